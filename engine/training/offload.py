"""Carrying out a training memory plan (``engine.training.memory``): streamed frozen blocks, the optimizer on the
CPU.

``BlockStreamer`` (the seed's ``--enable_model_cpu_offload``, and the plan's ``stream``): the frozen weights of the
transformer's blocks from ``resident_blocks`` on rest in pinned CPU RAM (one arena, no per-tensor rounding); a
block's forward pre-hook copies them in (on CUDA the next block is copied on a side stream meanwhile) and at most
``capacity`` blocks are on the device at a time (the oldest is dropped: its parameters point at an empty tensor).
The trained parameters (the LoRA matrices) and everything outside the streamed blocks stay on the device.

The backward pass needs the frozen weights again (the input gradient of a linear layer is ``grad @ W``):

- with gradient checkpointing the block's forward is recomputed in the backward pass, so its pre-hook copies the
  block in again, right before that block's backward runs (autograd runs a later block's backward before an earlier
  block's, so the dropped block is never the one in use);
- without it, the weights autograd saves for the backward pass are replaced by a reference (a saved-tensor hook
  around the transformer's call, matching the storage of a streamed weight) and copied in again when the backward
  pass unpacks them.

``CPUOffloadOptimizer`` (``--enable_optimizer_cpu_offload``): the optimizer and its state live on the CPU over float32
copies of the trained parameters; each step moves the gradients out, steps there, and copies the weights back.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch

ALIGN = 64


class _PinnedArena:
    """CPU tensors carved out of a few large (pinned, on CUDA) chunks: pinning each tensor on its own rounds it up to
    a power of two."""

    def __init__(self, pin: bool, chunk_bytes: int = 1 << 30):
        self.pin, self.chunk_bytes = pin, chunk_bytes
        self.chunks, self.used = [], 0

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        if not self.pin:
            return t.detach().to("cpu", copy=True)
        n = t.numel() * t.element_size()
        if not self.chunks or self.used + n > self.chunks[-1].numel():
            self.chunks.append(torch.empty(max(self.chunk_bytes, n), dtype=torch.uint8, pin_memory=True))
            self.used = 0
        out = self.chunks[-1][self.used:self.used + n].view(t.dtype).view(t.shape)
        out.copy_(t.detach())
        self.used += (n + ALIGN - 1) // ALIGN * ALIGN
        return out


class _Ref:
    """What a saved streamed weight is packed as: its block, its parameter and the view autograd saved."""

    __slots__ = ("block", "param", "size", "stride", "offset")

    def __init__(self, block, param, t):
        self.block, self.param = block, param
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class BlockStreamer:
    """Stream the frozen weights of ``dit``'s blocks from ``resident_blocks`` on (see the module's notes)."""

    def __init__(self, dit, device, resident_blocks: int = 0, capacity: int = 2, prefetch: Optional[bool] = None):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and self.device.index is None:   # "cuda" -> "cuda:N": tensors report their index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = on_cuda if prefetch is None else (prefetch and on_cuda)
        self.capacity = max(1, capacity)
        blocks = list(dit.transformer_blocks) + list(dit.single_transformer_blocks)
        self.resident_blocks = max(0, min(resident_blocks, len(blocks)))
        self.blocks = blocks[self.resident_blocks:]
        arena = _PinnedArena(pin=on_cuda)
        self.params: list = []             # per streamed block: [(param, home copy)]
        for block in self.blocks:
            pairs = []
            for p in block.parameters():
                if not p.requires_grad:
                    pairs.append((p, arena.copy_of(p.data)))
                    p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            self.params.append(pairs)
        dit.to(self.device)                # the rest (and the trained parameters) live on the device
        self.loaded: "OrderedDict[int, list]" = OrderedDict()   # block -> its weights' storage pointers
        self.live: dict = {}               # storage pointer -> (block, param) of the weights on the device now
        self.pending: dict = {}            # block -> (tensors, event) copied on the side stream
        self.side = torch.cuda.Stream(self.device) if self.prefetch else None
        self.onloads, self.max_loaded, self._last = 0, 0, None
        self.handles = [b.register_forward_pre_hook(self._pre_hook(i)) for i, b in enumerate(self.blocks)]
        self._saved_hooks = None
        self.handles.append(dit.register_forward_pre_hook(self._enter_saved_hooks))
        self.handles.append(dit.register_forward_hook(self._exit_saved_hooks, always_call=True))

    # ------------------------------------------------------------------------------------------- moving
    def _pre_hook(self, i: int) -> Callable:
        def hook(_module, _args):
            self.onload(i)
        return hook

    def _copy_in(self, i: int) -> list:
        return [home.to(self.device, non_blocking=True) for _p, home in self.params[i]]

    def onload(self, i: int) -> None:
        if i in self.loaded:
            self.loaded.move_to_end(i)
        else:
            self._make_room(keep=None, incoming=0 if i in self.pending else 1)
            if i in self.pending:
                tensors, event = self.pending.pop(i)
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for t in tensors:
                    t.record_stream(stream)   # allocated on the side stream, used (and freed) on this one
            else:
                tensors = self._copy_in(i)
            ptrs = []
            for (p, _home), t in zip(self.params[i], tensors):
                p.data = t
                ptrs.append(t.untyped_storage().data_ptr())
                self.live[ptrs[-1]] = (i, p)
            self.loaded[i] = ptrs
            self.onloads += 1
        direction = 1 if self._last is None or i >= self._last else -1
        self._last = i
        nxt = i + direction
        if self.prefetch and 0 <= nxt < len(self.blocks) and nxt not in self.loaded and nxt not in self.pending:
            self._make_room(keep=i, incoming=1)
            if len(self.loaded) + len(self.pending) < self.capacity:
                with torch.cuda.stream(self.side):
                    tensors = self._copy_in(nxt)
                    event = torch.cuda.Event()
                    event.record(self.side)
                self.pending[nxt] = (tensors, event)
        self.max_loaded = max(self.max_loaded, len(self.loaded) + len(self.pending))

    def _make_room(self, keep, incoming: int) -> None:
        """Drop the least recently used blocks (not ``keep``) until ``incoming`` more fit in ``capacity``."""
        while len(self.loaded) + len(self.pending) + incoming > self.capacity:
            victims = [j for j in self.loaded if j != keep]
            if not victims:
                break
            self.offload(victims[0])

    def offload(self, i: int) -> None:
        for ptr in self.loaded.pop(i, ()):   # the pointers recorded when it came in (a cast may have moved p.data)
            self.live.pop(ptr, None)
        for p, _home in self.params[i]:
            p.data = torch.empty(0, dtype=_home.dtype, device=self.device)

    def offload_all(self) -> None:
        for i in list(self.loaded):
            self.offload(i)
        self.pending.clear()
        self._last = None

    # ------------------------------------------------------------------------- the saved-tensor references
    def _pack(self, t):
        if not isinstance(t, torch.Tensor) or t.device != self.device or t.is_sparse:
            return t
        hit = self.live.get(t.untyped_storage().data_ptr()) if t.numel() else None
        return t if hit is None else _Ref(hit[0], hit[1], t)

    def _unpack(self, x):
        if not isinstance(x, _Ref):
            return x
        self.onload(x.block)
        return x.param.data.as_strided(x.size, x.stride, x.offset)

    def _enter_saved_hooks(self, _module, _args):
        self._last = None
        if torch.is_grad_enabled() and self._saved_hooks is None:
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def _exit_saved_hooks(self, _module, _args, _output):
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    def remove(self) -> None:
        """Put every streamed weight back on the device and take the hooks off."""
        for h in self.handles:
            h.remove()
        for pairs in self.params:
            for p, home in pairs:
                p.data = home.to(self.device)
        self.loaded.clear()
        self.live.clear()

    def streamed_bytes(self) -> int:
        return sum(home.numel() * home.element_size() for pairs in self.params for _p, home in pairs)


# ----------------------------------------------------------------------------------------------- the optimizer
class CPUOffloadOptimizer(torch.optim.Optimizer):
    """``optimizer_cls`` over float32 CPU copies of ``params``: its state never touches the device.

    ``step`` copies the device gradients out, steps on the CPU and copies the weights back. The CPU copies are the
    master weights; a device parameter changed from outside (a resumed state copied in) is read back first (its
    version counter tells)."""

    def __init__(self, params, optimizer_cls, **kwargs):
        self.device_params = list(params)
        self.shadows = [torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True)) for p in self.device_params]
        self.inner = optimizer_cls(self.shadows, **kwargs)
        super().__init__(self.shadows, dict(self.inner.defaults))
        self.param_groups = self.inner.param_groups   # one set of groups: the LR scheduler changes the inner's
        self.state = self.inner.state
        self._versions = [p._version for p in self.device_params]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for k, (p, s) in enumerate(zip(self.device_params, self.shadows)):
            if p._version != self._versions[k]:
                s.copy_(p.detach())
            s.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for k, (p, s) in enumerate(zip(self.device_params, self.shadows)):
            p.copy_(s.to(p.device, p.dtype, non_blocking=True))
            self._versions[k] = p._version
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)   # torch casts the state to the CPU copies' device
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state


# --------------------------------------------------------------------------------------------- applying a plan
def make_optimizer(plan, params: list, optimizer_cls, **kwargs):
    """The run's optimizer as the plan says: 8-bit AdamW (bitsandbytes) and/or on the CPU."""
    if plan is not None and plan.optimizer == "AdamW 8-bit":
        import bitsandbytes as bnb
        optimizer_cls = bnb.optim.AdamW8bit
    if plan is not None and plan.optimizer_offload:
        return CPUOffloadOptimizer(params, optimizer_cls, **kwargs)
    return optimizer_cls(params, **kwargs)


