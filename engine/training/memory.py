"""The training memory plan: where each part of a LoRA / full training run lives under a VRAM limit.

Pure arithmetic on component sizes (``engine.memory.ComponentSize``, from the checkpoint manifests, the safetensors
headers or the loaded modules), like ``engine.memory.planner`` for inference: no torch at import, so the Train tab and
``train.py --vram_limit`` show the plan before anything loads.

What a training step holds on the device, and the choices that shrink each part:

- the transformer's frozen weights: ``resident`` (bf16), ``fp8`` (stored in fp8, computed in bf16 one layer at a
  time), ``stream`` (the blocks rest in pinned CPU RAM and are copied in one at a time, the next one on a side stream
  while the current one computes; the first ``resident_blocks`` stay) or ``fp8+stream``;
- the trained parameters (the LoRA matrices, in ``--lora_dtype``), their gradients, and the optimizer's state (AdamW:
  two moments per parameter; 8-bit AdamW from bitsandbytes where it is installed and the device is CUDA: 2 bytes; or
  none of it on the device with ``--enable_optimizer_cpu_offload``, the step then runs on the CPU);
- the activations saved for the backward pass: every block's (no checkpointing), only each block's input (gradient
  checkpointing: the block is recomputed in the backward pass), or none (``--use_gradient_checkpointing_offload``:
  the block inputs go to CPU RAM), plus one block's working set while it runs backward;
- the text encoders and the VAE, which only encode the inputs: ``resident``, ``offload`` (moved in to encode, back to
  the CPU before the transformer runs), ``fp8+offload`` or ``stream``; not loaded at all when the run trains from
  cached inputs (split training's second stage).

The person's own flags (``--fp8_models``, the checkpointing flags, the two CPU offload flags) are kept; the plan fills
in the rest with the fastest combination (a small time model: compute at the machine's matmul rate, copies at its
pinned host-to-device rate, prefetch hiding the smaller of the two) whose peak fits. An impossible limit gives the
smallest plan and says what it needs.

Activation estimates (batch 1, bf16, per token x hidden width): a FLUX block saves ~``SAVED_PER_BLOCK`` elements for
its backward pass without checkpointing (the inputs of its linears, attention's q/k/v/out, the MLP's wide middle
before and after GELU, the modulations), and its backward working set is ~2x the inference peak of one call
(``engine.memory.activations``); ``benchmarks/train_vram.py`` measures the real peak on a GPU.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ..memory.activations import activation_bytes
from ..memory.planner import CUDA_RESERVE_GB
from ..memory.sizes import GiB, ITEMSIZE, ComponentSize, gb

SAVED_PER_BLOCK = 24          # elements per (token x hidden) a block saves for backward without checkpointing
BACKWARD_FACTOR = 2           # one block's backward working set, in inference peaks of one call
MARGIN_GB = 0.25              # left free when resident blocks fill the budget to the block
ENCODERS = ("text_encoder_1", "text_encoder_2", "vae")
ENCODER_OPTIONS = ("resident", "offload", "fp8+offload", "stream")
DIT_OPTIONS = ("resident", "fp8", "stream", "fp8+stream")
CHECKPOINTING = ("none", "checkpoint", "checkpoint+offload")


@dataclass(frozen=True)
class TrainingJob:
    """What the plan is for: the trained parameters and the image size (batch 1, as the seed trains)."""

    lora: bool = True
    rank: int = 16
    trainable_params: Optional[int] = None    # None: estimated (LoRA: rank x (in + out) of every block linear)
    width: int = 1024
    height: int = 1024
    text_tokens: int = 512
    lora_itemsize: int = 4                    # --lora_dtype float32 (the trained matrices and their gradients)
    compute: str = "bfloat16"

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)


@dataclass(frozen=True)
class Fixed:
    """The person's explicit choices: each pins one dimension of the search (None: the plan decides)."""

    fp8_dit: bool = False
    fp8_encoders: tuple = ()
    checkpointing: Optional[str] = None       # the least checkpointing the flags ask for
    model_offload: bool = False               # --enable_model_cpu_offload: the transformer streams
    optimizer_offload: bool = False           # --enable_optimizer_cpu_offload
    cached_inputs: bool = False               # split stage 2: no text encoder or VAE is loaded
    adamw8bit_available: bool = False         # bitsandbytes importable and the device is CUDA
    custom_optimizer: bool = False            # --customized_optimizer: its state is AdamW-sized, never 8-bit


