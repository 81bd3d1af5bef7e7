"""One image on several GPUs: seconds per denoising step and peak VRAM of a full-size FLUX transformer on one GPU vs
split over N GPUs with context parallelism (``engine.parallel``: diffusers' Ulysses / ring attention).

Run with torchrun, one process per GPU. Every rank builds the same transformer at its real size with random weights
(speed and memory do not depend on the values) and the same 1024x1024 inputs, already encoded. First rank 0 alone runs
the steps plainly (world size 1; the others wait), then every rank runs them split. A step is one transformer pass
and its Euler update; the median over ``--steps`` after ``--warmup`` is reported, per step the slowest rank's time.
Peak VRAM is ``torch.cuda.max_memory_allocated`` (weights included: each GPU holds the whole transformer), the split
row's the largest over the ranks. Rank 0 prints both rows, the speed-up (1-GPU s/step / N-GPU s/step), the memory
ratio, and how far the split output is from the plain one.

    torchrun --nproc_per_node=4 benchmarks/context_parallel.py                                # FLUX.1-dev, Ulysses 4
    torchrun --nproc_per_node=8 benchmarks/context_parallel.py --model flux2-klein-4b --ulysses 4 --ring 2 \\
        --attention cudnn
    torchrun --nproc_per_node=2 benchmarks/context_parallel.py --tiny --dtype fp32            # CPU smoke run (gloo)

Ring attention needs ``--attention cudnn`` or ``flash`` (kernels that return the log-sum-exp); Ulysses degrees must
divide the heads (24 for all three models here).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name -> (diffusers class, its config at full size, image token channels, text tokens at the default prompt length)
MODELS = {
    "flux1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), 64, 512),
    "flux2-klein-4b": ("Flux2Transformer2DModel", dict(
        in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=7680, guidance_embeds=False, axes_dims_rope=(32, 32, 32, 32)), 128, 512),
    "flux3-klein": ("Flux3Transformer2DModel", dict(
        in_channels=128, cond_in_channels=128, num_layers=5, num_single_layers=28, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=20480, axes_dims_rope=(32, 32, 32, 32), flow_map=True), 128, 160),
}
TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 8,
        "joint_attention_dim": 32, "pooled_projection_dim": 32}
TINY_ROPE = {"FluxTransformer2DModel": (4, 6, 6)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="flux1-dev")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: the model's usual)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: all the GPUs)")
    p.add_argument("--ring", type=int, default=None, help="ring degree (needs --attention cudnn or flash)")
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flash", "cudnn"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tiny", action="store_true", help="a 1+1-block 128-wide model (a CPU smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="rank 0 writes the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def build_transformer(args, dtype, device):
    """The model at full size (or ``--tiny``), built on meta and filled on the device: normal(0, fan_in^-1/2)
    matrices, ones for norm weights, zeros for other vectors; the same values on every rank."""
    import diffusers
    cls_name, config, _, _ = MODELS[args.model]
    cls = getattr(diffusers, cls_name)
    if args.tiny:
        config = {**config, **{k: v for k, v in TINY.items() if k in config},
                  "axes_dims_rope": TINY_ROPE.get(cls_name, (4, 4, 4, 4))}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1)
            else:
                p.zero_()
    return model.eval().requires_grad_(False)


def make_inputs(args, dit, dtype, device) -> dict:
    """One call's encoded inputs at the image size: packed latents, prompt embeddings, 2-D position ids."""
    _, _, channels, text_default = MODELS[args.model]
    cls_name = type(dit).__name__
    cell = 16
    rows, cols = args.height // cell, args.width // cell
    n_img, n_txt = rows * cols, args.text_tokens or (16 if args.tiny else text_default)
    width = dit.config.joint_attention_dim
    channels = dit.config.in_channels
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    axes = 3 if cls_name == "FluxTransformer2DModel" else 4
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float()
    img_ids = torch.zeros(n_img, axes)
    img_ids[:, 1:3] = grid
    txt_ids = torch.zeros(n_txt, axes)
    if axes == 4:
        txt_ids[:, 3] = torch.arange(n_txt)
    x = dict(hidden_states=torch.randn(1, n_img, channels, generator=g),
             encoder_hidden_states=torch.randn(1, n_txt, width, generator=g),
             timestep=torch.tensor([1.0]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    if cls_name == "FluxTransformer2DModel":
        x.update(pooled_projections=torch.randn(1, dit.config.pooled_projection_dim, generator=g),
                 guidance=torch.tensor([3.5]))
    if cls_name == "Flux3Transformer2DModel":
        x["target_timestep"] = torch.tensor([0.9])
    floats = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    return {k: v.to(device=device, dtype=dtype if k in floats else torch.float32) if torch.is_tensor(v) else v
            for k, v in x.items()}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(dit, x, args, device, group_max=None) -> tuple:
    """(per-step seconds of the timed steps, the first step's output). ``group_max``: reduce each step's time to
    the slowest rank's."""
    latents = x["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, args.warmup + args.steps + 1).tolist()
    times, first = [], None
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            v = dit(**{**x, "hidden_states": latents, "timestep": x["timestep"] * sigmas[i]})[0]
            latents = latents + (sigmas[i + 1] - sigmas[i]) * v
        sync(device)
        seconds = time.perf_counter() - t0
        if group_max is not None:
            seconds = group_max(seconds)
        if first is None:
            first = v.float().cpu()
        if i >= args.warmup:
            times.append(seconds)
    return times, first


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if torch.device(device).type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def group_max_fn(device):
    import torch.distributed as dist

    def group_max(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return group_max


def row(label: str, times: list, peak: float) -> dict:
    return {"row": label, "s_per_step": statistics.median(times), "min_s_per_step": min(times), "peak_vram_gb": peak}


def main(argv=None) -> int:
    import torch.distributed as dist
    from engine.acceleration.attention import attention_context, backend_for
    from engine.parallel import close_group, enable_context_parallel, init_group
    args = parse_args(argv)
    ranks = init_group()
    try:
        dtype, device = DTYPES[args.dtype], ranks.device
        backend = backend_for(args.attention, device, dtype)
        reset_peak(device)
        dit = build_transformer(args, dtype, device)
        x = make_inputs(args, dit, dtype, device)
        n_params = sum(p.numel() for p in dit.parameters())
        unit = "GPU" if device.startswith("cuda") else "process"
        with attention_context(backend):
            rows, plain = [], None
            if ranks.is_main:
                times, plain = run_steps(dit, x, args, device)
                rows.append(row(f"1 {unit}", times, peak_gb(device)))
            if ranks.world_size == 1:
                report(args, ranks, None, n_params, x, rows, None)
                return 0
            dist.barrier()
            info = enable_context_parallel(dit, args.ulysses, args.ring, attention=args.attention)
            reset_peak(device)
            times, split = run_steps(dit, x, args, device, group_max_fn(device))
            peak = group_max_fn(device)(peak_gb(device)) if device.startswith("cuda") else float("nan")
        rows.append(row(f"{ranks.world_size} {unit}s", times, peak))
        if ranks.is_main:
            report(args, ranks, info, n_params, x, rows, float((split - plain).abs().max()))
        return 0
    finally:
        close_group()


def report(args, ranks, info, n_params, x, rows, diff) -> None:
    how = info.describe() if info is not None else "world size 1"
    print(f"{args.model}{' (tiny)' if args.tiny else ''}: {n_params / 1e9:.2f}B params, {args.dtype}, "
          f"{x['hidden_states'].shape[1]} image + {x['encoder_hidden_states'].shape[1]} text tokens "
          f"({args.width}x{args.height}); {how} on {ranks.device.split(':')[0]}, attention {args.attention}")
    for r in rows:
        print(f"  {r['row']:>11}: {r['s_per_step']:.3f} s/step (min {r['min_s_per_step']:.3f}), "
              f"peak VRAM {r['peak_vram_gb']:.2f} GB")
    if info is None:
        print("  (one process: start with torchrun --nproc_per_node=N, N >= 2, for the split row)")
        return
    one, many = rows
    speedup = one["s_per_step"] / many["s_per_step"]
    memory = many["peak_vram_gb"] / one["peak_vram_gb"] if one["peak_vram_gb"] == one["peak_vram_gb"] else None
    print(f"  speed-up {speedup:.2f}x on {ranks.world_size} GPUs (ideal {ranks.world_size}); peak VRAM ratio "
          f"{'n/a' if memory is None else f'{memory:.2f}'}; first step's output: max |split - plain| = {diff:.3g}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"model": args.model, "tiny": args.tiny, "dtype": args.dtype, "width": args.width, "height": args.height,
             "world_size": ranks.world_size, "ulysses": info.ulysses_degree, "ring": info.ring_degree,
             "attention": args.attention, "rows": rows, "speedup": speedup, "vram_ratio": memory,
             "max_abs_diff": diff}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
