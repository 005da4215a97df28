"""Export a local diffusers SD 1.x, SD 2.x or SDXL pipeline directory (+ T2I-Adapters: diffusers directories or
TencentARC's original .pth files; ControlNets; an h94-layout IP-Adapter) to a graph set.

One code path for every family: what differs (one or two text encoders and which of their outputs the
UNet sees, SDXL's added conditioning, an extra mid-block residual slot for T2I-Adapter-XL) is derived
from the checkpoint's configs and written into the manifest, which is all the runtime reads.

Everything is validated before anything heavy runs; the set is built in `OUT/.tmp-*` and moved into
`OUT` only when every graph exported, with `manifest.json` written last, so a directory with a
manifest is always a complete set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, T2IAdapter, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import manifest as mf
from .adapter import check_name, condition_kind, export_adapter, feature_count, match_slots
from .compact import compact_graph
from .controlnet import check_controlnet, check_controlnet_dir, control_slots, export_controlnet, guess_mode_scales
from .errors import ExportError
from .ip_adapter import IPAdapter, UNetIPInputs, export_image_encoder, export_image_projection, load_ip_adapter, manifest_entry
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, graph_spec, sha256_file
from .original_adapter import SUFFIXES as ORIGINAL_SUFFIXES, is_original_checkpoint, load_original_adapter
from .precision import check_precision
from .style_adapter import Style, export_style_encoder, export_style_tokens, load_style_adapter
from .style_adapter import check_unet_fit as check_style_fit
from .style_adapter import manifest_entry as style_manifest_entry
from .text_encoder import POOLED_OUTPUT, EncoderUse, export_text_encoder
from .tokenizer import export_tokenizer, load_tokenizer
from .unet import check_unet, export_unet, has_text_time, pooled_dim, residual_slots
from .vae import check_vae_precision, export_vae_decoder, export_vae_encoder, needs_fp32, vae_downscale

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
XL_COMPONENTS = ("tokenizer_2", "text_encoder_2")
EXPECTED_CLASSES = {
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")
# SDXL's add_time_ids, in diffusers' order (`_get_add_time_ids`): each a (height, width) or (top, left) pair.
TIME_IDS = ["original_size", "crops_coords_top_left", "target_size"]
# A set with a style adapter: the UNet's encoder_hidden_states length is this dynamic dim (text + style tokens).
CONTEXT_DIM = "context_length"


@dataclass
class TextEncoderPart:
    """One text encoder, its tokenizer and which of its outputs the pipeline uses."""

    name: str  # graph name: text_encoder, text_encoder_2
    tokenizer: CLIPTokenizer
    model: CLIPTextModel | CLIPTextModelWithProjection
    use: EncoderUse


@dataclass
class Components:
    """A pipeline's parts, in fp32, eval mode, and the precision to export them in."""

    text_encoders: list[TextEncoderPart]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict  # the checkpoint's scheduler_config.json, verbatim
    # SDXL pipelines' `force_zeros_for_empty_prompt`: no negative prompt -> zero embeddings.
    force_zeros_for_empty_prompt: bool = False
    precision: str = "fp32"  # the set's requested compute precision: fp32 | fp16
    vae_precision: str | None = None  # the VAE graphs', when given explicitly (else see `vae_graphs_precision`)

    @classmethod
    def single_encoder(cls, tokenizer, text_encoder, unet, vae, scheduler_config, **kw) -> "Components":
        """SD 1.x / 2.x: one encoder, its last hidden state (`StableDiffusionPipeline.encode_prompt`)."""
        part = TextEncoderPart("text_encoder", tokenizer, text_encoder, EncoderUse("last", False))
        return cls([part], unet, vae, scheduler_config, **kw)

    @classmethod
    def dual_encoder(cls, tokenizers, text_encoders, unet, vae, scheduler_config, **kw) -> "Components":
        """SDXL (`StableDiffusionXLAdapterPipeline.encode_prompt`): both encoders' penultimate hidden
        states, and the second one's pooled projection."""
        parts = [
            TextEncoderPart("text_encoder", tokenizers[0], text_encoders[0], EncoderUse("penultimate", False)),
            TextEncoderPart("text_encoder_2", tokenizers[1], text_encoders[1], EncoderUse("penultimate", True)),
        ]
        return cls(parts, unet, vae, scheduler_config, **kw)


