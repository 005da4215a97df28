"""Export a local diffusers SD 1.x pipeline directory (+ T2I-Adapter directories) to a graph set.

Everything is validated before anything heavy runs; the set is built in `OUT/.tmp-*` and moved into
`OUT` only when every graph exported, with `manifest.json` written last, so a directory with a
manifest is always a complete set.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, T2IAdapter, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import manifest as mf
from .adapter import check_name, condition_kind, export_adapter, match_slots
from .errors import ExportError
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, graph_spec, sha256_file
from .text_encoder import export_text_encoder
from .tokenizer import export_tokenizer, load_tokenizer
from .unet import check_sd1_unet, export_unet, residual_slots
from .vae import export_vae_decoder, vae_downscale

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
EXPECTED_CLASSES = {
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder": ("CLIPTextModel",),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


@dataclass
class Components:
    """An SD 1.x pipeline's parts, in fp32, eval mode."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict  # the checkpoint's scheduler_config.json, verbatim


def _variant(component_dir: Path) -> str | None:
    """Load the plain weights; fall back to an fp16-only checkpoint (upcast to fp32 on load)."""
    if any((component_dir / n).is_file() for n in WEIGHT_NAMES):
        return None
    if any((component_dir / n.replace(".", ".fp16.", 1)).is_file() for n in WEIGHT_NAMES):
        return "fp16"
    raise ExportError(f"{component_dir}: no weights file (expected one of {', '.join(WEIGHT_NAMES)})")


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ExportError(f"--model {model_dir}: not a directory (expected a diffusers SD 1.x pipeline directory)")
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"--model {model_dir}: no model_index.json (expected a diffusers pipeline directory)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for comp in COMPONENTS:
        if not (model_dir / comp).is_dir():
            raise ExportError(f"--model {model_dir}: missing component directory {comp}/")
        entry = index.get(comp)
        allowed = EXPECTED_CLASSES.get(comp)
        if allowed and (not isinstance(entry, list) or len(entry) != 2 or entry[1] not in allowed):
            raise ExportError(
                f"--model {model_dir}: model_index.json has {comp}={entry}, expected a class in {list(allowed)} (SD 1.x)"
            )
    if not (model_dir / "scheduler" / "scheduler_config.json").is_file():
        raise ExportError(f"--model {model_dir}: missing scheduler/scheduler_config.json")


def load_checkpoint(model_dir: Path) -> Components:
    check_model_dir(model_dir)
    te_dir, unet_dir, vae_dir = model_dir / "text_encoder", model_dir / "unet", model_dir / "vae"
    text_encoder = CLIPTextModel.from_pretrained(str(te_dir), dtype=torch.float32, variant=_variant(te_dir))
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32, variant=_variant(unet_dir))
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32, variant=_variant(vae_dir))
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return Components(
        tokenizer=load_tokenizer(model_dir / "tokenizer"),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=scheduler_config,
    )


def check_adapter_args(adapters: list[tuple[str, Path]]) -> None:
    seen = set()
    for name, path in adapters:
        check_name(name)
        if name in seen:
            raise ExportError(f"adapter name {name!r} is given twice")
        seen.add(name)
        if not path.is_dir():
            raise ExportError(f"--adapter {name}={path}: not a directory (expected a diffusers T2IAdapter directory)")
        if not (path / "config.json").is_file():
            raise ExportError(f"--adapter {name}={path}: no config.json (expected a diffusers T2IAdapter directory)")


def load_adapter(name: str, path: Path) -> T2IAdapter:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name") != "T2IAdapter":
        raise ExportError(f"--adapter {name}={path}: config.json is a {config.get('_class_name')!r}, expected 'T2IAdapter'")
    adapter = T2IAdapter.from_pretrained(str(path), torch_dtype=torch.float32, variant=_variant(path))
    return adapter.eval()


