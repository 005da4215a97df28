"""TencentARC's original T2I-Adapter checkpoints (.pth) load as the same network in diffusers' T2IAdapter.

The oracle is a port of the original modules (below); the key map is also checked against the one
diffusers' conversion script spells out (tests/data/t2i_adapter_key_map.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from t2i_export.cli import main
from t2i_export.errors import ExportError
from t2i_export.original_adapter import full_key, light_key, load_original_adapter

KEY_MAP = Path(__file__).parent / "data" / "t2i_adapter_key_map.json"


# --- The original networks: a minimal port of TencentARC/T2I-Adapter ldm/modules/encoders/adapter.py
# (commit 168f87f6): Downsample, ResnetBlock, Adapter, ResnetBlock_light, extractor, Adapter_light, with
# their module names, argument names and forward passes (asserts and the 1D/3D variants left out).


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None, padding=1):
        super().__init__()
        out_channels = out_channels or channels
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_c, out_c, down, ksize=3, sk=False, use_conv=True):
        super().__init__()
        ps = ksize // 2
        self.in_conv = nn.Conv2d(in_c, out_c, ksize, 1, ps) if in_c != out_c or not sk else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, ksize, 1, ps)
        self.skep = nn.Conv2d(in_c, out_c, ksize, 1, ps) if not sk else None
        self.down = down
        if down:
            self.down_opt = Downsample(in_c, use_conv=use_conv)

    def forward(self, x):
        if self.down:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        h = self.block2(self.act(self.block1(x)))
        return h + self.skep(x) if self.skep is not None else h + x


class Adapter(nn.Module):
    def __init__(self, channels=(320, 640, 1280, 1280), nums_rb=3, cin=64, ksize=3, sk=False, use_conv=True):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(8)
        self.channels = channels
        self.nums_rb = nums_rb
        body = []
        for i in range(len(channels)):
            for j in range(nums_rb):
                if i != 0 and j == 0:
                    body.append(ResnetBlock(channels[i - 1], channels[i], down=True, ksize=ksize, sk=sk, use_conv=use_conv))
                else:
                    body.append(ResnetBlock(channels[i], channels[i], down=False, ksize=ksize, sk=sk, use_conv=use_conv))
        self.body = nn.ModuleList(body)
        self.conv_in = nn.Conv2d(cin, channels[0], 3, 1, 1)

    def forward(self, x):
        x = self.conv_in(self.unshuffle(x))
        features = []
        for i in range(len(self.channels)):
            for j in range(self.nums_rb):
                x = self.body[i * self.nums_rb + j](x)
            features.append(x)
        return features


class ResnetBlock_light(nn.Module):  # noqa: N801 - the original's name
    def __init__(self, in_c):
        super().__init__()
        self.block1 = nn.Conv2d(in_c, in_c, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(in_c, in_c, 3, 1, 1)

    def forward(self, x):
        return self.block2(self.act(self.block1(x))) + x


class extractor(nn.Module):  # noqa: N801 - the original's name
    def __init__(self, in_c, inter_c, out_c, nums_rb, down=False):
        super().__init__()
        self.in_conv = nn.Conv2d(in_c, inter_c, 1, 1, 0)
        self.body = nn.Sequential(*[ResnetBlock_light(inter_c) for _ in range(nums_rb)])
        self.out_conv = nn.Conv2d(inter_c, out_c, 1, 1, 0)
        self.down = down
        if down:
            self.down_opt = Downsample(in_c, use_conv=False)

    def forward(self, x):
        if self.down:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class Adapter_light(nn.Module):  # noqa: N801 - the original's name
    def __init__(self, channels=(320, 640, 1280, 1280), nums_rb=3, cin=64):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(8)
        self.channels = channels
        self.body = nn.ModuleList(
            extractor(in_c=cin if i == 0 else channels[i - 1], inter_c=channels[i] // 4, out_c=channels[i],
                      nums_rb=nums_rb, down=i != 0)
            for i in range(len(channels))
        )

    def forward(self, x):
        x = self.unshuffle(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


# As TencentARC builds them for its released checkpoints (ldm/inference_base.py get_adapters), at the
# tiny zoo's sizes (t2i_export/tiny.py: the tiny UNet's residual channels are 8, 8, 16, 16).
def tiny_full(cin=1, channels=(8, 8, 16, 16), nums_rb=2, **kw) -> Adapter:
    return Adapter(cin=64 * cin, channels=list(channels), nums_rb=nums_rb, **{"ksize": 1, "sk": True, "use_conv": False, **kw})


def tiny_light(cin=3, channels=(8, 8, 16, 16), nums_rb=4) -> Adapter_light:
    return Adapter_light(cin=64 * cin, channels=list(channels), nums_rb=nums_rb)


def save(module: nn.Module, path: Path, seed: int = 0) -> Path:
    """Re-draw the weights from `seed` (PyTorch's default initialisers) and save the state dict."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    torch.save(module.state_dict(), path)
    return path


# --- Same network, same numbers

CASES = {
    "full-sketch": (lambda: tiny_full(), dict(adapter_type="full_adapter", in_channels=1, channels=[8, 8, 16, 16], num_res_blocks=2)),
    "full-rgb-3-blocks": (
        lambda: tiny_full(cin=3, channels=(8, 16, 32, 32), nums_rb=3),
        dict(adapter_type="full_adapter", in_channels=3, channels=[8, 16, 32, 32], num_res_blocks=3),
    ),
    "light-color": (lambda: tiny_light(), dict(adapter_type="light_adapter", in_channels=3, channels=[8, 8, 16], num_res_blocks=4)),
    "light-2-blocks": (
        lambda: tiny_light(cin=1, channels=(8, 16, 32, 32), nums_rb=2),
        dict(adapter_type="light_adapter", in_channels=1, channels=[8, 16, 32], num_res_blocks=2),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_loaded_adapter_computes_what_the_original_does(tmp_path, case):
    build, want_config = CASES[case]
    original = build().eval()
    path = save(original, tmp_path / "adapter.pth", seed=1234)
    adapter = load_original_adapter("a", path)

    assert {k: adapter.config[k] for k in want_config} == want_config
    assert adapter.config.downscale_factor == 8 and not adapter.training
    torch.manual_seed(5)
    # 128 x 192 (16 x 24 after unshuffling): every 2x pooling sees an even size, where the originals
    # (which floor) and diffusers (which ceils) agree.
    x = torch.rand(2, want_config["in_channels"], 128, 192)
    with torch.no_grad():
        want, got = original(x), adapter(x)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        # Exact: both run the same convolutions on the same weights in the same order.
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_half_precision_checkpoint_loads_as_fp32(tmp_path):
    original = tiny_full()
    path = save(original, tmp_path / "a.pth")
    torch.save({k: v.half() for k, v in torch.load(path).items()}, path)
    adapter = load_original_adapter("a", path)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())


def test_safetensors_of_the_original_layout(tmp_path):
    from safetensors.torch import save_file

    original = tiny_light().eval()
    save(original, tmp_path / "a.pth")
    save_file(torch.load(tmp_path / "a.pth"), str(tmp_path / "a.safetensors"))
    adapter = load_original_adapter("a", tmp_path / "a.safetensors")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x)[3], original(x)[3], rtol=0, atol=0)