def family(comps: Components) -> str:
    """Informational label for the manifest; the runtime never branches on it."""
    if has_text_time(comps.unet.config):
        return "sdxl"
    # SD 2.x's OpenCLIP ViT-H uses GELU; OpenAI CLIP (SD 1.x) quick_gelu.
    return "sd2" if comps.text_encoders[0].model.config.hidden_act == "gelu" else "sd1"


def _variant(component_dir: Path) -> str | None:
    """Load the plain weights; fall back to an fp16-only checkpoint (upcast to fp32 on load)."""
    if any((component_dir / n).is_file() for n in WEIGHT_NAMES):
        return None
    if any((component_dir / n.replace(".", ".fp16.", 1)).is_file() for n in WEIGHT_NAMES):
        return "fp16"
    raise ExportError(f"{component_dir}: no weights file (expected one of {', '.join(WEIGHT_NAMES)})")


def _index(model_dir: Path) -> dict:
    return json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ExportError(f"--model {model_dir}: not a directory (expected a diffusers SD 1.x/2.x/XL pipeline directory)")
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"--model {model_dir}: no model_index.json (expected a diffusers pipeline directory)")
    index = _index(model_dir)
    xl = index.get("text_encoder_2") not in (None, [None, None])
    for comp in COMPONENTS + (XL_COMPONENTS if xl else ()):
        if not (model_dir / comp).is_dir():
            raise ExportError(f"--model {model_dir}: missing component directory {comp}/")
        entry = index.get(comp)
        allowed = EXPECTED_CLASSES.get(comp)
        if allowed and (not isinstance(entry, list) or len(entry) != 2 or entry[1] not in allowed):
            raise ExportError(
                f"--model {model_dir}: model_index.json has {comp}={entry}, expected a class in {list(allowed)} "
                "(SD 1.x/2.x/XL base; SDXL refiners are not supported)"
            )
    if not (model_dir / "scheduler" / "scheduler_config.json").is_file():
        raise ExportError(f"--model {model_dir}: missing scheduler/scheduler_config.json")


def check_vae_dir(vae_dir: Path) -> None:
    if not (vae_dir / "config.json").is_file():
        raise ExportError(f"--vae {vae_dir}: no config.json (expected a diffusers AutoencoderKL directory)")
    config = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("_class_name") != "AutoencoderKL":
        raise ExportError(f"--vae {vae_dir}: config.json is a {config.get('_class_name')!r}, expected 'AutoencoderKL'")


def load_checkpoint(
    model_dir: Path, vae_dir: Path | None = None, vae_precision: str | None = None, precision: str = "fp32"
) -> Components:
    check_model_dir(model_dir)
    index = _index(model_dir)
    unet_dir = model_dir / "unet"
    vae_dir = vae_dir or model_dir / "vae"
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32, variant=_variant(unet_dir)).eval()
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32, variant=_variant(vae_dir)).eval()
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))

    def encoder(sub: str, cls):
        d = model_dir / sub
        return cls.from_pretrained(str(d), dtype=torch.float32, variant=_variant(d)).eval()

    common = dict(unet=unet, vae=vae, scheduler_config=scheduler_config, precision=precision, vae_precision=vae_precision)
    if index.get("text_encoder_2") not in (None, [None, None]):
        return Components.dual_encoder(
            [load_tokenizer(model_dir / "tokenizer"), load_tokenizer(model_dir / "tokenizer_2")],
            [encoder("text_encoder", CLIPTextModel), encoder("text_encoder_2", CLIPTextModelWithProjection)],
            # StableDiffusionXL*Pipeline.__init__ defaults it to True.
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            **common,
        )
    return Components.single_encoder(load_tokenizer(model_dir / "tokenizer"), encoder("text_encoder", CLIPTextModel), **common)


