"""Carrying out a memory plan (``engine.memory.planner``) on loaded modules.

- fp8 storage: diffusers' layer-wise casting hooks (``apply_layerwise_casting_hook``) on the layers ``fp8_layers``
  picks, applied block by block, each block moved to where it rests right after it is cast, so a bf16 checkpoint is
  never held in RAM next to its fp8 copy (the bf16 tensors are the memory-mapped file; the fp8 copy of one block is
  made at a time).
- streaming: diffusers' group offloading (``apply_group_offloading``), block level, one block per group, with
  ``use_stream=True`` on CUDA (the next block is copied on a side stream while the current one computes) and pinned
  RAM copies (or, unpinned, the memory-mapped file itself as the copy: ``low_cpu_mem_usage``).
- offloading: the module rests on the CPU and ``Residency.onload`` moves it in for its stage; it stays on the GPU
  until another component needs the room (least recently used first), so a job does not move the transformer in and
  out at every step and a new prompt does not evict what still fits.

Which layers are cast and which blocks are streamed, per role: ``engine.memory.layers``.

``place_modules`` plans a set of loaded modules and places them all (what a pipeline's ``set_models`` does).
``apply`` is idempotent and can re-place a module that is already placed (a new VRAM limit): streaming hooks are
removed and re-applied, devices change, bf16 -> fp8 is done in place. fp8 -> bf16 cannot be done in place (the
lost bits are gone): ``needs_reload`` says so and the engine re-reads that component from its file.
"""
from __future__ import annotations

import gc
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from .layers import fp8_chunks, group_target, stream_blocks
from .planner import plan
from .sizes import GiB, sizes_from_module

FP8_TYPES = tuple(t for t in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if t)
PARTIAL_PREFETCH = "flux_partial_prefetch"     # partial streaming's hook that prefetches the first streamed block
_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading", PARTIAL_PREFETCH)


@dataclass
class ComponentPlacement:
    """One component's placement, in torch terms, from a ``planner.Entry``."""

    compute_device: torch.device
    compute_dtype: torch.dtype
    rest_device: torch.device          # where it sits when not in use
    storage_dtype: torch.dtype         # dtype of the stored weights (fp8 means cast per layer at compute time)
    strategy: str = "resident"
    pinned: bool = True
    prefetch: bool = False
    vram_bytes: int = 0
    activation_bytes: int = 0
    role: str = ""
    resident_blocks: int = 0           # stream: the first k blocks (and all outside the blocks) stay on the device
    stay_bytes: int = 0                # of vram_bytes, what stays on the device between stages

    @property
    def offloaded(self) -> bool:
        """Rests off the compute device and is moved in for its stage."""
        return self.strategy in ("offload", "fp8+offload")

    @property
    def streamed(self) -> bool:
        return self.strategy == "stream"

    @property
    def needs_room(self) -> bool:
        """Every stage asks the residency for its room (an offloaded component's weights, a streamed one's blocks in
        flight, anyone's activations): an offloaded component left on the device goes back when the stage needs it."""
        return True

    @property
    def fp8(self) -> bool:
        return self.storage_dtype in FP8_TYPES

    def key(self) -> tuple:
        return (self.strategy, str(self.compute_device), self.compute_dtype, str(self.rest_device),
                self.storage_dtype, self.pinned, self.prefetch, self.resident_blocks)


def _torch_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name).replace("torch.", ""))


def from_entry(entry) -> ComponentPlacement:
    return ComponentPlacement(compute_device=torch.device(entry.compute_device),
                              compute_dtype=_torch_dtype(entry.compute_dtype),
                              rest_device=torch.device(entry.rest_device),
                              storage_dtype=_torch_dtype(entry.storage_dtype), strategy=entry.strategy,
                              pinned=entry.pinned, prefetch=entry.prefetch, vram_bytes=entry.vram_bytes,
                              activation_bytes=entry.activation_bytes, role=entry.role,
                              resident_blocks=getattr(entry, "resident_blocks", 0),
                              stay_bytes=getattr(entry, "stay_bytes", 0))


