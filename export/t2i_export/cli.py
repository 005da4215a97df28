"""`python -m t2i_export {pipeline,tiny,random,rng,train-demo,eval-demo,calibrate,verify}`: argument parsing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ExportError
from .precision import PRECISIONS

# tiny_ip_set.IP_SETS' families (named here so that the parser does not import torch)
IP_FAMILIES = ("sd1-ip", "sd1-ip-plus", "sdxl-ip", "sdxl-ip-plus")


def _adapter_arg(text: str, flag: str = "--adapter") -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected NAME=DIR")
    return name, Path(path)


def _controlnet_arg(text: str) -> tuple[str, Path]:
    return _adapter_arg(text, "--controlnet")


def _condition_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--condition {text!r}: expected NAME=IMAGE")
    return name, Path(path)


def _op_types(text: str) -> tuple[str, ...]:
    known = ("Conv", "Gemm", "MatMul")
    ops = tuple(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
    unknown = [o for o in ops if o not in known]
    if unknown or not ops:
        raise ExportError(f"--op-types {text!r}: expected a comma-separated subset of {', '.join(known)}")
    return ops


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2i_export", description="Export SD 1.x / 2.x / XL + T2I-Adapters to a t2i-rt graph set.")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("pipeline", help="export a local diffusers SD 1.x/2.x/XL pipeline directory (+ T2I-Adapter directories)")
    pp.add_argument("--model", type=Path, required=True, help="diffusers pipeline dir (model_index.json, unet/, vae/, ...)")
    pp.add_argument("--adapter", type=_adapter_arg, action="append", default=[], metavar="NAME=PATH",
                    help="a diffusers T2IAdapter dir or an original TencentARC .pth (full or light adapter; also "
                    ".pt/.ckpt/.safetensors of that layout), exported as adapter_NAME.onnx (repeatable)")
    pp.add_argument("--controlnet", type=_controlnet_arg, action="append", default=[], metavar="NAME=DIR",
                    help="a diffusers ControlNetModel dir of the same base model, exported as controlnet_NAME.onnx; the "
                    "UNet then also takes ControlNet residuals, so adapters and ControlNets combine on one UNet graph "
                    "(repeatable: t2i-rt run --control NAME=IMAGE sums several, as MultiControlNet)")
    pp.add_argument("--ip-adapter", type=Path, action="append", default=[], metavar="FILE",
                    help="an h94/IP-Adapter weights file (.safetensors or .bin; plain or Plus) of the same base model: "
                    "exported as image_encoder.onnx and image_projection.onnx, and the UNet takes ip_tokens and ip_scale")
    pp.add_argument("--image-encoder", type=Path, metavar="DIR",
                    help="the IP-Adapter's CLIPVisionModelWithProjection dir (h94: models/image_encoder or "
                    "sdxl_models/image_encoder); needed with --ip-adapter")
    pp.add_argument("--style-adapter", type=Path, metavar="FILE",
                    help="TencentARC's T2I style adapter (t2iadapter_style_sd14v1.pth, SD 1.x): exported as style_encoder.onnx "
                    "and style_adapter.onnx, and the UNet's encoder_hidden_states takes the text plus 8 style tokens per image")
    pp.add_argument("--style-encoder", type=Path, metavar="DIR",
                    help="the style adapter's CLIPVisionModel dir with preprocessor_config.json "
                    "(openai/clip-vit-large-patch14); needed with --style-adapter")
    pp.add_argument("--out", type=Path, required=True, help="graph-set directory to write")
    pp.add_argument("--name", help="manifest name (default: the --out directory's name)")
    pp.add_argument("--vae", type=Path, metavar="DIR",
                    help="a diffusers AutoencoderKL dir to use instead of the model's vae/ (e.g. an fp16-safe SDXL VAE)")
    pp.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="compute precision of the graphs (their inputs/outputs stay float32); fp16 as diffusers' "
                    "pipe.to(torch.float16), except an SDXL VAE with force_upcast, whose graphs stay fp32 (default: fp32)")
    pp.add_argument("--compact-weights", action="store_true",
                    help="store weights losslessly in fewer bytes: float32 weights that are exactly float16 (a checkpoint "
                    "saved in fp16) as float16 plus a Cast, and mostly-zero token tables as their non-zero rows; the "
                    "graphs compute bit for bit the same (graphs with external data are left as they are)")
    pp.add_argument("--strip-names", action="store_true",
                    help="drop the graphs' node names, doc strings and shape annotations and number their intermediate "
                    "tensors: a small model's graphs shrink by a quarter to a half and compute the same, but ONNX "
                    "Runtime's errors then name no node (graphs with external data are left as they are)")
    pp.add_argument("--vae-precision", choices=PRECISIONS,
                    help="compute precision of the VAE graphs, decoder and encoder (default: --precision's, see there); "
                    "fp16 is refused for VAEs with force_upcast (SDXL's original VAE overflows)")

    pt = sub.add_parser("tiny", help="regenerate the deterministic tiny graph sets and their parity fixtures")
    pt.add_argument("--out", type=Path, required=True,
                    help="writes OUT/tiny-FAMILY and OUT/fixtures/tiny-FAMILY (and OUT/tiny-sd1-fp16, same weights in fp16; "
                         "sd1-ip, sd1-ip-plus, sdxl-ip, sdxl-ip-plus: tiny-sd1 or tiny-sdxl with the tiny plain or "
                         "Plus IP-Adapter, tiny_ip_set.py; sd1-style: tiny-sd1 with the tiny style adapter and the sketch "
                         "adapter, sd1-ip-style: tiny-sd1 with the style adapter and the IP-Adapter, both tiny_style_set.py)")
    pt.add_argument("--family", action="append",
                    choices=["sd1", "sd2", "sdxl", "sd1-inpaint", *IP_FAMILIES, "sd1-style", "sd1-ip-style"],
                    help="only these members of the tiny zoo (repeatable; default: the committed ones, all but the IP "
                    "and style sets, which are generated, not committed: scripts/generate-sets.sh writes them to "
                    "graphs/generated)")
    pt.add_argument("--work", type=Path, help="keep the intermediate diffusers checkpoint here (default: a temp dir)")

    pr = sub.add_parser("random", help="export a random-weight pipeline of a real model's size (benchmarks)")
    pr.add_argument("--preset", choices=["sd15", "small"], default="sd15",
                    help="sd15: SD 1.5's exact shapes; small: SD 1.5's architecture scaled down, 256x256 (benches/)")
    pr.add_argument("--adapter-preset", action="append", default=[], choices=["full", "sketch", "light"],
                    help="add a random T2I-Adapter of this kind, sized for the preset's UNet (repeatable)")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--name", help="manifest name (default: random-PRESET, random-PRESET-fp16)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="compute precision of the graphs (their inputs/outputs stay float32; default: fp32)")
    pr.add_argument("--save-diffusers", type=Path, metavar="DIR",
                    help="also save the same modules in diffusers format: DIR/random-PRESET and DIR/adapters/NAME")

    pg = sub.add_parser("rng", help="regenerate graphs/fixtures/rng: torch.randn draws of torch.Generator(\"cpu\")")
    pg.add_argument("--out", type=Path, required=True, help="fixture directory to write (draws.json, avx2.npy, default.npy)")

    pd = sub.add_parser("train-demo", help="train the demo-shapes model and its sketch/color T2I-Adapters, and export its graph set "
                        "(docs/demo-model.md)")
    pd.add_argument("--out", type=Path, required=True,
                    help="the graph set to write (graphs/demo-shapes): the graphs, OUT/diffusers (the fp16 diffusers checkpoint: "
                    "model/, adapters/{sketch,color}, training.json) and OUT/examples (the demo grid's conditions)")
    pd.add_argument("--work", type=Path, metavar="DIR",
                    help="keep each stage's result here and skip stages already done (default: .OUT-training beside --out)")
    pd.add_argument("--checkpoint", type=Path, metavar="DIR",
                    help="skip training: package this checkpoint (a train-demo OUT/diffusers folder) into --out")
    pd.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget for all stages together (default: 80)")
    pd.add_argument("--steps-like", type=Path, metavar="TRAINING_JSON",
                    help="run each stage for the step counts recorded in this training.json instead of the clock (a replay)")
    pd.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (default: 0)")
    pd.add_argument("--scenes", type=int, default=24000, help="distinct training scenes (default: 24000)")
    pd.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")

    pe = sub.add_parser("eval-demo", help="score what the demo-shapes model draws: prompt accuracy, IoU with the sketch, diversity")
    pe.add_argument("--graphs", type=Path, default=Path("graphs/demo-shapes"), help="the demo graph set (default: graphs/demo-shapes)")
    pe.add_argument("--t2i-rt", dest="binary", type=Path, default=Path("target/release/t2i-rt"),
                    help="the t2i-rt binary to draw with (default: target/release/t2i-rt)")
    pe.add_argument("--scenes", type=int, default=24, help="held-out scenes (default: 24)")
    pe.add_argument("--samples", type=int, default=3, help="samples per scene and mode (default: 3)")
    pe.add_argument("--config", action="append", metavar="BACKEND:PRECISION",
                    help="repeatable; precision fp32, fp16 (a set exported in fp16) or int8 (the set calibrated with calibrate's defaults); "
                    "default: ort-cpu:fp32, tract:fp32, ort-cpu:fp16")
    pe.add_argument("--out", type=Path, default=Path("out/eval-demo"), help="results.md, results.json, grids (default: out/eval-demo)")

    pc = sub.add_parser("calibrate", help="add calibrated INT8 (QDQ) variants of the UNet and ControlNets to a graph set, "
                        "and TensorRT's INT8 calibration table (calibration/README.md)")
    pc.add_argument("--graphs", type=Path, required=True, help="the f32 graph set to calibrate (left unchanged)")
    pc.add_argument("--out", type=Path, required=True, help="the graph set to write: new or empty")
    pc.add_argument("--t2i-rt", dest="binary", type=Path, metavar="PATH",
                    help="the t2i-rt binary that records the feeds (default: $T2I_RT_BIN, else t2i-rt on PATH, else "
                    "target/release then target/debug)")
    pc.add_argument("--prompts", type=Path, metavar="FILE", help="calibration prompts, one a line (default: 8 built-in "
                    "ones); the last prompt's runs are held out to measure the error")
    pc.add_argument("--condition", type=_condition_arg, action="append", default=[], metavar="NAME=IMAGE",
                    help="the condition image for the adapter or ControlNet NAME (repeatable; default: a synthetic one)")
    pc.add_argument("--steps", type=int, default=20, help="denoising steps per run; every call is recorded (default: 20)")
    pc.add_argument("--seed", type=int, default=0, help="seed of the first prompt's runs, +1 per prompt (default: 0)")
    pc.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                    help="how activation ranges come from the statistics (default: minmax)")
    pc.add_argument("--quantize", default="unet,controlnet", help="which per-step graphs get an INT8 variant "
                    "(default: unet,controlnet)")
    pc.add_argument("--target-error", type=float, default=0.05, help="keep the most sensitive layer groups in float "
                    "until each graph's held-out output relative L2 vs f32 is at most this (default: 0.05)")
    pc.add_argument("--max-excluded", type=int, default=8, help="at most this many groups kept in float (default: 8)")
    pc.add_argument("--groups", choices=["block", "top"], default="block", help="sensitivity granularity: block "
                    "(down_blocks.0.attentions.0) or top (down_blocks.0; fewer trials) (default: block)")
    pc.add_argument("--no-reduce-range", action="store_true", help="8-bit weights instead of 7-bit: for CPUs with VNNI "
                    "(without it ONNX Runtime's u8s8 kernels saturate: calibration/README.md)")
    pc.add_argument("--activations", choices=["uint8", "int8"], default="uint8",
                    help="uint8 (asymmetric) for ONNX Runtime's and OpenVINO's CPU kernels, or int8 symmetric (zero point "
                    "0), the only kind TensorRT's explicit quantization (ort-trt) takes (default: uint8)")
    pc.add_argument("--op-types", default="Conv,Gemm", help="which ops get quantize/dequantize pairs, comma-separated: "
                    "Conv, Gemm, MatMul (default: Conv,Gemm; with MatMul too the small preset's UNet ran slower than f32 "
                    "on an AVX2 CPU without VNNI: calibration/README.md)")
    pc.add_argument("--feeds", type=Path, metavar="DIR", help="skip recording: DIR holds one `t2i-rt run --record-inputs` "
                    "folder per run; with folders named PROMPT-CONDITION (00-none, as calibrate names them) the last "
                    "prompt's are held out, else every fourth")
    pc.add_argument("--threads", type=int, default=2, help="threads per graph call (default: 2)")

    pv = sub.add_parser("verify", help="check a graph set's manifest paths and sha256")
    pv.add_argument("dir", type=Path)
    return p


def _quiet_libraries() -> None:
    """Progress bars and advice (install accelerate, ...) would bury the one line that matters."""
    # Before the first import: some messages are printed while the libraries import.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    for lib in (dl, tl):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "pipeline":
            from .pipeline import export_pipeline

            if len(args.ip_adapter) > 1:
                raise ExportError("--ip-adapter is given more than once; a graph set holds one IP-Adapter")
            out = export_pipeline(
                args.model,
                args.adapter,
                args.out,
                args.name,
                vae_dir=args.vae,
                vae_precision=args.vae_precision,
                precision=args.precision,
                compact_weights=args.compact_weights,
                strip_names=args.strip_names,
                controlnets=args.controlnet,
                ip_adapter=args.ip_adapter[0] if args.ip_adapter else None,
                image_encoder=args.image_encoder,
                style_adapter=args.style_adapter,
                style_encoder=args.style_encoder,
            )
            print(f"wrote {out}")
        elif args.command == "tiny":
            from .tiny import build_tiny_zoo

            for set_dir, fixtures_dir in build_tiny_zoo(args.out, args.work, args.family):
                print(f"wrote {set_dir}" + (f" and {fixtures_dir}" if fixtures_dir else ""))
            ip_families = [f for f in args.family or [] if f in IP_FAMILIES]
            if ip_families:
                from .tiny_ip_set import build_tiny_ip_sets

                for set_dir, fixtures_dir in build_tiny_ip_sets(args.out, ip_families):
                    print(f"wrote {set_dir} and {fixtures_dir}")
            if args.family and "sd1-style" in args.family:
                from .tiny_style_set import build_tiny_style_set

                set_dir, fixtures_dir = build_tiny_style_set(args.out)
                print(f"wrote {set_dir} and {fixtures_dir}")
            if args.family and "sd1-ip-style" in args.family:
                from .tiny_style_set import build_tiny_ip_style_set

                set_dir, fixtures_dir = build_tiny_ip_style_set(args.out)
                print(f"wrote {set_dir} and {fixtures_dir}")
        elif args.command == "random":
            from .random_preset import export_random

            out = export_random(
                args.preset, args.adapter_preset, args.out, args.name, args.seed, args.save_diffusers, args.precision
            )
            print(f"wrote {out}")
        elif args.command == "rng":
            from .rng_fixtures import write_rng_fixtures

            print(f"wrote {write_rng_fixtures(args.out)}")
        elif args.command == "train-demo":
            import tempfile

            from .pipeline import check_out_dir
            from .train_demo import Plan, package, train

            check_out_dir(args.out)  # before an hour of training, not after
            if args.checkpoint:
                print(f"wrote {package(args.checkpoint, args.out)}")
            else:
                steps = {}
                if args.steps_like:
                    try:
                        recorded = json.loads(args.steps_like.read_text(encoding="utf-8"))
                        steps = {k: int(v) for k, v in recorded.items() if k.endswith("_steps")}
                    except (OSError, ValueError, AttributeError) as e:
                        raise ExportError(f"--steps-like {args.steps_like}: not a train-demo training.json ({e})") from e
                plan = Plan(minutes=args.minutes, seed=args.seed, scenes=args.scenes, threads=args.threads,
                            log=lambda line: print(line, flush=True), steps=steps)
                work = args.work or args.out.parent / f".{args.out.name}-training"
                with tempfile.TemporaryDirectory(prefix="t2i-train-demo-") as tmp:
                    print(f"wrote {package(train(Path(tmp) / 'diffusers', plan, work), args.out)}")
        elif args.command == "eval-demo":
            from .eval_demo import evaluate

            configs = [tuple(c.split(":", 1)) for c in (args.config or ["ort-cpu:fp32", "tract:fp32", "ort-cpu:fp16"])]
            for c in configs:
                if len(c) != 2 or c[1] not in (*PRECISIONS, "int8"):
                    raise ExportError(f"--config {':'.join(c)}: expected BACKEND:PRECISION, e.g. tract:fp32 (precision: "
                                      f"{', '.join(PRECISIONS)}, int8)")
            evaluate(args.binary, args.graphs, args.scenes, args.samples, configs, args.out, log=lambda line: print(line, flush=True))
            print(f"wrote {args.out / 'results.md'}")
        elif args.command == "calibrate":
            from .calibrate import DEFAULT_PROMPTS, Options, calibrate

            prompts = list(DEFAULT_PROMPTS)
            if args.prompts:
                try:
                    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
                except OSError as e:
                    raise ExportError(f"--prompts {args.prompts}: {e.strerror}") from e
            opts = Options(prompts=prompts, conditions=dict(args.condition), steps=args.steps, seed=args.seed,
                           method=args.method, quantize=tuple(k for k in args.quantize.split(",") if k),
                           target_error=args.target_error, max_excluded=args.max_excluded,
                           reduce_range=not args.no_reduce_range, groups=args.groups,
                           activations=args.activations, op_types=_op_types(args.op_types), t2i_rt=args.binary,
                           feeds=args.feeds, threads=args.threads)
            print(f"wrote {calibrate(args.graphs, args.out, opts)}")
        elif args.command == "verify":
            from .manifest import verify

            m = verify(args.dir)
            print(f"ok: {m['name']} ({len(m['graphs'])} graphs, {len(m['adapters'])} adapters)")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
