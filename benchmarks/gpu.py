"""One command for a CUDA machine: FLUX.1-dev's speed and memory, the engine against diffusers, in one process.

Full-size FLUX.1-dev with random weights (``benchmarks/vram.py``'s builders: built on the meta device, allocated and
filled on the GPU, then moved to the CPU as a loaded checkpoint), 1024x1024, 28 steps, a new prompt per image (so
the text encoders run). Rows, in order (the most telling first, so a tight budget skips the least):

- ``diffusers eager``: diffusers' ``FluxPipeline`` on the same modules, all on the device (the reference);
- ``engine eager``: ``FluxImagePipeline``, no VRAM limit;
- ``engine compiled``: ``set_acceleration(compile=True)`` (regional torch.compile; its first call compiles);
- ``engine compiled + fp8``: ``set_acceleration(fp8_compute=True)`` on top (torchao float8 matmuls);
- ``engine compiled + fp8 + step cache``: the same called with ``step_cache=THRESHOLD`` (first-block cache);
- ``engine, limit N GB`` for 24, 12, 8 and 4 GB (the planner's placements, eager);
- ``variant swap``: a random transformer file written to a temp folder, read with ``safetensors.safe_open`` (every
  tensor) against the engine loading it as a variant (``engine.loading.load_models``) and placing it in the
  pipeline (``set_models``); the file is in the page cache for both.

Each row: seconds per image (the fastest of ``--repeats`` calls, after a warm-up call of 2 steps at the same size,
which also compiles), median seconds per step, the warm-up's seconds, peak VRAM (torch's and the driver's), peak RAM (process RSS), the plan's predicted
seconds and VRAM, notes (what an option did or why it was off), and the time ratio to diffusers eager. A speed
option the engine does not have yet (AttributeError / TypeError) is recorded as "not available". ``--budget-s``
(default 450) skips, recorded as skipped, each row whose projected time would pass the budget.

    python benchmarks/gpu.py                       # CUDA, full size: ~6-8 min on an H100; writes gpu-bench.md/.json
    python benchmarks/gpu.py --quick               # 4 steps, 2 limits: a smoke run on the GPU (~2 min)
    python benchmarks/gpu.py --cpu                 # CPU: 2 double + 4 single blocks at width 512, 256x256, 4 steps,
                                                   # with the full-size dry-run plans of vram.py appended
    python benchmarks/gpu.py --cpu --tiny --steps 1 --size 64   # the test's smoke run (seconds)

Results: ``--out PREFIX`` (default ``gpu-bench``, ``cpu-bench`` with --cpu) -> PREFIX.md and PREFIX.json, written
after every row (an interrupted run keeps what it measured).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import vram as base  # noqa: E402 - benchmarks/vram.py: the builders, the peak sampler, the dimensions

GiB = 1024 ** 3
FULL = base.FULL
# The CPU's stand-in: FLUX's structure, 2 double + 4 single blocks at width 512 (8 heads of 64), encoders to match.
CPU = {
    "dit": dict(FULL["dit"], num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
                joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(8, 28, 28)),
    "t5": dict(FULL["t5"], d_model=512, d_ff=1024, num_layers=4, num_heads=8, d_kv=64),
    "clip": dict(FULL["clip"], hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=256),
    "vae": dict(FULL["vae"], block_out_channels=(32, 64, 128, 128), layers_per_block=1),
}
ACCEL = ("engine compiled", "engine compiled + fp8", "engine compiled + fp8 + step cache")
NOT_AVAILABLE = "not available"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU at a few blocks (ratios to diffusers)")
    p.add_argument("--tiny", action="store_true", help="with --cpu: vram.py's tiny model (the test's smoke run)")
    p.add_argument("--quick", action="store_true", help="fewer steps (4) and limits (8, 24): a smoke run")
    p.add_argument("--steps", type=int, default=None, help="steps per image (default 28; 4 with --cpu or --quick)")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024; 256 with --cpu)")
    p.add_argument("--limits", nargs="+", type=float, default=None, help="VRAM limits in GB (default 24 12 8 4)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip rows that would end past this (default 450)")
    p.add_argument("--ram-limit", type=float, default=None, help="GB of RAM the engine's plans may use (default: none)")
    p.add_argument("--step-cache", type=float, default=0.08, help="first-block cache threshold (default 0.08)")
    p.add_argument("--out", default=None, help="PREFIX for PREFIX.md and PREFIX.json (default gpu-bench/cpu-bench)")
    p.add_argument("--tokenizers", default=None, help="a folder with the demo's tokenizer/ and tokenizer_2/")
    p.add_argument("--no-swap", action="store_true", help="skip the variant swap row")
    p.add_argument("--no-plans", action="store_true", help="with --cpu: do not append vram.py --dry-run's plans")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row, the fastest counted (default 1; "
                                                             "3 with --cpu: a shared CPU is noisy)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.cpu else 1)
    if args.tiny and not args.cpu:
        p.error("--tiny is for --cpu smoke runs; on a GPU the benchmark is the full-size model")
    args.steps = args.steps or (4 if (args.cpu or args.quick) else 28)
    args.size = args.size or (256 if args.cpu else 1024)
    args.limits = args.limits or ([24.0, 8.0] if args.quick else [24.0, 12.0, 8.0, 4.0])
    args.out = args.out or ("cpu-bench" if args.cpu else "gpu-bench")
    if args.steps < 1 or args.size < 64 or args.size % 16:
        p.error("--steps must be >= 1 and --size a multiple of 16 (>= 64)")
    if any(x <= 0 for x in args.limits):
        p.error("--limits must be positive numbers of GB")
    return args


# ------------------------------------------------------------------------------------------------ the bench
class Bench:
    """The modules, tokenizers, results and clock of one run."""

    def __init__(self, args):
        import torch
        self.args, self.torch = args, torch
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.dims = (base.TINY if args.tiny else CPU) if args.cpu else FULL
        # The CPU runs float32 (as the studio's demo does: faster than bf16 on most CPUs); the GPU bf16.
        self.dtype = torch.float32 if args.cpu else torch.bfloat16
        self.t0 = time.perf_counter()
        self.results: list = []
        self.modules = {role: self.build(role) for role in base.ROLES}
        self.toks = load_tokenizers(args.tokenizers)
        self.prompts = 0

    def build(self, role):
        m = base.build(role, self.dims, self.device, self.args.seed)
        if self.dtype != self.torch.bfloat16:
            self.torch.nn.Module.to(m, self.dtype)
            m.flux_studio_file_dtype = str(self.dtype).replace("torch.", "")
        return m

    def rebuild(self, role):
        self.modules[role] = None
        free()
        self.modules[role] = self.build(role)

    def prompt(self):
        self.prompts += 1            # a new prompt per call: the text encoders run every time
        return f"a red fox in the snow, take {self.prompts}"

    def elapsed(self):
        return time.perf_counter() - self.t0

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def device_name(self):
        if self.device.type == "cuda":
            return self.torch.cuda.get_device_name(self.device)
        import platform
        return f"cpu ({platform.processor() or platform.machine()}, {self.torch.get_num_threads()} threads)"


def load_tokenizers(folder):
    if folder is None:
        return base.tokenizers()
    from engine.text_encoding import load_tokenizer
    folder = pathlib.Path(folder)
    return load_tokenizer(folder / "tokenizer", "CLIP"), load_tokenizer(folder / "tokenizer_2", "T5")


def free():
    base._free()


def timed(bench, call):
    """Run ``call(step_callback)`` ``--repeats`` times under the peak sampler: (the fastest call's seconds, its
    median s/step, peaks, every call's seconds). The fastest is the least disturbed on a shared machine."""
    stamps, seconds = [], []
    free()
    with base.Peaks(bench.device) as peaks:
        for _ in range(bench.args.repeats):
            mine = []
            t = time.perf_counter()
            call(lambda *a: mine.append(time.perf_counter()))
            bench.sync()
            seconds.append(time.perf_counter() - t)
            stamps.append(mine)
    best = stamps[seconds.index(min(seconds))]
    steps = [b - a for a, b in zip(best, best[1:])]
    return min(seconds), (statistics.median(steps) if steps else None), peaks, seconds


def measured(name, seconds, per_step, peaks, warmup, **extra):
    every = extra.pop("every", [seconds])
    return {"config": name, "status": "ok", "seconds_per_image": seconds, "seconds_per_step": per_step,
            "seconds_every_call": every,
            "warmup_seconds": warmup, "peak_vram_torch_gb": peaks.vram_torch / GiB,
            "peak_vram_driver_gb": peaks.vram_driver / GiB, "peak_ram_gb": peaks.rss / GiB, **extra}


# ------------------------------------------------------------------------------------------------ the rows
def run_diffusers(bench):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    a, m = bench.args, bench.modules
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=m["vae"],
                        text_encoder=m["text_encoder_1"], tokenizer=bench.toks[0], text_encoder_2=m["text_encoder_2"],
                        tokenizer_2=bench.toks[1], transformer=m["dit"])
    pipe.to(bench.device)

    def call(steps, cb=None):
        pipe(prompt=bench.prompt(), height=a.size, width=a.size, num_inference_steps=steps, guidance_scale=3.5,
             max_sequence_length=512, generator=bench.torch.Generator("cpu").manual_seed(a.seed),
             callback_on_step_end=(lambda p, i, t, kw: (cb(), kw)[1]) if cb else None)

    warm = time.perf_counter()
    call(2)
    bench.sync()
    warm = time.perf_counter() - warm
    seconds, per_step, peaks, every = timed(bench, lambda cb: call(a.steps, cb))
    for module in m.values():               # back to the CPU: each engine row places them itself
        bench.torch.nn.Module.to(module, "cpu")
    pipe.remove_all_hooks()
    free()
    return measured("diffusers eager", seconds, per_step, peaks, warm, every=every)


