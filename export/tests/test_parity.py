"""Each exported graph, run by onnxruntime, equals the torch module it was exported from.

Tolerance: |onnx - torch| <= 1e-4 * max(1, max|torch|). Both sides compute in float32, but ORT (and
tract) fuse and reorder work: Conv/MatMul accumulation order, GroupNorm exported as
InstanceNormalization on a reshaped tensor, attention as MatMul+Softmax. That costs a few ulps per op;
measured here: <= 1e-6 for text encoder, UNet and adapters and <= 7e-6 for the VAE decoder (outputs
of magnitude ~1-2). 1e-4 keeps a margin for other CPUs' SIMD paths, while a semantic error (a
missing residual, a wrong slot, a broken skip connection) moves outputs by >= 1e-2.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import COMMITTED_FIXTURES, COMMITTED_SET, graph_specs, load_graph_fixture

from t2i_export.manifest import verify
from t2i_export.unet import UNetGraph

RTOL = 1e-4

GRAPHS = ["text_encoder", "unet", "vae_decoder", "vae_encoder", "adapter_sketch", "adapter_color", "controlnet_canny"]


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> float:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = float(np.abs(got.astype(np.float64) - want).max())
    bound = RTOL * max(1.0, float(np.abs(want).max()))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"
    return err


def run_ort(path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", GRAPHS)
def test_exported_graph_matches_torch(zoo, name):
    spec = graph_specs(zoo.manifest())[name]
    inputs, outputs = load_graph_fixture(zoo.fixtures_dir, name, spec)
    got = run_ort(zoo.set_dir / spec["file"], inputs)
    for o, g in zip(spec["outputs"], got):
        assert_close(g, outputs[o["name"]], f"{name}.{o['name']}")


@pytest.mark.parametrize("name", GRAPHS)
def test_committed_graph_matches_committed_fixture(name):
    """What the Rust side relies on: graphs/tiny-sd1 reproduces graphs/fixtures/tiny-sd1."""
    manifest = verify(COMMITTED_SET)
    spec = graph_specs(manifest)[name]
    inputs, outputs = load_graph_fixture(COMMITTED_FIXTURES, name, spec)
    got = run_ort(COMMITTED_SET / spec["file"], inputs)
    for o, g in zip(spec["outputs"], got):
        assert_close(g, outputs[o["name"]], f"{name}.{o['name']}")


def test_fixture_inputs_are_nontrivial(zoo):
    spec = graph_specs(zoo.manifest())["unet"]
    inputs, _ = load_graph_fixture(zoo.fixtures_dir, "unet", spec)
    assert inputs["sample"].shape[0] == 2 and inputs["sample"].shape[2] != inputs["sample"].shape[3]
    for i in range(4):
        assert np.abs(inputs[f"adapter_residual_{i}"]).mean() > 0.1
    assert inputs["timestep"].dtype == np.float32 and inputs["timestep"][1] % 1 != 0  # an Euler-style timestep


def _unet_feeds(zoo):
    spec = graph_specs(zoo.manifest())["unet"]
    inputs, outputs = load_graph_fixture(zoo.fixtures_dir, "unet", spec)
    return spec, inputs, outputs


@torch.no_grad()
def test_unet_reproduces_inplace_skip_aliasing(zoo, oracle):
    """diffusers does `sample += residual` after DownBlock2D, and `sample` is the same tensor object as
    that block's last skip connection, so the skip gets the residual too. Breaking the aliasing (a
    hook hands the UNet a copy) changes the result, and the graph matches the aliasing version.

    The tiny UNet's deepest skip is weak (effect ~1e-3, through a GroupNorm), but the graph's error is
    ~1e-6, so the two are told apart by a factor of 100 at least.
    """
    spec, inputs, outputs = _unet_feeds(zoo)
    args = [torch.from_numpy(inputs[i["name"]].copy()) for i in spec["inputs"]]
    block = oracle.unet.down_blocks[-1]
    assert type(block).__name__ == "DownBlock2D" and block.downsamplers is None
    with_alias = outputs["noise_pred"]
    handle = block.register_forward_hook(lambda m, a, out: (out[0].clone(), out[1]))
    try:
        no_alias = UNetGraph(oracle.unet)(*args).numpy()
    finally:
        handle.remove()
    effect = float(np.abs(no_alias - with_alias).max())
    assert effect > 1e-4
    got = run_ort(zoo.set_dir / spec["file"], inputs)[0]
    err = assert_close(got, with_alias, "unet.noise_pred")
    assert err < effect / 100, (err, effect)


@torch.no_grad()
def test_zero_residuals_are_no_adapter(zoo, oracle):
    spec, inputs, _ = _unet_feeds(zoo)
    residual = ("adapter_residual_", "control_down_", "control_mid")
    feeds = {k: (np.zeros_like(v) if k.startswith(residual) else v) for k, v in inputs.items()}
    got = run_ort(zoo.set_dir / spec["file"], feeds)[0]
    want = oracle.unet(
        torch.from_numpy(inputs["sample"]),
        torch.from_numpy(inputs["timestep"]),
        encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
        return_dict=False,
    )[0].numpy()
    assert_close(got, want, "unet.noise_pred (zero residuals vs no adapter)")


@torch.no_grad()
@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_scales_are_diffusers_conditioning_scale(zoo, oracle, guess_mode):
    """The `scales` input the runtime fills (every entry the scale; in guess mode the manifest's
    `guess_mode_scales` times it, in float32) gives what ControlNetModel gives with
    `conditioning_scale` and `guess_mode`."""
    m = zoo.manifest()
    entry = m["controlnets"][0]
    spec = entry["graph"]
    inputs, _ = load_graph_fixture(zoo.fixtures_dir, "controlnet_canny", spec)
    scale = 0.8
    n = len(m["control_slots"])
    scales = np.float32(entry["guess_mode_scales"]) * np.float32(scale) if guess_mode else np.full(n, scale, np.float32)
    got = run_ort(zoo.set_dir / spec["file"], {**inputs, "scales": scales})
    down, mid = oracle.controlnets[entry["name"]](
        torch.from_numpy(inputs["sample"]),
        torch.from_numpy(inputs["timestep"]),
        encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
        controlnet_cond=torch.from_numpy(inputs["controlnet_cond"]),
        conditioning_scale=scale,
        guess_mode=guess_mode,
        return_dict=False,
    )
    assert len(got) == len(down) + 1 == n
    for slot, g, w in zip(m["control_slots"], got, [*down, mid]):
        assert_close(g, w.numpy(), f"controlnet_canny.{slot['input']} (guess_mode={guess_mode})")


def test_graphs_take_other_sizes_and_batches(zoo, oracle):
    """Dynamic axes really are dynamic: batch 3, a 128x64 image (latent 16x8)."""
    m = zoo.manifest()
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(3, 4, 16, 8, generator=g)
    with torch.no_grad():
        want = oracle.vae.decode(latent, return_dict=False)[0].numpy()
    got = run_ort(zoo.set_dir / m["graphs"]["vae_decoder"]["file"], {"latent_sample": latent.numpy()})[0]
    assert_close(got, want, "vae_decoder at batch 3, 128x64")
    image = torch.rand(3, 3, 128, 64, generator=g) * 2 - 1
    with torch.no_grad():
        posterior = oracle.vae.encode(image).latent_dist
    got = run_ort(zoo.set_dir / m["graphs"]["vae_encoder"]["file"], {"image": image.numpy()})
    assert_close(got[0], posterior.mean.numpy(), "vae_encoder.latent_mean at batch 3, 128x64")
    assert_close(got[1], posterior.std.numpy(), "vae_encoder.latent_std at batch 3, 128x64")
    cond = torch.rand(3, 1, 128, 64, generator=g)
    with torch.no_grad():
        want_feats = oracle.adapters["sketch"](cond)
    spec = graph_specs(m)["adapter_sketch"]
    for got_f, want_f in zip(run_ort(zoo.set_dir / spec["file"], {"condition": cond.numpy()}), want_feats):
        assert_close(got_f, want_f.numpy(), "adapter_sketch at batch 3, 128x64")
