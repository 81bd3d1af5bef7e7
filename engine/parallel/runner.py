"""One image from a context parallel pipeline: every rank makes the same call (same seed, so the same noise; the
same steps), and only rank 0 shows progress."""
from __future__ import annotations

from .group import ParallelError, shared_seed

REFUSED_CALL_OPTIONS = ("step_cache", "tea_cache_l1_thresh")


def _silent(iterable):
    return iterable


def generate_image(pipe, **call):
    """``pipe(**call)`` on every rank of a pipeline set up by ``enable_context_parallel``; returns the image (each
    rank decodes the same latents). A seed of None becomes rank 0's draw on every rank. The step caches are refused:
    each rank would decide on its own tokens whether to skip, and the ranks would part ways."""
    info = getattr(pipe, "context_parallel", None)
    if info is None:
        raise ParallelError("This pipeline does not run in parallel yet: call "
                            "engine.parallel.enable_context_parallel(pipe, ...) (or pipe.enable_context_parallel) "
                            "in every process first.")
    for name in REFUSED_CALL_OPTIONS:
        if call.get(name):
            raise ParallelError(f"{name} cannot run with context parallelism (each rank would decide to skip on its "
                                f"own tokens): leave it out.")
    if call.get("rand_device", "cpu") != "cpu" and call.get("seed") is None:
        raise ParallelError("With rand_device other than 'cpu', pass a seed so that every rank draws the same noise.")
    call["seed"] = shared_seed(call.get("seed"))
    if not info.ranks.is_main:
        call["progress_bar_cmd"] = _silent
        call.pop("preview_callback", None)
    return pipe(**call)