def export_pipeline(
    model_dir: Path,
    adapters: list[tuple[str, Path]],
    out_dir: Path,
    name: str | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """`python -m t2i_export pipeline`: load the directories, then `export_components`."""
    check_model_dir(model_dir)
    check_adapter_args(adapters)
    check_out_dir(out_dir)
    comps = load_checkpoint(model_dir)
    loaded = [(n, load_adapter(n, p)) for n, p in adapters]
    return export_components(comps, loaded, out_dir, name, external_data_threshold)


@dataclass(frozen=True)
class Geometry:
    latent_channels: int
    vae_downscale: int
    size_multiple: int
    default_size: list[int]  # [width, height]


def geometry(comps: Components) -> Geometry:
    unet, vae, te = comps.unet, comps.vae, comps.text_encoder
    check_sd1_unet(unet.config)
    if unet.config.in_channels != vae.config.latent_channels or unet.config.out_channels != unet.config.in_channels:
        raise ExportError(
            f"unet in/out channels {unet.config.in_channels}/{unet.config.out_channels} do not match the VAE's "
            f"latent_channels {vae.config.latent_channels}"
        )
    if unet.config.cross_attention_dim != te.config.hidden_size:
        raise ExportError(
            f"unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder hidden_size {te.config.hidden_size}"
        )
    vd = vae_downscale(vae)
    multiple = vd * 2 ** (len(unet.config.down_block_types) - 1)
    sample = unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
    default = [max(multiple, (w * vd) // multiple * multiple), max(multiple, (h * vd) // multiple * multiple)]
    return Geometry(vae.config.latent_channels, vd, multiple, default)


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir():
        entries = [e for e in out_dir.iterdir() if not e.name.startswith(".tmp-")]
        if entries and not (out_dir / mf.MANIFEST).is_file():
            raise ExportError(f"--out {out_dir}: not empty and not a graph set (no {mf.MANIFEST}); refusing to write into it")


def export_components(
    comps: Components,
    adapters: list[tuple[str, T2IAdapter]],
    out_dir: Path,
    name: str | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Validate, export every graph into `out_dir/.tmp-*`, then move the set into `out_dir`."""
    for n, _ in adapters:
        check_name(n)
    if len({n for n, _ in adapters}) != len(adapters):
        raise ExportError("adapter names must be unique")
    check_out_dir(out_dir)
    geo = geometry(comps)
    slots = residual_slots(comps.unet.config)
    fed = {n: match_slots(n, a, slots, geo.vae_downscale, geo.size_multiple) for n, a in adapters}
    seq_len = comps.tokenizer.model_max_length

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        tok_path = tmp / "tokenizer.json"
        tok_entry = export_tokenizer(comps.tokenizer, tok_path, comps.text_encoder.config.max_position_embeddings)
        tokenizer = {"file": "tokenizer.json", "sha256": sha256_file(tok_path), **tok_entry}

        latent_multiple = geo.size_multiple // geo.vae_downscale
        graphs = {
            "text_encoder": export_text_encoder(comps.text_encoder, seq_len, tmp / "text_encoder.onnx", external_data_threshold),
            "unet": export_unet(comps.unet, slots, seq_len, tmp / "unet.onnx", latent_multiple, external_data_threshold),
            "vae_decoder": export_vae_decoder(
                comps.vae, tmp / "vae_decoder.onnx", (latent_multiple, 2 * latent_multiple), external_data_threshold
            ),
        }
        adapter_entries = []
        for n, a in adapters:
            files = export_adapter(a, slots, fed[n], tmp / f"adapter_{n}.onnx", geo.size_multiple, external_data_threshold)
            adapter_entries.append(
                {
                    "name": n,
                    "adapter_type": a.config.adapter_type,
                    "condition": condition_kind(a),
                    "in_channels": a.config.in_channels,
                    "downscale_factor": a.total_downscale_factor,
                    "residual_slots": fed[n],
                    "graph": graph_spec(tmp, files),
                }
            )
        manifest = mf.build(
            name=name or out_dir.resolve().name,
            tokenizer=tokenizer,
            latent_channels=geo.latent_channels,
            latent_downscale=geo.vae_downscale,
            size_multiple=geo.size_multiple,
            default_size=geo.default_size,
            scaling_factor=comps.vae.config.scaling_factor,
            scheduler=comps.scheduler_config,
            residual_slots=[s.manifest() for s in slots],
            graphs={k: graph_spec(tmp, files) for k, files in graphs.items()},
            adapters=adapter_entries,
        )
        _install(tmp, out_dir, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _install(tmp: Path, out_dir: Path, manifest: dict) -> None:
    """Replace whatever set `out_dir` held by the one built in `tmp`; the manifest goes in last."""
    old = out_dir / mf.MANIFEST
    if old.is_file():
        try:
            stale = [rel for rel, _ in mf.listed_files(json.loads(old.read_text(encoding="utf-8")))]
        except (ValueError, KeyError, TypeError):
            stale = []
        old.unlink()  # from here on `out_dir` does not look like a complete set
        for rel in stale:
            mf.check_relative(rel)
            (out_dir / rel).unlink(missing_ok=True)
    for rel, _ in mf.listed_files(manifest):
        os.replace(tmp / rel, out_dir / rel)
    mf.write(out_dir, manifest)
