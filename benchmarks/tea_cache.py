"""TeaCache on the CPU: steps skipped, time and image difference at several ``tea_cache_l1_thresh`` values.

Each threshold's image is compared with the same call without a cache (same seed, same model, same process): the
steps it skipped (``pipe.acceleration.last_call``), seconds per call and the max / mean absolute pixel difference (0-255 scale, over all channels); ``passes`` is how many fewer times the blocks ran
(passes / passes computed: the bound on the speed-up of the transformer's share). The time is the whole call's CPU time (text encoding
cached after a warm-up, VAE decode included), the least of ``--repeats`` runs, uncached and cached runs interleaved.

    python benchmarks/tea_cache.py                                   # the random demo model, 64x64, 30 steps
    python benchmarks/tea_cache.py --heads 8 --head-dim 128 --double 2 --single 4   # a wider random transformer
    python benchmarks/tea_cache.py --smooth                           # timestep embedding kept to low frequencies

Random weights say nothing about a trained model's skip pattern (the seed's rescale polynomial was fitted on
FLUX.1-dev); ``--smooth`` keeps only the lowest frequencies of the timestep embedding, closer to how trained models
change from step to step (tests/test_acceleration.py's ``smooth_time``). ``--models-dir`` takes a folder in the demo's
layout (flux1-dev.safetensors, ae.safetensors, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) instead.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=64, help="image height = width (multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--t5-tokens", type=int, default=128, help="t5_sequence_length")
    p.add_argument("--models-dir", type=pathlib.Path, default=None, help="a model folder in the demo's layout")
    p.add_argument("--heads", type=int, default=None, help="swap in a random transformer with this many heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--smooth", action="store_true", help="keep the timestep embedding's lowest frequencies only")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def load_pipeline(args):
    from engine.demo import write_demo_model
    from tests.helpers import demo_pipeline
    folder = args.models_dir or write_demo_model(pathlib.Path(tempfile.gettempdir()) / "flux-studio-bench-models")
    pipe = demo_pipeline(folder)
    if args.heads:
        pipe.set_models({"dit": wide_transformer(pipe.dit.config, args)})
    if args.smooth:
        from tests.test_acceleration import smooth_time
        smooth_time(pipe.dit)
    return pipe


def wide_transformer(config, args):
    """A random FLUX.1 transformer reading the same text and latents as ``config``'s, ``heads x head_dim`` wide."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(args.seed)
    rope = (16, 56, 56) if args.head_dim == 128 else tuple(config.axes_dims_rope)
    dit = FluxTransformer2DModel(patch_size=1, in_channels=config.in_channels, num_layers=args.double,
                                 num_single_layers=args.single, attention_head_dim=args.head_dim,
                                 num_attention_heads=args.heads, joint_attention_dim=config.joint_attention_dim,
                                 pooled_projection_dim=config.pooled_projection_dim,
                                 guidance_embeds=config.guidance_embeds, axes_dims_rope=rope).eval()
    with torch.no_grad():      # diffusers zero-initialises output projections: random ones make the blocks matter
        for p in dit.parameters():
            if p.ndim == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return dit


def timed(pipe, **kw):
    """The image and the call's CPU seconds (this process's, all threads: on a shared machine far steadier than
    the wall clock, which other processes' load stretches)."""
    start = time.process_time()
    image = pipe(**kw)
    return np.asarray(image, dtype=np.float32), time.process_time() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args)
    kw = dict(prompt="a lighthouse on a cliff at dusk", height=args.size, width=args.size, seed=args.seed,
              num_inference_steps=args.steps, t5_sequence_length=args.t5_tokens, progress_bar_cmd=lambda x: x)
    pipe(**dict(kw, num_inference_steps=2))           # warm-up (the prompt's encoding is cached from here on)
    config = pipe.dit.config
    print(f"transformer width {config.num_attention_heads * config.attention_head_dim}, {config.num_layers}+"
          f"{config.num_single_layers} blocks, {args.size}x{args.size}, {args.steps} steps, smooth={args.smooth}; "
          f"CPU seconds per call: the least of {args.repeats} runs, each cached run right after an uncached one")
    print(f"{'threshold':>9} {'skipped':>8} {'passes':>7} {'no cache':>8} {'cached':>8} {'speed-up':>8} {'max diff':>8} "
          f"{'mean diff':>9}  steps skipped")
    for threshold in args.thresholds:
        base, cached = [], []
        for _ in range(args.repeats):          # interleaved: a shared machine's load hits both alike
            ref, sec = timed(pipe, **kw)
            base.append(sec)
            out, sec = timed(pipe, **kw, tea_cache_l1_thresh=threshold)
            cached.append(sec)
        notes = pipe.acceleration.last_call
        diff = np.abs(out - ref)
        run = notes["passes"] - notes["skipped"]      # the block stack's share of the time shrinks by passes / run
        print(f"{threshold:>9.2f} {notes['skipped']:>3}/{notes['passes']:<4} {notes['passes'] / run:>6.2f}x {min(base):>8.2f} {min(cached):>8.2f} "
              f"{min(base) / min(cached):>7.2f}x {diff.max():>8.0f} {diff.mean():>9.3f}  "
              f"{notes['skipped_steps'].get('cond')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