# --- The key map, as diffusers' conversion script spells it out at TencentARC's released sizes


def test_key_map_matches_diffusers_conversion_script(tmp_path):
    fixture = json.loads(KEY_MAP.read_text(encoding="utf-8"))
    full, light = fixture["full_adapter"], fixture["light_adapter"]
    assert len(full["keys"]) == 38 and len(light["keys"]) == 80
    assert {k: full_key(k, full["num_res_blocks"]) for k in full["keys"]} == full["keys"]
    assert {k: light_key(k) for k in light["keys"]} == light["keys"]

    # The same structure as [320, 640, 1280, 1280] (a channel change into stages 1 and 2, none into 3),
    # small: the original modules have exactly the fixture's keys, the loaded ones exactly its values.
    for kind, original in (("full_adapter", tiny_full(cin=3, channels=(8, 16, 32, 32))), ("light_adapter", tiny_light(channels=(8, 16, 32, 32)))):
        keys = fixture[kind]["keys"]
        assert set(original.state_dict()) == set(keys), kind
        adapter = load_original_adapter("a", save(original, tmp_path / f"{kind}.pth"))
        assert set(adapter.state_dict()) == set(keys.values()), kind
        for k, v in original.state_dict().items():
            assert torch.equal(adapter.state_dict()[keys[k]], v), k


# --- Bad input: one line, what the file is and what was expected


