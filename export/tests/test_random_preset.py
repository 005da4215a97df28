"""`python -m t2i_export random --preset small`: the benchmark graph set is SD 1.5's architecture at
benchmark scale, deterministic, and its diffusers checkpoint holds the very weights it exported.

One build in a temp dir (~15 s on 2 busy cores, most of it the ONNX export); graph IO against
diffusers is covered by test_parity.py on the tiny set, so here only the manifest and the saved
checkpoint are checked.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, T2IAdapter

from t2i_export.cli import main
from t2i_export.random_preset import build_random


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    argv = ["random", "--preset", "small", "--adapter-preset", "sketch", "--adapter-preset", "light",
            "--save-diffusers", str(root / "diffusers"), "--out", str(root / "graphs")]
    assert main(argv) == 0
    return root


def test_small_manifest_is_sd15_shaped_at_256(small):
    m = json.loads((small / "graphs" / "manifest.json").read_text(encoding="utf-8"))
    assert m["name"] == "random-small"
    assert m["family"] == "sd1"
    assert m["default_size"] == [256, 256]
    assert m["size_multiple"] == 64
    assert m["latent"] == {"channels": 4, "downscale": 8}
    (te,) = m["text_encoders"]
    assert te["tokenizer"]["max_length"] == 77
    assert m["scheduler"]["_class_name"] == "PNDMScheduler"  # SD 1.5's scheduler config
    assert [(s["channels"], s["downscale"]) for s in m["residual_slots"]] == [(64, 1), (128, 2), (256, 4), (256, 8)]
    te_out = te["graph"]["outputs"][0]
    assert te_out["dims"] == ["batch", 77, 256]
    unet_in = {i["name"]: i["dims"] for i in m["graphs"]["unet"]["inputs"]}
    assert unet_in["encoder_hidden_states"] == ["batch", 77, 256]
    adapters = {a["name"]: a for a in m["adapters"]}
    assert set(adapters) == {"sketch", "light"}
    assert (adapters["sketch"]["adapter_type"], adapters["sketch"]["condition"]) == ("full_adapter", "gray")
    assert (adapters["light"]["adapter_type"], adapters["light"]["condition"]) == ("light_adapter", "rgb")
    for a in adapters.values():
        assert a["residual_slots"] == [0, 1, 2, 3]
    for g in m["graphs"].values():
        assert g["external_data"] == []  # small: everything inline


def test_small_checkpoint_has_the_exported_weights_and_sd15_blocks(small):
    pipe = StableDiffusionPipeline.from_pretrained(str(small / "diffusers" / "random-small"), safety_checker=None,
                                                   requires_safety_checker=False)
    unet, te, vae = pipe.unet.config, pipe.text_encoder.config, pipe.vae.config
    assert tuple(unet.block_out_channels) == (64, 128, 256, 256)
    assert unet.layers_per_block == 2
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.cross_attention_dim == te.hidden_size == 256
    assert te.vocab_size == 49408 and te.max_position_embeddings == 77 and te.num_hidden_layers == 4
    assert tuple(vae.block_out_channels) == (32, 64, 128, 128)
    assert len(pipe.tokenizer) == 49408

    # Same seed, same weights: the checkpoint is what a fresh build_random gives.
    fresh = build_random("small", ["sketch", "light"], seed=0)
    for name in ("text_encoder", "unet", "vae"):
        saved = getattr(pipe, name).state_dict()
        for k, v in fresh[name].state_dict().items():
            assert torch.equal(saved[k], v), f"{name}.{k}"
    for name in ("sketch", "light"):
        saved = T2IAdapter.from_pretrained(str(small / "diffusers" / "adapters" / name)).state_dict()
        for k, v in fresh["adapters"][name].state_dict().items():
            assert torch.equal(saved[k], v), f"adapter {name}.{k}"
