"""Attention backend choice through diffusers' attention dispatcher (``diffusers.models.attention_dispatch``).

FLUX.1's and FLUX.2's transformers (diffusers' ``FluxTransformer2DModel`` / ``Flux2Transformer2DModel``) compute
attention with ``dispatch_attention_fn``; their processors keep ``_attention_backend = None``, so the dispatcher's
*active* backend decides, and so do the engine's own processors that call it (IP-Adapter's). The choice is applied
with diffusers' ``attention_backend`` context around a pipeline call (nothing global is left changed, unlike
``ModelMixin.set_attention_backend``, which also sets the process-wide default).

Which kernels exist depends on the machine: each choice is probed once per (device, dtype) with a tiny attention
call, and an unavailable one is refused naming what this machine has. On a CPU, torch has its flash kernel and the
math kernel, not cuDNN's or the memory-efficient one. The flash kernels take no attention mask: EliGen's regional
masks need "auto" / "sdpa".
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .settings import ATTENTION_CHOICES, SettingError

_probed: dict = {}


def candidates(choice: str) -> list:
    """The dispatcher's backends that serve a choice, preferred first ("auto": none, the dispatcher's default)."""
    from diffusers.models.attention_dispatch import AttentionBackendName as A
    return {"auto": [], "sdpa": [A.NATIVE], "flash": [A.FLASH, A._NATIVE_FLASH], "cudnn": [A._NATIVE_CUDNN],
            "efficient": [A._NATIVE_EFFICIENT]}[choice]


def _works(backend, device: torch.device, dtype: torch.dtype) -> bool:
    """One tiny attention call through the backend on the device: the only sure test that its kernel exists."""
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements, dispatch_attention_fn
    try:
        _check_attention_backend_requirements(backend)
        q = torch.randn(1, 8, 2, 64, device=device, dtype=dtype)      # (batch, tokens, heads, head width)
        dispatch_attention_fn(q, q, q, backend=backend)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not on this machine
        return False


def _resolve(choice: str, device: torch.device, dtype: torch.dtype):
    key = (choice, str(device), str(dtype))
    if key not in _probed:
        _probed[key] = next((b for b in candidates(choice) if _works(b, device, dtype)), None)
    return _probed[key]


def backend_for(choice: str, device, dtype):
    """The dispatcher's backend for a choice on this device and dtype (None for "auto"), or SettingError naming the
    choices this machine has."""
    device = torch.device(device)
    if choice == "auto":
        return None
    backend = _resolve(choice, device, dtype)
    if backend is None:
        raise SettingError(f"The attention backend {choice!r} is not available on this machine ({device}, "
                           f"{str(dtype).replace('torch.', '')}); it has: {', '.join(available(device, dtype))}. "
                           f"Use one of those.")
    return backend


def available(device, dtype) -> list:
    """The choices that work on this device and dtype ("auto" always)."""
    device = torch.device(device)
    return ["auto"] + [c for c in ATTENTION_CHOICES[1:] if _resolve(c, device, dtype) is not None]


@contextmanager
def attention_context(backend):
    """The dispatcher's active backend for the duration (None: unchanged)."""
    if backend is None:
        with nullcontext():
            yield
        return
    from diffusers.models.attention_dispatch import attention_backend
    with attention_backend(backend):
        yield