@dataclass
class TrainingPlan:
    device: str
    vram_limit_gb: Optional[float]
    job: TrainingJob
    dit: str                                  # one of DIT_OPTIONS
    resident_blocks: int
    total_blocks: int
    encoders: dict                            # {role: one of ENCODER_OPTIONS or "not loaded"}
    checkpointing: str                        # one of CHECKPOINTING
    optimizer: str                            # "AdamW" or "AdamW 8-bit"
    optimizer_offload: bool
    parts_gb: dict                            # the training step's peak, part by part
    stage_peaks_gb: dict                      # {"train step": ..., role: the encoding stage's peak}
    predicted_peak_vram_gb: float
    predicted_step_s: float
    streamed_gb_per_step: float
    fits: bool
    notes: list = field(default_factory=list)

    @property
    def streams(self) -> bool:
        return "stream" in self.dit

    @property
    def fp8(self) -> bool:
        return self.dit.startswith("fp8")

    @property
    def all_resident(self) -> bool:
        return (self.dit == "resident" and self.checkpointing == "none" and not self.optimizer_offload
                and all(v in ("resident", "not loaded") for v in self.encoders.values()))

    def summary(self) -> str:
        limit = "no limit" if self.vram_limit_gb is None else f"{self.vram_limit_gb:g} GB"
        return (f"== training plan for {limit}: predicted peak VRAM {_gb(self.predicted_peak_vram_gb)} GB, "
                f"~{self.predicted_step_s:.2f} s/step ({self.job.width}x{self.job.height}, "
                f"{'LoRA rank ' + str(self.job.rank) if self.job.lora else 'full'})"
                + ("" if self.fits else " -- DOES NOT FIT"))

    def lines(self) -> list:
        dit = self.dit
        if self.streams:
            dit += f" ({self.resident_blocks}/{self.total_blocks} blocks resident, " \
                   f"{_gb(self.streamed_gb_per_step)} GB copied per step)"
        out = [self.summary(), f"   transformer: {dit}",
               "   " + ", ".join(f"{r}: {v}" for r, v in self.encoders.items()) if self.encoders else
               "   text encoders / VAE: not loaded (cached inputs)",
               f"   gradient checkpointing: {self.checkpointing}; optimizer: {self.optimizer}"
               f"{' on the CPU' if self.optimizer_offload else ''}",
               "   step peak: " + ", ".join(f"{k} {_gb(v)}" for k, v in self.parts_gb.items() if v) + " GB"]
        return out + [f"   note: {n}" for n in self.notes]

    def describe(self) -> str:
        return "\n".join(self.lines())

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["job"] = dataclasses.asdict(self.job)
        d["summary"] = self.summary()
        d["lines"] = self.lines()
        d["describe"] = self.describe()
        return d


def _gb(value: float) -> str:
    """GB for people: one decimal, more digits for the small sizes of a demo model."""
    return f"{value:.1f}" if value >= 0.95 else f"{value:.2g}"


# ------------------------------------------------------------------------------------------------------ sizes
def lora_params(tensors: Mapping, rank: int) -> int:
    """rank x (in + out) of every 2-D block weight in a transformer's state-dict description (what an empty
    ``--lora_target_modules`` and the seed's FLUX list both reach on FLUX.1-dev, every block linear being wide)."""
    from ..memory.sizes import DIT_BLOCKS
    total = 0
    for key, info in tensors.items():
        shape = info["shape"] if isinstance(info, Mapping) else getattr(info, "shape", ())
        if key.endswith(".weight") and len(shape) == 2 and DIT_BLOCKS.search(key):
            total += rank * (int(shape[0]) + int(shape[1]))
    return total


def _estimate_lora(dit: ComponentSize, rank: int) -> int:
    """Without the shapes: ~ rank x (in + out) per block linear, from the block's parameters at the width."""
    hidden = dit.dims.get("hidden", 3072)
    return int(sum(rank * 2 * n / hidden for n in dit.blocks))


# ---------------------------------------------------------------------------------------------- the step's parts
@dataclass(frozen=True)
class _Dit:
    nonblock: int
    blocks: tuple                 # bytes per block in the storage dtype
    transient: int                # one fp8 layer's bf16 copy


