"""Out-of-memory recovery for one job: on a GPU out-of-memory error, free what is held, re-plan for a tighter VRAM
limit (the next strategies down), retry once and tell the person; a second one is a clear message naming the limit
to try. The engine stays usable either way.
"""
from __future__ import annotations

from typing import Callable

from engine.errors import EngineError


def is_oom(exc: BaseException) -> bool:
    """A device out-of-memory error: torch's OutOfMemoryError, or a RuntimeError saying so (cuBLAS, other backends)."""
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def plan_words(plan) -> str:
    """A plan in a few words: each component's strategy and the predicted peak."""
    from engine.roles import label
    parts = []
    for role, entry in plan.entries.items():
        dtype = " fp8" if "float8" in entry.storage_dtype and entry.strategy == "stream" else ""
        parts.append(f"{label(role).split(' (')[0]}: {entry.strategy}{dtype}")
    return "; ".join(parts) + f"; predicted peak {plan.predicted_peak_vram_gb:.1f} GB"


class OomGuard:
    """``guard(fn)`` runs ``fn`` for a job; see the module's docstring. ``notes`` collects what was done, for the
    job's results; ``progress`` shows the retry."""

    def __init__(self, models, notes: list, progress: Callable):
        self.models, self.notes, self.progress = models, notes, progress

    def __call__(self, fn: Callable):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raised
            if not is_oom(exc):
                raise
            first = _first_line(exc)
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        old_limit, new_limit = self._tighten()
        was = f"{old_limit:g} GB" if old_limit is not None else "no limit"
        after = self.models.pipe.plan if self.models.pipe is not None else None
        what = plan_words(after) if after is not None else "a tighter plan"
        self.notes.append(f"The GPU ran out of memory ({first}; limit: {was}). The engine freed what it held, "
                          f"re-planned for a {new_limit:g} GB limit ({what}) and ran it again. The VRAM limit stays "
                          f"at {new_limit:g} GB: raise it under Models & memory if this was a one-off.")
        self.progress(0, 1, f"Out of GPU memory: re-planned for {new_limit:g} GB, retrying")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            second = _first_line(exc)
        self.models.free_after_oom()
        suggest = max(0.5, round(new_limit * 0.6, 1))
        raise EngineError(
            f"Out of GPU memory twice: with {was} and again after re-planning for {new_limit:g} GB ({second}). "
            f"Try a lower limit (--vram-limit {suggest:g}, or under Models & memory), a smaller image size, or close "
            f"other programs that use the GPU. The engine is still loaded and ready.")

    def _tighten(self) -> tuple:
        """Free what is held and re-plan for 0.6 x the smaller of the limit and the predicted peak; (old, new)."""
        from engine import memory
        models = self.models
        models.free_after_oom()
        before = models.pipe.plan if models.pipe is not None else None
        old_limit = models.vram_limit
        if before is not None:
            new_limit = memory.tighter(before)
        else:
            new_limit = max(0.5, round((old_limit or models.device_total_gb() or 8.0) * 0.6, 2))
        models.vram_limit = new_limit
        if models.pipe is not None:
            models.replan()
        return old_limit, new_limit