def engine_pipe(bench, limit=None):
    from engine.pipeline import FluxImagePipeline
    pipe = FluxImagePipeline(device=str(bench.device), torch_dtype=bench.dtype)
    pipe.vram_limit, pipe.ram_limit = limit, bench.args.ram_limit
    pipe.plan_size = (bench.args.size, bench.args.size)
    pipe.set_models(dict(bench.modules))
    pipe.tokenizer_1, pipe.tokenizer_2 = bench.toks
    return pipe


def release(bench, pipe):
    """The modules back on the CPU without hooks, for the next row."""
    from engine.memory import place as placement
    try:
        pipe.residency.offload_all()
    except Exception as exc:  # noqa: BLE001 - e.g. a float8 layer that cannot move: moved one by one below
        print(f"offloading after the row failed ({type(exc).__name__}: {exc}); moving the modules one by one")
    for role in base.ROLES:
        module = getattr(pipe, role)
        try:
            placement.unplace(module)
            bench.torch.nn.Module.to(module, "cpu")
        except Exception:  # noqa: BLE001 - the caller builds this one again
            bench.modules[role] = None
    free()


def accelerate(pipe, **options):
    """``pipe.set_acceleration(**options)``: (notes, None) or (None, why it is not available)."""
    setter = getattr(pipe, "set_acceleration", None)
    if setter is None:
        return None, "FluxImagePipeline.set_acceleration is missing"
    missing = [k for k in options if k not in inspect.signature(setter).parameters]
    if missing:
        return None, f"set_acceleration has no {', '.join(missing)}"
    try:
        return list(setter(**options) or []), None
    except (AttributeError, TypeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def run_engine(bench, pipe, name, step_cache=None, options=None):
    """One engine row on ``pipe``: ``options`` for set_acceleration first, ``step_cache`` for the call."""
    a = bench.args
    notes = []
    if options:
        notes, why = accelerate(pipe, **options)
        if why:
            return {"config": name, "status": NOT_AVAILABLE, "why": why}
    extra = {}
    if step_cache is not None:
        if "step_cache" not in inspect.signature(pipe.__call__).parameters:
            return {"config": name, "status": NOT_AVAILABLE, "why": "the pipeline's call has no step_cache"}
        extra["step_cache"] = step_cache

    def call(steps, cb=None):
        pipe(prompt=bench.prompt(), height=a.size, width=a.size, num_inference_steps=steps, seed=a.seed,
             progress_bar_cmd=lambda it: it, step_callback=cb, **extra)

    try:
        warm = time.perf_counter()
        call(2)
        bench.sync()
        warm = time.perf_counter() - warm
        seconds, per_step, peaks, every = timed(bench, lambda cb: call(a.steps, cb))
    except TypeError as exc:             # an option the call does not take yet
        return {"config": name, "status": NOT_AVAILABLE, "why": f"TypeError: {exc}"}
    plan = pipe.plan
    accel = getattr(pipe, "acceleration", None)
    notes = list(dict.fromkeys(notes + list(getattr(accel, "notes", []) or [])))     # each note once
    return measured(name, seconds, per_step, peaks, warm, every=every, notes=notes,
                    step_cache=dict(getattr(accel, "last_call", {}) or {}) if step_cache is not None else None,
                    predicted_seconds=getattr(plan, "predicted_seconds", None),
                    predicted_vram_gb=getattr(plan, "predicted_peak_vram_gb", None),
                    predicted_ram_gb=getattr(plan, "predicted_peak_ram_gb", None),
                    plan={r["role"]: f"{r['strategy']}/{r['storage_dtype']}" for r in plan.describe()})


def run_limit(bench, limit):
    """One engine row under a VRAM limit, with the modules the plan wants (fp8 is not undone in place: a module left
    in fp8 that this plan keeps in full precision is built again)."""
    from engine.memory import place as placement
    try:
        preview = placement.plan_modules(bench.modules, {}, bench.device, bench.dtype, limit, bench.args.ram_limit,
                                         bench.args.size, bench.args.size)
        for role, entry in preview.entries.items():
            if placement.needs_reload(bench.modules[role], placement.from_entry(entry)):
                bench.rebuild(role)
    except (AttributeError, TypeError):       # the planner's preview changed: set_models reports what it cannot do
        pass
    pipe = engine_pipe(bench, limit)
    try:
        return run_engine(bench, pipe, f"engine, limit {limit:g} GB")
    finally:
        release(bench, pipe)


def touch(tensors, device) -> None:
    """Make every byte real where it lives: safetensors and the engine may hand back tensors mapped from the file,
    read only when first used. On the CPU one byte per 4 KiB page is read (each page faulted in from the page
    cache, no copy); on a GPU the copy already read everything."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    for t in tensors:
        if t.numel():
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def raw_read(path, device) -> float:
    """Seconds to read every tensor of ``path`` with safetensors onto ``device`` (the second of two reads: page
    cache warm, as for the engine's)."""
    from safetensors import safe_open
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        with safe_open(str(path), "pt", device="cpu") as f:
            tensors = [f.get_tensor(k).to(device) for k in f.keys()]
        touch(tensors, device)
        seconds.append(time.perf_counter() - t)
        del tensors
    return seconds[-1]


def run_swap(bench):
    """A transformer file read raw (safetensors, every tensor, onto the device) vs loaded by the engine as a variant
    and placed in a pipeline whose other modules are in place (the studio's model switch)."""
    from safetensors.torch import save_file
    from engine.loading import load_models
    pipe = engine_pipe(bench, None)
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as folder:
        path = pathlib.Path(folder) / "flux1-variant.safetensors"
        t = time.perf_counter()
        state = {k: v.detach().to("cpu").contiguous() for k, v in bench.modules["dit"].state_dict().items()}
        save_file(state, str(path))
        del state
        write_s = time.perf_counter() - t
        size_gb = path.stat().st_size / GiB
        raw_s = raw_read(path, bench.device)
        pipe.dit = None                       # the old transformer leaves first, as the studio's switch does
        pipe.model_files.pop("dit", None)
        bench.modules["dit"] = None
        free()
        t = time.perf_counter()
        loaded = load_models([path], torch_dtype=bench.dtype, device="cpu", expect={str(path): "dit"})["dit"]
        load_s = time.perf_counter() - t
        pipe.set_models({"dit": loaded})
        touch([p for p in pipe.dit.parameters()], bench.device)
        swap_s = time.perf_counter() - t
    del pipe, loaded
    free()
    return {"config": "variant swap", "status": "ok", "file_gb": size_gb, "write_seconds": write_s,
            "raw_read_seconds": raw_s, "raw_read_gb_per_s": size_gb / raw_s, "engine_load_seconds": load_s,
            "engine_swap_seconds": swap_s, "swap_vs_raw": swap_s / raw_s, "device": str(bench.device)}


# ------------------------------------------------------------------------------------------- budget & output
def projected(bench, name, limit=None) -> float:
    """Seconds a row is expected to take, from the rows measured so far (0 when nothing is known yet)."""
    ref = next((r for r in bench.results if r["config"] == "engine eager" and r["status"] == "ok"), None)
    ref = ref or next((r for r in bench.results if r["status"] == "ok" and "seconds_per_image" in r), None)
    if ref is None:
        return 0.0
    one = ref["seconds_per_image"] + ref["warmup_seconds"]
    cuda = bench.device.type == "cuda"
    if name == "variant swap":
        gb = sum(p.numel() * p.element_size() for p in bench.modules["dit"].parameters()) / GiB
        return 5 + gb * (2.5 if cuda else 4.0)
    if name == "engine compiled":
        return one * 1.2 + (120 if cuda else 0)
    if name in ACCEL:
        return one + (90 if cuda and "step cache" not in name else 0)
    if limit is not None:                     # streaming costs more the lower the limit; a rebuilt dit ~20 s
        factor = 1.2 if not cuda else (1.5 if limit >= 24 else 2.5 if limit >= 12 else 4 if limit >= 8 else 6)
        return one * factor + (20 if cuda else 0)
    return one


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def ratios(results) -> None:
    """Each measured row's time as a multiple of diffusers eager's (None without it)."""
    ref = next((r for r in results if r["config"] == "diffusers eager" and r["status"] == "ok"), None)
    for r in results:
        if "seconds_per_image" in r:
            r["vs_diffusers"] = r["seconds_per_image"] / ref["seconds_per_image"] if ref else None
            r["step_vs_diffusers"] = (r["seconds_per_step"] / ref["seconds_per_step"]
                                      if ref and r.get("seconds_per_step") and ref.get("seconds_per_step") else None)


def markdown(meta, results) -> str:
    lines = [f"# FLUX.1 benchmark: {meta['model']}", "",
             f"{meta['device']}; {meta['size']}x{meta['size']}, {meta['steps']} steps; {meta['dtype']}; "
             f"{meta['elapsed_s']:.0f} s in all (budget {meta['budget_s']:.0f} s).", "",
             "| configuration | status | s/image | s/step | x diffusers | warm-up s | VRAM torch GB | VRAM driver GB "
             "| RAM GB | predicted s/image | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r["config"] == "variant swap":
            continue
        if "seconds_per_image" not in r:
            lines.append(f"| {r['config']} | {r['status']} | | | | | | | | | {r.get('why', '')} |")
            continue
        notes = "; ".join(r.get("notes") or [])
        if r.get("step_cache"):
            notes = (notes + "; " if notes else "") + f"step cache {r['step_cache']}"
        lines.append(f"| {r['config']} | ok | {fmt(r['seconds_per_image'])} | {fmt(r['seconds_per_step'], 3)} | "
                     f"{fmt(r.get('vs_diffusers'))} | {fmt(r['warmup_seconds'], 1)} | {fmt(r['peak_vram_torch_gb'])} | "
                     f"{fmt(r['peak_vram_driver_gb'])} | {fmt(r['peak_ram_gb'], 1)} | "
                     f"{fmt(r.get('predicted_seconds'), 1)} | {notes} |")
    swap = next((r for r in results if r["config"] == "variant swap"), None)
    if swap:
        lines += ["", "Variant swap (a transformer file in the page cache):", ""]
        if swap["status"] != "ok":
            lines.append(f"{swap['status']}: {swap.get('why', '')}")
        else:
            lines.append(f"{swap['file_gb']:.2f} GB onto {swap['device']}: raw safetensors read "
                         f"{swap['raw_read_seconds']:.2f} s ({swap['raw_read_gb_per_s']:.1f} GB/s); the engine's "
                         f"swap (load {swap['engine_load_seconds']:.2f} s, then placed) {swap['engine_swap_seconds']:.2f}"
                         f" s: x{swap['swap_vs_raw']:.2f} the raw read.")
    if meta.get("plans"):
        lines += ["", "Full-size FLUX.1-dev plans (`benchmarks/vram.py --dry-run`):", "", "```", meta["plans"].rstrip(),
                  "```"]
    return "\n".join(lines) + "\n"


def save(bench, plans=None):
    a = bench.args
    ratios(bench.results)
    meta = {"model": "FLUX.1-dev, random weights, " + ("full size" if not a.cpu else
                                                       "vram.py's tiny model" if a.tiny else
                                                       "2 double + 4 single blocks at width 512"),
            "device": bench.device_name(), "size": a.size, "steps": a.steps, "dtype": str(bench.dtype),
            "budget_s": a.budget_s, "elapsed_s": bench.elapsed(), "plans": plans}
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(f"{out}.json").write_text(json.dumps({"meta": meta, "args": vars(a), "results": bench.results},
                                                      indent=1, default=str))
    text = markdown(meta, bench.results)
    pathlib.Path(f"{out}.md").write_text(text)
    return text


def dry_run_plans(limits) -> str:
    """``vram.py --dry-run``'s plans for the full-size model (no GPU needed), as it prints them."""
    cmd = [sys.executable, str(HERE / "vram.py"), "--dry-run", "--limits", *[f"{x:g}" for x in limits], "none"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return done.stdout if done.returncode == 0 else f"vram.py --dry-run failed:\n{done.stderr[-2000:]}"


# ----------------------------------------------------------------------------------------------------- main
def attempt(bench, name, run, limit=None):
    """Run one row unless the budget says no; an out-of-memory or other failure is recorded, not raised."""
    est = projected(bench, name, limit)
    if est and bench.elapsed() + est > bench.args.budget_s:      # nothing known yet (0): it runs
        row = {"config": name, "status": "skipped",
               "why": f"projected {est:.0f} s after {bench.elapsed():.0f} s passes the {bench.args.budget_s:.0f} s "
                      f"budget"}
    else:
        t = time.perf_counter()
        try:
            row = run()
        except bench.torch.OutOfMemoryError as exc:
            row = {"config": name, "status": "out of memory", "why": str(exc).splitlines()[0]}
        except Exception as exc:  # noqa: BLE001 - one row failing must not lose the others
            row = {"config": name, "status": "error", "why": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        row["wall_seconds"] = time.perf_counter() - t
        free()
    bench.results.append(row)
    shown = fmt(row.get("seconds_per_image")) + " s/image" if "seconds_per_image" in row else row.get("why", "")
    print(f"[{bench.elapsed():6.0f} s] {name}: {row['status']}, {shown}", flush=True)
    save(bench)
    return row


def engine_rows(bench):
    """Engine eager, then the speed options on the same pipeline (compile, + fp8, + step cache)."""
    pipe = engine_pipe(bench, None)
    a = bench.args
    try:
        attempt(bench, "engine eager", lambda: run_engine(bench, pipe, "engine eager"))
        attempt(bench, ACCEL[0], lambda: run_engine(bench, pipe, ACCEL[0], options={"compile": True}))
        attempt(bench, ACCEL[1], lambda: run_engine(bench, pipe, ACCEL[1], options={"fp8_compute": True}))
        attempt(bench, ACCEL[2], lambda: run_engine(bench, pipe, ACCEL[2], step_cache=a.step_cache))
    finally:
        release(bench, pipe)
    if any(r["config"] in ACCEL and r["status"] == "ok" for r in bench.results):
        bench.torch._dynamo.reset()             # the compiled graphs hold the old blocks
        bench.rebuild("dit")      # compiled blocks and float8 layers stay on the module: the limits get a plain one
    for role in [r for r, m in bench.modules.items() if m is None]:
        bench.rebuild(role)


def main(argv=None, freeze: bool = False) -> int:
    args = parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print("CUDA is not available here: run with --cpu (a few blocks, ratios to diffusers), or "
              "benchmarks/vram.py --dry-run for the full-size plans.")
        return 2
    if freeze:
        import diffusers  # noqa: F401 - imported before the freeze below, as the rows will
        import engine.pipeline  # noqa: F401
        # What is alive now (torch, diffusers, the engine's modules) stays: out of the collector's way, so each
        # row's collection walks only what the rows make (~0.5 s less per collection). The models come after it.
        gc.collect()
        gc.freeze()
    bench = Bench(args)
    print(f"built {'full-size ' if not args.cpu else ''}FLUX.1-dev with random weights in {bench.elapsed():.1f} s on "
          f"{bench.device_name()}; {args.size}x{args.size}, {args.steps} steps, budget {args.budget_s:.0f} s",
          flush=True)
    attempt(bench, "diffusers eager", lambda: run_diffusers(bench))
    engine_rows(bench)
    for limit in sorted(args.limits, reverse=True):
        attempt(bench, f"engine, limit {limit:g} GB", lambda: run_limit(bench, limit), limit=limit)
    if not args.no_swap:
        attempt(bench, "variant swap", lambda: run_swap(bench))
    plans = None if (not args.cpu or args.no_plans) else dry_run_plans(args.limits)
    text = save(bench, plans)
    print("\n" + text)
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(freeze=True))
