"""How long a memory plan takes per image: the planner's time model.

Predicted seconds per image = for every component, its compute (FLOPs over the measured matmul rate) times how often
it runs (``engine.roles``' ``runs`` column: every step, once per prompt, once per image), + the fp8 -> compute dtype
casts of fp8-stored weights (and the dequantisation of a GGUF / 4-bit file's packed weights) at every call, + the
bytes it moves host -> device (streamed blocks at every call, offloaded components when the residency has to move
them back in) over the measured bandwidth. Streaming with
prefetch (CUDA: the next block copied on a side stream while one computes) costs the larger of compute and copy, not
the sum. Streaming from a memory-mapped file reads the page cache at the pageable rate when the file fits in the RAM
the plan leaves free, and the disk when it does not.

The constants are measured on the machine at first use (``probe``: a pinned and a pageable host -> device copy, a
bf16 matmul and an fp8 cast, about a second; cached for the process). A plan for a device this machine does not have
(the dry run planning for CUDA on a CPU-only machine) uses ``REFERENCE`` (an H100-class card on PCIe 5), and tests
inject their own with ``set_constants``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from ..roles import ordered, row
from .sizes import ComponentSize, is_fp8

GB = 1e9                          # rates are decimal (bytes per second), as bandwidths are quoted
CLIP_TOKENS = 77
VAE_FLOPS_PER_PIXEL = 7.0e6       # the FLUX VAE decoder at 128 base channels: ~7 TFLOP at 1024x1024 (its convs)
ENCODE_TOKENS = 512               # a text encoder's padded prompt


@dataclass(frozen=True)
class Constants:
    """What the time model needs to know about a machine."""

    pinned_bps: float             # host -> device bytes/s from pinned RAM
    pageable_bps: float           # host -> device bytes/s from ordinary RAM (and the page cache of a mapped file)
    disk_bps: float               # reading a file that is not in the page cache
    flops: float                  # matmul FLOP/s in the compute dtype
    cast_bps: float               # fp8 bytes cast to the compute dtype per second (layer-wise casting)
    block_overhead_s: float = 2e-4   # per streamed block per call: hooks, a stream sync, small kernels
    overlap_loss: float = 0.1     # prefetch hides a copy behind compute, not perfectly: this share of the smaller
                                  # of the two is still paid (the copy engine and the kernels share memory bandwidth)
    device: str = "cuda"
    source: str = "reference"     # "probe", "reference" or "injected"

    def as_dict(self) -> dict:
        return {"pinned_gbps": round(self.pinned_bps / GB, 2), "pageable_gbps": round(self.pageable_bps / GB, 2),
                "disk_gbps": round(self.disk_bps / GB, 2), "tflops": round(self.flops / 1e12, 2),
                "cast_gbps": round(self.cast_bps / GB, 2), "device": self.device, "source": self.source}


# An H100-class card on PCIe 5 (dense bf16 matmul as FLUX's shapes reach it; pinned copies ~40 GB/s): for plans made
# for a device this machine does not have. Disk: an NVMe SSD.
REFERENCE = Constants(pinned_bps=40 * GB, pageable_bps=12 * GB, disk_bps=2 * GB, flops=600e12, cast_bps=1000 * GB,
                      block_overhead_s=2e-4, device="cuda", source="reference")
CPU_REFERENCE = Constants(pinned_bps=8 * GB, pageable_bps=8 * GB, disk_bps=1 * GB, flops=0.2e12, cast_bps=2 * GB,
                          block_overhead_s=1e-4, device="cpu", source="reference")

_CACHE: dict = {}                 # {device type: Constants} measured in this process
_INJECTED: dict = {}              # {device type: Constants} set by set_constants (tests, benchmarks)


def _kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else str(device).split(":")[0]


def set_constants(constants: Optional[Constants], device: str = "cuda"):
    """Use ``constants`` for plans on ``device`` (None: measure again / use the reference)."""
    if constants is None:
        _INJECTED.pop(_kind(device), None)
    else:
        _INJECTED[_kind(device)] = replace(constants, source="injected")


def constants(device: str = "cuda", measure: bool = True) -> Constants:
    """The constants for plans on ``device``: injected ones, else measured here once (when this machine has that
    device and ``measure``), else the reference card's."""
    kind = _kind(device)
    if kind in _INJECTED:
        return _INJECTED[kind]
    if kind in _CACHE:
        return _CACHE[kind]
    if measure and _present(kind):
        _CACHE[kind] = probe(device)
        return _CACHE[kind]
    return CPU_REFERENCE if kind == "cpu" else REFERENCE


