"""Time one LoRA training step: the engine's (engine.training) vs a plain diffusers + peft loop, same model and work.

A transformer at the real width (3072 hidden = 24 heads x 128, T5 context 4096, CLIP pooled 768, guidance embedder)
with a few blocks and random weights (speed does not depend on the values), 256 image tokens (a 256x256 image) +
512 text tokens, a rank-32 LoRA on the seed's FLUX target list (DiffSynth's names, mapped by the engine; the
reference gets the same diffusers layers by name). One step = forward, the weighted flow-matching loss, backward,
AdamW step. Inputs are already encoded (the VAE and text encoders are not timed in either path).

- engine: ``engine.training.model.add_lora`` (PEFT injection, LoRA in float32), ``objective.flow_matching_loss``,
  ``runner.train_step`` under an ``accelerate.Accelerator`` -- exactly the calls ``train.py`` makes per step.
- reference: diffusers' ``FluxTransformer2DModel.add_adapter(LoraConfig)`` (LoRA cast to float32 as diffusers'
  FLUX LoRA script does), diffusers' packing and id helpers, the
  transformer called as diffusers' training scripts call it, ``F.mse_loss``, ``torch.optim.AdamW``.

Both models are copies of the same weights; the two paths alternate after warm-up; the median is reported.

    python benchmarks/train_step.py                        # bf16 on CPU, 2 double + 2 single blocks
    python benchmarks/train_step.py --device cuda --double 19 --single 38 --image-tokens 4096 --checkpointing
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.denoise_step import DTYPES, build_transformer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=2, help="double-stream blocks (19 in FLUX.1-dev)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks (38 in FLUX.1-dev)")
    p.add_argument("--image-tokens", type=int, default=256, help="packed latent tokens (a square: 256 = 256x256)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both paths")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from diffusers import FluxPipeline
    from peft import LoraConfig

    from engine.training.args import TrainConfig
    from engine.training.export import peft_pairs
    from engine.training.lora_targets import DIFFSYNTH_FLUX_TARGETS
    from engine.training.model import add_lora, enable_checkpointing
    from engine.training.objective import TrainingInputs, TrainingSchedule
    from engine.training.runner import train_step
    from engine.training.tasks import FluxTrainingModule

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    side = int(round(args.image_tokens ** 0.5))
    assert side * side == args.image_tokens, "--image-tokens must be a square number"
    height = width = side * 16

    t0 = time.perf_counter()
    base = build_transformer(args, dtype, device)
    ours, ref = base, copy.deepcopy(base)

    # ---- engine
    config = TrainConfig(lora_base_model="dit", lora_target_modules=DIFFSYNTH_FLUX_TARGETS, lora_rank=args.rank)
    targets = add_lora(ours, config, log=lambda m: None)
    if args.checkpointing:
        enable_checkpointing(ours, offload=False)
    ours.train()
    accelerator = Accelerator()
    module = FluxTrainingModule(ours, dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.ConstantLR(opt)
    model, opt, sched = accelerator.prepare(module, opt, sched)

    # ---- reference: diffusers + peft, the same layers by name
    torch.manual_seed(args.seed)
    ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                               target_modules=targets))
    from diffusers.training_utils import cast_training_params
    cast_training_params(ref, dtype=torch.float32)   # as diffusers' FLUX LoRA script does: LoRA in fp32, base bf16
    if args.checkpointing:
        ref.enable_gradient_checkpointing()
    ref.train()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-4, weight_decay=0.01)

    n_ours = sum(p.numel() for p in params)
    n_ref = sum(p.numel() for p in ref_params)
    pairs = len(peft_pairs(ours))
    print(f"FLUX transformer: width 3072, {args.double} double + {args.single} single blocks, {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads); {args.image_tokens} image + {args.text_tokens} text tokens; rank "
          f"{args.rank} LoRA on {pairs} layers ({n_ours / 1e6:.1f}M params engine, {n_ref / 1e6:.1f}M reference; "
          f"LoRA dtype engine {params[0].dtype}, reference {ref_params[0].dtype}); checkpointing "
          f"{'on' if args.checkpointing else 'off'}; built in {time.perf_counter() - t0:.1f}s")

    g = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(1, 16, height // 8, width // 8, generator=g).to(device)
    inputs = TrainingInputs(latents=latents,
                            prompt_emb=torch.randn(1, args.text_tokens, 4096, generator=g).to(device, dtype),
                            pooled=torch.randn(1, 768, generator=g).to(device, dtype), height=height, width=width)
    schedule = TrainingSchedule()
    _, sigma, weight = schedule.sample(torch.Generator().manual_seed(args.seed))
    noise = torch.randn(latents.shape, generator=g)

    img_ids = FluxPipeline._prepare_latent_image_ids(1, height // 16, width // 16, device, dtype)
    txt_ids = torch.zeros(args.text_tokens, 3, device=device, dtype=dtype)

    def engine_step():
        return train_step(accelerator, model, opt, sched, inputs, {"sigma": sigma, "weight": weight, "noise": noise})

    def reference_step():
        x0 = latents
        n = noise.to(device)
        noisy = (1 - sigma) * x0 + sigma * n
        packed = FluxPipeline._pack_latents(noisy, 1, 16, height // 8, width // 8).to(dtype)
        target = FluxPipeline._pack_latents(n - x0, 1, 16, height // 8, width // 8)
        pred = ref(hidden_states=packed, timestep=torch.full((1,), sigma, device=device, dtype=dtype),
                   guidance=torch.full((1,), 1.0, device=device), pooled_projections=inputs.pooled,
                   encoder_hidden_states=inputs.prompt_emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float()) * weight
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        return loss

    paths = {"reference": reference_step, "engine": engine_step}

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        loss = fn()
        sync(device)
        return time.perf_counter() - t, float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        for fn in paths.values():
            timed(fn)
    times, losses = {k: [] for k in paths}, {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            dt, loss = timed(fn)
            times[name].append(dt)
            losses[name].append(loss)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in paths:
        print(f"{name:>9}: {med[name]:.3f} s/step (median of {args.repeats}; min {min(times[name]):.3f}, "
              f"max {max(times[name]):.3f}); losses {', '.join(f'{x:.4f}' for x in losses[name])}")
    print(f"ratio engine/reference: {med['engine'] / med['reference']:.3f} "
          f"(ratio of the minimums: {min(times['engine']) / min(times['reference']):.3f})")
    if device.type == "cuda":
        print(f"peak VRAM: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