def _dit_bytes(dit: ComponentSize, fp8: bool, compute: str) -> _Dit:
    storage = "float8_e4m3fn" if fp8 else compute
    return _Dit(dit.nonblock_bytes(storage, compute), tuple(dit.block_bytes(storage, compute)),
                dit.largest_layer * ITEMSIZE[compute] if fp8 else 0)


def _activations(dit: ComponentSize, job: TrainingJob, level: str) -> int:
    hidden = dit.dims.get("hidden", 3072)
    tokens = job.image_tokens + job.text_tokens
    item = ITEMSIZE[job.compute]
    one_call = activation_bytes("dit", dit, job.compute, job.width, job.height, job.text_tokens)
    working = BACKWARD_FACTOR * one_call
    n = len(dit.blocks) or 1
    if level == "none":
        return n * SAVED_PER_BLOCK * tokens * hidden * item + working
    if level == "checkpoint":
        return n * tokens * hidden * item + working
    return tokens * hidden * item + working       # block inputs in CPU RAM: one in flight


def _encoder_stage(size: ComponentSize, option: str, job: TrainingJob) -> tuple:
    """(bytes on the device while it encodes, bytes staying between steps) of a text encoder or the VAE."""
    fp8 = "fp8" in option
    storage = "float8_e4m3fn" if fp8 else job.compute
    full = size.nbytes(storage, job.compute)
    act = activation_bytes(size.role, size, job.compute, job.width, job.height, job.text_tokens)
    if option == "stream" and size.blocks:
        blocks = size.block_bytes(storage, job.compute)
        full = size.nonblock_bytes(storage, job.compute) + 2 * max(blocks)
    transient = size.largest_layer * ITEMSIZE[job.compute] if fp8 else 0
    return full + act + transient, (full if option == "resident" else 0)


# ------------------------------------------------------------------------------------------------------ choosing
@dataclass(frozen=True)
class _Rates:
    flops: float
    copy_bps: float


def _rates(device: str) -> _Rates:
    from ..memory import cost
    c = cost.constants(device, measure=False)
    return _Rates(c.flops, c.pinned_bps)


def _combos(sizes: Mapping, fixed: Fixed, device: str, job: TrainingJob):
    on_cuda = device.startswith("cuda")
    dits = [d for d in DIT_OPTIONS if d.startswith("fp8") or not fixed.fp8_dit]
    if not job.lora:   # trained in full: every block weight is trained (nothing frozen to stream or store in fp8)
        dits = ["resident"]
    if fixed.model_offload:
        dits = [d for d in dits if "stream" in d]
    levels = CHECKPOINTING[CHECKPOINTING.index(fixed.checkpointing or "none"):]
    optim = [(True, False)] if fixed.optimizer_offload else [(False, False), (True, False)]
    if fixed.adamw8bit_available and on_cuda and not fixed.custom_optimizer and not fixed.optimizer_offload:
        optim.insert(1, (False, True))
    roles = [] if fixed.cached_inputs else [r for r in ENCODERS if r in sizes]

    def enc_options(role):
        opts = [o for o in ENCODER_OPTIONS if not (o == "stream" and not sizes[role].blocks)]
        if role in fixed.fp8_encoders:
            return [o for o in opts if "fp8" in o]
        return [o for o in opts if "fp8" not in o or role == "text_encoder_2"]
    return dits, levels, optim, roles, {r: enc_options(r) for r in roles}


