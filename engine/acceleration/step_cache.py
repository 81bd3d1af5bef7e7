"""First-block step caching: diffusers' FirstBlockCache (``FirstBlockCacheConfig``) on a transformer, for one call.

At every pass the first block runs; when its output's residual changed by less than ``threshold`` (relative mean
absolute difference) since the last pass that ran every block, the other blocks are skipped and their residual from
that pass is added instead. Each pipeline call enables the cache on entry and removes it on exit (``StepCache`` is a
context manager), so no state outlives a call and a threshold of 0 leaves the transformer untouched.

True CFG runs two passes per step; each runs in its own cache context ("cond" / "uncond": ``pass_context``), so the
negative pass never compares against, or reuses, the positive pass's residuals. ``passes`` and ``skipped`` count the
transformer calls of the call and those whose blocks after the first were skipped.

FLUX.2's single-stream blocks see the text and image tokens as one sequence (``Flux2SingleTransformerBlock`` returns
``cat(text, image)``), which diffusers 0.42's tail hook does not expect (it subtracts the first block's two outputs
from that one tensor and fails): for such a model the last block's hook is replaced by ``ConcatTailHook``, which splits
the sequence at the text's length first. FLUX.1's single blocks return the two parts and need nothing.
"""
from __future__ import annotations

from contextlib import nullcontext

from diffusers.hooks import FirstBlockCacheConfig
from diffusers.hooks.first_block_cache import FBCBlockHook

LEADER_HOOK = "fbc_leader_block_hook"      # diffusers' names for the hooks on the first block and the others
BLOCK_HOOK = "fbc_block_hook"


class StepCache:
    def __init__(self, dit, threshold: float):
        self.dit, self.threshold = dit, float(threshold)
        self.passes = self.skipped = 0
        self._leader = None
        self._handle = None

    @property
    def active(self) -> bool:
        return self.threshold > 0

    def __enter__(self) -> "StepCache":
        if not self.active:
            return self
        if self.dit.is_cache_enabled:          # left over by an interrupted call: start clean
            self.dit.disable_cache()
        self.dit.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        self._leader = _hooked(self.dit, LEADER_HOOK)[-1][1]
        _fix_concat_tail(self.dit, self._leader)
        # Counted after each whole transformer call, outside the (possibly compiled) blocks.
        self._handle = self.dit.register_forward_hook(self._count)
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        if self._handle is not None:
            self._handle.remove()
        self.dit.disable_cache()          # removes the hooks and their state: the next call starts fresh
        self._leader = self._handle = None

    def _count(self, module, args, output) -> None:
        self.passes += 1
        if not self._leader.state_manager.get_state().should_compute:
            self.skipped += 1

    def pass_context(self, negative: bool = False):
        """The cache context of one transformer pass: CFG's positive and negative passes keep separate states."""
        if not self.active:
            return nullcontext()
        return self.dit.cache_context("uncond" if negative else "cond")

    def stats(self) -> dict:
        return {"threshold": self.threshold, "passes": self.passes, "skipped": self.skipped}


def _hooked(dit, name: str) -> list:
    """[(module, hook)] of the modules carrying diffusers' hook ``name``, in module order."""
    found = []
    for module in dit.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(name) if registry is not None else None
        if hook is not None:
            found.append((module, hook))
    if not found:
        raise RuntimeError(f"diffusers' FirstBlockCache put no {name} on the transformer's blocks.")
    return found


def _fix_concat_tail(dit, leader) -> None:
    """Replace the last block's hook by ``ConcatTailHook`` when that block returns one text+image sequence while the
    first returns the two apart (FLUX.2)."""
    tail, hook = _hooked(dit, BLOCK_HOOK)[-1]
    if not (hook.is_tail and hook._metadata.return_encoder_hidden_states_index is None
            and leader._metadata.return_encoder_hidden_states_index is not None):
        return
    registry = tail._diffusers_hook
    registry.remove_hook(BLOCK_HOOK, recurse=False)
    registry.register_hook(ConcatTailHook(leader.state_manager, is_tail=True), BLOCK_HOOK)


class ConcatTailHook(FBCBlockHook):
    """The last block's hook for a model whose last blocks return ``cat(text, image)``: the residuals it leaves for
    skipped passes are that sequence minus the first block's outputs, split at the text's length."""

    def new_forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        if not state.should_compute:
            return super().new_forward(module, *args, **kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden, text = state.head_block_output       # the first block's (image, text) outputs
        n = text.shape[1]
        state.tail_block_residuals = (output[:, n:] - hidden, output[:, :n] - text)
        return output
