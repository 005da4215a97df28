"""Shared ONNX export step: one torch module -> one `.onnx` file (+ one `.onnx.data` file when large).

Every graph goes through `export_graph`, so all graphs share the same exporter settings: the legacy
TorchScript exporter (`dynamo=False`), opset 17, constant folding, named dynamic axes. The graphs must
also run in tract (pure-Rust ONNX), so nothing here asks for contrib/custom ops.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx
import torch

from . import OPSET
from .precision import HalfGraph, check_precision, half_weights

# Protobuf refuses messages >= 2 GiB; keep a margin for the graph structure itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
}


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: its name and `dims` (ints fixed, strings symbolic)."""

    name: str
    dims: Sequence[int | str]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_graph(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[TensorIO],
    outputs: Sequence[TensorIO],
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    precision: str = "fp32",
    keep_float32: Sequence[str] = (),
) -> list[Path]:
    """Export `module(*args)` to `path`; returns the files written (the graph, then its external data).

    Symbolic dims of `inputs`/`outputs` become ONNX `dynamic_axes` with those exact names. When the
    module's weights exceed `external_data_threshold` bytes they go to one `<file>.data` beside it.
    `precision` "fp16" traces the module with fp16 weights (`precision.HalfGraph`); the inputs named
    in `keep_float32` reach it in float32, as in diffusers' fp16 pipelines.
    """
    check_precision(precision, f"{path.name}: precision")
    module = module.eval()
    half = precision == "fp16"
    with half_weights(module) if half else nullcontext():
        if half:
            module = HalfGraph(module, [i for i, io in enumerate(inputs) if io.name in keep_float32])
        return _export(module, args, path, inputs, outputs, external_data_threshold)


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[TensorIO],
    outputs: Sequence[TensorIO],
    external_data_threshold: int,
) -> list[Path]:
    dynamic_axes = {
        io.name: {axis: dim for axis, dim in enumerate(io.dims) if isinstance(dim, str)}
        for io in list(inputs) + list(outputs)
    }
    external = module_bytes(module) > external_data_threshold
    with tempfile.TemporaryDirectory(prefix="t2i-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings about shape-dependent Python branches in diffusers are expected: the
            # traced branch is the one valid for all sizes that are multiples of `size_multiple`.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,
                input_names=[io.name for io in inputs],
                output_names=[io.name for io in outputs],
                dynamic_axes=dynamic_axes,
            )
        # Re-save through `onnx` so that a large graph's weights land in exactly one data file with a
        # relative location (the legacy exporter writes one file per tensor), and so that the file
        # layout does not depend on how torch chose to write it. Large weights are streamed tensor by
        # tensor rather than loaded: an SDXL UNet is 10 GB in fp32, and torch already holds a copy.
        model = onnx.load(str(raw), load_external_data=False)
        _check_io(model, inputs, outputs)
        _set_dims(model.graph.input, inputs)
        _set_dims(model.graph.output, outputs)
        if external:
            data_name = path.name + ".data"
            _gather_external_data(model, Path(tmp), path.parent / data_name)
            onnx.save_model(model, str(path))
            written = [path, path.parent / data_name]
            # give the data file the graph file's permissions.
            os.chmod(written[1], path.stat().st_mode & 0o777)
        else:
            onnx.load_external_data_for_model(model, tmp)
            onnx.save_model(model, str(path))
            written = [path]
        del model
    onnx.checker.check_model(str(path))
    return written


def _gather_external_data(model: onnx.ModelProto, src_dir: Path, data_path: Path) -> None:
    """Move every initializer's bytes into `data_path` (external data, 4 KiB-aligned offsets, as
    onnx's own writer aligns them), one tensor at a time; small tensors stay inline."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    with open(data_path, "wb") as out:
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with open(src_dir / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    raw = f.read(info.length) if info.length else f.read()
                tensor.ClearField("external_data")
                tensor.data_location = onnx.TensorProto.DEFAULT
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                raw = tensor.raw_data
                tensor.ClearField("raw_data")
            else:
                continue
            offset = out.tell()
            pad = -offset % 4096
            out.write(b"\0" * pad)
            offset += pad
            out.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del raw


def _check_io(model: onnx.ModelProto, inputs: Sequence[TensorIO], outputs: Sequence[TensorIO]) -> None:
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    want_in = [io.name for io in inputs]
    want_out = [io.name for io in outputs]
    # The legacy exporter silently drops inputs the traced graph does not use: that would be a bug here.
    if got_in != want_in or got_out != want_out:
        raise RuntimeError(f"exported graph IO {got_in} -> {got_out} differs from the contract {want_in} -> {want_out}")


def _set_dims(values, ios: Sequence[TensorIO]) -> None:
    """Write the declared dims into the graph's IO: the exporter's shape inference sometimes invents
    names (e.g. `LayerNormalizationlast_hidden_state_dim_1` for a dim that is always 77)."""
    for v, io in zip(values, ios):
        shape = v.type.tensor_type.shape
        if len(shape.dim) != len(io.dims):
            raise RuntimeError(f"{io.name}: exported rank {len(shape.dim)} != declared {list(io.dims)}")
        for d, want in zip(shape.dim, io.dims):
            if isinstance(want, str):
                d.dim_param = want
            else:
                if d.HasField("dim_value") and d.dim_value != want:
                    raise RuntimeError(f"{io.name}: exported dim {d.dim_value} != declared {want}")
                d.dim_value = want


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """The `inputs`/`outputs` of a GraphSpec, read back from the ONNX file itself."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            if tt.elem_type not in _ONNX_DTYPES:
                raise RuntimeError(f"{path.name}: {v.name} has unsupported ONNX element type {tt.elem_type}")
            dims: list[int | str] = []
            for d in tt.shape.dim:
                if d.HasField("dim_param"):
                    dims.append(d.dim_param)
                elif d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    raise RuntimeError(f"{path.name}: {v.name} has an unnamed dynamic dimension")
            out.append({"name": v.name, "dtype": _ONNX_DTYPES[tt.elem_type], "dims": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)


# A GraphSpec's `batch` (format 3): what the runtime stacks along a graph's "batch" axis.
# "prompts": one row per distinct prompt text (the text encoders: [negative,] positive);
# "guided_samples": CFG's [unconditional; conditional] halves of n_samples each, or n_samples (unet);
# "samples": n_samples (vae_decoder); "one": a single row, its result shared by every sample and both
# CFG halves (adapters: one condition image; vae_encoder: one init or masked image);
# "images": an IP-Adapter's image rows, [negative, positive] with guidance, [positive] without (image_encoder,
# image_projection).
BATCH_KINDS = ("prompts", "guided_samples", "samples", "one", "images")


def graph_spec(set_dir: Path, files: list[Path], precision: str, batch: str) -> dict:
    """A manifest GraphSpec for a graph written by `export_graph` into `set_dir` with `precision`,
    run by the runtime at batch `batch` (`BATCH_KINDS`)."""
    if batch not in BATCH_KINDS:
        raise ValueError(f"batch {batch!r}: expected one of {BATCH_KINDS}")
    graph, data = files[0], files[1:]
    inputs, outputs = graph_io(graph)
    return {
        "file": graph.relative_to(set_dir).as_posix(),
        "sha256": sha256_file(graph),
        "external_data": [{"file": d.relative_to(set_dir).as_posix(), "sha256": sha256_file(d)} for d in data],
        "precision": precision,  # compute precision; the IO is float32 (int64 ids) either way
        "batch": batch,
        "inputs": inputs,
        "outputs": outputs,
    }
