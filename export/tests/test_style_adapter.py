"""T2I style adapter export (style_adapter.py) against the original code's semantics.

diffusers has no style adapter: the oracle is the port of TencentARC's `StyleAdapter` (same module and
parameter names, loaded from the original-layout `.pth` with strict=True), transformers'
`CLIPVisionModel.last_hidden_state` for the encoder (`get_cond_style`), and diffusers' UNet called with
the context the original's samplers build (`style_context`).

Tolerance: relative L2 error ||onnx - torch|| / ||torch|| <= 1e-5. Both sides compute in float32;
onnxruntime reorders MatMul/Softmax/LayerNorm accumulation, a few ulps per op (measured: ~1e-7 to
1e-6). A semantic error (tokens not reaching the cross-attention, a context truncated to 77, a wrong
head split) moves the result by >= 1e-2 relative, checked below against the style's effect itself.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import EXPORT_DIR, assert_rel_l2 as rel_l2, ort_run as run

from t2i_export.errors import ExportError
from t2i_export.manifest import verify
from t2i_export.pipeline import export_pipeline
from t2i_export.style_adapter import (
    StyleAdapter, combine_style_tokens, load_style_module, read_state_dict, style_active, style_context,
)
from t2i_export.tiny import write_checkpoint
from t2i_export.tiny_style_adapter import STYLE_CONFIG, VISION_CONFIG, build_style_adapter, save_style_adapter, write_tiny_style_adapter

TEXT_LEN = 77


@pytest.fixture(scope="module")
def style_work(tmp_path_factory):
    """The tiny SD 1 checkpoint, its style adapter files, and one graph set exported with them."""
    root = tmp_path_factory.mktemp("style")
    model_dir, _ = write_checkpoint(root / "work")
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet")).eval()
    encoder_dir, pth = write_tiny_style_adapter(root / "style", unet.config.cross_attention_dim)
    set_dir = export_pipeline(model_dir, [], root / "set", style_adapter=pth, style_encoder=encoder_dir)
    return {"root": root, "model": model_dir, "encoder": encoder_dir, "pth": pth, "set": set_dir, "unet": unet,
            "manifest": verify(set_dir)}


def pixels(batch: int = 3, seed: int = 7) -> torch.Tensor:
    size = VISION_CONFIG["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_manifest_entry(style_work):
    m = style_work["manifest"]
    s = m["style_adapter"]
    assert s["num_tokens"] == 8 and s["max_images"] == TEXT_LEN // 8
    assert s["context"] == {"unet_input": "encoder_hidden_states", "sequence_dim": "context_length",
                            "append": "weighted_tokens", "negative_padding": "own_last_tokens"}
    assert s["preprocess"] == {
        "convert_rgb": True, "shortest_edge": 224, "resample": "bicubic", "crop": [224, 224], "rescale_factor": 1 / 255,
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    }
    assert s["style_encoder"]["batch"] == s["style_adapter"]["batch"] == "images"
    assert s["style_encoder"]["outputs"][0]["dims"] == ["batch", 50, 32]
    assert s["style_adapter"]["inputs"][0]["dims"] == ["batch", 50, 32]
    assert s["style_adapter"]["outputs"][0]["dims"] == ["batch", 8, 4]
    dims = {i["name"]: i["dims"] for i in m["graphs"]["unet"]["inputs"]}
    assert dims["encoder_hidden_states"] == ["batch", "context_length", 4]
    assert sorted(p.name for p in style_work["set"].iterdir()) == sorted(
        ["manifest.json", "text_encoder.onnx", "unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx",
         "style_encoder.onnx", "style_adapter.onnx"] + [p.name for p in style_work["set"].glob("tokenizer*")])


@torch.no_grad()
def test_encoder_and_adapter_match_port(style_work):
    """At batch 3 (exported at 2): CLIPVisionModel's last_hidden_state, then the ported StyleAdapter
    loaded from the .pth (the original's `get_cond_style` then `adapter['model'](input)`)."""
    from transformers import CLIPVisionModel

    s = style_work["manifest"]["style_adapter"]
    x = pixels()
    want = CLIPVisionModel.from_pretrained(str(style_work["encoder"])).eval()(x).last_hidden_state
    got = run(style_work["set"] / s["style_encoder"]["file"], {"pixel_values": x.numpy()})[0]
    rel_l2(got, want.numpy(), "style_encoder")
    module = load_style_module(style_work["pth"])
    tokens = module(want)
    got_tokens = run(style_work["set"] / s["style_adapter"]["file"], {"last_hidden_state": want.numpy()})[0]
    rel_l2(got_tokens, tokens.numpy(), "style_adapter")


def test_state_dict_round_trips(tmp_path):
    """The file holds exactly the original's keys; it loads into a freshly built original-shaped
    module with strict=True and back out unchanged."""
    module = build_style_adapter(4)
    pth = save_style_adapter(module, tmp_path / "s.pth")
    raw = torch.load(str(pth), map_location="cpu", weights_only=True)
    keys = set(raw)
    assert {"style_embedding", "proj", "ln_pre.weight", "ln_post.bias", "transformer_layes.1.attn.in_proj_weight",
            "transformer_layes.1.attn.out_proj.weight", "transformer_layes.0.mlp.c_fc.weight",
            "transformer_layes.0.mlp.c_proj.bias", "transformer_layes.0.ln_1.weight", "transformer_layes.0.ln_2.bias"} <= keys
    fresh = StyleAdapter(width=32, context_dim=4, num_head=8, n_layes=STYLE_CONFIG["n_layes"], num_token=8)
    fresh.load_state_dict(raw, strict=True)
    loaded = load_style_module(pth)
    for k, v in raw.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # TencentARC's loader strips an `adapter.` prefix (inference_base.get_adapters); so does ours.
    torch.save({f"adapter.{k}": v for k, v in raw.items()}, str(tmp_path / "prefixed.pth"))
    assert set(read_state_dict(tmp_path / "prefixed.pth")) == keys


def test_released_shapes_build():
    """The released adapter's constructor arguments give the released sizes (1024 wide, 8 tokens of 768)."""
    m = StyleAdapter(width=1024, context_dim=768, num_head=8, n_layes=3, num_token=8)
    assert tuple(m.style_embedding.shape) == (1, 8, 1024) and tuple(m.proj.shape) == (1024, 768)
    assert tuple(m(torch.zeros(1, 257, 1024)).shape) == (1, 8, 768)


def unet_feeds(m: dict, ehs: torch.Tensor, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = ehs.shape[0]
    return {
        "sample": torch.randn(batch, 4, 8, 16, generator=g),
        "timestep": torch.tensor([981.0, 17.25][:batch]),
        "encoder_hidden_states": ehs,
        **{s["input"]: torch.zeros(batch, s["channels"], 8 // s["downscale"], 16 // s["downscale"]) for s in m["residual_slots"]},
    }


def diffusers_unet(unet, feeds) -> np.ndarray:
    return unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                return_dict=False)[0].numpy()


@torch.no_grad()
@pytest.mark.parametrize("images", [0, 1, 2])
def test_unet_context_matches_diffusers(style_work, images):
    """The UNet graph at 77 (no style), 85 (one image) and 93 (two) context tokens == diffusers' UNet
    given the same context, built as the original's DDIM sampler builds the guided pair."""
    m = style_work["manifest"]
    unet = style_work["unet"]
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(1, TEXT_LEN, 4, generator=g), torch.randn(1, TEXT_LEN, 4, generator=g)
    if images:
        hidden = torch.randn(images, 50, 32, generator=g)
        tokens = run(style_work["set"] / m["style_adapter"]["style_adapter"]["file"], {"last_hidden_state": hidden.numpy()})[0]
        per_image = [torch.from_numpy(tokens[i : i + 1]) * 3.0 for i in range(images)]  # enlarged: the tiny UNet is weakly conditioned
        cond_ctx, uncond_ctx = style_context(cond, uncond, combine_style_tokens(per_image, [1.0, 0.5][:images]))
    else:
        cond_ctx, uncond_ctx = cond, uncond
    ehs = torch.cat([uncond_ctx, cond_ctx])  # p_sample_ddim's c_in = [uncond; cond]
    assert ehs.shape[1] == TEXT_LEN + 8 * images
    feeds = unet_feeds(m, ehs)
    want = diffusers_unet(unet, feeds)
    got = run(style_work["set"] / m["graphs"]["unet"]["file"], {k: v.numpy() for k, v in feeds.items()})[0]
    rel_l2(got, want, f"unet at {ehs.shape[1]} tokens")
    if images:
        # The style tokens move the prediction far beyond the tolerance: they do reach the cross-attention.
        plain = diffusers_unet(unet, unet_feeds(m, torch.cat([uncond, cond])))
        moved = np.linalg.norm(want[1] - plain[1]) / np.linalg.norm(plain[1])
        assert moved > 1e-2, moved  # measured: 0.44


def test_style_context_reference():
    """ddim.py p_sample_ddim: cond + tokens; uncond + its own last P tokens; no uncond without guidance."""
    cond = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    uncond = -cond
    tokens = torch.full((2, 2, 3), 7.0)
    c, u = style_context(cond, uncond, tokens)
    assert torch.equal(c, torch.cat([cond, tokens], 1))
    assert torch.equal(u[:, :5], uncond) and torch.equal(u[:, 5:], uncond[:, 3:5])
    c1, u1 = style_context(cond, None, tokens)
    assert torch.equal(c1, c) and u1 is None
    with pytest.raises(ValueError):
        style_context(cond, uncond, torch.zeros(2, 6, 3))


def test_combine_and_tau():
    """get_adapter_feature: weighted then concatenated in order; ddim_sampling's style_cond_tau window."""
    a, b = torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0)
    out = combine_style_tokens([a, b], [0.5, 3.0])
    assert torch.equal(out, torch.cat([a * 0.5, b * 3.0], 1))
    assert [style_active(i, 10, 1.0) for i in range(10)] == [True] * 10
    # tau 0.5 of 10 steps: index = 9 - i must be >= 5, i.e. the first 5 (noisiest) steps.
    assert [style_active(i, 10, 0.5) for i in range(10)] == [True] * 5 + [False] * 5
    assert [style_active(i, 10, 0.0) for i in range(10)] == [False] * 10


def test_errors(style_work, tmp_path):
    model = style_work["model"]
    pth, enc = style_work["pth"], style_work["encoder"]

    def fails(match, **kw):
        with pytest.raises(ExportError, match=match) as e:
            export_pipeline(model, [], tmp_path / "out", **kw)
        assert "\n" not in str(e.value)

    fails("needs --style-encoder", style_adapter=pth)
    fails("only used with --style-adapter", style_encoder=enc)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    fails("cannot read it", style_adapter=tmp_path / "junk.pth", style_encoder=enc)
    torch.save({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "other.pth"))
    fails("not TencentARC's StyleAdapter", style_adapter=tmp_path / "other.pth", style_encoder=enc)
    state = dict(torch.load(str(pth), weights_only=True))
    state.pop("ln_post.weight")
    torch.save(state, str(tmp_path / "partial.pth"))
    fails("missing ln_post.weight", style_adapter=tmp_path / "partial.pth", style_encoder=enc)
    save_style_adapter(build_style_adapter(8), tmp_path / "wide.pth")  # 8-wide tokens, the tiny UNet's are 4
    fails("cross_attention_dim is 4", style_adapter=tmp_path / "wide.pth", style_encoder=enc)
    save_style_adapter(build_style_adapter(4, width=16), tmp_path / "narrow.pth")
    fails("hidden_size is 32", style_adapter=tmp_path / "narrow.pth", style_encoder=enc)
    fails("only --precision fp32", style_adapter=pth, style_encoder=enc, precision="fp16")
    bare = tmp_path / "bare_encoder"
    bare.mkdir()
    (bare / "config.json").write_bytes((enc / "config.json").read_bytes())
    fails("no preprocessor_config.json", style_adapter=pth, style_encoder=bare)
    assert not (tmp_path / "out").exists()


def test_cli_help_mentions_flags():
    out = subprocess.run([sys.executable, "-m", "t2i_export", "pipeline", "--help"], cwd=EXPORT_DIR,
                         capture_output=True, text=True, check=True).stdout
    assert "--style-adapter" in out and "--style-encoder" in out