# ------------------------------------------------------------------------------------------------ applying
def fp8_storage(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The fp8 dtype the module's weights are stored in (None: not stored in fp8)."""
    return getattr(module, "_flux_fp8", None)


def is_fp8(module: torch.nn.Module) -> bool:
    return fp8_storage(module) is not None


def needs_reload(module: torch.nn.Module, placement: ComponentPlacement) -> bool:
    """A module stored in fp8 cannot get its full-precision weights back without re-reading its file."""
    return is_fp8(module) and not placement.fp8


def remove_streaming(module: torch.nn.Module):
    """Remove group offloading hooks (the weights stay where they are: on the CPU, and a partly streamed module's
    resident blocks on the device until the caller moves the module)."""
    from diffusers.hooks import HookRegistry
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            for name in _GROUP_HOOKS:
                if registry.get_hook(name) is not None:
                    registry.remove_hook(name, recurse=False)
    module._flux_streamed = False


def is_streamed(module) -> bool:
    return bool(getattr(module, "_flux_streamed", False))


def move(module: torch.nn.Module, device: torch.device):
    # nn.Module.to, not ModelMixin.to (which refuses while group offloading hooks are on; they are off here)
    torch.nn.Module.to(module, device)


def _apply_fp8(role: str, module: torch.nn.Module, storage: torch.dtype, compute: torch.dtype, device: torch.device):
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook
    for _name, chunk, units in fp8_chunks(role, module):
        for _lname, layer in units:
            apply_layerwise_casting_hook(layer, storage, compute, non_blocking=False)
        move(chunk, device)   # one block's fp8 copy at a time; its bf16 source is released
    move(module, device)
    try:  # PEFT layers (LoRA) must see compute-dtype inputs; diffusers' own helper
        from diffusers.hooks.layerwise_casting import _disable_peft_input_autocast
        _disable_peft_input_autocast(module)
    except Exception:  # noqa: BLE001 - optional
        pass
    module._flux_fp8 = storage


def _cast(module: torch.nn.Module, dtype: torch.dtype):
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        torch.nn.Module.to(module, dtype=dtype)


def _apply_stream(role: str, module: torch.nn.Module, place: ComponentPlacement):
    blocks = stream_blocks(role, module)
    if 0 < place.resident_blocks < len(blocks):
        _apply_partial_stream(module, blocks, place)
        return
    from diffusers.hooks import apply_group_offloading
    move(module, torch.device("cpu"))
    target, block_modules = group_target(role, module)
    use_stream = place.prefetch and place.compute_device.type == "cuda"
    apply_group_offloading(target, onload_device=place.compute_device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream,
                           record_stream=False, low_cpu_mem_usage=not place.pinned, block_modules=block_modules,
                           non_blocking=use_stream)
    module._flux_streamed = True


def _move_except(module: torch.nn.Module, device: torch.device, skip: set):
    """Move ``module`` to ``device`` except the submodules in ``skip`` (ids), which stay where they are."""
    for child in module.children():
        if id(child) in skip:
            continue
        if any(id(m) in skip for m in child.modules()):
            _move_except(child, device, skip)
        else:
            move(child, device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        module._buffers[name] = b.to(device)


def _prefetch_hook(group):
    """A hook for the first resident block: it starts copying the first streamed block on the side stream, so the
    copy overlaps the resident blocks' compute (the streamed blocks then prefetch each other)."""
    from diffusers.hooks.hooks import ModelHook

    class PrefetchFirstStreamed(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            group.onload_()
            return args, kwargs
    return PrefetchFirstStreamed()


def _apply_partial_stream(module: torch.nn.Module, blocks: list, place: ComponentPlacement):
    """Partial streaming: the first ``resident_blocks`` blocks and everything outside the blocks stay on the device;
    the rest are diffusers' module groups (one block each, ``GroupOffloadingHook``) moved in for their call and out
    after it, each prefetching the next on the side stream (CUDA) as diffusers' block-level streaming does, the first
    one prefetched by the first resident block."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import GroupOffloadingConfig, GroupOffloadingHook, ModuleGroup
    k, dev, cpu = place.resident_blocks, place.compute_device, torch.device("cpu")
    streamed = blocks[k:]
    move(module, cpu)
    _move_except(module, dev, {id(b) for b in streamed})
    use_stream = place.prefetch and dev.type == "cuda"
    stream = torch.cuda.Stream(device=dev) if use_stream else None
    config = GroupOffloadingConfig(onload_device=dev, offload_device=cpu, offload_type="block_level",
                                   num_blocks_per_group=1, non_blocking=use_stream, stream=stream,
                                   record_stream=False, low_cpu_mem_usage=not place.pinned)
    groups = [ModuleGroup(modules=[b], offload_device=cpu, onload_device=dev, offload_leader=b, onload_leader=b,
                          non_blocking=use_stream, stream=stream, record_stream=False,
                          low_cpu_mem_usage=not place.pinned, onload_self=not use_stream, group_id=f"block_{k + i}")
              for i, b in enumerate(streamed)]
    for i, (block, group) in enumerate(zip(streamed, groups)):
        hook = GroupOffloadingHook(group, config=config)
        if use_stream and i + 1 < len(groups):
            hook.next_group = groups[i + 1]
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, "group_offloading")
    if use_stream:
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_prefetch_hook(groups[0]),
                                                                            PARTIAL_PREFETCH)
    module._flux_streamed = True


def apply(module: torch.nn.Module, placement: ComponentPlacement, role: Optional[str] = None) -> torch.nn.Module:
    """Place ``module`` as ``placement`` says (idempotent). An fp8 module asked to be full precision stays fp8
    (``needs_reload`` tells the caller beforehand)."""
    role = role or placement.role or getattr(module, "flux_studio_role", "")
    rest = placement.compute_device if placement.strategy in ("resident", "fp8") else placement.rest_device
    if placement.streamed:
        rest = torch.device("cpu")
    current = getattr(module, "_flux_placement", None)
    if current is not None and current.key() == placement.key():
        if not placement.streamed:
            move(module, rest)   # an offloaded module another pipeline had moved in goes back to rest
        module._flux_placement = placement
        return module
    if is_streamed(module):
        remove_streaming(module)
        move(module, torch.device("cpu"))
    if not is_fp8(module):
        _cast(module, placement.compute_dtype)
    if placement.fp8 and not is_fp8(module):
        _apply_fp8(role, module, placement.storage_dtype, placement.compute_dtype, rest)
    else:
        move(module, rest)
    if placement.streamed:
        _apply_stream(role, module, placement)
    module._flux_placement = placement
    return module


def unplace(module: torch.nn.Module):
    """Back to the CPU without streaming hooks, placed nowhere (fp8 storage stays: it cannot be undone in place)."""
    if is_streamed(module):
        remove_streaming(module)
    move(module, torch.device("cpu"))
    module._flux_placement = None


def release_memory(collect: bool = True):
    """Give freed memory back: ``gc.collect()`` (modules with hooks hold reference cycles) unless ``collect`` is
    False, then the CUDA caching allocator's unused blocks to the driver."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- moving in for a stage
class Residency:
    """Which offloaded components are on their compute device now, least recently used first.

    ``onload`` moves a component in for its stage and evicts others only while the budget needs the room (with no
    budget, every other offloaded component goes back, as DiffSynth-Studio's ``load_models_to_device`` does)."""

    def __init__(self):
        self._in: "OrderedDict[str, tuple]" = OrderedDict()
        self.budget_bytes: Optional[int] = None
        self.fixed_bytes = 0           # resident weights + runtime reserve
        self.moves = []                # (role, "in"/"out") for tests and the benchmark

    def configure(self, budget_bytes: Optional[int], fixed_bytes: int):
        self.budget_bytes, self.fixed_bytes = budget_bytes, fixed_bytes

    def onloaded(self) -> list:
        return list(self._in)

    def onload(self, role: str, module: torch.nn.Module, place: ComponentPlacement):
        """Move an offloaded component in for its stage; for any other (resident, fp8, streamed: it moves its own
        blocks) only make its stage's room under the budget (its activations, its blocks in flight), so that an
        offloaded component left on the device from an earlier stage goes back first."""
        if role in self._in:
            self._in.move_to_end(role)
            return
        if not place.offloaded and self.budget_bytes is None:
            return
        need = place.vram_bytes - place.stay_bytes + place.activation_bytes
        for other in list(self._in):
            if self.budget_bytes is not None:
                held = sum(p.vram_bytes for _m, p in self._in.values())
                if self.fixed_bytes + held + need <= self.budget_bytes:
                    break
            self.offload(other)
        if not place.offloaded:
            return
        move(module, place.compute_device)
        self._in[role] = (module, place)
        self.moves.append((role, "in"))

    def offload(self, role: str):
        module, place = self._in.pop(role)
        move(module, place.rest_device)
        self.moves.append((role, "out"))

    def offload_all(self):
        for role in list(self._in):
            self.offload(role)

    def forget(self):
        self._in.clear()


def plan_modules(modules: dict, fields: dict, device, torch_dtype, vram_limit=None, ram_limit=None,
                 width: int = 1024, height: int = 1024, text_tokens: int = 512, pipeline: Optional[str] = None,
                 steps: int = 28):
    """The ``planner.Plan`` for these loaded modules (exact sizes); with no limit on CUDA, fitted to what is free
    (the memory torch already holds counts as free: it is ours to re-plan)."""
    sizes = {role: sizes_from_module(role, m) for role, m in modules.items()}
    dev = torch.device(device)
    free = None
    if vram_limit is None and dev.type == "cuda" and torch.cuda.is_available():
        free_b, _total = torch.cuda.mem_get_info(dev)
        free = (free_b + torch.cuda.memory_reserved(dev)) / GiB
    return plan(sizes, str(dev), vram_limit, ram_limit, compute_dtype=str(torch_dtype), width=width, height=height,
                t5_sequence_length=text_tokens, fields={r: f for r, f in (fields or {}).items() if r in modules},
                free_vram_gb=free, pipeline=pipeline, steps=steps)


def place_modules(installed: dict, fields: dict, device, torch_dtype, residency: Residency, vram_limit=None,
                  ram_limit=None, width: int = 1024, height: int = 1024, text_tokens: int = 512,
                  pipeline: Optional[str] = None, steps: int = 28) -> tuple:
    """Plan ``installed`` ({role: module}) and place every module by the plan: (plan, {role: ComponentPlacement},
    {role: placed module}). What was moved in for a stage goes back first; components leaving the device are
    placed before those that stay on it, so the device never holds a component's old and new placement at once; a
    module already in fp8 that the plan wants in full precision stays fp8 (noted in the plan: only re-reading its
    file brings the low bits back). The residency is configured for the new plan's budget."""
    residency.offload_all()
    residency.forget()
    p = plan_modules(installed, fields, device, torch_dtype, vram_limit, ram_limit, width, height, text_tokens,
                     pipeline, steps)
    placements = {r: from_entry(e) for r, e in p.entries.items()}
    for role, placement in placements.items():
        if needs_reload(installed[role], placement):
            placement.storage_dtype = fp8_storage(installed[role])
            p.entries[role].storage_dtype = str(placement.storage_dtype).replace("torch.", "")
            p.notes.append(f"{p.entries[role].label} stays in fp8 until it is loaded again.")
    order = sorted(installed, key=lambda r: placements[r].strategy in ("resident", "fp8"))
    placed = {role: apply(installed[role], placements[role], role) for role in order}
    release_memory(collect=False)       # moved tensors are freed by reference counting
    residency.configure(p.budget_bytes, p.resident_bytes() + p.reserve_bytes)
    return p, placements, placed