def check_adapter_args(adapters: list[tuple[str, Path]]) -> None:
    seen = set()
    for name, path in adapters:
        check_name(name)
        if name in seen:
            raise ExportError(f"adapter name {name!r} is given twice")
        seen.add(name)
        if is_original_checkpoint(path):
            continue  # read and checked by `load_original_adapter`
        if path.is_file():
            raise ExportError(
                f"--adapter {name}={path}: a file but not {'/'.join(ORIGINAL_SUFFIXES)} "
                "(expected a diffusers T2IAdapter directory or TencentARC's original .pth)"
            )
        if not path.is_dir():
            raise ExportError(
                f"--adapter {name}={path}: not a directory or checkpoint file "
                "(expected a diffusers T2IAdapter directory or TencentARC's original .pth)"
            )
        if not (path / "config.json").is_file():
            raise ExportError(f"--adapter {name}={path}: no config.json (expected a diffusers T2IAdapter directory)")


def load_adapter(name: str, path: Path) -> T2IAdapter:
    if is_original_checkpoint(path):
        return load_original_adapter(name, path)
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
    vae_dir: Path | None = None,
    vae_precision: str | None = None,
    precision: str = "fp32",
    compact_weights: bool = False,
    strip_names: bool = False,
    controlnets: list[tuple[str, Path]] = (),
    ip_adapter: Path | None = None,
    image_encoder: Path | None = None,
    style_adapter: Path | None = None,
    style_encoder: Path | None = None,
) -> Path:
    """`python -m t2i_export pipeline`: load the directories, then `export_components`."""
    check_model_dir(model_dir)
    if vae_dir is not None:
        check_vae_dir(vae_dir)
    check_precision(precision, "--precision")
    if vae_precision is not None:
        check_precision(vae_precision, "--vae-precision")
    check_adapter_args(adapters)
    check_names([n for n, _ in adapters], [n for n, _ in controlnets])
    for n, p in controlnets:
        check_controlnet_dir(n, p)
    check_out_dir(out_dir)
    if image_encoder is not None and ip_adapter is None:
        raise ExportError("--image-encoder is only used with --ip-adapter")
    if style_encoder is not None and style_adapter is None:
        raise ExportError("--style-encoder is only used with --style-adapter")
    check_style_args(style_adapter, precision, controlnets)
    ip = load_ip_adapter(ip_adapter, image_encoder, model_dir) if ip_adapter is not None else None
    style = load_style_adapter(style_adapter, style_encoder) if style_adapter is not None else None
    comps = load_checkpoint(model_dir, vae_dir, vae_precision, precision)
    loaded = [(n, load_adapter(n, p)) for n, p in adapters]
    nets = [(n, ControlNetModel.from_pretrained(str(p), torch_dtype=torch.float32, variant=_variant(p)).eval())
            for n, p in controlnets]
    return export_components(comps, loaded, out_dir, name, external_data_threshold, compact_weights, strip_names, nets, ip, style)


def check_style_args(style_adapter, precision: str, controlnets) -> None:
    """What the style adapter's export does not cover yet, refused before anything loads."""
    if style_adapter is None:
        return
    if precision != "fp32":
        # The original's LayerNorm computes in float32 on fp16 inputs; its fp16 graph is not verified yet.
        raise ExportError("--style-adapter: only --precision fp32 is supported for now")
    if controlnets:
        # TencentARC's style adapter never ran beside a ControlNet: what context a ControlNet should see is undefined.
        raise ExportError("--style-adapter: cannot be combined with --controlnet (the original defines no such combination)")


def check_names(adapters: list[str], controlnets: list[str]) -> None:
    """Adapter and ControlNet names: valid and each unique within its kind."""
    for kind, names in (("adapter", adapters), ("controlnet", controlnets)):
        for n in names:
            check_name(n, kind)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ExportError(f"{kind} name {twice[0]!r} is given twice")


