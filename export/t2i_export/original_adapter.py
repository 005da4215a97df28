"""TencentARC's original T2I-Adapter checkpoints (`t2iadapter_*_sd14v1.pth`, `*_sd15v2.pth`) as a diffusers `T2IAdapter`.

The original networks are `Adapter` and `Adapter_light` in TencentARC/T2I-Adapter
`ldm/modules/encoders/adapter.py`. Every released full adapter is built as `Adapter(cin=64 * c,
channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1, sk=True, use_conv=False)` and the color adapter as
`Adapter_light(cin=64 * 3, channels=[320, 640, 1280, 1280], nums_rb=4)`: with those arguments they are
diffusers' `FullAdapter` and `LightAdapter` (diffusers/models/adapter.py) under other module names, which
is what diffusers' scripts/convert_original_t2i_adapter.py relies on. Here the sizes are read from the
weights instead of assumed, the key map is derived per key, and the result must fill the diffusers
module exactly (every key, every shape), so a checkpoint of another layout is refused, not half-loaded.

One difference remains in the arithmetic: the originals' 2x average pooling floors odd sizes, diffusers'
(`ceil_mode=True`) rounds them up. Feature maps the exporter accepts have even sizes, where both agree.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from diffusers import T2IAdapter

from .errors import ExportError

SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
# Both originals start with nn.PixelUnshuffle(8): conv inputs have 8 * 8 channels per image channel.
DOWNSCALE = 8
# `Adapter` keeps its stages in one flat list (`body.{stage * nums_rb + block}`), so the split into
# stages is not in the weights; TencentARC builds it with one stage per SD UNet down block, always 4.
FULL_STAGES = 4

_FULL_BODY = re.compile(r"body\.(\d+)\.(in_conv|block1|block2)\.(weight|bias)")
_LIGHT_CONV = re.compile(r"body\.(\d+)\.(in_conv|out_conv)\.(weight|bias)")
_LIGHT_RESNET = re.compile(r"body\.(\d+)\.body\.(\d+)\.(block1|block2)\.(weight|bias)")
_EXPECTED = (
    "expected TencentARC's Adapter (conv_in.*, body.N.block1.*) or Adapter_light "
    "(body.N.in_conv.*, body.N.body.M.block1.*) state dict"
)


def is_original_checkpoint(path: Path) -> bool:
    """A file with a checkpoint suffix (a diffusers adapter is a directory)."""
    return path.is_file() and path.suffix.lower() in SUFFIXES


def full_key(key: str, num_res_blocks: int) -> str | None:
    """`Adapter` key -> `T2IAdapter(adapter_type="full_adapter")` key, None if it has no counterpart.

    `body.{k}` is block `k % nrb` of stage `k // nrb`; only a stage's first block can carry the 1x1
    `in_conv` (when the channel count changes), which diffusers keeps on the stage (`AdapterBlock`).
    """
    if key in ("conv_in.weight", "conv_in.bias"):
        return f"adapter.{key}"
    m = _FULL_BODY.fullmatch(key)
    if not m:
        return None
    k, part, param = int(m[1]), m[2], m[3]
    stage, block = divmod(k, num_res_blocks)
    if part == "in_conv":
        return f"adapter.body.{stage}.in_conv.{param}" if block == 0 else None
    return f"adapter.body.{stage}.resnets.{block}.{part}.{param}"


def light_key(key: str) -> str | None:
    """`Adapter_light` key -> `T2IAdapter(adapter_type="light_adapter")` key, None if it has no counterpart.

    Each `extractor` (`body.{i}`) is a `LightAdapterBlock`; its `body` Sequential is `resnets`.
    """
    m = _LIGHT_CONV.fullmatch(key)
    if m:
        return f"adapter.body.{m[1]}.{m[2]}.{m[3]}"
    m = _LIGHT_RESNET.fullmatch(key)
    if m:
        return f"adapter.body.{m[1]}.resnets.{m[2]}.{m[3]}.{m[4]}"
    return None


def read_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    where = f"--adapter {name}={path}"
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code: not for a converter.
        raise ExportError(
            f"{where}: cannot read it as a PyTorch checkpoint of plain tensors (corrupt, or it pickles other "
            "objects, which are not loaded for safety); give TencentARC's original .pth or a diffusers T2IAdapter directory"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to read is the same bad input
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch's run on for lines
        raise ExportError(
            f"{where}: cannot read it as a PyTorch/safetensors checkpoint ({type(e).__name__}: {reason}); "
            "give TencentARC's original .pth or a diffusers T2IAdapter directory"
        ) from None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ExportError(f"{where}: not a state dict of tensors ({_EXPECTED})")
    return state


def _layout(name: str, path: Path, state: dict) -> str:
    where = f"--adapter {name}={path}"
    keys = set(state)
    if "conv_in.weight" in keys:
        return "full_adapter"
    if "body.0.in_conv.weight" in keys:
        return "light_adapter"
    if "style_embedding" in keys:
        raise ExportError(
            f"{where}: a TencentARC StyleAdapter (it extends the prompt's tokens, not the UNet's residuals), "
            "which is not supported; give a full or light T2I-Adapter"
        )
    if any(k.startswith("adapter.") for k in keys):
        raise ExportError(
            f"{where}: diffusers T2IAdapter weights; give the directory that holds them with its config.json"
        )
    sample = ", ".join(sorted(keys)[:3])
    raise ExportError(f"{where}: unknown checkpoint layout (keys {sample}, ...); {_EXPECTED}")


def _config(name: str, path: Path, state: dict, layout: str) -> tuple[dict, dict[str, str]]:
    """The diffusers config the weights imply, and the key map (original -> diffusers) for every key."""
    where = f"--adapter {name}={path}"

    def in_channels(weight: torch.Tensor) -> int:
        if weight.ndim != 4 or weight.shape[1] % (DOWNSCALE * DOWNSCALE):
            raise ExportError(
                f"{where}: first convolution has shape {tuple(weight.shape)}; its input channels must be a "
                f"multiple of {DOWNSCALE * DOWNSCALE} (pixel unshuffle by {DOWNSCALE})"
            )
        return weight.shape[1] // (DOWNSCALE * DOWNSCALE)

    if layout == "full_adapter":
        blocks = 1 + max((int(m[1]) for m in map(_FULL_BODY.fullmatch, state) if m), default=-1)
        if blocks == 0 or blocks % FULL_STAGES:
            raise ExportError(
                f"{where}: Adapter with {blocks} body blocks; expected {FULL_STAGES} stages of equal length "
                f"(TencentARC's nums_rb x {FULL_STAGES})"
            )
        nrb = blocks // FULL_STAGES
        channels = []
        for stage in range(FULL_STAGES):
            w = state.get(f"body.{stage * nrb}.block1.weight")
            if w is None:
                raise ExportError(f"{where}: Adapter without body.{stage * nrb}.block1.weight ({_EXPECTED})")
            channels.append(int(w.shape[0]))
        config = dict(in_channels=in_channels(state["conv_in.weight"]), channels=channels, num_res_blocks=nrb)
        keymap = {k: full_key(k, nrb) for k in state}
    else:
        stages = 1 + max((int(m[1]) for m in map(_LIGHT_CONV.fullmatch, state) if m), default=-1)
        nrb = 1 + max((int(m[2]) for m in map(_LIGHT_RESNET.fullmatch, state) if m and m[1] == "0"), default=-1)
        channels = []
        for i in range(stages):
            w = state.get(f"body.{i}.out_conv.weight")
            if w is None:
                raise ExportError(f"{where}: Adapter_light without body.{i}.out_conv.weight ({_EXPECTED})")
            channels.append(int(w.shape[0]))
        # diffusers' LightAdapter has len(channels) + 1 blocks, the last repeating channels[-1].
        if stages < 2 or channels[-1] != channels[-2]:
            raise ExportError(
                f"{where}: Adapter_light with output channels {channels}; diffusers' LightAdapter needs at least 2 "
                "stages, the last two of equal width (TencentARC's [320, 640, 1280, 1280])"
            )
        config = dict(in_channels=in_channels(state["body.0.in_conv.weight"]), channels=channels[:-1], num_res_blocks=nrb)
        keymap = {k: light_key(k) for k in state}
    return dict(config, downscale_factor=DOWNSCALE, adapter_type=layout), keymap


def _first(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def load_original_adapter(name: str, path: Path) -> T2IAdapter:
    """Read an original TencentARC full or light adapter checkpoint into an fp32 `T2IAdapter` in eval mode.

    Raises `ExportError` (one line) for an unreadable file or one whose keys and shapes are not exactly
    those of a diffusers full/light adapter after the key map.
    """
    path = Path(path)
    where = f"--adapter {name}={path}"
    state = read_state_dict(name, path)
    layout = _layout(name, path, state)
    config, keymap = _config(name, path, state, layout)
    try:
        adapter = T2IAdapter(**config)
    except Exception as e:  # noqa: BLE001 - a config diffusers refuses is bad input
        raise ExportError(f"{where}: weights imply {config}, which diffusers cannot build ({e})") from None
    if any(".skep." in k for k in state):
        raise ExportError(
            f"{where}: Adapter built with sk=False (skip convolutions body.N.skep.*), which diffusers' FullAdapter "
            "does not have; only sk=True adapters (TencentARC's released ones) convert"
        )
    want = adapter.state_dict()
    original = "Adapter" if layout == "full_adapter" else "Adapter_light"
    unmapped = sorted(k for k, v in keymap.items() if v is None or v not in want)
    if unmapped:
        raise ExportError(
            f"{where}: {original} key {_first(unmapped)} has no counterpart in diffusers' "
            f"{layout} {config['channels']} x {config['num_res_blocks']} (not the structure of TencentARC's released adapters); "
            "convert it to a diffusers T2IAdapter directory by hand"
        )
    missing = sorted(set(want) - set(keymap.values()))
    if missing:
        raise ExportError(f"{where}: {original} checkpoint lacks the weights of diffusers' {_first(missing)}")
    mapped = {keymap[k]: v for k, v in state.items()}
    for k, v in mapped.items():
        if v.shape != want[k].shape:
            src = next(o for o, d in keymap.items() if d == k)
            raise ExportError(
                f"{where}: {src} has shape {tuple(v.shape)}, diffusers' {layout} expects {tuple(want[k].shape)} "
                "(another kernel size or width than TencentARC's released adapters)"
            )
    adapter.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    return adapter.eval()
