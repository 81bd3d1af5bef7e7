"""FLUX.1-dev LoRA training under a VRAM limit: step time and peak VRAM, all resident vs the engine's training plan.

Full-size FLUX.1-dev transformer (12B) with random weights (``vram.py``'s builders: built on the meta device, filled
on the GPU, then moved to the CPU as a loaded checkpoint would be), a rank-16 LoRA on the seed's FLUX target list,
1024x1024 (4096 image tokens + 512 text tokens), batch 1, inputs already encoded (the text encoders and the VAE are
not timed, as in ``train_step.py``; the plan still makes room for their encoding stages, as ``train.py`` does).
One step = the flow-matching loss, backward, AdamW step, exactly the calls ``train.py`` makes
(``engine.training``: ``add_lora``, ``flow_matching_loss``, the plan's checkpointing, ``offload.BlockStreamer``,
``offload.make_optimizer``).

Rows:

- ``unlimited``: every weight on the GPU in bf16 (the seed's default), no checkpointing (if that runs out of memory
  on the card: with gradient checkpointing, and the row says so);
- ``plan <L> GB``: ``engine.training.memory.plan_training`` for the limit, applied.

Each row: median seconds per step after warm-up, ``torch.cuda.max_memory_allocated`` and the driver's peak
(``total - free``, sampled every 20 ms: includes the CUDA context), the plan's predicted peak. Then the ratio of the
step times and whether the target holds: peak < the limit at no more than 1.3x the unlimited step time.

    python benchmarks/train_vram.py                  # CUDA (H100: ~5 min; 24 GB of RAM per copy of the model)
    python benchmarks/train_vram.py --limits 12 8    # several plans
    python benchmarks/train_vram.py --dry-run        # the plans only (from the manifests or meta builds): seconds
    python benchmarks/train_vram.py --tiny --device cpu   # every code path on a tiny model (smoke test)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import vram as V  # noqa: E402

GiB = 1024 ** 3
TARGET_RATIO = 1.3
MANIFESTS = pathlib.Path(os.environ.get("FLUX_MANIFESTS", REPO.parent / "shared" / "checkpoint-manifests"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limits", nargs="+", type=float, default=[12.0], help="VRAM limits in GB (default 12)")
    p.add_argument("--size", type=int, default=1024, help="image width = height (default 1024)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a tiny model with the same structure (code-path smoke test)")
    p.add_argument("--dry-run", action="store_true", help="print the plans and exit (no GPU needed)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.size % 16 or args.size < 64:
        p.error("--size must be a multiple of 16 (>= 64)")
    if args.device.startswith("cpu") and not (args.tiny or args.dry_run):
        p.error("the full-size model on a CPU would take hours: use --tiny (or --dry-run)")
    return args


# ---------------------------------------------------------------------------------------------------- plans
def plan_sizes(args) -> tuple:
    """({role: ComponentSize}, the transformer's tensor description or None): the manifests for the full model
    (as ``train.py`` reads the files' headers), meta builds for --tiny."""
    from engine import memory as vram
    if not args.tiny and (MANIFESTS / "FLUX.1-dev").is_dir():
        d = MANIFESTS / "FLUX.1-dev"
        paths = {"dit": d / "flux1-dev.safetensors.json", "vae": d / "ae.safetensors.json",
                 "text_encoder_1": d / "text_encoder" / "model.safetensors.json",
                 "text_encoder_2": d / "text_encoder_2" / "model.safetensors.json"}
        return vram.sizes_from_manifests(paths), json.loads(paths["dit"].read_text())["tensors"]
    return V.sizes_for(V.TINY if args.tiny else V.FULL), None


def make_plan(args, limit, sizes, tensors, device: str, trainable=None):
    from engine.training.memory import Fixed, TrainingJob, plan_training
    job = TrainingJob(lora=True, rank=args.rank, trainable_params=trainable, width=args.size, height=args.size,
                      text_tokens=args.text_tokens)
    eight = device.startswith("cuda") and _has_bitsandbytes()
    return plan_training(sizes, limit, job, Fixed(adamw8bit_available=eight), device, dit_tensors=tensors)


def _has_bitsandbytes() -> bool:
    import importlib.util
    return importlib.util.find_spec("bitsandbytes") is not None


# ------------------------------------------------------------------------------------------------------ runs
def _inputs(args, device, dtype):
    import torch

    from engine.training.objective import TrainingInputs, TrainingSchedule
    g = torch.Generator().manual_seed(args.seed + 1)
    lat = args.size // 8
    width = V.TINY["dit"]["joint_attention_dim"] if args.tiny else 4096
    pooled = V.TINY["dit"]["pooled_projection_dim"] if args.tiny else 768
    inputs = TrainingInputs(latents=torch.randn(1, 16, lat, lat, generator=g).to(device),
                            prompt_emb=torch.randn(1, args.text_tokens, width, generator=g).to(device, dtype),
                            pooled=torch.randn(1, pooled, generator=g).to(device, dtype), height=args.size,
                            width=args.size)
    _i, sigma, weight = TrainingSchedule().sample(torch.Generator().manual_seed(args.seed))
    return inputs, sigma, weight, torch.randn(inputs.latents.shape, generator=g)


def run_row(name, base, args, device, plan=None, checkpointing: str = "none") -> dict:
    """Train ``args.warmup + args.repeats`` steps on a copy of ``base`` (on the CPU) placed as ``plan`` says
    (None: everything on the device)."""
    import torch

    from engine.training.args import TrainConfig
    from engine.training.lora_targets import DIFFSYNTH_FLUX_TARGETS
    from engine.training.model import add_lora, enable_checkpointing
    from engine.training.objective import flow_matching_loss
    from engine.training.offload import BlockStreamer, make_optimizer
    dtype = torch.bfloat16
    dit = copy.deepcopy(base)
    add_lora(dit, TrainConfig(lora_base_model="dit", lora_target_modules=DIFFSYNTH_FLUX_TARGETS, lora_rank=args.rank,
                              seed=args.seed), log=lambda m: None)
    level = plan.checkpointing if plan is not None else checkpointing
    if level != "none":
        enable_checkpointing(dit, level == "checkpoint+offload")
    dit.train()
    V._free()
    cuda = device.type == "cuda"
    peaks = V.Peaks(device)
    with peaks:
        streamer = BlockStreamer(dit, device, plan.resident_blocks) if plan is not None and plan.streams else None
        if streamer is None:
            dit.to(device)
        params = [p for p in dit.parameters() if p.requires_grad]
        opt = make_optimizer(plan, params, torch.optim.AdamW, lr=1e-4, weight_decay=0.01)
        inputs, sigma, weight, noise = _inputs(args, device, dtype)
        times, losses = [], []
        for i in range(args.warmup + args.repeats):
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            loss = flow_matching_loss(dit, inputs, sigma, weight, noise, dtype)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
    row = {"name": name, "s_per_step": statistics.median(times), "min_s": min(times),
           "vram_torch_gb": peaks.vram_torch / GiB, "vram_driver_gb": peaks.vram_driver / GiB,
           "ram_gb": peaks.rss / GiB, "losses": losses, "checkpointing": level,
           "predicted_peak_gb": plan.predicted_peak_vram_gb if plan is not None else None,
           "plan": plan.lines() if plan is not None else None,
           "trainable": sum(p.numel() for p in params)}
    del dit, opt, streamer
    V._free()
    return row


def run_unlimited(base, args, device) -> dict:
    """All resident without checkpointing; with it if the card runs out of memory."""
    import torch
    try:
        return run_row("unlimited", base, args, device)
    except torch.cuda.OutOfMemoryError:
        pass   # (retried below, once the failed attempt's frames and their tensors are gone)
    V._free()
    row = run_row("unlimited (checkpointing)", base, args, device, checkpointing="checkpoint")
    row["note"] = "without gradient checkpointing the card ran out of memory"
    return row


def print_row(r):
    pred = "" if r["predicted_peak_gb"] is None else f", predicted {r['predicted_peak_gb']:.1f} GB"
    print(f"{r['name']:>28}: {r['s_per_step']:.3f} s/step (min {r['min_s']:.3f}), peak VRAM torch "
          f"{r['vram_torch_gb']:.2f} GB, driver {r['vram_driver_gb']:.2f} GB{pred}, RAM {r['ram_gb']:.1f} GB, "
          f"checkpointing {r['checkpointing']}" + (f" ({r['note']})" if r.get("note") else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes, tensors = plan_sizes(args)
    plan_device = "cuda" if args.dry_run and not args.device.startswith("cpu") else args.device
    if args.dry_run:
        for limit in [None] + list(args.limits):
            print("\n" + make_plan(args, limit, sizes, tensors, plan_device).describe())
        return 0
    import torch
    device = torch.device(args.device)
    t0 = time.perf_counter()
    base = V.build("dit", V.TINY if args.tiny else V.FULL, device, args.seed)   # on the CPU, bf16
    print(f"FLUX.1{' (tiny)' if args.tiny else '-dev'} transformer built in {time.perf_counter() - t0:.0f} s; "
          f"{args.size}x{args.size} ({(args.size // 16) ** 2} image + {args.text_tokens} text tokens), LoRA rank "
          f"{args.rank}, {device}")
    results = [run_unlimited(base, args, device)]
    print_row(results[0])
    for limit in args.limits:
        plan = make_plan(args, limit, sizes, tensors, str(device), trainable=results[0]["trainable"])
        print("\n" + plan.describe())
        row = run_row(f"plan {limit:g} GB", base, args, device, plan=plan)
        row["limit_gb"] = limit
        results.append(row)
        print_row(row)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    ref = results[0]["s_per_step"]
    print()
    for r in results[1:]:
        ratio = r["s_per_step"] / ref
        ok = r["vram_driver_gb"] < r["limit_gb"] and ratio <= TARGET_RATIO
        print(f"{r['name']}: x{ratio:.2f} the unlimited step time, peak {r['vram_driver_gb']:.2f} GB (driver) / "
              f"{r['vram_torch_gb']:.2f} GB (torch): target (< {r['limit_gb']:g} GB at <= {TARGET_RATIO}x) "
              f"{'MET' if ok else 'NOT met'}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
