"""Faster compute from libraries, as options of the pipelines (issue 17, item 3).

``FluxImagePipeline.from_pretrained(..., compile=False, attention_backend="auto", fp8_compute=False)`` (FLUX.2's
pipeline takes the same), ``pipe.set_acceleration(compile=None, attention_backend=None, fp8_compute=None,
step_cache=None)`` (None: unchanged) and ``pipe(..., step_cache=0.0)`` per call:

- ``compile``: regional ``torch.compile`` of the transformer's blocks (``compile``);
- ``attention_backend``: diffusers' attention dispatcher (``attention``);
- ``fp8_compute``: torchao's float8 matmuls (``fp8_compute``);
- ``step_cache``: diffusers' FirstBlockCache with a per-call threshold (``step_cache``);
- ``tea_cache_l1_thresh`` (per call only): DiffSynth-Studio's TeaCache on diffusers' hooks (``tea_cache``).

Each pipeline holds one ``Acceleration``: the settings (``settings.AccelerationSettings``), the notes saying what
cannot help on this machine, and what the last call did (``last_call``: the step cache's passes and skips). The
prompt-embedding cache across jobs is the pipelines' own (``prompt_cache``: FLUX.1's ``PromptEncoder``, FLUX.2's
``Flux2PromptEncoder``); the studio shares one between pipelines.

No torch at import (the studio reads the settings): the mechanisms are imported when used.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

from .settings import (ATTENTION_CHOICES, AccelerationSettings, SettingError, check_step_cache)  # noqa: F401

__all__ = ["Acceleration", "AccelerationSettings", "SettingError", "ATTENTION_CHOICES"]


class Acceleration:
    def __init__(self):
        self.settings = AccelerationSettings()
        self.notes: list = []          # why a setting does nothing here (CPU, GPU too old, streamed transformer)
        self.last_call: dict = {}      # the last call's step cache: {"threshold", "passes", "skipped"}
        self._cache = None             # the running call's StepCache

    def apply(self, dit, placement, **values) -> list:
        """Change the settings (None: unchanged) and carry them out on the transformer for its placement (device,
        dtype, streamed or not); returns the notes. An attention backend this machine lacks is refused
        (``SettingError`` naming the ones it has) and nothing changes."""
        from . import attention, compile as compiling, fp8_compute
        new = self.settings.changed(**values)
        if dit is None:                      # nothing loaded yet: kept for when it is
            self.settings = new
            return []
        device, dtype, streamed = _where(dit, placement)
        attention.backend_for(new.attention_backend, device, dtype)
        if fp8_compute.is_applied(dit) and not new.fp8_compute:
            raise SettingError("fp8 compute cannot be switched off in place (the fp8 weights lost their low bits): "
                               "load the transformer again.")
        # fp8 first: compiled blocks would otherwise see their weights change type and compile again.
        notes = fp8_compute.apply_fp8_compute(dit, device, streamed) if new.fp8_compute else []
        notes += compiling.apply_compile(dit, new.compile, device, streamed)
        self.settings, self.notes = new, notes
        return notes

    @contextmanager
    def running(self, dit, placement, step_cache=None, tea_cache_l1_thresh=None, num_inference_steps=None):
        """Around one pipeline call: the attention backend and the step cache (this call's threshold, else the
        setting's), or TeaCache when the call asks for it (``tea_cache_l1_thresh``; it needs the call's
        ``num_inference_steps``). Yields the cache; ``last_call`` holds its counts afterwards."""
        from . import attention
        device, dtype, _ = _where(dit, placement)
        backend = attention.backend_for(self.settings.attention_backend, device, dtype)
        cache = self._call_cache(dit, step_cache, tea_cache_l1_thresh, num_inference_steps)
        try:
            with attention.attention_context(backend), cache:
                self._cache = cache
                yield cache
        finally:
            self._cache = None
            self.last_call = cache.stats()

    def _call_cache(self, dit, step_cache, tea_cache_l1_thresh, num_inference_steps):
        """One call's step cache: TeaCache (``tea_cache``) when asked for, else the first-block cache. A call naming
        both refuses; the setting's first-block threshold gives way to a call's TeaCache."""
        from .step_cache import StepCache
        from .tea_cache import TeaCache, check_tea_cache
        tea = check_tea_cache(tea_cache_l1_thresh)
        threshold = self.settings.step_cache if step_cache is None else check_step_cache(step_cache)
        if not tea:
            return StepCache(dit, threshold)
        if step_cache is not None and threshold > 0:
            raise SettingError("One step cache per call: pass step_cache (first-block cache) or tea_cache_l1_thresh "
                               "(TeaCache), not both.")
        return TeaCache(dit, tea, num_inference_steps)

    def cfg_pass(self, negative: bool = False):
        """The running call's cache context for one transformer pass (CFG's two passes kept apart)."""
        return self._cache.pass_context(negative) if self._cache is not None else nullcontext()

    def in_force(self, step_cache=None) -> dict:
        """The settings a call with ``step_cache`` (None: the setting's) runs with: what a recipe records."""
        out = self.settings.as_dict()
        if step_cache is not None:
            out["step_cache"] = check_step_cache(step_cache)
        return out


def _where(dit, placement) -> tuple:
    """(compute device, compute dtype, streamed) of the transformer: its placement's, else its weights' (a pipeline
    assembled by hand, without the memory plan)."""
    if placement is not None:
        return placement.compute_device, placement.compute_dtype, placement.streamed
    weight = next(dit.parameters())
    return weight.device, weight.dtype, False
