"""The fixtures are reachable from the graph set alone: a minimal Python stand-in for the runtime
(tokenizer.json, the ONNX graphs in onnxruntime, the manifest's scheduler config, PIL Lanczos) runs
every case of cases.json and lands on expected_latents / expected_images.

This checks the fixtures and the manifest together, before any Rust is involved. Tolerance: the
graphs differ from torch by ~1e-6 per call; through 6 CFG steps that grows to the measured
~1e-6 relative L2 on the final latents. Bound 1e-4 relative L2, images within 1 level.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from conftest import COMMITTED_FIXTURES, COMMITTED_SET

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from t2i_export.reference import PRESETS, SCHEDULERS
from t2i_export.tokenizer import encode_padded


class GraphPipeline:
    def __init__(self, set_dir):
        self.dir = set_dir
        self.m = json.loads((set_dir / "manifest.json").read_text(encoding="utf-8"))
        self.sess = {k: ort.InferenceSession(str(set_dir / g["file"])) for k, g in self.m["graphs"].items()}
        self.adapters = {a["name"]: a for a in self.m["adapters"]}
        for a in self.m["adapters"]:
            self.sess["adapter_" + a["name"]] = ort.InferenceSession(str(set_dir / a["graph"]["file"]))
        (self.te,) = self.m["text_encoders"]
        self.sess["text_encoder"] = ort.InferenceSession(str(set_dir / self.te["graph"]["file"]))
        self.tok = Tokenizer.from_file(str(set_dir / self.te["tokenizer"]["file"]))

    def ids(self, text):
        t = self.te["tokenizer"]
        return encode_padded(self.tok, text, t["max_length"], self.tok.token_to_id("<|endoftext|>"), t["pad_token_id"])

    def condition(self, path, spec, width, height):
        image = Image.open(path)
        image = image.convert("L" if spec["condition"] == "gray" else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        a = np.asarray(image).astype(np.float32) / 255.0
        a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
        return np.ascontiguousarray(a)

    def run(self, case, fixtures_dir):
        n, cfg = case["n_samples"], case["guidance"] > 1.0
        texts = ([case["negative_prompt"] or ""] if cfg else []) + [case["prompt"]]
        hidden = self.sess["text_encoder"].run(None, {"input_ids": np.array([self.ids(t) for t in texts], np.int64)})[0]
        embeds = np.concatenate([np.repeat(hidden[i : i + 1], n, axis=0) for i in range(len(texts))])

        slots = self.m["residual_slots"]
        state = None
        for a in case["adapters"]:
            spec = self.adapters[a["name"]]
            x = self.condition(fixtures_dir / a["image"], spec, case["width"], case["height"])
            feats = self.sess["adapter_" + a["name"]].run(None, {"condition": x})
            w = np.float32(a["weight"])
            weighted = [w * f for f in feats]
            if state is None:
                state = [None] * len(slots)
            for slot, f in zip(spec["residual_slots"], weighted):
                state[slot] = f if state[slot] is None else state[slot] + f
        batch = (2 if cfg else 1) * n
        h, w = case["height"] // 8, case["width"] // 8
        zeros = [np.zeros((batch, s["channels"], h // s["downscale"], w // s["downscale"]), np.float32) for s in slots]
        if state is not None:
            state = [np.concatenate([np.repeat(f, n, axis=0)] * (2 if cfg else 1)) for f in state]

        kind = case["scheduler"]
        options = {**PRESETS.get(kind, {}), **case.get("scheduler_options", {})}
        scheduler = SCHEDULERS[kind].from_config(self.m["scheduler"], **options)
        scheduler.set_timesteps(case["steps"])
        # A case without latents passed diffusers generator=torch.Generator("cpu").manual_seed(seed): the
        # latents first, then each stochastic step's noise (diffusers' randn_tensor), from that generator.
        generator = torch.Generator("cpu").manual_seed(case["seed"])
        if case["latents"] is None:
            initial = torch.randn((n, self.m["latent"]["channels"], h, w), generator=generator)
        else:
            initial = torch.from_numpy(np.load(fixtures_dir / case["latents"]))
        latents = initial * scheduler.init_noise_sigma
        # cond_tau 1: every model call (the SD 1.x pipeline); below: the XL pipeline's int(steps * tau).
        cond_steps = len(scheduler.timesteps) if case["cond_tau"] >= 1 else int(case["steps"] * case["cond_tau"])
        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            feeds = {
                "sample": model_input.numpy(),
                "timestep": np.full(batch, float(t), np.float32),
                "encoder_hidden_states": embeds,
            }
            residuals = state if state is not None and i < cond_steps else zeros
            feeds.update({s["input"]: r for s, r in zip(slots, residuals)})
            noise = torch.from_numpy(self.sess["unet"].run(None, feeds)[0])
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + case["guidance"] * (text - uncond)
                if case.get("guidance_rescale", 0.0) > 0.0:
                    noise = rescale_noise_cfg(noise, text, guidance_rescale=case["guidance_rescale"])
            params = set(inspect.signature(scheduler.step).parameters)
            kwargs = {"eta": case.get("eta", 0.0)} if "eta" in params else {}
            if "generator" in params:
                kwargs["generator"] = generator
            latents = scheduler.step(noise, t, latents, **kwargs).prev_sample
        image = self.sess["vae_decoder"].run(None, {"latent_sample": (latents / self.m["vae"]["scaling_factor"]).numpy()})[0]
        pixels = (np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
        return latents.numpy(), pixels


def _cases(fixtures_dir):
    return json.loads((fixtures_dir / "cases.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("which", ["fresh", "committed"])
def test_graph_set_reproduces_every_case(zoo, which):
    set_dir, fixtures_dir = (zoo.set_dir, zoo.fixtures_dir) if which == "fresh" else (COMMITTED_SET, COMMITTED_FIXTURES)
    pipe = GraphPipeline(set_dir)
    for case in _cases(fixtures_dir):
        latents, pixels = pipe.run(case, fixtures_dir)
        want = np.load(fixtures_dir / case["expected_latents"])
        rel = float(np.linalg.norm(latents - want) / np.linalg.norm(want))
        assert rel <= 1e-4, f"{case['name']}: relative L2 {rel:.3g}"
        for k, rel_png in enumerate(case["expected_images"]):
            expected = np.asarray(Image.open(fixtures_dir / rel_png)).astype(int)
            diff = int(np.abs(pixels[k].astype(int) - expected).max())
            assert diff <= 1, f"{case['name']} image {k}: max pixel diff {diff}"