def _evaluate(sizes, job, dit_opt, level, opt_offload, eight_bit, enc, budget_b, reserve, rates, n_train):
    dit = sizes["dit"]
    d = _dit_bytes(dit, dit_opt.startswith("fp8"), job.compute)
    item = job.lora_itemsize if job.lora else ITEMSIZE[job.compute]
    trained = n_train * item
    grads = n_train * item
    optim = 0 if opt_offload else n_train * (2 if eight_bit else 2 * item)
    acts = _activations(dit, job, level)
    enc_stay = {r: _encoder_stage(sizes[r], o, job) for r, o in enc.items()}
    stay_enc = sum(s for _v, s in enc_stay.values())
    fixed_train = trained + grads + optim + acts + d.transient + reserve + stay_enc
    streams = "stream" in dit_opt
    n = len(d.blocks)
    full = d.nonblock + sum(d.blocks)
    if not streams:
        k, inflight, dit_stay = n, 0, full
    elif budget_b is None:       # --enable_model_cpu_offload without a limit: every block streams, as the seed's
        k, dit_stay, inflight = 0, d.nonblock, 2 * max(d.blocks)
    else:
        k = n - 1
        # the most leading blocks resident that leave room for two streamed ones and every encoding stage
        while k > 0:
            stay = d.nonblock + sum(d.blocks[:k])
            rest = 2 * max(d.blocks[k:])
            enc_peak = max((v - s for v, s in enc_stay.values()), default=0)
            train_peak = stay + rest + fixed_train
            encode_peak = stay + trained + optim + reserve + stay_enc + enc_peak
            if budget_b is None or max(train_peak, encode_peak) <= budget_b - MARGIN_GB * GiB:
                break
            k -= 1
        dit_stay = d.nonblock + sum(d.blocks[:k])
        inflight = 2 * max(d.blocks[k:])
    parts = {"weights": dit_stay, "blocks in flight": inflight, "trained": trained, "gradients": grads,
             "optimizer": optim, "activations": acts, "encoders kept": stay_enc,
             "fp8 cast": d.transient, "reserve": reserve}
    stages = {"train step": sum(parts.values())}
    for r, (v, s) in enc_stay.items():   # while it encodes: what stays, the trained state (no gradients then)
        stages[r] = dit_stay + trained + optim + reserve + stay_enc - s + v
    # time: forward 2, input gradients 2 (frozen base) or 4 (full) FLOPs per parameter per token; +2 recompute
    tokens = job.image_tokens + job.text_tokens
    flops = dit.params * tokens * (2 + (2 if job.lora else 4) + (2 if level != "none" else 0))
    compute = flops / rates.flops
    streamed = (sum(d.blocks[k:]) if streams else 0) * 2   # forward, and the backward (or recompute) again
    copy = streamed / rates.copy_bps
    step = max(compute, copy) + 0.1 * min(compute, copy) if streams else compute
    step += sum(sizes[r].nbytes(job.compute, job.compute) / rates.copy_bps for r, o in enc.items() if o != "resident")
    if level == "checkpoint+offload":
        step += 2 * len(d.blocks) * tokens * dit.dims.get("hidden", 3072) * ITEMSIZE[job.compute] / rates.copy_bps
    if opt_offload:
        step += 2 * trained / rates.copy_bps + n_train * 2e-9      # grads out, weights back, the CPU's AdamW
    if dit_opt.startswith("fp8"):
        step += 2 * dit.fp8_params * 2 / (rates.copy_bps * 25)       # casting every layer, forward and backward
    return parts, stages, k, step, streamed


