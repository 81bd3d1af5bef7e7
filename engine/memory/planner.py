"""The VRAM planner: where each model component lives, chosen from its size and a memory budget.

Pure arithmetic on sizes (no torch needed), so a plan can be made from the checkpoint manifests or from the
safetensors headers of files not yet loaded, and the studio can show it before anything is in memory.

Per component one of these strategies (``Entry.strategy``):

- ``resident``      on the GPU for the whole session (fastest).
- ``offload``       rests in CPU RAM and is moved to the GPU for its stage of a job; it stays there until another
                    component needs the room (text encoders run once per prompt, the VAE once per image).
- ``fp8``           resident, stored as float8_e4m3fn and computed in the compute dtype (bf16) one layer at a time
                    (diffusers' layer-wise casting): half the memory, a small loss of precision.
- ``fp8+offload``   both.
- ``stream``        rests in CPU RAM; during its stage diffusers' group offloading moves one block at a time to the
                    GPU, and on CUDA the next block is copied on a side stream while the current one computes.
                    Storage may be bf16 or fp8 (``storage_dtype``); ``pinned`` says whether the RAM copy is pinned
                    (fast copies) or is the memory-mapped file itself (no private RAM, read from the page cache).
                    *Partial* streaming (``resident_blocks`` k > 0): the first k blocks and everything outside the
                    blocks stay on the GPU, only the rest move at every call (and have a RAM copy).

The choice: every combination of the per-component options is scored by its predicted seconds per image
(``engine.memory.cost``: the bytes each component moves host -> device per image over the measured bandwidth, its
compute over the measured matmul rate times how often it runs, fp8 casts, and what the residency moves when one
stage needs another's room), and the fastest combination whose predicted peak fits the VRAM budget and whose RAM
fits the RAM budget wins; the Role table's fixed costs (quality first: fp8 and streaming cost precision and copies)
only break ties. A streamed component keeps as many leading blocks resident as every stage leaves room for (the most
important component first): more resident blocks never cost time. Stages are respected: text encoders run once per
prompt and then leave (a streamed or offloaded T5 costs one move per new prompt, not per step), so at 12 GB the
transformer gets the room. Because every plan that fits a budget fits a larger one, more budget never gives a slower
plan. Predicted peak VRAM = the largest stage (the weights on the GPU while one component computes + that stage's
activations at the planned resolution + the transient bf16 copy of one fp8 layer) + a runtime reserve (CUDA context,
cuBLAS workspace, allocator slack). RAM = the weights' private copies (pinned or not) + the process; a file streamed
from its memory map takes page cache, which the time model reads at the disk's rate when it does not fit beside the
private RAM. Sizes are GiB (1024**3 bytes), written "GB" as everywhere else.

The seed's per-file fields (``offload_dtype``, ``offload_device``, ``onload_dtype``, ``onload_device``,
``preparing_dtype``, ``preparing_device``, ``computation_dtype``, ``computation_device``) pin a component's strategy
(see :func:`options_from_fields`); without them the planner decides.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional

from ..roles import ROLES, by_importance, label, ordered, row
from .activations import activation_bytes
from .cost import Constants, Work, predict
from .cost import constants as cost_constants
from .sizes import FP8, ITEMSIZE, ComponentSize, device_name, dtype_name, gb, GiB, is_fp8

# Runtime reserve on a CUDA device: the context (~0.3-0.5 GB, outside torch's allocator), cuBLAS workspaces and
# allocator slack. Counted in the predicted peak so that it is comparable with the driver's view (nvidia-smi).
CUDA_RESERVE_GB = 0.6
# Room left free when a streamed component keeps its leading blocks resident (they are chosen to fill the budget).
PARTIAL_MARGIN_GB = 0.25
# Python, torch, transformers, diffusers (and the CUDA libraries) in RAM before any weight is loaded.
PROCESS_RAM_GB = {"cuda": 2.5, "other": 1.0}

# Options: (strategy, fp8 storage?, pinned?). What each costs and which the planner may pick for a component are
# columns of its row in the Role table (``engine.roles``): quality first, then speed.
OPTIONS = {
    "R": ("resident", False, True),
    "O": ("offload", False, True),
    "F": ("fp8", True, True),
    "FO": ("fp8+offload", True, True),
    "S": ("stream", False, True),
    "SF": ("stream", True, True),
    "SM": ("stream", False, False),    # streamed from the memory-mapped file: no private RAM, slowest
    "SFM": ("stream", True, False),    # only through the seed's fields ("disk" with an fp8 preparing dtype)
}
COSTS = MappingProxyType({name: r.costs for name, r in ROLES.items()})    # the Role table's costs, by role
STRATEGY_RANK = {"resident": 0, "offload": 1, "fp8": 2, "fp8+offload": 3, "stream": 4}
STAYS = ("resident", "fp8")            # strategies whose weights stay on the compute device between stages
PACKED = "packed"                      # sizes' file dtype of a GGUF / 4-bit / fp8-with-scales file (kept quantized)


# ---------------------------------------------------------------------------------------------------------------
# Plans
@dataclass
class Entry:
    role: str
    label: str
    option: str                    # key of OPTIONS
    strategy: str
    storage_dtype: str             # dtype of the weights on the GPU (and in RAM)
    compute_dtype: str
    compute_device: str
    rest_device: str               # where it lies between stages
    pinned: bool = True            # stream: pinned RAM copy (True) or the memory-mapped file (False)
    prefetch: bool = False         # stream: the next block is copied on a side stream
    vram_bytes: int = 0            # weights on the compute device during its own stage
    ram_bytes: int = 0             # weights in RAM between stages
    activation_bytes: int = 0
    source: str = "planner"        # "planner" or "fields" (the seed's per-file settings)
    note: str = ""
    on_device: bool = True         # computes on the plan's device (whose memory the budget governs)
    resident_blocks: int = 0       # stream: the first k blocks (and the rest outside the blocks) stay on the device
    total_blocks: int = 0          # streamable blocks the component has
    stay_bytes: int = 0            # weights on the device between stages (resident, fp8, a stream's resident blocks)
    streamed_bytes: int = 0        # stream: bytes copied to the device at every call
    streamed_blocks: int = 0       # stream: groups moved at every call

    def describe(self) -> dict:
        return {"role": self.role, "label": self.label, "strategy": self.strategy,
                "storage_dtype": self.storage_dtype, "compute_dtype": self.compute_dtype,
                "vram_gb": round(gb(self.vram_bytes), 6), "ram_gb": round(gb(self.ram_bytes), 6),
                "compute_device": self.compute_device, "source": self.source,
                "resident_blocks": self.resident_blocks, "total_blocks": self.total_blocks,
                "streamed_gb": round(gb(self.streamed_bytes), 6) if self.strategy == "stream" else 0.0,
                "pinned": self.pinned}

    def how(self) -> str:
        """A short name of the placement: "stream 40/57 resident", "fp8", "stream (mapped file)"."""
        text = self.strategy
        if self.strategy == "stream" and self.resident_blocks:
            text += f" {self.resident_blocks}/{self.total_blocks} resident"
        if self.strategy == "stream" and not self.pinned:
            text += " (mapped file)"
        return text


@dataclass
class Plan:
    entries: dict
    device: str
    vram_limit_gb: Optional[float]       # what was asked (None = none)
    budget_gb: Optional[float]           # what the plan was fitted to (the limit, or the free memory, or None)
    ram_limit_gb: Optional[float]
    width: int
    height: int
    predicted_peak_vram_gb: float
    predicted_peak_ram_gb: float
    peak_stage: Optional[str]
    fits: bool
    cost: tuple                          # per-component costs, most important component first
    notes: list = field(default_factory=list)
    stage_peaks_gb: dict = field(default_factory=dict)
    predicted_seconds: float = 0.0       # per image (a new prompt each time), see engine.memory.cost
    seconds_parts: dict = field(default_factory=dict)   # {role: seconds, "moves": offloading moves}
    steps: int = 28                      # the steps the time was predicted for
    time_constants: dict = field(default_factory=dict)  # the rates the prediction used (measured or reference)

    def describe(self) -> list:
        return [self.entries[r].describe() for r in ordered(self.entries)]

    def as_dict(self) -> dict:
        return {"device": self.device, "vram_limit_gb": self.vram_limit_gb, "budget_gb": self.budget_gb,
                "ram_limit_gb": self.ram_limit_gb, "components": self.describe(),
                "predicted_peak_vram_gb": round(self.predicted_peak_vram_gb, 2),
                "predicted_peak_ram_gb": round(self.predicted_peak_ram_gb, 2),
                "peak_stage": self.peak_stage, "fits": self.fits, "resolution": f"{self.width}x{self.height}",
                "stage_peaks_gb": {k: round(v, 2) for k, v in self.stage_peaks_gb.items()},
                "predicted_seconds": round(self.predicted_seconds, 2), "steps": self.steps,
                "predicted_seconds_parts": {k: round(v, 3) for k, v in self.seconds_parts.items()},
                "time_constants": dict(self.time_constants), "notes": list(self.notes)}

    def strategies(self) -> dict:
        return {r: e.strategy for r, e in self.entries.items()}

    @property
    def budget_bytes(self) -> Optional[int]:
        return None if self.budget_gb is None else int(self.budget_gb * GiB)

    @property
    def reserve_bytes(self) -> int:
        return int(CUDA_RESERVE_GB * GiB) if self.device.startswith("cuda") else 0

    def resident_bytes(self) -> int:
        """Weights that stay on the compute device between stages (a partly streamed component's resident blocks
        too)."""
        return sum(e.stay_bytes for e in self.entries.values() if e.on_device)


def options_from_fields(fields: Mapping, device: str, default_dtype: str) -> tuple:
    """The seed's per-file fields -> (allowed options, compute device, compute dtype, note).

    DiffSynth-Studio's semantics (docs/en/Pipeline_Usage/VRAM_management.md and diffsynth/core/vram): VRAM management
    is on only when both ``offload_dtype`` and ``offload_device`` are set; otherwise the model is loaded in
    ``computation_dtype`` on ``computation_device`` and stays there. Unset onload/preparing fields default to the
    computation ones. A layer rests in the offload state (offload dtype/device) while its model is not in use, is in
    the onload state during its model's stage, moves to the preparing state on its first call when the limit leaves
    room (or there is no limit), and is cast to the computation dtype/device for the call itself. Mapped onto ours:

    - onload on the computation device (resident during the stage) -> ``offload`` (``resident`` if it also rests
      there; ``fp8...`` when the dtype on the device is fp8 and the computation dtype is not);
    - onload on the CPU, preparing on the computation device -> moved in when the budget leaves room, otherwise
      streamed (the planner picks ``offload``/``stream`` from the budget, as DiffSynth's check does per layer);
    - onload and preparing on the CPU -> ``stream`` (every call copies the layer in);
    - ``"disk"`` -> ``stream`` from the memory-mapped file, unpinned (no copy in RAM).
    """
    f = {k: v for k, v in fields.items() if v is not None}
    comp_dtype = dtype_name(f.get("computation_dtype")) or default_dtype
    comp_dev = device_name(f.get("computation_device")) or device
    notes = []
    if is_fp8(comp_dtype):
        notes.append(f"computation_dtype {comp_dtype}: fp8 matrix multiplication is not used; weights stay in "
                     f"{comp_dtype} and are computed in bfloat16.")
        comp_dtype = "bfloat16"
        f["onload_dtype"] = f.get("onload_dtype") or FP8
        f["preparing_dtype"] = f.get("preparing_dtype") or FP8
        f.setdefault("offload_dtype", FP8)
        f.setdefault("offload_device", comp_dev)
    off_dt, off_dev = dtype_name(f.get("offload_dtype")), device_name(f.get("offload_device"))
    if off_dt is None or off_dev is None:
        return ("R",), comp_dev, comp_dtype, " ".join(notes)
    on_dt = dtype_name(f.get("onload_dtype")) or comp_dtype
    on_dev = device_name(f.get("onload_device")) or comp_dev
    prep_dt = dtype_name(f.get("preparing_dtype")) or comp_dtype
    prep_dev = device_name(f.get("preparing_device")) or comp_dev
    if "disk" in (off_dt, off_dev, on_dt, on_dev):
        gpu_dt = prep_dt if prep_dt != "disk" else comp_dtype
        fp8 = is_fp8(gpu_dt)
        notes.append("disk offload: streamed from the memory-mapped file (the page cache holds what was read).")
        return (("SFM",) if fp8 else ("SM",)), comp_dev, comp_dtype, " ".join(notes)
    gpu_dt = prep_dt if prep_dev == comp_dev else on_dt
    fp8 = is_fp8(gpu_dt)
    if off_dt != gpu_dt:
        notes.append(f"offload_dtype {off_dt} differs from the dtype on the device ({gpu_dt}): the weights are kept in "
                     f"{gpu_dt} in RAM too (cast once, not at every move).")
    if on_dev == comp_dev and off_dev == comp_dev:
        opts = ("F",) if fp8 else ("R",)
    elif on_dev == comp_dev:
        opts = ("FO",) if fp8 else ("O",)
    elif prep_dev == comp_dev:
        opts = ("FO", "SF") if fp8 else ("O", "S")
    else:
        opts = ("SF",) if fp8 else ("S",)
    return opts, comp_dev, comp_dtype, " ".join(notes)
# ---------------------------------------------------------------------------------------------------------------
# Choosing
@dataclass(frozen=True)
class _Choice:
    """How one component may be placed: the options, where and in what dtype it computes, who decided."""

    options: tuple
    device: str
    dtype: str
    source: str = "planner"            # "planner" or "fields" (the seed's per-file settings)
    note: str = ""


@dataclass(frozen=True)
class _Setting:
    """What every entry of one plan shares."""

    device: str
    prefetch: bool
    width: int
    height: int
    text_tokens: int
    reserve: float                     # runtime reserve, bytes
    pipeline: Optional[str] = None     # whose slots these are ("flux2": FLUX.2's names for the shared ones)
    work: Work = Work()                # the job the time is predicted for
    constants: Optional[Constants] = None   # the machine's rates (engine.memory.cost)


class _Candidate(NamedTuple):
    combo: dict                        # {role: Entry}
    peak: int                          # bytes of VRAM at the largest stage
    ram: int                           # bytes of RAM the weights take
    cost: tuple                        # per-component costs, most important component first
    stage_peaks: dict
    seconds: float = 0.0               # predicted seconds per image
    parts: tuple = ()                  # ({role: seconds}, seconds of offloading moves)

    def key(self) -> tuple:
        """Fastest first; between plans predicted equally fast (to the millisecond) the better quality, then the
        smaller peaks."""
        return round(self.seconds, 3), self.cost, self.peak, self.ram


def _choices(roles: list, fields: Mapping, device: str, compute_dtype: str) -> dict:
    out = {}
    for role in roles:
        f = {k: v for k, v in (fields.get(role) or {}).items() if v is not None}
        if f:
            opts, cdev, cdt, note = options_from_fields(f, device, compute_dtype)
            out[role] = _Choice(opts, cdev, cdt, "fields", note)
        else:
            out[role] = _Choice(row(role).planner_options, device, compute_dtype)
    return out


class _Blocks(NamedTuple):
    """A component's streamable blocks in one storage dtype, for choosing how many stay resident."""

    nonblock: int                      # bytes outside the blocks (embedders, norms, final layer)
    sizes: tuple                       # bytes per block, in run order
    prefix: tuple                      # prefix[k]: bytes of the first k blocks
    suffix_max: tuple                  # suffix_max[k]: the largest block from k on (0 past the end)


_BLOCKS_CACHE: dict = {}     # (id(size), storage, compute) -> (size, _Blocks): a plan scores hundreds of combinations


def _blocks(size: ComponentSize, storage: str, compute: str) -> _Blocks:
    key = (id(size), storage, compute)
    hit = _BLOCKS_CACHE.get(key)
    if hit is not None and hit[0] is size:
        return hit[1]
    if hasattr(size, "block_bytes"):       # a quantized file's blocks at their real bytes
        per = tuple(size.block_bytes(storage, compute))
    else:
        item, citem = ITEMSIZE[storage], ITEMSIZE[compute]
        per = tuple(f * item + (n - f) * citem for n, f in zip(size.blocks, size.block_fp8)) if is_fp8(storage) \
            else tuple(n * item for n in size.blocks)
    prefix, suffix = [0], [0] * (len(per) + 1)
    for b in per:
        prefix.append(prefix[-1] + b)
    for i in range(len(per) - 1, -1, -1):
        suffix[i] = max(per[i], suffix[i + 1])
    out = _Blocks(size.nonblock_bytes(storage, compute), per, tuple(prefix), tuple(suffix))
    if len(_BLOCKS_CACHE) > 256:
        _BLOCKS_CACHE.clear()
    _BLOCKS_CACHE[key] = (size, out)       # the size is kept, so its id is not reused while cached
    return out


def _entry(role: str, opt: str, size: ComponentSize, choice: _Choice, s: _Setting, k: int = 0) -> Entry:
    """One component's entry under option ``opt``; a streamed one with its first ``k`` blocks resident."""
    strategy, fp8, pinned = OPTIONS[opt]
    cdev, cdt = choice.device, choice.dtype
    storage = FP8 if fp8 else cdt
    full = size.nbytes(storage, cdt)
    prefetch = bool(strategy == "stream" and s.prefetch and cdev.startswith("cuda"))
    vram, stay, streamed, n_streamed = full, 0, 0, 0
    if strategy in STAYS:
        stay = full
    elif strategy == "stream":
        streamed, n_streamed = full, max(1, len(size.blocks))
        if size.blocks:   # the rest + the block computing (+ the next one, copied meanwhile)
            b = _blocks(size, storage, cdt)
            k = max(0, min(k, len(b.sizes) - 1))
            stay = b.nonblock + b.prefix[k] if k else 0
            vram = (stay or b.nonblock) + (2 if prefetch else 1) * b.suffix_max[k]
            streamed = full - stay if k else full
            n_streamed = len(b.sizes) - k + (0 if k else 1)
    if cdev.startswith("cpu"):        # computes on the CPU: everything lies in RAM
        ram = full
    elif strategy in STAYS:
        ram = 0
    elif strategy == "stream" and not pinned and size.file_dtype in (storage, PACKED):
        ram = 0                       # the memory-mapped file is the copy (a quantized file's weights stay packed)
    elif strategy == "stream":
        ram = streamed                # the resident blocks have no RAM copy
    else:
        ram = full
    on_device = cdev == s.device
    return Entry(role=role, label=label(role, s.pipeline), option=opt, strategy=strategy, storage_dtype=storage,
                 compute_dtype=cdt, compute_device=cdev, rest_device=cdev if strategy in STAYS else "cpu",
                 pinned=pinned, prefetch=prefetch, vram_bytes=int(vram) if on_device else 0, ram_bytes=int(ram),
                 activation_bytes=activation_bytes(role, size, cdt, s.width, s.height, s.text_tokens),
                 source=choice.source, note=choice.note, on_device=on_device,
                 resident_blocks=k if strategy == "stream" else 0, total_blocks=len(size.blocks),
                 stay_bytes=int(stay) if on_device else 0, streamed_bytes=int(streamed), streamed_blocks=n_streamed)


def _groups(combo: dict) -> dict:
    """{stage: the components computing in it}: the stage's own and its partners (a ControlNet beside the DiT)."""
    return {st: (st,) + tuple(r for r in row(st).partners if r in combo) for st, e in combo.items() if e.on_device}


def _stage_peaks(combo: dict, sizes: Mapping, reserve: int) -> dict:
    """{stage: bytes of VRAM while that component computes}: what stays on the device (resident components and the
    resident blocks of partly streamed ones), the stage's components and their partners (a ControlNet beside the
    transformer), one fp8 layer's compute-dtype copy at a time, the stage's activations (a ControlNet's residuals are
    held while the transformer runs) and the runtime reserve."""
    peaks = {}
    for stage, group in _groups(combo).items():
        total = sum((e.vram_bytes if r in group else e.stay_bytes) for r, e in combo.items() if e.on_device)
        total += max((sizes[r].largest_layer * ITEMSIZE[combo[r].compute_dtype] for r in group
                      if is_fp8(combo[r].storage_dtype)), default=0)
        peaks[stage] = total + sum(combo[r].activation_bytes for r in group) + reserve
    return peaks


def _most_resident_blocks(combo: dict, role: str, sizes: Mapping, s: _Setting, budget_b) -> int:
    """The most leading blocks of streamed ``role`` that can stay on the device with every stage still within the
    budget less a margin (0: stream them all). More resident blocks never cost time: fewer bytes move at every call.
    The margin: partial residency fills the budget to the block, where the estimates' rounding is the only slack."""
    e0 = combo[role]
    if budget_b is None or not e0.on_device or not sizes[role].blocks:
        return 0
    budget_b -= PARTIAL_MARGIN_GB * GiB if s.device.startswith("cuda") else 0
    b = _blocks(sizes[role], e0.storage_dtype, e0.compute_dtype)
    peaks, groups = _stage_peaks(combo, sizes, s.reserve), _groups(combo)
    mult = 2 if e0.prefetch else 1
    own = [st for st in peaks if role in groups[st]]
    # the other stages only grow with k (by the resident part): they bound k from above
    others = max((p - e0.stay_bytes for st, p in peaks.items() if st not in own), default=0)
    top = bisect.bisect_right(b.prefix, budget_b - others - b.nonblock) - 1
    for k in range(min(top, len(b.sizes) - 1), 0, -1):
        vram = b.nonblock + b.prefix[k] + mult * b.suffix_max[k]
        if all(peaks[st] - e0.vram_bytes + vram <= budget_b for st in own):
            return k
    return 0


def _cache_fits(combo: dict, sizes: Mapping, ram_b) -> bool:
    """Whether the memory-mapped files streamed from fit in the page cache beside the plan's private RAM."""
    mapped = sum(sizes[r].nbytes(sizes[r].file_dtype if sizes[r].file_dtype in ITEMSIZE else e.storage_dtype,
                                 e.compute_dtype)
                 for r, e in combo.items() if e.strategy == "stream" and not e.pinned and e.ram_bytes == 0)
    return ram_b is None or mapped == 0 or mapped + sum(e.ram_bytes for e in combo.values()) <= ram_b


def _candidate(combo: dict, sizes: Mapping, s: _Setting, importance: list, choices: dict, budget_b, ram_b):
    """Score one combination: streamed components keep as many leading blocks resident as fit (the most important
    component first), then its peaks, RAM and predicted time."""
    combo = dict(combo)
    for r in importance:
        if combo[r].strategy == "stream":
            k = _most_resident_blocks(combo, r, sizes, s, budget_b)
            if k:
                combo[r] = _entry(r, combo[r].option, sizes[r], choices[r], s, k)
    peaks = _stage_peaks(combo, sizes, s.reserve)
    fixed = sum(e.stay_bytes for e in combo.values()) + s.reserve
    seconds, parts, moves = predict(combo, sizes, s.work, s.constants, fixed, budget_b,
                                    _cache_fits(combo, sizes, ram_b))
    return _Candidate(combo, max(peaks.values(), default=0), sum(e.ram_bytes for e in combo.values()),
                      tuple(row(r).costs[combo[r].option] for r in importance), peaks, seconds, (parts, moves))


def _search(sizes: Mapping, roles: list, choices: dict, s: _Setting, budget_b, ram_b) -> tuple:
    """Every combination of the per-component options -> (the fastest that fits VRAM and RAM, the one needing the
    least RAM among those that fit VRAM, the one needing the least VRAM); None where there is none."""
    entries = {r: {o: _entry(r, o, sizes[r], choices[r], s) for o in choices[r].options} for r in roles}
    importance = by_importance(roles)
    best = vram_only = least = None
    for opts in itertools.product(*(choices[r].options for r in roles)):
        cand = _candidate({r: entries[r][o] for r, o in zip(roles, opts)}, sizes, s, importance, choices, budget_b,
                          ram_b)
        vram_ok = budget_b is None or cand.peak <= budget_b
        ram_ok = ram_b is None or cand.ram <= ram_b
        if vram_ok and ram_ok and (best is None or cand.key() < best.key()):
            best = cand
        if vram_ok and (vram_only is None or (cand.ram, cand.key()) < (vram_only.ram, vram_only.key())):
            vram_only = cand
        if least is None or (cand.peak, cand.key()) < (least.peak, least.key()):
            least = cand
    return best, vram_only, least


def plan(sizes: Mapping, device="cuda", vram_limit_gb: Optional[float] = None, ram_limit_gb: Optional[float] = None,
         compute_dtype="bfloat16", width: int = 1024, height: int = 1024, t5_sequence_length: int = 512,
         fields: Optional[Mapping] = None, free_vram_gb: Optional[float] = None,
         prefetch: Optional[bool] = None, pipeline: Optional[str] = None, steps: int = 28,
         prompts_per_image: float = 1.0, constants: Optional[Constants] = None) -> Plan:
    """Choose a strategy for every component in ``sizes`` ({role: ComponentSize}): the plan with the least predicted
    time per image (``engine.memory.cost``) whose peak fits the VRAM budget and whose weights fit the RAM budget.

    ``vram_limit_gb`` None: fit to ``free_vram_gb`` when given (the device's free memory), else unlimited.
    ``ram_limit_gb`` None: no RAM budget. ``fields`` {role: the seed's per-file fields}: a component with any field
    set follows them. ``pipeline`` ("flux2") labels the components as that pipeline calls them. ``steps`` and
    ``prompts_per_image`` (1: a new prompt for every image) are the job the time is predicted for; ``constants`` the
    machine's (default: measured here at first use, see ``cost.constants``).
    """
    device = device_name(device) or "cpu"
    on_cuda = device.startswith("cuda")
    budget = vram_limit_gb if vram_limit_gb is not None else free_vram_gb
    work = Work(width, height, steps, t5_sequence_length, prompts_per_image)
    setting = _Setting(device, on_cuda if prefetch is None else prefetch, width, height, t5_sequence_length,
                       CUDA_RESERVE_GB * GiB if on_cuda else 0, pipeline, work,
                       constants or cost_constants(device))
    roles = ordered(sizes)
    choices = _choices(roles, fields or {}, device, dtype_name(compute_dtype))
    process = PROCESS_RAM_GB["cuda" if on_cuda else "other"] * GiB
    ram_b = None if ram_limit_gb is None else ram_limit_gb * GiB - process
    chosen, vram_only, least = _search(sizes, roles, choices, setting, None if budget is None else budget * GiB, ram_b)
    fits, notes = chosen is not None, []
    if chosen is None and vram_only is not None:
        chosen = vram_only
        notes.append(f"Not enough RAM for any plan within {ram_limit_gb:g} GB of RAM: the plan that needs the least "
                     f"RAM ({gb(chosen.ram + process):.1f} GB) is used; the system may swap.")
    elif chosen is None:
        chosen = least
        notes.append(f"Nothing fits in {budget:g} GB of VRAM at {width}x{height}: the plan that needs the least "
                     f"({gb(chosen.peak):.1f} GB) is used and may run out of memory. Try a smaller image size, tiled "
                     f"VAE decoding, or a higher --vram-limit.")
    peaks = chosen.stage_peaks
    parts, moves = chosen.parts
    result = Plan(entries=chosen.combo, device=device, vram_limit_gb=vram_limit_gb,
                  budget_gb=None if budget is None else float(budget), ram_limit_gb=ram_limit_gb, width=width,
                  height=height, predicted_peak_vram_gb=gb(chosen.peak), predicted_peak_ram_gb=gb(chosen.ram + process),
                  peak_stage=max(peaks, key=peaks.get) if peaks else None, fits=fits, cost=chosen.cost, notes=notes,
                  stage_peaks_gb={k: gb(v) for k, v in peaks.items()}, predicted_seconds=chosen.seconds,
                  seconds_parts={**parts, "moves": moves}, steps=steps,
                  time_constants=setting.constants.as_dict())
    result.notes.extend(_notes(result, budget, vram_limit_gb, free_vram_gb))
    return result


def _notes(p: Plan, budget, vram_limit_gb, free_vram_gb) -> list:
    out = []
    if p.device.startswith("cpu"):
        if budget is None:
            out.append("Running on the CPU: every component lives in RAM.")
        else:
            out.append(f"Running on the CPU: the {budget:g} GB budget is applied as if it were VRAM (offloading is a "
                       f"no-op there; fp8 storage and block streaming are real).")
    elif vram_limit_gb is None and free_vram_gb is not None:
        out.append(f"No VRAM limit set: planned for the {free_vram_gb:.1f} GB free on {p.device}.")
    elif budget is None:
        out.append("No VRAM limit: everything stays on the GPU.")
    if p.peak_stage and not p.device.startswith("cpu"):
        what = row(p.peak_stage).stage
        reserve = f" incl. {CUDA_RESERVE_GB:g} GB runtime reserve" if p.device.startswith("cuda") else ""
        out.append(f"Predicted peak {p.predicted_peak_vram_gb:.1f} GB during {what} at {p.width}x{p.height}{reserve}.")
    for role in ordered(p.entries):
        e = p.entries[role]
        name = e.label
        if e.source == "fields":
            out.append(f"{name}: placed as its ModelConfig's VRAM fields ask ({e.strategy}, {e.storage_dtype})."
                       + (f" {e.note}" if e.note else ""))
        if e.strategy == "stream":
            how = ("the next block copied on a side stream while one computes" if e.prefetch else "one block at a time")
            src = "pinned RAM" if e.pinned else "the memory-mapped file (no RAM copy)"
            part = (f" (its first {e.resident_blocks} of {e.total_blocks} blocks stay on the GPU; the other "
                    f"{e.total_blocks - e.resident_blocks} move at every call)" if e.resident_blocks else "")
            out.append(f"{name} is streamed to the GPU block by block from {src}, {how}{part}.")
        if is_fp8(e.storage_dtype) and e.source == "planner":
            out.append(f"{name} is stored in fp8 (e4m3) and computed in {e.compute_dtype}: half the memory, a small "
                       f"loss of precision.")
    c = p.time_constants
    rates = "the rates measured on this machine" if c.get("source") == "probe" else f"{c.get('source')} rates"
    out.append(f"Predicted {p.predicted_seconds:.1f} s per image ({p.steps} steps, a new prompt each time) with "
               f"{rates}: {c.get('tflops', 0):g} TFLOP/s, {c.get('pinned_gbps', 0):g} GB/s host->device.")
    vae = p.entries.get("vae")
    if vae is not None and vae.on_device and p.budget_gb is not None and gb(vae.activation_bytes) > 0.25 * p.budget_gb:
        out.append(f"VAE decoding at {p.width}x{p.height} needs about {gb(vae.activation_bytes):.1f} GB of "
                   f"activations; for larger images turn on tiled decoding.")
    return out


def tighter(p: Plan, factor: float = 0.6) -> float:
    """The VRAM budget (GB) to re-plan with after an out-of-memory error: ``factor`` x the smaller of the budget
    and the predicted peak."""
    base = p.predicted_peak_vram_gb
    if p.budget_gb is not None:
        base = min(base, p.budget_gb)
    return max(0.5, round(base * factor, 2))


__all__ = ["Entry", "Plan", "plan", "options_from_fields", "tighter", "OPTIONS", "COSTS", "STRATEGY_RANK",
           "CUDA_RESERVE_GB", "PROCESS_RAM_GB"]