def apply_training_plan(pipe, plan, device, log: Callable[[str], None] = print) -> Optional[BlockStreamer]:
    """Place the transformer as ``plan`` says (streamed blocks: a ``BlockStreamer``; otherwise on the device) and
    make the offloaded encoders leave the device before the transformer runs. Call after the LoRA is added (its
    matrices are trainable, so they stay on the device)."""
    import dataclasses

    from .model import enable_checkpointing
    if plan.checkpointing != "none":   # what the flags asked, or more where the plan needs it
        enable_checkpointing(pipe.dit, plan.checkpointing == "checkpoint+offload")
    streamer = None
    if plan.streams and torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        from ..errors import EngineError
        raise EngineError("Streaming the transformer's blocks from CPU RAM (--enable_model_cpu_offload, or a "
                          "--vram_limit plan that streams) works on one GPU only, as the seed's offload training: "
                          "launch one process, or raise --vram_limit so that the plan keeps the blocks resident.")
    if plan.streams:
        streamer = BlockStreamer(pipe.dit, device, plan.resident_blocks)
        log(f"Streaming {len(streamer.blocks)} of {plan.total_blocks} transformer blocks from CPU RAM "
            f"({streamer.streamed_bytes() / 1024 ** 3:.1f} GB), the LoRA and {streamer.resident_blocks} blocks "
            f"resident.")
    else:
        pipe.dit.to(device)
    place = pipe.placements.get("dit")
    if place is not None and place.offloaded:   # it now lives where the plan put it: no stage moves it whole
        pipe.placements["dit"] = dataclasses.replace(place, strategy="resident", rest_device=torch.device(device))
    others = [r for r, v in plan.encoders.items() if v != "resident"]
    if others:
        def encoders_out(_module, _args):
            for role in list(pipe.residency.onloaded()):
                if role != "dit":
                    pipe.residency.offload(role)
        pipe.dit.register_forward_pre_hook(encoders_out)
    return streamer


