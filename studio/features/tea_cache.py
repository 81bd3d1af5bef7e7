"""The step cache, DiffSynth-Studio's TeaCache (``pipe(..., tea_cache_l1_thresh=...)``, ``engine.acceleration.
tea_cache``): while the first block's input barely changes from one step to the next, the transformer's blocks are
skipped and the last computed step's residual reused.

Request key: ``tea_cache_l1_thresh`` (0 or none: off; 0.2-0.6 usual, higher skips more steps and changes the image
more). Every image tab has the setting; the recipe keeps it, and the result's notes say how many steps were skipped.
FLUX.1 transformers only (the seed's rescale polynomial was fitted on FLUX.1-dev).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .base import Feature, number_in

MAX_THRESHOLD = 2.0         # beyond it nearly every step is skipped: the image is the first step's


@dataclasses.dataclass(frozen=True)
class TeaCacheInputs:
    tea_cache_l1_thresh: Optional[float] = None


@dataclasses.dataclass
class TeaCacheState:
    threshold: float


def check_threshold(value) -> float:
    return number_in(value, 0.0, MAX_THRESHOLD, "The step cache (TeaCache) threshold must be a number from 0 (off) to "
                     f"{MAX_THRESHOLD:g} (0.2-0.6 is usual), got {{value}}.")


class TeaCacheFeature(Feature):
    name = "tea_cache"
    Inputs = TeaCacheInputs

    def validate(self, inputs: TeaCacheInputs, job) -> Optional[TeaCacheState]:
        if inputs.tea_cache_l1_thresh in (None, ""):
            return None
        threshold = check_threshold(inputs.tea_cache_l1_thresh)
        return TeaCacheState(threshold) if threshold > 0 else None

    def pipe_kwargs(self, state: TeaCacheState, job, notes: list) -> dict:
        return {"tea_cache_l1_thresh": state.threshold}

    def recipe(self, state: TeaCacheState, job, copies) -> dict:
        return {"tea_cache_l1_thresh": state.threshold}

    def describe(self, recipe: dict) -> list:
        value = recipe.get("tea_cache_l1_thresh")
        if not value:
            return []
        skipped = recipe.get("steps_skipped")
        done = f", {skipped} of {recipe.get('num_inference_steps', '?')} steps skipped" if skipped is not None else ""
        return [f"Step cache (TeaCache): threshold {value:g}{done}"]


__all__ = ["TeaCacheFeature", "TeaCacheInputs", "check_threshold"]
