"""One image on several GPUs from the command line; run it with torchrun, one process per GPU:

    torchrun --nproc_per_node=4 -m engine.parallel.generate --model FLUX.1-dev --models-dir ./models \\
        --prompt "a red fox in the snow" --width 1024 --height 1024 --steps 28 --seed 0 --ulysses 4 --output fox.png

Every process loads the whole pipeline onto its own GPU (GPU = LOCAL_RANK), the transformer's tokens are split
among them (``--ulysses`` / ``--ring``; unset: all Ulysses), every rank runs the same steps on the same noise and
rank 0 saves the image and prints the time. On a machine without GPUs the processes talk over gloo on the CPU
(slow; for checking only).
"""
from __future__ import annotations

import argparse
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="FLUX.1-dev", help="a registry variant (FLUX.1-dev, FLUX.2-klein-4B, "
                   "FLUX.3-Image-Klein, ...; the *-random-demo ones are written into --models-dir first)")
    p.add_argument("--models-dir", default=None, help="where the model files are (or are downloaded to; default: "
                   "DIFFSYNTH_MODEL_BASE_PATH or ./models)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=None, help="true CFG (default: the variant's)")
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (heads must divide by it)")
    p.add_argument("--ring", type=int, default=None, help="ring degree (needs --attention cudnn or flash)")
    p.add_argument("--uneven", action="store_true", help="allow token counts that do not divide by the world size")
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flash", "cudnn"))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--output", default="parallel.png")
    return p.parse_args(argv)


def call_arguments(args, variant, kind: str) -> dict:
    """The pipeline call for this family."""
    steps = args.steps or variant.default_steps
    cfg = variant.default_cfg if args.cfg_scale is None else args.cfg_scale
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=cfg, height=args.height,
                width=args.width, seed=args.seed, num_inference_steps=steps)
    if kind != "flux3":
        call["embedded_guidance"] = variant.default_guidance
    return call


def run(args) -> int:
    import torch
    from .. import registry
    from . import close_group, generate_image, init_group
    from .loading import family, load_variant
    ranks = init_group()
    try:
        variant = registry.get_variant(args.model)
        kind = family(variant)
        pipe = load_variant(args.model, args.models_dir, ranks.device, getattr(torch, DTYPES[args.dtype]),
                            args.attention)
        info = pipe.enable_context_parallel(ulysses_degree=args.ulysses, ring_degree=args.ring, uneven=args.uneven)
        call = call_arguments(args, variant, kind)
        if ranks.is_main:
            print(f"{variant.label}: {info.describe()}; {args.width}x{args.height}, {call['num_inference_steps']} "
                  f"steps", flush=True)
        t0 = time.perf_counter()
        image = generate_image(pipe, **call)
        seconds = time.perf_counter() - t0
        if ranks.is_main:
            image.save(args.output)
            print(f"saved {args.output} in {seconds:.1f} s", flush=True)
        return 0
    finally:
        close_group()


def main(argv=None) -> int:
    from ..errors import EngineError
    args = parse_args(argv)
    try:
        return run(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
