"""FLUX.1-dev under VRAM limits: the engine's placement plans against diffusers' own offloading, in one process.

Full-size FLUX.1-dev (12B transformer, T5-XXL encoder, CLIP-L, the 16-channel VAE) with random weights: built on
the meta device, allocated with ``torch.empty`` and filled by ``normal_`` on the GPU (speed does not depend on the
values), then moved to the CPU as a loaded checkpoint would be. For each VRAM limit the engine plans, places the
modules and generates one 1024x1024 image (28 steps) with a fresh prompt (so the text encoders run), reporting:

- seconds per image (the whole call: text encoding, denoising, VAE decoding) and the median seconds per step;
- peak VRAM as torch sees it (``torch.cuda.max_memory_allocated``) and as the driver sees it (the largest
  ``total - free`` of ``torch.cuda.mem_get_info``, sampled every 20 ms: includes the CUDA context and the cache);
- peak RAM of the process (largest RSS, sampled likewise);
- the plan's predicted peaks, for comparison.

Then diffusers' ``FluxPipeline`` with the same modules: ``enable_model_cpu_offload()`` and
``enable_group_offload(block_level, use_stream=True)``, and the ratios of the engine's times to them.

    python benchmarks/vram.py                          # CUDA: limits none 24 12 8 6 4 GB + diffusers (~6-8 min, H100)
    python benchmarks/vram.py --steps 8 --limits 8 none --no-diffusers
    python benchmarks/vram.py --dry-run                # print the plans for the full-size model; no GPU needed
    python benchmarks/vram.py --dry-run --ram-limit 32 --limits 4 8 12 24 none
    python benchmarks/vram.py --tiny --device cpu --steps 2 --size 128   # smoke test of every code path on a CPU

``--json PATH`` writes the results (also after every configuration, so an interrupted run keeps what it measured).
``--ram-limit GB`` is the system RAM the plans may use (default: 16 GB for the dry run, the target of issue 17; what
this machine has free for measured runs). Each plan prints one line a script can read,
``== plan for 12 GB: predicted peak VRAM 11.2 GB, RAM 13.9 GB, 9.8 s/image``, then its components. The predicted
seconds use the rates measured on this machine's device at first use (``engine.memory.cost``), or an H100-class
reference card's where the planned-for device is not here (the dry run on a CPU-only machine).
"""
from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1024 ** 3
ROLES = ("text_encoder_1", "text_encoder_2", "dit", "vae")