def rest_on_cpu_fields(device, dtype) -> dict:
    """The seed's per-file fields of a model that rests in CPU RAM and computes on ``device`` (loading under a plan:
    nothing reaches the device before the plan places it)."""
    return {"offload_dtype": dtype, "offload_device": "cpu", "onload_dtype": dtype, "onload_device": str(device),
            "computation_dtype": dtype, "computation_device": str(device)}


def plan_fields(plan, roles, fp8_roles, device, dtype) -> dict:
    """{role: the seed's per-file fields} placing the loaded components as ``plan`` says: the transformer rests on
    the CPU (``apply_training_plan`` moves it), the encoders resident / offloaded / streamed, fp8 where asked or
    planned."""
    from .model import FP8
    out = {}
    for role in roles:
        how = "offload" if role == "dit" else plan.encoders.get(role, "offload")
        fp8 = role in fp8_roles or (role == "dit" and plan.fp8) or "fp8" in how
        stored = FP8 if fp8 else dtype
        f = {"offload_dtype": stored, "offload_device": "cpu", "onload_dtype": stored, "onload_device": str(device),
             "preparing_dtype": stored, "preparing_device": str(device), "computation_dtype": dtype,
             "computation_device": str(device)}
        if how == "resident":
            f.update(offload_device=str(device))
        elif how == "stream":
            f.update(onload_device="cpu", preparing_dtype=stored, preparing_device="cpu")
        out[role] = f
    return out