def plan_training(sizes: Mapping, vram_limit_gb: Optional[float], job: TrainingJob = TrainingJob(),
                  fixed: Fixed = Fixed(), device: str = "cuda", dit_tensors: Optional[Mapping] = None
                  ) -> TrainingPlan:
    """The fastest training placement whose peak fits ``vram_limit_gb`` (None: no limit -> everything resident,
    as the seed trains). ``sizes``: {role: ComponentSize} with at least the ``dit``; ``dit_tensors``: its
    state-dict description, for the exact LoRA size."""
    if "dit" not in sizes:
        raise ValueError("plan_training needs the transformer's size (role 'dit').")
    device = "cuda:0" if device == "cuda" else str(device)
    dit = sizes["dit"]
    n_train = job.trainable_params
    if n_train is None:
        n_train = (lora_params(dit_tensors, job.rank) if dit_tensors else _estimate_lora(dit, job.rank)) \
            if job.lora else dit.params
    reserve = int(CUDA_RESERVE_GB * GiB) if device.startswith("cuda") else 0
    budget_b = None if vram_limit_gb is None else int(vram_limit_gb * GiB)
    rates = _rates(device)
    dits, levels, optim, roles, enc_opts = _combos(sizes, fixed, device, job)
    if budget_b is None:   # the seed's: everything resident (within what the flags ask)
        dits, levels = dits[:1], levels[:1]
        optim, enc_opts = optim[:1], {r: (["fp8+offload"] if "fp8" in o[0] else ["resident"])
                                      for r, o in enc_opts.items()}
    best = least = None
    # quality first: fp8 storage (of the transformer or T5) only where no plan in full precision fits
    for allow_fp8 in (False, True):
        for dit_opt in dits:
            if dit_opt.startswith("fp8") and not (allow_fp8 or fixed.fp8_dit):
                continue
            for enc_choice in itertools.product(*(enc_opts[r] for r in roles)):
                enc = dict(zip(roles, enc_choice))
                if not allow_fp8 and any("fp8" in o and r not in fixed.fp8_encoders for r, o in enc.items()):
                    continue
                for level, (opt_offload, eight_bit) in itertools.product(levels, optim):
                    parts, stages, k, step, streamed = _evaluate(sizes, job, dit_opt, level, opt_offload, eight_bit,
                                                                 enc, budget_b, reserve, rates, n_train)
                    peak = max(stages.values())
                    cand = (step, peak, dit_opt, level, opt_offload, eight_bit, enc, parts, stages, k, streamed)
                    if (budget_b is None or peak <= budget_b) and (best is None or step < best[0]):
                        best = cand
                    if least is None or peak < least[1]:
                        least = cand
        if best is not None:
            break
    fits = best is not None
    step, peak, dit_opt, level, opt_offload, eight_bit, enc, parts, stages, k, streamed = best or least
    notes = []
    if not fits:
        notes.append(f"Nothing fits in {vram_limit_gb:g} GB at {job.width}x{job.height}: the smallest plan needs "
                     f"{_gb(gb(least[1]))} GB. Raise --vram_limit, lower the resolution (--max_pixels / --height "
                     f"--width), the LoRA rank, or train from cached inputs (split training).")
    if device.startswith("cpu"):
        notes.append("On the CPU the limit is applied as if it were VRAM (moves are no-ops there).")
    if eight_bit:
        notes.append("8-bit AdamW (bitsandbytes): optimizer state in 8 bits.")
    if budget_b is not None and "stream" in dit_opt:
        notes.append("Frozen transformer blocks stream from pinned CPU RAM; the LoRA stays on the device.")
    plan = TrainingPlan(
        device=device, vram_limit_gb=vram_limit_gb, job=job, dit=dit_opt,
        resident_blocks=k if "stream" in dit_opt else len(dit.blocks), total_blocks=len(dit.blocks),
        encoders={r: enc.get(r, "not loaded") for r in ENCODERS if r in sizes} if not fixed.cached_inputs else {},
        checkpointing=level, optimizer="AdamW 8-bit" if eight_bit else "AdamW", optimizer_offload=opt_offload,
        parts_gb={n: round(gb(v), 3) for n, v in parts.items()},
        stage_peaks_gb={n: round(gb(v), 3) for n, v in stages.items()}, predicted_peak_vram_gb=gb(peak),
        predicted_step_s=step, streamed_gb_per_step=gb(streamed), fits=fits, notes=notes)
    return plan


# ------------------------------------------------------------------------------------------ from a TrainConfig
def training_memory_plan(config, device, family=None) -> Optional[TrainingPlan]:
    """The run's plan (``train.py --vram_limit`` / ``--enable_model_cpu_offload`` / ``--enable_optimizer_cpu_offload``),
    from its model files' headers; None when none of them is given (everything resident, as the seed trains)."""
    from ..errors import EngineError
    limit = getattr(config, "vram_limit", None)
    asked = limit is not None or getattr(config, "enable_model_cpu_offload", False) or \
        getattr(config, "enable_optimizer_cpu_offload", False)
    if not asked or str(config.task).endswith("data_process"):   # split stage 1 trains nothing
        return None
    if family is not None and not family.memory_plan:
        raise EngineError(f"--vram_limit / --enable_model_cpu_offload / --enable_optimizer_cpu_offload: training "
                          f"{family.name} under a memory plan is not supported yet; leave them out ({family.name} "
                          f"trains with every model on the device) or use --fp8_models and "
                          f"--use_gradient_checkpointing_offload.")
    if limit is not None and limit <= 0:
        raise EngineError(f"--vram_limit {limit}: give the GB of VRAM training may use (e.g. 12), or leave it out.")
    from ..memory.sizes import sizes_from_tensors
    tensors = _files_by_role(config, allow_download=True)
    if "dit" not in tensors:
        raise EngineError("None of the model files is a FLUX transformer (flux1-dev.safetensors or similar).")
    sizes = {r: sizes_from_tensors(r, t) for r, t in tensors.items() if r in ("dit",) + ENCODERS}
    fp8 = _fp8_roles_from_headers(config)
    dev = str(device)
    plan = plan_training(sizes, limit, job_from_config(config), fixed_from_config(config, dev, fp8), dev,
                         dit_tensors=tensors["dit"])
    if not plan.fits:
        raise EngineError(f"--vram_limit {limit:g}: {plan.notes[0]}")
    return plan