# Full-size FLUX.1-dev (the manifests' shapes) and a tiny stand-in with the same structure for --tiny.
FULL = {
    "dit": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
    "t5": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, dense_act_fn="gelu_new", tie_word_embeddings=False),
    "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False),
}
TINY = {
    "dit": dict(FULL["dit"], num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 14, 14)),
    "t5": dict(FULL["t5"], d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32),
    "clip": dict(FULL["clip"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=64),
    "vae": dict(FULL["vae"], block_out_channels=(32, 32, 64, 64), layers_per_block=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limits", nargs="+", default=["none", "24", "12", "8", "6", "4"],
                   help="VRAM limits in GB, 'none' for no limit (default: none 24 12 8 6 4)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps per image (default 28)")
    p.add_argument("--size", type=int, default=1024, help="image width = height (default 1024)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, ... (cpu only with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny model with the same structure (code-path smoke test)")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' offloading references")
    p.add_argument("--dry-run", action="store_true", help="print the engine's plans for each limit and exit")
    p.add_argument("--ram-limit", metavar="GB", default=None,
                   help="system RAM the plans may use, GB or 'none' (default: 16 for --dry-run, else what is free)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.size < 64 or args.size % 16:
        p.error("--steps must be >= 1 and --size a multiple of 16 (>= 64)")
    try:
        args.limits = [None if str(x).lower() in ("none", "0", "unlimited") else float(x) for x in args.limits]
    except ValueError:
        p.error(f"--limits takes numbers of GB or 'none', got {args.limits}")
    if any(x is not None and x <= 0 for x in args.limits):
        p.error("--limits must be positive")
    args.ram_limit = _ram_limit(p, args.ram_limit, args.dry_run)
    if args.device.startswith("cpu") and not (args.tiny or args.dry_run):
        p.error("the full-size model on a CPU would take hours: use --tiny (or --dry-run)")
    return args


def _ram_limit(p, text, dry_run):
    if text is None:
        if dry_run:
            return 16.0
        import psutil
        return round(psutil.virtual_memory().available / GiB, 1)
    if str(text).lower() in ("none", "0", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        p.error(f"--ram-limit takes a number of GB or 'none', got {text!r}")
    if value <= 0:
        p.error("--ram-limit must be positive")
    return value


# ------------------------------------------------------------------------------------------------- the models
def _init_(module, device, seed):
    """Allocate a meta-built module on ``device`` and fill it fast: normal(0, fan_in^-1/2) matrices, ones for norm
    scales, zeros for biases, position ids 0..n-1."""
    import torch
    module.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.normal_(0.0, (1.0 if "embed" in name or "shared" in name else fan_in ** -0.5), generator=g)
            elif "norm" in name or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand(b.shape))
            else:
                b.zero_()
    module.eval().requires_grad_(False)
    return module


def build(role: str, dims: dict, device, seed: int = 0):
    """One component with random weights, in bf16 on the CPU (as the loader leaves a checkpoint)."""
    import torch
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)       # built in bf16 directly: no fp32 copy
    try:
        with torch.device("meta"):
            m = _meta(role, dims)
    finally:
        torch.set_default_dtype(default)
    _init_(m, device, seed + ROLES.index(role))
    if role == "text_encoder_2":
        m.encoder.embed_tokens.weight = m.shared.weight   # keep T5's tie after to_empty
    torch.nn.Module.to(m, "cpu")
    m.flux_studio_role = role
    m.flux_studio_file_dtype = "bfloat16"
    return m


def tokenizers():
    """The demo's CLIP and T5 tokenizers (written offline): token ids only matter for shapes here."""
    from engine.demo import write_demo_model
    from engine.text_encoding import load_tokenizer
    folder = write_demo_model(pathlib.Path(tempfile.gettempdir()) / "flux-studio-bench-models")
    return load_tokenizer(folder / "tokenizer", "CLIP"), load_tokenizer(folder / "tokenizer_2", "T5")


# --------------------------------------------------------------------------------------------- measuring
class Peaks:
    """Largest driver-side VRAM use and process RSS, sampled in a thread, plus torch's own peak."""

    def __init__(self, device, interval=0.02):
        import psutil
        import torch
        self.torch, self.device, self.interval = torch, device, interval
        self.proc = psutil.Process()
        self.cuda = device.type == "cuda"
        self.vram_driver = self.rss = 0
        self._stop = threading.Event()

    def sample(self):
        self.rss = max(self.rss, self.proc.memory_info().rss)
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info(self.device)
            self.vram_driver = max(self.vram_driver, total - free)

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
        self._stop.set()
        self._thread.join()
        self.sample()
        self.vram_torch = self.torch.cuda.max_memory_allocated(self.device) if self.cuda else 0


def _free():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sizes_for(dims) -> dict:
    """The planner's sizes for these modules, from meta builds (no memory)."""
    import torch
    from engine import memory as vram
    out = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for role in ROLES:
            with torch.device("meta"):
                m = _meta(role, dims)
            m.flux_studio_file_dtype = "bfloat16"
            out[role] = vram.sizes_from_module(role, m)
    finally:
        torch.set_default_dtype(default)
    return out


def _meta(role, dims):
    if role == "dit":
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel(**dims["dit"])
    if role == "text_encoder_2":
        from transformers import T5Config, T5EncoderModel
        return T5EncoderModel(T5Config(**dims["t5"]))
    if role == "text_encoder_1":
        from transformers import CLIPTextConfig, CLIPTextModel
        return CLIPTextModel(CLIPTextConfig(**dims["clip"]))
    from diffusers import AutoencoderKL
    return AutoencoderKL(**dims["vae"])


def plan_line(p, limit) -> str:
    """The plan's summary in the form scripts read: ``== plan for 12 GB: predicted peak VRAM 11.2 GB, RAM 13.9 GB,
    9.8 s/image``."""
    head = "no limit" if limit is None else f"{limit:g} GB"
    return (f"== plan for {head}: predicted peak VRAM {p.predicted_peak_vram_gb:.1f} GB, RAM "
            f"{p.predicted_peak_ram_gb:.1f} GB, {p.predicted_seconds:.1f} s/image")


def print_plan(p, limit):
    print("\n" + plan_line(p, limit) + ("" if p.fits else "  (DOES NOT FIT)"))
    width = max(len(e.label) for e in p.entries.values())
    for role in p.describe():
        e = p.entries[role["role"]]
        print(f"   {role['label']:<{width}} {e.how():<34} {role['storage_dtype']:<14} vram {role['vram_gb']:6.2f} GB"
              f"  ram {role['ram_gb']:6.2f} GB  {p.seconds_parts.get(e.role, 0):7.2f} s")
    if p.seconds_parts.get("moves"):
        print(f"   {'offloading moves':<{width}} {'':<34} {'':<14} {'':<31}  {p.seconds_parts['moves']:7.2f} s")


# ------------------------------------------------------------------------------------------------ the runs
def run_engine(modules, toks, limit, args, device, prompt):
    import torch
    from engine.memory import place as placement
    from engine.pipeline import FluxImagePipeline
    pipe = FluxImagePipeline(device=str(device), torch_dtype=torch.bfloat16)
    pipe.vram_limit, pipe.ram_limit = limit, args.ram_limit
    pipe.plan_size = (args.size, args.size)
    pipe.plan_steps = args.steps          # (a pipeline without it plans for 28 steps)
    t0 = time.perf_counter()
    pipe.set_models(dict(modules))
    placed = time.perf_counter() - t0
    pipe.tokenizer_1, pipe.tokenizer_2 = toks
    _free()
    stamps = []
    with Peaks(device) as peaks:
        t0 = time.perf_counter()
        pipe(prompt=prompt, height=args.size, width=args.size, num_inference_steps=args.steps, seed=args.seed,
             progress_bar_cmd=lambda it: it, step_callback=lambda d, t: stamps.append(time.perf_counter()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    plan = pipe.plan
    result = {"config": f"engine, limit {'none' if limit is None else f'{limit:g} GB'}", "limit_gb": limit,
              "seconds_per_image": seconds, "seconds_per_step": statistics.median(steps) if steps else None,
              "placement_seconds": placed, "peak_vram_torch_gb": peaks.vram_torch / GiB,
              "peak_vram_driver_gb": peaks.vram_driver / GiB, "peak_ram_gb": peaks.rss / GiB,
              "predicted_vram_gb": plan.predicted_peak_vram_gb, "predicted_ram_gb": plan.predicted_peak_ram_gb,
              "predicted_seconds": plan.predicted_seconds,
              "fits": plan.fits, "plan": {r: f"{e.how()}/{e.storage_dtype}" for r, e in plan.entries.items()}}
    pipe.residency.offload_all()
    for role in ROLES:              # leave the modules on the CPU, without streaming hooks, for the next config
        placement.unplace(getattr(pipe, role))
    del pipe
    _free()
    return result


def run_diffusers(modules, toks, mode, args, device, prompt):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from engine.memory import place as placement
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=modules["vae"],
                        text_encoder=modules["text_encoder_1"], tokenizer=toks[0],
                        text_encoder_2=modules["text_encoder_2"], tokenizer_2=toks[1], transformer=modules["dit"])
    t0 = time.perf_counter()
    if mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.type == "cuda")
    placed = time.perf_counter() - t0
    _free()
    stamps = []
    with Peaks(device) as peaks:
        t0 = time.perf_counter()
        pipe(prompt=prompt, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5,
             max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(args.seed),
             callback_on_step_end=lambda p, i, t, kw: (stamps.append(time.perf_counter()), kw)[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {"config": f"diffusers {mode}", "limit_gb": None, "seconds_per_image": seconds,
              "seconds_per_step": statistics.median(steps) if steps else None, "placement_seconds": placed,
              "peak_vram_torch_gb": peaks.vram_torch / GiB, "peak_vram_driver_gb": peaks.vram_driver / GiB,
              "peak_ram_gb": peaks.rss / GiB}
    pipe.remove_all_hooks()
    for m in modules.values():
        placement.remove_streaming(m)
        torch.nn.Module.to(m, "cpu")
    del pipe
    _free()
    return result


def table(results) -> str:
    lines = [f"{'configuration':<34}{'s/image':>9}{'pred s':>8}{'s/step':>8}{'VRAM torch':>11}{'VRAM drv':>10}"
             f"{'predicted':>10}{'RAM':>8}{'pred RAM':>9}"]
    for r in results:
        pred = f"{r['predicted_vram_gb']:.2f}" if r.get("predicted_vram_gb") is not None else "-"
        pred_s = f"{r['predicted_seconds']:.2f}" if r.get("predicted_seconds") is not None else "-"
        pred_ram = f"{r['predicted_ram_gb']:.1f}" if r.get("predicted_ram_gb") is not None else "-"
        step = f"{r['seconds_per_step']:.3f}" if r.get("seconds_per_step") else "-"
        lines.append(f"{r['config']:<34}{r['seconds_per_image']:>9.2f}{pred_s:>8}{step:>8}"
                     f"{r['peak_vram_torch_gb']:>11.2f}{r['peak_vram_driver_gb']:>10.2f}{pred:>10}"
                     f"{r['peak_ram_gb']:>8.1f}{pred_ram:>9}")
    return "\n".join(lines)


def ratios(results) -> list:
    out = []
    refs = {r["config"]: r for r in results if r["config"].startswith("diffusers")}
    for r in results:
        if r["config"].startswith("diffusers"):
            continue
        for name, ref in refs.items():
            out.append(f"{r['config']} / {name}: time x{r['seconds_per_image'] / ref['seconds_per_image']:.2f}, "
                       f"torch VRAM x{r['peak_vram_torch_gb'] / max(ref['peak_vram_torch_gb'], 1e-9):.2f}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from engine import memory as vram
    from engine.memory import place as placement
    dims = TINY if args.tiny else FULL
    device = torch.device(args.device)
    if args.dry_run:
        sizes = sizes_for(dims)
        print(f"FLUX.1-dev, {args.size}x{args.size}, {args.steps} steps, RAM limit "
              f"{'none' if args.ram_limit is None else f'{args.ram_limit:g} GB'}; rates: "
              f"{vram.cost.constants('cpu' if device.type == 'cpu' else 'cuda').as_dict()}")
        for limit in args.limits:
            print_plan(vram.plan(sizes, "cuda" if not device.type == "cpu" else "cpu", limit, args.ram_limit,
                                 width=args.size, height=args.size, steps=args.steps), limit)
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: run with --dry-run, or --tiny --device cpu for a smoke test.")
        return 2
    results = []

    def save():
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                           "device": torch.cuda.get_device_name(device)
                                                           if device.type == "cuda" else "cpu",
                                                           "results": results}, indent=1))

    t_build = time.perf_counter()
    init_device = device if device.type == "cuda" else torch.device("cpu")
    modules = {role: build(role, dims, init_device, args.seed) for role in ROLES}
    toks = tokenizers()
    _free()
    print(f"built random {'tiny' if args.tiny else 'full-size'} FLUX.1-dev in {time.perf_counter() - t_build:.1f} s on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"{args.size}x{args.size}, {args.steps} steps", flush=True)

    # warm-up (kernels, cuBLAS handles), not timed
    warm = argparse.Namespace(**{**vars(args), "steps": 2})
    run_engine(modules, toks, args.limits[0], warm, device, "warm-up")
    for i, limit in enumerate(args.limits):
        # fp8 is not reversible in place: a module left in fp8 that this plan wants in bf16 is rebuilt
        preview = placement.plan_modules(modules, {}, device, torch.bfloat16, limit, args.ram_limit, args.size,
                                         args.size, steps=args.steps)
        for role, entry in preview.entries.items():
            if placement.needs_reload(modules[role], placement.from_entry(entry)):
                modules[role] = None
                _free()
                modules[role] = build(role, dims, init_device, args.seed)
        print_plan(preview, limit)
        try:
            r = run_engine(modules, toks, limit, args, device, f"a red fox in the snow, take {i}")
        except torch.OutOfMemoryError as exc:
            r = {"config": f"engine, limit {limit:g} GB", "error": f"out of memory: {str(exc).splitlines()[0]}"}
            print(r["error"], flush=True)
            _free()
            results.append(r)
            save()
            continue
        results.append(r)
        print(table([r]).splitlines()[1], flush=True)
        save()
    if not args.no_diffusers:
        for role in ROLES:                       # diffusers gets bf16 modules
            if placement.is_fp8(modules[role]):
                modules[role] = None
                _free()
                modules[role] = build(role, dims, init_device, args.seed)
        for mode in ("model_cpu_offload", "group_offload"):
            try:
                r = run_diffusers(modules, toks, mode, args, device, f"a red fox in the snow, {mode}")
            except torch.OutOfMemoryError as exc:
                r = {"config": f"diffusers {mode}", "error": f"out of memory: {str(exc).splitlines()[0]}"}
            results.append(r)
            print(r.get("error") or table([r]).splitlines()[1], flush=True)
            save()
    ok = [r for r in results if "error" not in r]
    print("\n" + table(ok))
    for line in ratios(ok):
        print(line)
    for r in results:
        if "error" in r:
            print(f"{r['config']}: {r['error']}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