def one_line_error(path: Path) -> str:
    with pytest.raises(ExportError) as e:
        load_original_adapter("a", path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--adapter a={path}: "), msg
    return msg


def test_unknown_keys(tmp_path):
    torch.save({"foo.weight": torch.zeros(2), "bar": torch.ones(1)}, tmp_path / "x.pth")
    msg = one_line_error(tmp_path / "x.pth")
    assert "unknown checkpoint layout" in msg and "bar, foo.weight" in msg and "Adapter_light" in msg


def test_style_adapter_is_named(tmp_path):
    torch.save({"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8)}, tmp_path / "style.pth")
    assert "StyleAdapter" in one_line_error(tmp_path / "style.pth")


def test_diffusers_weights_file_points_to_its_directory(tmp_path):
    from diffusers import T2IAdapter
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(T2IAdapter(in_channels=1, channels=[8, 8, 16, 16], num_res_blocks=2).state_dict(), str(tmp_path / "w.safetensors"))
    assert "diffusers T2IAdapter weights" in one_line_error(tmp_path / "w.safetensors")


def test_extra_and_missing_keys(tmp_path):
    state = tiny_full().state_dict()
    torch.save({**state, "body.0.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    assert "key 'body.0.extra.weight' has no counterpart" in one_line_error(tmp_path / "extra.pth")
    torch.save({k: v for k, v in state.items() if k != "body.5.block2.bias"}, tmp_path / "missing.pth")
    assert "lacks the weights of diffusers' 'adapter.body.2.resnets.1.block2.bias'" in one_line_error(tmp_path / "missing.pth")


def test_other_original_variants_are_refused(tmp_path):
    # sk=False: a skip conv (`skep`) per block, which diffusers' AdapterResnetBlock does not have.
    msg = one_line_error(save(tiny_full(sk=False), tmp_path / "sk.pth"))
    assert "sk=False" in msg and "skep" in msg
    # ksize=3: 3x3 block2 where diffusers has 1x1.
    msg = one_line_error(save(tiny_full(ksize=3), tmp_path / "k3.pth"))
    assert "body.0.block2.weight has shape (8, 8, 3, 3)" in msg and "(8, 8, 1, 1)" in msg
    # 3 stages: not TencentARC's one stage per SD down block.
    msg = one_line_error(save(tiny_full(channels=(8, 16, 16)), tmp_path / "three.pth"))
    assert "6 body blocks" in msg
    # Light adapter whose last two stages differ: diffusers repeats the last width.
    msg = one_line_error(save(tiny_light(channels=(8, 8, 16, 32)), tmp_path / "light.pth"))
    assert "output channels [8, 8, 16, 32]" in msg


def test_unreadable_files(tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip file at all\n" * 10)
    assert "cannot read it" in one_line_error(tmp_path / "corrupt.pth")
    assert "cannot read it" in one_line_error(tmp_path / "missing.pth")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "cannot read it" in one_line_error(tmp_path / "corrupt.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "not a state dict of tensors" in one_line_error(tmp_path / "list.pth")


def cli_error(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_bad_pth_is_one_line(capsys, zoo, tmp_path):
    base = ["pipeline", "--model", zoo.model_dir, "--out", tmp_path / "o"]
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    err = cli_error(capsys, *base, "--adapter", f"s={tmp_path / 'corrupt.pth'}")
    assert f"--adapter s={tmp_path / 'corrupt.pth'}: cannot read it" in err
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pth")
    err = cli_error(capsys, *base, "--adapter", f"s={tmp_path / 'foo.pth'}")
    assert "unknown checkpoint layout" in err
    err = cli_error(capsys, *base, "--adapter", f"s={tmp_path / 'gone.pth'}")
    assert "not a directory or checkpoint file" in err
    (tmp_path / "notes.txt").write_text("hi")
    err = cli_error(capsys, *base, "--adapter", f"s={tmp_path / 'notes.txt'}")
    assert "a file but not .pth/.pt/.ckpt/.safetensors" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


# --- End to end: original checkpoints in, adapter graphs out, computing what the originals do


def test_pipeline_exports_original_checkpoints(capsys, zoo, tmp_path):
    originals = {"sk": tiny_full().eval(), "co": tiny_light().eval()}
    paths = {n: save(m, tmp_path / f"{n}.pth", seed=7) for n, m in originals.items()}
    out = tmp_path / "set"
    argv = ["pipeline", "--model", str(zoo.model_dir), "--out", str(out)]
    for n, p in paths.items():
        argv += ["--adapter", f"{n}={p}"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["verify", str(out)]) == 0

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    entries = {a["name"]: a for a in manifest["adapters"]}
    assert {n: (a["adapter_type"], a["condition"], a["residual_slots"]) for n, a in entries.items()} == {
        "sk": ("full_adapter", "gray", [0, 1, 2, 3]),
        "co": ("light_adapter", "rgb", [0, 1, 2, 3]),
    }
    torch.manual_seed(3)
    for n, original in originals.items():
        graph = entries[n]["graph"]
        session = ort.InferenceSession(str(out / graph["file"]), providers=["CPUExecutionProvider"])
        x = torch.rand(1, entries[n]["in_channels"], 64, 128)
        got = session.run([o["name"] for o in graph["outputs"]], {graph["inputs"][0]["name"]: x.numpy()})
        with torch.no_grad():
            want = original(x)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            # ONNX Runtime's convolutions are not PyTorch's: same numbers up to float32 rounding.
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