def _present(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind != "cuda":
        return False
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: nothing to measure
        return False


def _best_of(fn, repeats: int = 3) -> float:
    """The fastest of a few runs (seconds): the first run pays allocation and warm-up."""
    best = float("inf")
    for _ in range(repeats):
        best = min(best, fn())
    return max(best, 1e-9)


def probe(device: str = "cuda", mib: Optional[int] = None) -> Constants:
    """Measure the constants on ``device`` (under a second): a host -> device copy of ``mib`` MiB (default 256 on a
    GPU, 64 on the CPU) from pinned and from pageable RAM, a square bf16 matmul and an fp8 -> bf16 cast. On the CPU
    the "copies" are memory copies and the matmul (fp32) runs in the CPU's threads."""
    import torch
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = (mib or (256 if cuda else 64)) * 2 ** 20

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(fn):
        def run():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0
        return run

    host = torch.empty(n, dtype=torch.uint8)
    host.fill_(1)
    target = torch.empty(n, dtype=torch.uint8, device=dev)
    pageable = n / _best_of(timed(lambda: target.copy_(host, non_blocking=False)))
    pinned_host = host.pin_memory() if cuda else host
    pinned = n / _best_of(timed(lambda: target.copy_(pinned_host, non_blocking=cuda)))
    size = 4096 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    reps = 8 if cuda else 2
    flops = 2 * size ** 3 * reps / _best_of(timed(lambda: [a @ b for _ in range(reps)]))
    fp8 = getattr(torch, "float8_e4m3fn", None)
    cast = pageable
    try:
        elems = (n // 4) if cuda else (n // 16)
        w = torch.randn(elems, device=dev, dtype=torch.bfloat16).to(fp8)
        cast = elems / _best_of(timed(lambda: w.to(torch.bfloat16)))
    except (TypeError, RuntimeError):   # no fp8 dtype in this torch, or no cast kernel on this device: a copy's rate
        pass
    ref = REFERENCE if cuda else CPU_REFERENCE
    return Constants(pinned_bps=pinned, pageable_bps=pageable, disk_bps=ref.disk_bps, flops=flops, cast_bps=cast,
                     block_overhead_s=ref.block_overhead_s, device=str(dev), source="probe")


# -------------------------------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class Work:
    """What a job asks of the components: the image, the steps, the text tokens beside the image's, and how many new
    prompts per image (1: every image has a new prompt, the text encoders run each time)."""

    width: int = 1024
    height: int = 1024
    steps: int = 28
    text_tokens: int = 512
    prompts_per_image: float = 1.0

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def calls(self, role: str) -> float:
        runs = row(role).runs
        return float(self.steps) if runs == "step" else (1.0 if runs == "image" else self.prompts_per_image)


def _dit_flops(size: ComponentSize, work: Work) -> float:
    """Per step: every block weight meets every token (2 FLOP per multiply-add) + attention's two L x L x d
    products in each block."""
    tokens = work.image_tokens + work.text_tokens
    hidden = size.dims.get("hidden", 3072)
    return 2.0 * size.params * tokens + 4.0 * tokens ** 2 * hidden * max(1, len(size.blocks))


def _vae_flops(size: ComponentSize, work: Work) -> float:
    return VAE_FLOPS_PER_PIXEL * work.width * work.height * (size.dims.get("channels", 128) / 128) ** 2


def _tokens_flops(tokens: int):
    return lambda size, work: 2.0 * size.params * tokens


# FLOPs of one call, per role; a role not named: 2 x params x a padded prompt's tokens.
FLOPS = {
    "dit": _dit_flops, "controlnet": _dit_flops, "infinityou_infusenet": _dit_flops, "vae": _vae_flops,
    "text_encoder_1": _tokens_flops(CLIP_TOKENS),
}


def flops(role: str, size: ComponentSize, work: Work) -> float:
    return FLOPS.get(role, _tokens_flops(ENCODE_TOKENS))(size, work)


# ------------------------------------------------------------------------------------------------ the estimate
def _stream_rate(entry, c: Constants, cache_fits: bool) -> float:
    if entry.pinned:
        return c.pinned_bps
    return c.pageable_bps if cache_fits else min(c.disk_bps, c.pageable_bps)


def component_seconds(entry, size: ComponentSize, work: Work, c: Constants, cache_fits: bool = True) -> float:
    """Seconds one component takes per image: its calls' compute, casts and (streamed) copies. Offloading moves are
    the residency's, counted by ``offload_seconds``."""
    calls = work.calls(entry.role)
    compute = flops(entry.role, size, work) / c.flops
    cast = size.fp8_params / c.cast_bps if is_fp8(entry.storage_dtype) else 0.0
    cast += getattr(size, "packed_params", 0) / c.cast_bps     # a quantized file's weights: dequantised per call
    per_call = compute + cast
    if entry.strategy == "stream":
        moved = entry.streamed_bytes / _stream_rate(entry, c, cache_fits)
        overhead = entry.streamed_blocks * c.block_overhead_s
        if entry.prefetch:
            per_call = max(per_call, moved) + c.overlap_loss * min(per_call, moved) + overhead
        else:
            per_call = per_call + moved + overhead
    return calls * per_call


OFFLOADED = ("offload", "fp8+offload")


def offload_moves(entries: Mapping, fixed_bytes: int, budget_bytes: Optional[int]) -> int:
    """Bytes the residency (``place.Residency``: least recently used first, evicting only while the budget needs the
    room; every stage asks for its room, an offloaded component's weights or anyone's activations and blocks in
    flight) moves in and out per image in a steady run of images, by simulating two images' stages."""
    stages = [r for r in ordered(entries) if entries[r].on_device]
    held: list = []
    moved = [0, 0]
    for image in (0, 1):
        for role in stages:
            e = entries[role]
            offloaded = e.strategy in OFFLOADED
            if role in held:
                held.remove(role)
                held.append(role)
                continue
            if not offloaded and budget_bytes is None:
                continue
            need = e.vram_bytes - e.stay_bytes + e.activation_bytes
            while held:
                if budget_bytes is not None and fixed_bytes + sum(entries[h].vram_bytes for h in held) + need \
                        <= budget_bytes:
                    break
                moved[image] += entries[held.pop(0)].vram_bytes      # out
            if offloaded:
                held.append(role)
                moved[image] += e.vram_bytes                          # in
    return moved[1]


def predict(entries: Mapping, sizes: Mapping, work: Work, c: Constants, fixed_bytes: int,
            budget_bytes: Optional[int], cache_fits: bool = True) -> tuple:
    """(seconds per image, {role: seconds}, seconds of offloading moves) for a plan's entries."""
    parts = {r: component_seconds(e, sizes[r], work, c, cache_fits) for r, e in entries.items()}
    moves = offload_moves(entries, fixed_bytes, budget_bytes) / c.pageable_bps
    return sum(parts.values()) + moves, parts, moves


__all__ = ["Constants", "REFERENCE", "CPU_REFERENCE", "Work", "probe", "constants", "set_constants", "flops",
           "component_seconds", "offload_moves", "predict"]
