"""Does context parallelism give the single-process result here? Run under torchrun on the machine to check:

    torchrun --nproc_per_node=2 -m engine.parallel.check                           # CPUs (gloo) or GPUs (nccl)
    torchrun --nproc_per_node=2 -m engine.parallel.check --ring 2 --attention cudnn --dtype bf16   # ring, CUDA

Every rank builds the same tiny random transformers of the three families (FLUX.1, FLUX.2, FLUX 3 with reference
tokens; FLUX 3 again with token counts that do not divide, through diffusers' uneven modes), runs one forward
plainly, then with context parallelism, and compares; with ``--models-dir`` it also makes a
2-step image with the FLUX.1 random-weight demo pipeline both ways and compares the final latents. Each case also
records how many tokens the first attention layer saw on this rank (1/N of them when the split happened). Rank 0
prints a table and, with ``--json``, every rank writes its results (``<json>.rank<k>``). Exit 1 when a difference
exceeds the tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS, HEAD_DIM, TEXT_WIDTH = 8, 16, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ulysses", type=int, default=None)
    p.add_argument("--ring", type=int, default=None)
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flash", "cudnn"))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--models-dir", default=None, help="also a 2-step FLUX.1 demo image (the demo is written here)")
    p.add_argument("--json", default=None, help="write each rank's results to <json>.rank<k>")
    return p.parse_args(argv)


def randomise(model, seed: int):
    """Seeded random weights, the same on every rank (diffusers zero-initialises some projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def tiny(family: str):
    from diffusers import Flux2Transformer2DModel, Flux3Transformer2DModel, FluxTransformer2DModel
    common = dict(num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                  joint_attention_dim=TEXT_WIDTH)
    if family == "flux1":
        return FluxTransformer2DModel(patch_size=1, in_channels=16, pooled_projection_dim=TEXT_WIDTH,
                                      guidance_embeds=True, axes_dims_rope=(4, 6, 6), **common)
    if family == "flux2":
        return Flux2Transformer2DModel(in_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True, **common)
    return Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, timestep_channels=32,
                                   axes_dims_rope=(4, 4, 4, 4), flow_map=True, **common)


def tiny_inputs(family: str, image_tokens: int, text_tokens: int, cond_tokens: int, dtype, device) -> dict:
    g = torch.Generator().manual_seed(1)
    axes = 3 if family == "flux1" else 4
    x = dict(hidden_states=torch.randn(1, image_tokens, 16, generator=g),
             encoder_hidden_states=torch.randn(1, text_tokens, TEXT_WIDTH, generator=g),
             timestep=torch.tensor([0.7]), img_ids=torch.randn(image_tokens, axes, generator=g) * 4,
             txt_ids=torch.randn(text_tokens, axes, generator=g) * 4, return_dict=False)
    if family == "flux1":
        x.update(pooled_projections=torch.randn(1, TEXT_WIDTH, generator=g), guidance=torch.tensor([3.5]))
    elif family == "flux2":
        x.update(guidance=torch.tensor([3.5]))
    else:
        x.update(target_timestep=torch.tensor([0.4]), image_cond_hidden_states=torch.randn(1, cond_tokens, 16,
                                                                                            generator=g),
                 image_cond_ids=torch.randn(cond_tokens, axes, generator=g) * 4)
    floats = ("hidden_states", "encoder_hidden_states", "pooled_projections", "image_cond_hidden_states")
    return {k: (v.to(device=device, dtype=dtype if k in floats else v.dtype) if torch.is_tensor(v) else v)
            for k, v in x.items()}


class TokenCounter:
    """The sequence length the first attention layer receives (its input before any all-to-all)."""

    def __init__(self, dit):
        from .context import attention_modules
        self.seen = []
        attention_modules(dit)[0].register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.seen.append(int(hidden.shape[1]))