def _files_by_role(config, allow_download: bool = False) -> dict:
    """{role: {key: {shape, dtype}}} from the run's model files' headers (no weights read, nothing downloaded)."""
    import pathlib

    from ..loading.detect import detect_component
    from ..loading.files import read_header
    from .model import parse_model_configs
    out: dict = {}
    for mc, _fp8 in parse_model_configs(config):
        paths = []
        for p in mc.resolve(allow_download=allow_download):
            p = pathlib.Path(p)
            paths += sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
        for path in paths:
            header = {k: v for k, v in read_header(path).items() if k != "__metadata__"}
            role = detect_component(header)[0]
            out.setdefault(role, {}).update(header)
    return out


def fixed_from_config(config, device: str, fp8_roles=()) -> Fixed:
    level = ("checkpoint+offload" if config.use_gradient_checkpointing_offload else
             "checkpoint" if config.use_gradient_checkpointing else None)
    eight = False
    if str(device).startswith("cuda"):
        import importlib.util
        eight = importlib.util.find_spec("bitsandbytes") is not None
    # Trained from a cache (split stage 2, or --cache_dir once it has encoded): no encoder is on the device per step.
    cached = str(config.task).endswith(":train") or bool(getattr(config, "cache_dir", None))
    return Fixed(fp8_dit="dit" in fp8_roles, fp8_encoders=tuple(r for r in fp8_roles if r != "dit"),
                 checkpointing=level, model_offload=bool(getattr(config, "enable_model_cpu_offload", False)),
                 optimizer_offload=bool(getattr(config, "enable_optimizer_cpu_offload", False)),
                 adamw8bit_available=eight, custom_optimizer=bool(config.customized_optimizer),
                 cached_inputs=cached)


def job_from_config(config, trainable_params: Optional[int] = None) -> TrainingJob:
    w = config.width or int(config.max_pixels ** 0.5) // 16 * 16
    h = config.height or int(config.max_pixels ** 0.5) // 16 * 16
    return TrainingJob(lora=config.is_lora, rank=config.lora_rank, trainable_params=trainable_params, width=w,
                       height=h, lora_itemsize=ITEMSIZE.get(config.lora_dtype, 4))


def plan_for_config(config, vram_limit_gb: Optional[float], device: str = "cuda") -> dict:
    """The plan for a ``TrainConfig`` from its model files' headers, without loading any weight (the Train tab):
    ``TrainingPlan.as_dict()`` (``summary``, ``lines``, ``predicted_peak_vram_gb``, ``fits``, ...)."""
    from ..memory.sizes import sizes_from_tensors
    tensors = _files_by_role(config)
    if "dit" not in tensors:
        raise ValueError("None of the model files is a FLUX transformer: no training plan.")
    sizes = {r: sizes_from_tensors(r, t) for r, t in tensors.items() if r in ("dit",) + ENCODERS}
    fp8 = _fp8_roles_from_headers(config)
    plan = plan_training(sizes, vram_limit_gb, job_from_config(config), fixed_from_config(config, device, fp8),
                         device, dit_tensors=tensors["dit"])
    return plan.as_dict()


def _fp8_roles_from_headers(config) -> tuple:
    import pathlib

    from ..loading.detect import detect_component
    from ..loading.files import read_header
    from .model import parse_model_configs
    roles = set()
    for mc, is_fp8 in parse_model_configs(config):
        if not is_fp8:
            continue
        for p in mc.resolve(allow_download=False):
            p = pathlib.Path(p)
            for path in (sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]):
                roles.add(detect_component({k: v for k, v in read_header(path).items() if k != "__metadata__"})[0])
    return tuple(sorted(roles))
