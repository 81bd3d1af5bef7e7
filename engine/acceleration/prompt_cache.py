"""The prompt-embedding cache across jobs: same prompt, same text encoder (files and storage dtype), same tokenizer
-> the text encoder's output again, without running it.

FLUX.1's ``PromptEncoder`` (``engine.text_encoding``) keys its entries this way in the pipeline's ``prompt_cache``;
FLUX.2's pipeline uses ``cached`` with the same kind of key in its own ``prompt_cache``. The studio hands every
pipeline it builds one shared cache (``studio.models.ModelCache.prompt_cache``), so switching model, size or seed
re-encodes nothing; keys never use object identity alone, so a cache shared between pipelines cannot hand one
encoder's output to another.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

CACHE_SIZE = 16


def encoder_identity(module) -> tuple:
    """What makes an encoder's output: its files (stable across pipelines) and how its weights are stored."""
    files = tuple(str(f) for f in getattr(module, "flux_studio_files", ()))
    dtype = next((str(p.dtype) for p in module.parameters()), "")
    return (files or id(module), dtype)


def cached(cache: OrderedDict, key: tuple, make: Callable, size: int = CACHE_SIZE):
    """``cache[key]``, made by ``make()`` when missing (least recently used entries beyond ``size`` dropped)."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
    return value
