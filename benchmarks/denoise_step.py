"""Time one FLUX denoising forward pass: diffusers' FluxTransformer2DModel called plainly vs the engine's path.

A transformer at the real width (3072 hidden = 24 heads x 128, T5 context 4096, CLIP pooled 768, guidance embedder)
with a few blocks, random weights (speed does not depend on the values), 256 image tokens + 512 text tokens.
Both paths run the same model object on the same inputs, interleaved, after warm-up; the median is reported.

    python benchmarks/denoise_step.py                      # bf16 on CPU, 2 double + 2 single blocks
    python benchmarks/denoise_step.py --device cuda --double 19 --single 38   # the full model on a GPU

Exit status 1 (with "engine path not available yet") if ``engine.pipeline.denoise_step`` does not exist.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=2, help="double-stream blocks (19 in FLUX.1-dev)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks (38 in FLUX.1-dev)")
    p.add_argument("--image-tokens", type=int, default=256, help="packed latent tokens (256 = a 256x256 image)")
    p.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (512 for FLUX.1-dev)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def engine_denoise_step():
    """The engine's model call, or None (with the reason) while it does not exist."""
    try:
        from engine.pipeline import denoise_step
    except Exception as e:  # noqa: BLE001 - any import failure means the path is not usable yet
        return None, f"{type(e).__name__}: {e}"
    return denoise_step, None


def build_transformer(args, dtype, device):
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy, no cast
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                torch.nn.init.ones_(p)
            elif p.ndim == 1:
                torch.nn.init.zeros_(p)
            else:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5, generator=g)
        for name, b in model.named_buffers():  # none today; keep any future buffer defined
            raise RuntimeError(f"unexpected buffer {name}: initialise it here")
    return model.eval().requires_grad_(False)


def make_inputs(args, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    b, n_img, n_txt = args.batch, args.image_tokens, args.text_tokens
    side = int(round(n_img ** 0.5))
    h, w = (side, n_img // side) if side * (n_img // side) == n_img else (1, n_img)
    image_ids = torch.zeros(h, w, 3)
    image_ids[..., 1] = torch.arange(h)[:, None]
    image_ids[..., 2] = torch.arange(w)[None, :]
    x = dict(
        latents_packed=torch.randn(b, n_img, 64, generator=g),
        timestep=torch.full((b,), 0.5),
        guidance=torch.full((b,), 3.5),
        pooled=torch.randn(b, 768, generator=g),
        text_embeds=torch.randn(b, n_txt, 4096, generator=g),
        text_ids=torch.zeros(n_txt, 3),
        image_ids=image_ids.reshape(-1, 3),
    )
    float_keys = ("latents_packed", "pooled", "text_embeds")
    return {k: v.to(device=device, dtype=dtype if k in float_keys else torch.float32) for k, v in x.items()}


def diffusers_call(dit, x):
    # As diffusers' FluxPipeline calls it (timestep as sigma in [0, 1]; the model multiplies by 1000 itself).
    return dit(hidden_states=x["latents_packed"], timestep=x["timestep"], guidance=x["guidance"],
               pooled_projections=x["pooled"], encoder_hidden_states=x["text_embeds"], txt_ids=x["text_ids"],
               img_ids=x["image_ids"], return_dict=False)[0]


def timed(fn, device):
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    sync()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    args = parse_args(argv)
    step, why = engine_denoise_step()
    if step is None:
        print(f"engine path not available yet ({why})")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)

    t0 = time.perf_counter()
    dit = build_transformer(args, dtype, device)
    x = make_inputs(args, dtype, device)
    n_params = sum(p.numel() for p in dit.parameters())
    assert {p.dtype for p in dit.parameters()} == {dtype}, "parameters not all in the benchmark dtype"
    print(f"FLUX transformer: width 3072 (24x128), {args.double} double + {args.single} single blocks, "
          f"{n_params / 1e9:.2f}B params, {args.dtype} on {device} ({torch.get_num_threads()} threads); "
          f"{args.batch} x ({args.image_tokens} image + {args.text_tokens} text) tokens; "
          f"built in {time.perf_counter() - t0:.1f}s")

    paths = {
        "diffusers": lambda: diffusers_call(dit, x),
        "engine": lambda: step(dit, x["latents_packed"], x["timestep"], x["guidance"], x["pooled"],
                               x["text_embeds"], x["text_ids"], x["image_ids"]),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outs = {}
    for _ in range(args.warmup):
        for name, fn in paths.items():
            outs[name] = timed(fn, device)[1]
    times = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so drift (thermal, other load) hits both alike
        for name, fn in paths.items():
            dt, outs[name] = timed(fn, device)
            times[name].append(dt)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in paths:
        print(f"{name:>9}: {med[name]:.4f} s/step (median of {args.repeats}; "
              f"min {min(times[name]):.4f}, max {max(times[name]):.4f})")
    print(f"ratio engine/diffusers: {med['engine'] / med['diffusers']:.3f} "
          f"(ratio of the minimums: {min(times['engine']) / min(times['diffusers']):.3f})")
    diff = (outs["engine"].float() - outs["diffusers"].float()).abs().max().item()
    print(f"max |engine - diffusers| output difference: {diff:.3g}")
    if device.type == "cuda":
        print(f"peak VRAM: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