@dataclass(frozen=True)
class Geometry:
    latent_channels: int
    vae_downscale: int
    size_multiple: int
    default_size: list[int]  # [width, height]


def geometry(comps: Components) -> Geometry:
    unet, vae = comps.unet, comps.vae
    check_unet(unet.config)
    latent = vae.config.latent_channels
    # An inpainting UNet (stable-diffusion-inpainting) takes cat[latents, mask, masked_image_latents]:
    # 2C + 1 channels in, C out (StableDiffusionInpaintPipeline checks the same sum).
    if unet.config.in_channels not in (latent, 2 * latent + 1) or unet.config.out_channels != latent:
        raise ExportError(
            f"unet in/out channels {unet.config.in_channels}/{unet.config.out_channels} do not match the VAE's "
            f"latent_channels {latent} (expected {latent}/{latent}, or {2 * latent + 1}/{latent} for an inpainting UNet)"
        )
    hidden = sum(p.model.config.hidden_size for p in comps.text_encoders)
    if unet.config.cross_attention_dim != hidden:
        raise ExportError(
            f"unet cross_attention_dim {unet.config.cross_attention_dim} != the text encoders' hidden sizes "
            f"{' + '.join(str(p.model.config.hidden_size) for p in comps.text_encoders)}"
        )
    if has_text_time(unet.config):
        pooled = [p for p in comps.text_encoders if p.use.pooled]
        if len(pooled) != 1 or pooled[0].model.config.projection_dim != pooled_dim(unet.config):
            raise ExportError(
                f"unet: added conditioning expects text_embeds of {pooled_dim(unet.config)} values, but the text "
                "encoders give no matching pooled projection (an SDXL UNet needs text_encoder_2)"
            )
    elif any(p.use.pooled for p in comps.text_encoders):
        raise ExportError("unet: takes no added conditioning (text_embeds/time_ids) but the pipeline has two text encoders")
    lengths = {p.tokenizer.model_max_length for p in comps.text_encoders}
    if len(lengths) != 1:
        raise ExportError(f"tokenizers disagree on model_max_length ({sorted(lengths)}); their embeddings cannot be concatenated")
    vd = vae_downscale(vae)
    multiple = vd * 2 ** (len(unet.config.down_block_types) - 1)
    sample = unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
    default = [max(multiple, (w * vd) // multiple * multiple), max(multiple, (h * vd) // multiple * multiple)]
    return Geometry(vae.config.latent_channels, vd, multiple, default)


def vae_graphs_precision(comps: Components) -> tuple[str, str | None]:
    """The VAE graphs' precision (decoder and encoder alike), and a one-line notice when they stay fp32
    in an fp16 set.

    It follows the set's precision unless given explicitly (`--vae-precision`), except that a VAE
    diffusers upcasts (`force_upcast` in an SDXL pipeline: SDXL's original VAE overflows in fp16)
    stays fp32.
    """
    if comps.vae_precision is not None:
        return comps.vae_precision, None
    if comps.precision == "fp16" and needs_fp32(comps.vae, has_text_time(comps.unet.config)):
        return "fp32", (
            "note: vae_decoder and vae_encoder stay fp32: this VAE's config has force_upcast=true (it overflows in fp16, "
            "like SDXL's original VAE); for fp16 VAE graphs pass an fp16-safe VAE with --vae DIR (e.g. "
            "madebyollin/sdxl-vae-fp16-fix)"
        )
    return comps.precision, None


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
    compact_weights: bool = False,
    strip_names: bool = False,
    controlnets: list[tuple[str, ControlNetModel]] = (),
    ip_adapter: IPAdapter | None = None,
    style: Style | None = None,
) -> Path:
    """Validate, export every graph into `out_dir/.tmp-*`, then move the set into `out_dir`.

    `compact_weights`: store the graphs' weights losslessly in fewer bytes; `strip_names`: drop the
    graphs' debug names (both in compact.py). `ip_adapter`: adds the image_encoder and image_projection
    graphs and the UNet's ip_tokens/ip_scale inputs (ip_adapter.py). `style`: adds the style_encoder and
    style_adapter graphs, and the UNet's encoder_hidden_states gets a dynamic length (style_adapter.py).
    """
    check_names([n for n, _ in adapters], [n for n, _ in controlnets])
    check_out_dir(out_dir)
    check_precision(comps.precision, "precision")
    vae_precision, notice = vae_graphs_precision(comps)
    check_vae_precision(comps.vae, vae_precision, has_text_time(comps.unet.config))
    geo = geometry(comps)
    features = max((feature_count(a, geo.size_multiple) for _, a in adapters), default=0)
    slots = residual_slots(comps.unet.config, features)
    fed = {n: match_slots(n, a, slots, geo.vae_downscale, geo.size_multiple) for n, a in adapters}
    control = control_slots(comps.unet.config) if controlnets else []
    for n, c in controlnets:
        check_controlnet(n, c, comps.unet.config, control, geo.vae_downscale, geo.size_multiple)
    seq_len = comps.text_encoders[0].tokenizer.model_max_length
    ip_inputs = UNetIPInputs(ip_adapter, comps.unet) if ip_adapter is not None else None
    sequence = None
    if style is not None:
        check_style_args(style.path, comps.precision, controlnets)
        check_style_fit(style, comps.unet.config.cross_attention_dim)
        # Traced at text + one image's tokens (85 for SD 1.x), so that no length is baked in as 77.
        sequence = (CONTEXT_DIM, seq_len + style.num_tokens)

    if notice:
        print(notice, file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()

    def spec(files: list[Path], precision: str, batch: str) -> dict:
        if (compact_weights or strip_names) and len(files) == 1:  # a graph with external data is large: left as it is
            compact_graph(files[0], weights=compact_weights, names=strip_names)
        return graph_spec(tmp, files, precision, batch)
    try:
        latent_multiple = geo.size_multiple // geo.vae_downscale
        encoders = []
        for i, part in enumerate(comps.text_encoders):
            tok_entry = _write_tokenizer(tmp, part, i, encoders)
            files = export_text_encoder(
                part.model, seq_len, tmp / f"{part.name}.onnx", external_data_threshold, part.use, comps.precision
            )
            encoders.append(
                {
                    "name": part.name,
                    "tokenizer": tok_entry,
                    "hidden_output": part.use.hidden_output,
                    "pooled_output": POOLED_OUTPUT if part.use.pooled else None,
                    "graph": spec(files, comps.precision, "prompts"),
                }
            )
        added_cond = {}
        if has_text_time(comps.unet.config):
            added_cond = {"text_embeds": next(p.name for p in comps.text_encoders if p.use.pooled), "time_ids": TIME_IDS}
        unet_file = tmp / _unet_file(comps)
        latent_hw = (latent_multiple, 2 * latent_multiple)
        graphs = {
            "unet": spec(
                export_unet(
                    comps.unet, slots, seq_len, unet_file, latent_multiple, external_data_threshold, comps.precision, control,
                    ip_inputs, sequence,
                ),
                comps.precision,
                "guided_samples",
            ),
            "vae_decoder": spec(
                export_vae_decoder(comps.vae, tmp / "vae_decoder.onnx", latent_hw, external_data_threshold, vae_precision),
                vae_precision,
                "samples",
            ),
            # img2img and inpainting encode one image (init or masked) and share its sample across
            # n_samples (StableDiffusionImg2ImgPipeline.prepare_latents encodes the image once).
            "vae_encoder": spec(
                export_vae_encoder(comps.vae, tmp / "vae_encoder.onnx", latent_hw, external_data_threshold, vae_precision),
                vae_precision,
                "one",
            ),
        }
        adapter_entries = []
        for n, a in adapters:
            files = export_adapter(
                a, slots, fed[n], tmp / f"adapter_{n}.onnx", geo.size_multiple, external_data_threshold, comps.precision
            )
            adapter_entries.append(
                {
                    "name": n,
                    "adapter_type": a.config.adapter_type,
                    "condition": condition_kind(a),
                    "in_channels": a.config.in_channels,
                    "downscale_factor": a.total_downscale_factor,
                    "residual_slots": fed[n],
                    "graph": spec(files, comps.precision, "one"),
                }
            )
        controlnet_entries = []
        for n, c in controlnets:
            files = export_controlnet(
                c, comps.unet.config, control, seq_len, tmp / f"controlnet_{n}.onnx", latent_multiple, geo.vae_downscale,
                external_data_threshold, comps.precision,
            )
            controlnet_entries.append(
                {
                    "name": n,
                    "conditioning_channels": c.config.conditioning_channels,
                    "guess_mode_scales": guess_mode_scales(control),
                    "graph": spec(files, comps.precision, "guided_samples"),
                }
            )
        ip_entry = None
        if ip_adapter is not None:
            # [negative,] positive image rows (batch "images"); see ip_adapter.py for the negative's semantics.
            ip_entry = manifest_entry(
                ip_adapter,
                spec(export_image_encoder(ip_adapter, tmp / "image_encoder.onnx", external_data_threshold, comps.precision),
                     comps.precision, "images"),
                spec(export_image_projection(ip_adapter, comps.unet, tmp / "image_projection.onnx", external_data_threshold,
                                             comps.precision), comps.precision, "images"),
            )
        style_entry = None
        if style is not None:
            # One row per style image (their tokens are weighted and concatenated afterwards, style_adapter.py).
            style_entry = style_manifest_entry(
                style, seq_len, CONTEXT_DIM,
                spec(export_style_encoder(style, tmp / "style_encoder.onnx", external_data_threshold, comps.precision),
                     comps.precision, "images"),
                spec(export_style_tokens(style, tmp / "style_adapter.onnx", external_data_threshold, comps.precision),
                     comps.precision, "images"),
            )
        manifest = mf.build(
            family=family(comps),
            name=name or out_dir.resolve().name,
            text_encoders=encoders,
            force_zeros_for_empty_prompt=comps.force_zeros_for_empty_prompt,
            added_cond=added_cond,
            latent_channels=geo.latent_channels,
            latent_downscale=geo.vae_downscale,
            size_multiple=geo.size_multiple,
            default_size=geo.default_size,
            scaling_factor=comps.vae.config.scaling_factor,
            precision=comps.precision,
            vae_precision=vae_precision,
            scheduler=comps.scheduler_config,
            residual_slots=[s.manifest() for s in slots],
            graphs=graphs,
            adapters=adapter_entries,
            control_slots=[s.manifest() for s in control],
            controlnets=controlnet_entries,
            ip_adapter=ip_entry,
            style_adapter=style_entry,
        )
        _install(tmp, out_dir, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _unet_file(comps: Components) -> str:
    # `t2i-rt run --graph path/to/unet_xl.onnx` names the SDXL set by its UNet; the name is only a
    # convenience for people, the runtime reads the manifest.
    return "unet_xl.onnx" if family(comps) == "sdxl" else "unet.onnx"


def _write_tokenizer(tmp: Path, part: TextEncoderPart, index: int, previous: list[dict]) -> dict:
    """A built-in tokenizer, or `tokenizer.json.gz` (`tokenizer_2.json.gz`, ...); an encoder whose
    tokenizer file would be identical to an earlier one's shares that file."""
    file = "tokenizer.json.gz" if index == 0 else f"tokenizer_{index + 1}.json.gz"
    entry = export_tokenizer(part.tokenizer, tmp / file, part.model.config.max_position_embeddings)
    if "builtin" in entry:
        return entry
    digest = sha256_file(tmp / file)
    for prev in previous:
        if prev["tokenizer"]["sha256"] == digest:
            (tmp / file).unlink()
            file = prev["tokenizer"]["file"]
            break
    return {"file": file, "sha256": digest, **entry}


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