def forward_case(family: str, args, ranks, backend, uneven: bool = False) -> dict:
    """One forward of a tiny transformer plainly, then split; ``uneven``: odd text and reference token counts
    (FLUX 3's prompts have any length) through diffusers' "anything" modes."""
    from ..acceleration.attention import attention_context
    from . import enable_context_parallel
    world = ranks.world_size
    odd = 1 if uneven else 0
    image_tokens, text_tokens, cond_tokens = 8 * world, 4 * world + odd, 2 * world + odd
    dtype, device = DTYPES[args.dtype], torch.device(ranks.device)
    dit = randomise(tiny(family), seed=10).to(device)
    if dtype != torch.float32:
        dit = dit.to(dtype)
    counter = TokenCounter(dit)
    x = tiny_inputs(family, image_tokens, text_tokens, cond_tokens, dtype, device)
    with torch.no_grad(), attention_context(backend):
        plain = dit(**x)[0].float()
        enable_context_parallel(dit, args.ulysses, args.ring, uneven, attention=args.attention)
        parallel = dit(**x)[0].float()
    return dict(case=f"{family} forward{' uneven' if uneven else ''}",
                max_abs_diff=float((parallel - plain).abs().max()), scale=float(plain.abs().max()),
                shape=list(parallel.shape), tokens_whole=counter.seen[0], tokens_parallel=counter.seen[1])


def generation_case(args, ranks) -> dict:
    from ..demo import write_demo_model
    from ..model_config import ModelConfig
    from ..pipeline import FluxImagePipeline
    from . import generate_image
    root = write_demo_model(args.models_dir)
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=DTYPES[args.dtype], device=ranks.device, attention_backend=args.attention,
        model_configs=[ModelConfig(path=root / "flux1-dev.safetensors"), ModelConfig(path=root / "ae.safetensors"),
                       ModelConfig(path=root / "text_encoder" / "model.safetensors"),
                       ModelConfig(path=root / "text_encoder_2")],
        tokenizer_1_config=ModelConfig(path=root / "tokenizer"),
        tokenizer_2_config=ModelConfig(path=root / "tokenizer_2"))
    latents, decode = [], pipe.decode_latents

    def keep(x, *a, **k):
        latents.append(x.float().cpu())
        return decode(x, *a, **k)

    pipe.decode_latents = keep
    counter = TokenCounter(pipe.dit)
    call = dict(prompt="a red fox", seed=3, height=64, width=64, num_inference_steps=2, progress_bar_cmd=lambda r: r)
    plain = pipe(**call)
    pipe.enable_context_parallel(args.ulysses, args.ring)
    parallel = generate_image(pipe, **call)
    pixels = np.abs(np.asarray(parallel, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max()
    return dict(case="flux1 2-step image", max_abs_diff=float((latents[1] - latents[0]).abs().max()),
                scale=float(latents[0].abs().max()), shape=list(latents[1].shape), max_pixel_diff=int(pixels),
                tokens_whole=counter.seen[0], tokens_parallel=counter.seen[-1])


def run(args) -> list:
    from ..acceleration.attention import backend_for
    from . import degrees, init_group
    ranks = init_group()
    backend = backend_for(args.attention, ranks.device, DTYPES[args.dtype])
    results = [forward_case(family, args, ranks, backend) for family in ("flux1", "flux2", "flux3")]
    ulysses, ring = degrees(ranks.world_size, args.ulysses, args.ring)
    if ulysses == 1 or ring == 1:          # diffusers' uneven modes take one kind of split, not both
        results.append(forward_case("flux3", args, ranks, backend, uneven=True))
    if args.models_dir:
        results.append(generation_case(args, ranks))
    for r in results:
        r.update(rank=ranks.rank, world_size=ranks.world_size, backend=ranks.backend,
                 ok=r["max_abs_diff"] <= TOLERANCE[args.dtype] * max(1.0, r["scale"]))
    return results


def report(results: list, ranks) -> None:
    print(f"context parallel check: {ranks.world_size} processes, {ranks.backend}, {ranks.device}")
    for r in results:
        print(f"  {r['case']:<20} max |parallel - plain| = {r['max_abs_diff']:.3g} (output up to {r['scale']:.3g}); "
              f"first attention saw {r['tokens_parallel']} of {r['tokens_whole']} tokens per rank  "
              f"{'ok' if r['ok'] else 'MISMATCH'}")


def main(argv=None) -> int:
    from . import close_group, current
    args = parse_args(argv)
    try:
        results = run(args)
        ranks = current()
        if args.json:
            with open(f"{args.json}.rank{ranks.rank}", "w") as f:
                json.dump(results, f, indent=1)
        if ranks.is_main:
            report(results, ranks)
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        close_group()


if __name__ == "__main__":
    sys.exit(main())
