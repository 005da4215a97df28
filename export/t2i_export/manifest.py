"""`manifest.json`: the graph-set contract with the runtime (docs/manifest.md), written last.

`verify` re-checks a written set the way the runtime will: relative paths inside the set, files
present, sha256 matching.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import diffusers
import torch

from . import FORMAT_VERSION, OPSET, READABLE_FORMAT_VERSIONS, __version__
from .errors import ExportError
from .onnx_io import sha256_file
from .tokenizer import BUILTIN_SHA256

MANIFEST = "manifest.json"


def exporter_info() -> dict:
    # Local build tags (+cu132, +cpu) do not change CPU results: keep the manifest independent of them.
    return {
        "t2i_export": __version__,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "opset": OPSET,
    }


def build(
    *,
    family: str,
    name: str,
    text_encoders: list[dict],
    force_zeros_for_empty_prompt: bool,
    added_cond: dict,
    latent_channels: int,
    latent_downscale: int,
    size_multiple: int,
    default_size: list[int],
    scaling_factor: float,
    precision: str,
    vae_precision: str,
    scheduler: dict,
    residual_slots: list[dict],
    graphs: dict,
    adapters: list[dict],
    control_slots: list[dict] | None = None,
    controlnets: list[dict] | None = None,
    ip_adapter: dict | None = None,
    style_adapter: dict | None = None,
) -> dict:
    """The manifest, keys in the order of docs/manifest.md. `control_slots` and `controlnets` are
    written only for a set with ControlNets, `ip_adapter` and `style_adapter` only for a set with one (a
    set without stays byte for byte what it was)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "name": name,
        "exporter": exporter_info(),
        "precision": precision,
        "text_encoders": text_encoders,
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "added_cond": added_cond,
        "latent": {"channels": latent_channels, "downscale": latent_downscale},
        "size_multiple": size_multiple,
        "default_size": default_size,
        "vae": {"scaling_factor": scaling_factor, "precision": vae_precision},
        "scheduler": scheduler,
        "residual_slots": residual_slots,
        "graphs": graphs,
        "adapters": adapters,
    }
    if controlnets:
        manifest["control_slots"] = control_slots
        manifest["controlnets"] = controlnets
    if ip_adapter:
        manifest["ip_adapter"] = ip_adapter
    if style_adapter:
        manifest["style_adapter"] = style_adapter
    return manifest


def write(set_dir: Path, manifest: dict) -> Path:
    path = set_dir / MANIFEST
    tmp = set_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def listed_files(manifest: dict) -> list[tuple[str, str]]:
    """Every (path, sha256) the manifest refers to: graphs, their external data and INT8 variants, tokenizer
    files, the INT8 TensorRT calibration table."""
    encoders = manifest["text_encoders"]
    specs = [e["graph"] for e in encoders] + list(manifest["graphs"].values()) + [a["graph"] for a in manifest["adapters"]]
    specs += [c["graph"] for c in manifest.get("controlnets", [])]
    if "ip_adapter" in manifest:
        specs += [manifest["ip_adapter"]["image_encoder"], manifest["ip_adapter"]["image_projection"]]
    if "style_adapter" in manifest:
        specs += [manifest["style_adapter"]["style_encoder"], manifest["style_adapter"]["style_adapter"]]
    files = [(e["tokenizer"]["file"], e["tokenizer"]["sha256"]) for e in encoders if "file" in e["tokenizer"]]
    specs += [v for spec in specs for v in spec.get("variants", {}).values()]
    for spec in specs:
        files.append((spec["file"], spec["sha256"]))
        files.extend((d["file"], d["sha256"]) for d in spec["external_data"])
    if "int8_calibration" in manifest:
        table = manifest["int8_calibration"]["tensorrt_table"]
        files.append((table["file"], table["sha256"]))
    # Encoders may share one tokenizer file: list each file once.
    return list(dict.fromkeys(files))


def check_relative(path: str) -> None:
    p = PurePosixPath(path)
    if "\\" in path or p.is_absolute() or ".." in p.parts or not p.parts:
        raise ExportError(f"manifest path {path!r} must be relative, use '/', and stay inside the graph set")


def verify(set_dir: Path) -> dict:
    """Load and check `set_dir/manifest.json`; returns the manifest or raises ExportError."""
    path = set_dir / MANIFEST
    if not path.is_file():
        raise ExportError(f"{set_dir}: no {MANIFEST}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ExportError(
            f"{path}: format_version {manifest.get('format_version')} is not one of {list(READABLE_FORMAT_VERSIONS)}"
        )
    for rel, digest in listed_files(manifest):
        check_relative(rel)
        f = set_dir / rel
        if not f.is_file():
            raise ExportError(f"{path}: lists {rel} which is missing")
        got = sha256_file(f)
        if got != digest:
            raise ExportError(f"{path}: sha256 of {rel} is {got}, manifest says {digest}")
    for encoder in manifest["text_encoders"]:
        tok = encoder["tokenizer"]
        if "builtin" in tok and BUILTIN_SHA256.get(tok["builtin"]) != tok.get("sha256"):
            raise ExportError(f"{path}: {encoder['name']}'s built-in tokenizer {tok['builtin']!r} is not one this exporter knows")
    return manifest
