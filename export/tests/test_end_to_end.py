"""The fixtures are reachable from the graph set alone: a minimal Python stand-in for the runtime
(the tokenizer, the ONNX graphs in onnxruntime, the manifest's scheduler config, PIL Lanczos) runs
every case of cases.json and lands on expected_latents / expected_images.

This checks the fixtures and the manifest together, before any Rust is involved. Tolerance: the
graphs differ from torch by ~1e-6 per call; through 6 CFG steps that grows to the measured
~1e-6 relative L2 on the final latents. Bound 1e-4 relative L2, images within 1 level.

img2img and inpainting cases run here as the runtime must run them, from the vae_encoder graph's
mean and std and eps drawn from torch.Generator("cpu") (the order of draws is the diffusers
semantics in export/README.md); their debug_* files (init image latents, masked image latents,
latent mask, initial latents, SDXL time ids) are checked on the way, within the same 1e-4 relative
L2 (the latent mask and the time ids exactly).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import REPO

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from t2i_export.reference import PRESETS, SCHEDULERS
from t2i_export.tokenizer import encode_padded, entry_backend

REL_L2 = 1e-4


class GraphPipeline:
    def __init__(self, set_dir):
        self.dir = set_dir
        self.m = json.loads((set_dir / "manifest.json").read_text(encoding="utf-8"))
        self.sess = {k: ort.InferenceSession(str(set_dir / g["file"])) for k, g in self.m["graphs"].items()}
        self.adapters = {a["name"]: a for a in self.m["adapters"]}
        for a in self.m["adapters"]:
            self.sess["adapter_" + a["name"]] = ort.InferenceSession(str(set_dir / a["graph"]["file"]))
        self.controlnets = {c["name"]: c for c in self.m.get("controlnets", [])}
        for c in self.controlnets.values():
            self.sess["controlnet_" + c["name"]] = ort.InferenceSession(str(set_dir / c["graph"]["file"]))
        self.control_slots = self.m.get("control_slots", [])
        self.toks = {}
        for te in self.m["text_encoders"]:
            self.sess[te["name"]] = ort.InferenceSession(str(set_dir / te["graph"]["file"]))
            self.toks[te["name"]] = entry_backend(set_dir, te["tokenizer"])
        self.channels = self.m["latent"]["channels"]
        self.downscale = self.m["latent"]["downscale"]
        sample = next(i for i in self.m["graphs"]["unet"]["inputs"] if i["name"] == "sample")
        # stable-diffusion-inpainting's UNet: cat[latents C, mask 1, masked_image_latents C]
        self.inpainting_unet = sample["dims"][1] == 2 * self.channels + 1

    def encode_text(self, text) -> tuple[np.ndarray, np.ndarray | None]:
        """encoder_hidden_states [1, 77, sum D] (the encoders' hidden outputs concatenated) and, with
        added conditioning, text_embeds [1, P]."""
        hiddens, pooled = [], None
        for te in self.m["text_encoders"]:
            tok, t = self.toks[te["name"]], te["tokenizer"]
            ids = encode_padded(tok, text, t["max_length"], tok.token_to_id("<|endoftext|>"), t["pad_token_id"])
            sess = self.sess[te["name"]]
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": np.array([ids], np.int64)})))
            hiddens.append(out[te["hidden_output"]])
            if te["name"] == self.m["added_cond"].get("text_embeds"):
                pooled = out[te["pooled_output"]]
        return np.concatenate(hiddens, axis=-1), pooled

    def conditioning(self, case, n: int, cfg: bool) -> dict[str, np.ndarray]:
        """The UNet's text feeds over the batch [negative x n; positive x n] (SDXL: also text_embeds and
        time_ids, with force_zeros_for_empty_prompt)."""
        rows = [self.encode_text(case["prompt"])]
        if cfg:
            if case["negative_prompt"] is None and self.m["force_zeros_for_empty_prompt"]:
                rows.insert(0, tuple(None if a is None else np.zeros_like(a) for a in rows[0]))
            else:
                rows.insert(0, self.encode_text(case["negative_prompt"] or ""))
        feeds = {"encoder_hidden_states": np.concatenate([np.repeat(h, n, axis=0) for h, _ in rows])}
        if not self.m["added_cond"]:
            return feeds
        feeds["text_embeds"] = np.concatenate([np.repeat(p, n, axis=0) for _, p in rows])
        size = case.get("size_cond", {})
        hw = [case["height"], case["width"]]
        original, crop, target = size.get("original_size", hw), size.get("crops_coords_top_left", [0, 0]), size.get("target_size", hw)
        positive = original + crop + target
        if case.get("init_image") is not None:
            # StableDiffusionXLImg2ImgPipeline / XLInpaintPipeline._get_add_time_ids (no aesthetic score):
            # negative sizes default to the positive ones and the crop is the positive one
            # (negative_crops_coords_top_left is ignored); [neg x n; pos x n]
            negative = size.get("negative_original_size", original) + crop + size.get("negative_target_size", target)
            ids = ([negative] * n if cfg else []) + [positive] * n
        else:
            # StableDiffusionXLAdapterPipeline: negative ids only with both negative sizes; cat, then repeat
            negative = positive
            if "negative_original_size" in size and "negative_target_size" in size:
                negative = size["negative_original_size"] + size.get("negative_crops_coords_top_left", [0, 0]) + size["negative_target_size"]
            ids = ([negative, positive] if cfg else [positive]) * n
        feeds["time_ids"] = np.array(ids, np.float32)
        return feeds

    def condition(self, path, spec, width, height):
        image = Image.open(path)
        image = image.convert("L" if spec["condition"] == "gray" else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        a = np.asarray(image).astype(np.float32) / 255.0
        a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
        return np.ascontiguousarray(a)

    @staticmethod
    def control_image(path, width, height) -> np.ndarray:
        """The ControlNet pipelines' control_image_processor (VaeImageProcessor, do_convert_rgb,
        no normalisation): RGB resized with PIL Lanczos when the size differs, / 255: [1, 3, H, W]."""
        image = Image.open(path).convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return np.ascontiguousarray((np.asarray(image).astype(np.float32) / 255.0).transpose(2, 0, 1)[None])

    def control_residuals(self, case, controls, i, calls, t, model_input, text_feeds, n, cfg):
        """The summed ControlNet residuals for UNet call i of `calls` (StableDiffusion[XL]ControlNet
        pipelines, MultiControlNetModel): each net at `scale * controlnet_keep[i]` on the call's scaled
        latents; in guess mode with guidance, on the conditional half only, zeros for the other."""
        start, end, guess = case["control_start"], case["control_end"], case["guess_mode"]
        keep = 1.0 - float(i / calls < start or (i + 1) / calls > end)
        half = guess and cfg
        rows = slice(n, None) if half else slice(None)
        total = None
        for c, image in controls:
            spec = self.controlnets[c["name"]]
            cond_scale = np.float32(c["scale"] * keep)
            gm = np.asarray(spec["guess_mode_scales"], np.float32)
            scales = gm * cond_scale if guess else np.full(gm.shape, cond_scale, np.float32)
            sample = model_input[rows]
            feeds = {"sample": sample, "timestep": np.full(sample.shape[0], t, np.float32)}
            feeds.update({k: v[rows] for k, v in text_feeds.items()})
            feeds["controlnet_cond"] = np.ascontiguousarray(np.broadcast_to(image, (sample.shape[0], *image.shape[1:])))
            feeds["scales"] = scales
            out = self.sess["controlnet_" + c["name"]].run(None, feeds)
            if half:
                out = [np.concatenate([np.zeros_like(o), o]) for o in out]
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return total

    @staticmethod
    def init_image(path) -> np.ndarray:
        """VaeImageProcessor.preprocess: RGB / 255 in float32, then 2x - 1: [1, 3, H, W] in [-1, 1]."""
        a = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
        return np.ascontiguousarray((2.0 * a - 1.0).transpose(2, 0, 1)[None])

    @staticmethod
    def mask(path) -> np.ndarray:
        """The inpainting pipelines' mask_processor: grayscale, / 255, binarised at 0.5: [1, 1, H, W]."""
        a = np.asarray(Image.open(path).convert("L")).astype(np.float32) / 255.0
        return np.where(a >= 0.5, np.float32(1), np.float32(0))[None, None]

    def encode(self, image: np.ndarray, generator) -> torch.Tensor:
        """scaling_factor * (mean + std * eps), eps [1, C, h, w] from the generator (latent_dist.sample)."""
        mean, std = (torch.from_numpy(a) for a in self.sess["vae_encoder"].run(None, {"image": image}))
        eps = torch.randn(mean.shape, generator=generator)
        return self.m["vae"]["scaling_factor"] * (mean + std * eps)

    def run(self, case, fixtures_dir):
        return self.run_traced(case, fixtures_dir)[:2]

    def run_traced(self, case, fixtures_dir):
        """(final latents, uint8 images, {debug name: tensor}) for one case of cases.json."""
        n, cfg = case["n_samples"], case["guidance"] > 1.0
        controls = case.get("controls", [])
        if case["width"] is None:  # the ControlNet pipelines' default: the control image's size, floored
            w, h = Image.open(fixtures_dir / controls[0]["image"]).size
            case = {**case, "width": w // self.downscale * self.downscale, "height": h // self.downscale * self.downscale}
        controls = [(c, self.control_image(fixtures_dir / c["image"], case["width"], case["height"])) for c in controls]
        text_feeds = self.conditioning(case, n, cfg)

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
        h, w = case["height"] // self.downscale, case["width"] // self.downscale
        zeros = [np.zeros((batch, s["channels"], h // s["downscale"], w // s["downscale"]), np.float32) for s in slots]
        control_zeros = [np.zeros((batch, s["channels"], h // s["downscale"], w // s["downscale"]), np.float32)
                         for s in self.control_slots]
        if state is not None:
            state = [np.concatenate([np.repeat(f, n, axis=0)] * (2 if cfg else 1)) for f in state]

        kind = case["scheduler"]
        options = {**PRESETS.get(kind, {}), **case.get("scheduler_options", {})}
        scheduler = SCHEDULERS[kind].from_config(self.m["scheduler"], **options)
        scheduler.set_timesteps(case["steps"])
        timesteps = scheduler.timesteps
        # A case without latents passed diffusers generator=torch.Generator("cpu").manual_seed(seed): the
        # latents first, then each stochastic step's noise (diffusers' randn_tensor), from that generator.
        generator = torch.Generator("cpu").manual_seed(case["seed"])
        shape = (n, self.channels, h, w)
        debug = {}
        if "time_ids" in text_feeds:  # SDXL: [batch, 6] in the UNet's batch order
            debug["time_ids"] = torch.from_numpy(text_feeds["time_ids"])
        inpaint = blend = None
        if case.get("init_image") is not None:
            # get_timesteps: the tail of the schedule that strength leaves, begin index set to its start
            steps, strength = case["steps"], case["strength"]
            t_start = max(steps - min(int(steps * strength), steps), 0)
            timesteps = timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            image = self.init_image(fixtures_dir / case["init_image"])
            first_t = timesteps[:1].repeat(n)
            if case.get("mask") is None:  # img2img: posterior sample [1, ...], then noise [n, ...]
                debug["image_latents"] = image_latents = self.encode(image, generator)
                noise = torch.randn(shape, generator=generator)
                latents = scheduler.add_noise(torch.cat([image_latents] * n), noise, first_t)
            else:
                # inpainting: the init image is encoded unless a 9-channel UNet starts from pure noise
                # (strength 1), then the noise, then the masked image (always, even for a 4-channel UNet)
                full = strength == 1.0
                image_latents = None
                if not self.inpainting_unet or not full:
                    debug["image_latents"] = image_latents = self.encode(image, generator)
                noise = torch.randn(shape, generator=generator)
                if full:
                    latents = noise * scheduler.init_noise_sigma
                else:
                    latents = scheduler.add_noise(image_latents.repeat(n, 1, 1, 1), noise, first_t)
                mask = self.mask(fixtures_dir / case["mask"])
                masked_image = image * (mask < 0.5)
                debug["masked_image_latents"] = masked_latents = self.encode(masked_image, generator)
                # F.interpolate(mask, size=latent size), mode "nearest": each block's top-left pixel
                debug["latent_mask"] = latent_mask = torch.from_numpy(mask[:, :, :: self.downscale, :: self.downscale].copy())
                mask_n = latent_mask.repeat(n, 1, 1, 1)
                if self.inpainting_unet:
                    inpaint = [torch.cat([mask_n] * 2) if cfg else mask_n,
                               torch.cat([masked_latents.repeat(n, 1, 1, 1)] * 2) if cfg else masked_latents.repeat(n, 1, 1, 1)]
                else:
                    blend = (image_latents.repeat(n, 1, 1, 1), noise, mask_n)
        elif case["latents"] is None:
            latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
        else:
            latents = torch.from_numpy(np.load(fixtures_dir / case["latents"])) * scheduler.init_noise_sigma
        debug["initial_latents"] = latents
        # cond_tau 1: every model call (the SD 1.x pipeline); below: the XL pipeline's int(steps * tau).
        cond_steps = len(timesteps) if case["cond_tau"] >= 1 else int(case["steps"] * case["cond_tau"])
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            control = control_zeros
            if controls:  # on the scaled latents, before an inpainting UNet's extra channels
                control = self.control_residuals(case, controls, i, len(timesteps), float(t), model_input.numpy(), text_feeds, n, cfg)
            if inpaint is not None:  # after scale_model_input: the mask and masked latents are not scaled
                model_input = torch.cat([model_input, *inpaint], dim=1)
            feeds = {"sample": model_input.numpy(), "timestep": np.full(batch, float(t), np.float32), **text_feeds}
            residuals = state if state is not None and i < cond_steps else zeros
            feeds.update({s["input"]: r for s, r in zip(slots, residuals)})
            feeds.update({s["input"]: r for s, r in zip(self.control_slots, control)})
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
            if blend is not None:  # 4-channel UNet: outside the mask, the init latents noised to the next timestep
                image_latents, initial_noise, mask_n = blend
                proper = image_latents
                if i < len(timesteps) - 1:
                    proper = scheduler.add_noise(image_latents, initial_noise, torch.tensor([timesteps[i + 1]]))
                latents = (1 - mask_n) * proper + mask_n * latents
        image = self.sess["vae_decoder"].run(None, {"latent_sample": (latents / self.m["vae"]["scaling_factor"]).numpy()})[0]
        pixels = (np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
        return latents.numpy(), pixels, {k: v.numpy() for k, v in debug.items()}


def _cases(fixtures_dir):
    return json.loads((fixtures_dir / "cases.json").read_text(encoding="utf-8"))


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd1-inpaint"])
@pytest.mark.parametrize("which", ["fresh", "committed"])
def test_graph_set_reproduces_every_case(zoo_all, family, which):
    if which == "fresh":
        set_dir, fixtures_dir = zoo_all[family]
    else:
        set_dir, fixtures_dir = REPO / "graphs" / f"tiny-{family}", REPO / "graphs" / "fixtures" / f"tiny-{family}"
    pipe = GraphPipeline(set_dir)
    for case in _cases(fixtures_dir):
        latents, pixels, debug = pipe.run_traced(case, fixtures_dir)
        for key, path in [(k.removeprefix("debug_"), v) for k, v in case.items() if k.startswith("debug_")]:
            what = f"{case['name']} debug_{key}"
            if path is None:  # the pipeline never computed it (a 9-channel UNet at strength 1: no init image latents)
                assert key not in debug, f"{what}: null in the fixture, computed here"
                continue
            got, want = debug[key], np.load(fixtures_dir / path)
            assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
            if key in ("latent_mask", "time_ids"):
                assert np.array_equal(got, want), f"{what}: differs"
            else:
                assert _rel_l2(got, want) <= REL_L2, f"{what}: relative L2 {_rel_l2(got, want):.3g}"
        rel = _rel_l2(latents, np.load(fixtures_dir / case["expected_latents"]))
        assert rel <= REL_L2, f"{case['name']}: relative L2 {rel:.3g}"
        for k, rel_png in enumerate(case["expected_images"]):
            expected = np.asarray(Image.open(fixtures_dir / rel_png)).astype(int)
            diff = int(np.abs(pixels[k].astype(int) - expected).max())
            assert diff <= 1, f"{case['name']} image {k}: max pixel diff {diff}"
