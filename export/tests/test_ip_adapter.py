"""IP-Adapter export (ip_adapter.py) against diffusers, graph by graph.

The oracle is diffusers' own path: `StableDiffusionPipeline.load_ip_adapter` on the tiny h94-layout
files (tiny_ip_adapter.py), the UNet then called with `added_cond_kwargs={"image_embeds": ...}` after
`set_ip_adapter_scale`.

Tolerance: relative L2 error ||onnx - torch|| / ||torch|| <= 1e-5. Both sides compute in float32;
onnxruntime reorders MatMul/Softmax/LayerNorm accumulation, a few ulps per op (measured here: ~1e-7
to 1e-6). An IP-Adapter semantic error (a missing layer, the scale applied twice, the wrong encoder
output) moves the result by >= 1e-2 relative, checked in each test against the IP effect itself.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import EXPORT_DIR, assert_rel_l2 as rel_l2, ort_run as run

from t2i_export.condition_fixtures import photo
from t2i_export.errors import ExportError
from t2i_export.fixtures import condition_images
from t2i_export.ip_adapter_cases import CASES, run_loop
from t2i_export.manifest import verify
from t2i_export.pipeline import export_pipeline
from t2i_export.tiny import write_checkpoint
from t2i_export.tiny_ip_adapter import VISION_CONFIG, build_ip_adapter, build_projection, save_ip_adapter, write_tiny_ip_adapters

SCALE = 0.6
KINDS = ["plain", "plus"]


@pytest.fixture(scope="module")
def ip_work(tmp_path_factory):
    """The tiny SD 1 checkpoint, its IP-Adapter files and image encoder, and one graph set per kind."""
    root = tmp_path_factory.mktemp("ip")
    model_dir, adapter_dirs = write_checkpoint(root / "work")
    unet = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False).unet
    encoder_dir, files = write_tiny_ip_adapters(root / "ip", unet)
    sets = {k: export_pipeline(model_dir, [], root / f"set-{k}", ip_adapter=files[k], image_encoder=encoder_dir) for k in KINDS}
    return {"root": root, "model": model_dir, "encoder": encoder_dir, "files": files, "sets": sets, "unet": unet,
            "adapters": adapter_dirs}


def oracle_pipe(ip_work, kind: str | None):
    pipe = StableDiffusionPipeline.from_pretrained(str(ip_work["model"]), safety_checker=None, requires_safety_checker=False)
    if kind:
        f = ip_work["files"][kind]
        pipe.load_ip_adapter(str(f.parent), subfolder="", weight_name=f.name, image_encoder_folder=str(ip_work["encoder"]))
    return pipe


def manifest_of(ip_work, kind):
    return verify(ip_work["sets"][kind])


def unet_inputs(m: dict, batch: int = 2, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 16, generator=g),
        "timestep": torch.tensor([981.0, 17.25][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, 4, generator=g),
        **{s["input"]: torch.zeros(batch, s["channels"], 8 // s["downscale"], 16 // s["downscale"]) for s in m["residual_slots"]},
    }


def pixels(batch: int = 3, seed: int = 7) -> torch.Tensor:
    size = VISION_CONFIG["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_entry(ip_work, kind):
    m = manifest_of(ip_work, kind)
    ip = m["ip_adapter"]
    assert ip["kind"] == kind and ip["num_tokens"] == (4 if kind == "plain" else 8)
    assert ip["image_encoder_output"] == ("image_embeds" if kind == "plain" else "penultimate_hidden_states")
    assert ip["negative"] == ("zero_embeds" if kind == "plain" else "zero_pixel_values")
    assert ip["preprocess"] == {
        "convert_rgb": True, "shortest_edge": 224, "resample": "bicubic", "crop": [224, 224], "rescale_factor": 1 / 255,
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    }
    assert ip["image_encoder"]["batch"] == ip["image_projection"]["batch"] == "images"
    names = [i["name"] for i in m["graphs"]["unet"]["inputs"]]
    assert names[3:5] == ["ip_tokens", "ip_scale"]
    dims = {i["name"]: i["dims"] for i in m["graphs"]["unet"]["inputs"]}
    assert dims["ip_tokens"] == ["batch", ip["num_tokens"], 4] and dims["ip_scale"] == [1]
    assert ip["image_projection"]["outputs"][0]["dims"] == ["batch", ip["num_tokens"], 4]


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_encoder_and_projection_match_diffusers(ip_work, kind):
    """At batch 3 (exported at 2): diffusers' `encode_image` output, then its `encoder_hid_proj` layer."""
    pipe = oracle_pipe(ip_work, kind)
    ip = manifest_of(ip_work, kind)["ip_adapter"]
    x = pixels()
    want, _ = pipe.encode_image(x, "cpu", 1, output_hidden_states=kind == "plus")
    got = run(ip_work["sets"][kind] / ip["image_encoder"]["file"], {"pixel_values": x.numpy()})[0]
    rel_l2(got, want.numpy(), f"{kind} image_encoder")
    tokens = pipe.unet.encoder_hid_proj([want[:, None]])[0][:, 0]
    got_tokens = run(ip_work["sets"][kind] / ip["image_projection"]["file"], {"image_embeds": want.numpy()})[0]
    rel_l2(got_tokens, tokens.numpy(), f"{kind} image_projection")


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_unet_matches_diffusers_ip_adapter(ip_work, kind):
    """image_encoder -> image_projection -> unet (onnxruntime) == diffusers' UNet with the IP-Adapter
    loaded, `image_embeds` in `added_cond_kwargs`, at scale 0.6, as a CFG pair (negative as the
    manifest says)."""
    pipe = oracle_pipe(ip_work, kind)
    pipe.set_ip_adapter_scale(SCALE)
    set_dir = ip_work["sets"][kind]
    m = manifest_of(ip_work, kind)
    ip = m["ip_adapter"]
    x = pixels(1)
    embeds, negative = pipe.encode_image(x, "cpu", 1, output_hidden_states=kind == "plus")
    image_embeds = torch.cat([negative, embeds])[:, None]  # prepare_ip_adapter_image_embeds' [negative; positive]
    inputs = unet_inputs(m)
    want = pipe.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     added_cond_kwargs={"image_embeds": [image_embeds]}, return_dict=False)[0].numpy()

    rows = np.concatenate([np.zeros_like(x.numpy()), x.numpy()]) if ip["negative"] == "zero_pixel_values" else x.numpy()
    enc = run(set_dir / ip["image_encoder"]["file"], {"pixel_values": rows})[0]
    if ip["negative"] == "zero_embeds":
        enc = np.concatenate([np.zeros_like(enc), enc])
    tokens = run(set_dir / ip["image_projection"]["file"], {"image_embeds": enc})[0]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = run(set_dir / m["graphs"]["unet"]["file"], {**feeds, "ip_tokens": tokens, "ip_scale": np.float32([SCALE])})[0]
    rel_l2(got, want, f"{kind} unet at scale {SCALE}")

    plain = oracle_pipe(ip_work, None).unet
    without = plain(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                    return_dict=False)[0].numpy()
    effect = float(np.linalg.norm(want - without) / np.linalg.norm(without))
    assert effect > 1e-2, f"{kind}: the IP-Adapter moves the tiny UNet by only {effect:.3g}: the test would not see an error"


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_scale_zero_is_no_ip_adapter(ip_work, kind):
    """ip_scale 0: bit for bit the same output whatever ip_tokens hold, and diffusers' UNet without an
    IP-Adapter within tolerance."""
    set_dir = ip_work["sets"][kind]
    m = manifest_of(ip_work, kind)
    n = m["ip_adapter"]["num_tokens"]
    feeds = {k: v.numpy() for k, v in unet_inputs(m).items()}
    g = np.random.default_rng(0)
    unet_file = set_dir / m["graphs"]["unet"]["file"]
    zero = np.float32([0.0])
    a = run(unet_file, {**feeds, "ip_tokens": g.standard_normal((2, n, 4), np.float32) * 10, "ip_scale": zero})[0]
    b = run(unet_file, {**feeds, "ip_tokens": np.zeros((2, n, 4), np.float32), "ip_scale": zero})[0]
    assert np.array_equal(a, b)
    plain = oracle_pipe(ip_work, None).unet
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    want = plain(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"], return_dict=False)[0].numpy()
    rel_l2(a, want, f"{kind} unet at ip_scale 0 vs no IP-Adapter")


def test_tiny_files_roundtrip_through_diffusers_converter(ip_work):
    """The h94-layout files hold exactly the weights of the diffusers modules they were built from:
    diffusers' converter maps them back key for key (strict load), value for value."""
    for kind in KINDS:
        state = build_ip_adapter(ip_work["unet"], kind)
        back = ip_work["unet"]._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
        want = build_projection(ip_work["unet"], kind).state_dict()
        got = back.state_dict()
        assert sorted(got) == sorted(want), kind
        assert all(torch.equal(got[k], want[k]) for k in want), kind


# ---- errors: one ExportError line each


def test_error_weights_without_ip_parts(ip_work, tmp_path):
    bad = tmp_path / "nothing.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ExportError, match="no image_proj and ip_adapter weights"):
        export_pipeline(ip_work["model"], [], tmp_path / "out", ip_adapter=bad, image_encoder=ip_work["encoder"])


def test_error_other_base_model(ip_work, tmp_path):
    """An adapter for a UNet of another cross-attention width, and one with a layer missing."""
    state = build_ip_adapter(ip_work["unet"], "plain")
    state["image_proj"]["proj.weight"] = torch.zeros(4 * 8, VISION_CONFIG["projection_dim"])
    state["image_proj"]["norm.weight"], state["image_proj"]["norm.bias"] = torch.ones(8), torch.zeros(8)
    wide = save_ip_adapter(state, tmp_path / "wide.safetensors")
    with pytest.raises(ExportError, match="tokens are 8 wide but the UNet's cross_attention_dim is 4"):
        export_pipeline(ip_work["model"], [], tmp_path / "out", ip_adapter=wide, image_encoder=ip_work["encoder"])
    state = build_ip_adapter(ip_work["unet"], "plus")
    last = max(int(k.split(".")[0]) for k in state["ip_adapter"])
    state["ip_adapter"] = {k: v for k, v in state["ip_adapter"].items() if not k.startswith(f"{last}.")}
    short = save_ip_adapter(state, tmp_path / "short.bin")
    with pytest.raises(ExportError, match=r"weights for \d+ cross-attention layers, the UNet has \d+"):
        export_pipeline(ip_work["model"], [], tmp_path / "out", ip_adapter=short, image_encoder=ip_work["encoder"])


def test_error_encoder_width(ip_work, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    other = tmp_path / "encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**VISION_CONFIG, "projection_dim": 6})).save_pretrained(str(other))
    with pytest.raises(ExportError, match="projection_dim .* is 6 but the plain IP-Adapter"):
        export_pipeline(ip_work["model"], [], tmp_path / "out", ip_adapter=ip_work["files"]["plain"], image_encoder=other)


def test_error_lines_from_cli(ip_work, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "t2i_export", "pipeline", "--model", str(ip_work["model"]), "--out", str(tmp_path / "o"),
         "--ip-adapter", str(ip_work["files"]["plain"])],
        cwd=EXPORT_DIR, capture_output=True, text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "needs --image-encoder" in r.stderr


def test_cli_help_mentions_flags():
    r = subprocess.run([sys.executable, "-m", "t2i_export", "pipeline", "--help"], cwd=EXPORT_DIR, capture_output=True, text=True)
    assert r.returncode == 0 and "--ip-adapter" in r.stdout and "--image-encoder" in r.stdout


def feeds_from_spec(spec: dict, dims: dict, seed: int = 11) -> dict:
    """Random float32 inputs for a GraphSpec, symbolic dims from `dims` (`latent_height_divN` derived)."""
    g = np.random.default_rng(seed)

    def size(d):
        if isinstance(d, int):
            return d
        base, _, div = d.partition("_div")
        return dims[base] // int(div) if div else dims[base]

    return {i["name"]: g.standard_normal([size(d) for d in i["dims"]]).astype(np.float32) for i in spec["inputs"]}


@torch.no_grad()
def test_sdxl_unet_matches_diffusers_ip_adapter(tmp_path):
    """SDXL: the IP inputs come after text_embeds/time_ids; the rest as for SD 1 (plain adapter)."""
    from diffusers import StableDiffusionXLPipeline

    from t2i_export.tiny import write_checkpoint_sdxl

    model_dir, _ = write_checkpoint_sdxl(tmp_path / "work")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    encoder_dir, files = write_tiny_ip_adapters(tmp_path / "ip", pipe.unet)
    set_dir = export_pipeline(model_dir, [], tmp_path / "set", ip_adapter=files["plain"], image_encoder=encoder_dir)
    m = verify(set_dir)
    spec = m["graphs"]["unet"]
    names = [i["name"] for i in spec["inputs"]]
    assert names[3:7] == ["text_embeds", "time_ids", "ip_tokens", "ip_scale"]
    lat = m["size_multiple"] // m["latent"]["downscale"]
    feeds = feeds_from_spec(spec, {"batch": 2, "latent_height": lat, "latent_width": 2 * lat})
    feeds["timestep"] = np.float32([981.0, 17.25])
    feeds["time_ids"] = np.float32([[64, 128, 0, 0, 64, 128]] * 2)
    feeds["ip_scale"] = np.float32([SCALE])
    for k in feeds:
        if k.startswith("adapter_residual_"):
            feeds[k][:] = 0
    embeds = torch.from_numpy(feeds_from_spec(m["ip_adapter"]["image_projection"], {"batch": 2})["image_embeds"])
    feeds["ip_tokens"] = run(set_dir / m["ip_adapter"]["image_projection"]["file"], {"image_embeds": embeds.numpy()})[0]
    got = run(set_dir / spec["file"], feeds)[0]

    f = files["plain"]
    pipe.load_ip_adapter(str(f.parent), subfolder="", weight_name=f.name, image_encoder_folder=str(encoder_dir))
    pipe.set_ip_adapter_scale(SCALE)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    want = pipe.unet(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                     added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"], "image_embeds": [embeds[:, None]]},
                     return_dict=False)[0].numpy()
    rel_l2(got, want, "sdxl unet at scale 0.6")
    pipe.set_ip_adapter_scale(0.0)
    without = pipe.unet(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"], "image_embeds": [embeds[:, None]]},
                        return_dict=False)[0].numpy()
    assert float(np.linalg.norm(want - without) / np.linalg.norm(without)) > 1e-2


def preprocess_like_manifest(path, pre: dict) -> np.ndarray:
    """What the runtime is to do with `ip_adapter.preprocess` (transformers' CLIPImageProcessor steps:
    shortest edge to `shortest_edge`, the long one floor(shortest_edge * long / short), PIL resample;
    center crop at ((h - ch) // 2, (w - cw) // 2); × rescale_factor; (x - mean) / std)."""
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[pre["resample"]]
    image = Image.open(path)
    if pre["convert_rgb"]:
        image = image.convert("RGB")
    w, h = image.size
    s = pre["shortest_edge"]
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    x = np.asarray(image.resize(size, resample)).astype(np.float32)
    cw, ch = pre["crop"]
    top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
    x = x[top:top + ch, left:left + cw] * np.float32(pre["rescale_factor"])
    x = (x - np.float32(pre["mean"])) / np.float32(pre["std"])
    return x.transpose(2, 0, 1)[None]


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_fixture_reproduced_by_graphs(ip_work, kind, tmp_path):
    """ip_adapter_fixtures.py's diffusers pipeline run, redone from the manifest: preprocessing as the
    manifest describes it, image_encoder + image_projection graphs with the manifest's negative, then
    the denoising loop on the UNet graph (prompt embeddings and scheduler from diffusers)."""
    from t2i_export.ip_adapter_fixtures import CASE, load_pipeline, write_fixtures

    fx = write_fixtures(ip_work["model"], ip_work["files"][kind], ip_work["encoder"], tmp_path / "fx")
    set_dir = ip_work["sets"][kind]
    m = manifest_of(ip_work, kind)
    ip = m["ip_adapter"]
    want_pixels = np.load(fx / "pixel_values.npy")
    got_pixels = preprocess_like_manifest(fx / "image.png", ip["preprocess"])
    assert np.abs(got_pixels - want_pixels).max() <= 1e-5

    rows = want_pixels if ip["negative"] == "zero_embeds" else np.concatenate([np.zeros_like(want_pixels), want_pixels])
    enc = run(set_dir / ip["image_encoder"]["file"], {"pixel_values": rows})[0]
    rel_l2(enc[-1:], np.load(fx / "image_embeds.npy"), f"{kind} fixture image_embeds")
    neg = np.zeros_like(enc) if ip["negative"] == "zero_embeds" else enc[:1]
    if ip["negative"] == "zero_pixel_values":
        rel_l2(neg, np.load(fx / "negative_image_embeds.npy"), f"{kind} fixture negative_image_embeds")
    tokens = run(set_dir / ip["image_projection"]["file"], {"image_embeds": np.concatenate([neg, enc[-1:]])})[0]
    rel_l2(tokens, np.load(fx / "ip_tokens.npy"), f"{kind} fixture ip_tokens")

    pipe = load_pipeline(ip_work["model"], ip_work["files"][kind], ip_work["encoder"])
    prompt, negative = pipe.encode_prompt(CASE["prompt"], "cpu", 1, True, CASE["negative_prompt"])
    ehs = torch.cat([negative, prompt]).numpy()
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(CASE["steps"])
    latents = torch.from_numpy(np.load(fx / "latents_init.npy")) * scheduler.init_noise_sigma
    session = ort.InferenceSession(str(set_dir / m["graphs"]["unet"]["file"]), providers=["CPUExecutionProvider"])
    h, w = latents.shape[2:]
    zeros = {s["input"]: np.zeros((2, s["channels"], h // s["downscale"], w // s["downscale"]), np.float32)
             for s in m["residual_slots"]}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = session.run(None, {"sample": model_input.numpy(), "timestep": np.full(2, float(t), np.float32),
                                   "encoder_hidden_states": ehs, "ip_tokens": tokens, "ip_scale": np.float32([CASE["ip_scale"]]),
                                   **zeros})[0]
        uncond, text = torch.from_numpy(noise).chunk(2)
        latents = scheduler.step(uncond + CASE["guidance_scale"] * (text - uncond), t, latents).prev_sample
    rel_l2(latents.numpy(), np.load(fx / "latents.npy"), f"{kind} fixture final latents")


def test_error_unsupported_kinds(ip_work, tmp_path):
    """Full-face and FaceID projections load in diffusers but are not plain or Plus: refused by name;
    and one IP-Adapter per set."""
    state = build_ip_adapter(ip_work["unet"], "plain")
    state["image_proj"] = {"proj.0.weight": torch.zeros(8, 8), "proj.3.weight": torch.zeros(4)}
    full = save_ip_adapter(state, tmp_path / "full.bin")
    with pytest.raises(ExportError, match="a Full/FaceID image projection"):
        export_pipeline(ip_work["model"], [], tmp_path / "out", ip_adapter=full, image_encoder=ip_work["encoder"])
    f = str(ip_work["files"]["plain"])
    r = subprocess.run(
        [sys.executable, "-m", "t2i_export", "pipeline", "--model", str(ip_work["model"]), "--out", str(tmp_path / "o"),
         "--ip-adapter", f, "--ip-adapter", f, "--image-encoder", str(ip_work["encoder"])],
        cwd=EXPORT_DIR, capture_output=True, text=True,
    )
    assert r.returncode == 2 and "given more than once" in r.stderr, r.stderr


@torch.no_grad()
def test_ip_adapter_loop_equals_the_pipeline_at_adapter_weight_0(ip_work, tmp_path):
    """ip_adapter_cases.run_loop (StableDiffusionAdapterPipeline's loop with StableDiffusionPipeline's
    IP-Adapter embeds) with the adapter's weight at 0 is StableDiffusionPipeline with the same
    ip_adapter_image bit for bit: its text, IP and CFG paths and its scheduler are the pipeline's own,
    the adapter residuals the only addition; and at the case's weight the adapter moves the result."""
    from diffusers import T2IAdapter

    pipe = oracle_pipe(ip_work, "plain")
    pipe.set_ip_adapter_scale(SCALE)
    case = next(c for c in CASES if c["reference"] == "loop")
    (spec,) = case["adapters"]
    (tmp_path / spec["image"]).parent.mkdir(parents=True)
    condition_images()["sketch"].save(tmp_path / spec["image"])
    adapter = T2IAdapter.from_pretrained(str(ip_work["adapters"][spec["name"]])).eval()
    cdir = tmp_path / "cases" / case["name"]
    off = run_loop(pipe, adapter, dict(case, adapters=[dict(spec, weight=0.0)]), photo(), cdir)
    want = pipe(case["prompt"], negative_prompt=case["negative_prompt"], ip_adapter_image=photo(),
                num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                latents=torch.from_numpy(np.load(cdir / "latents.npy")), output_type="latent").images
    assert torch.equal(off, want)
    on = run_loop(pipe, adapter, case, photo(), cdir)
    assert float((on - want).norm() / want.norm()) > 1e-2
