"""The speed settings of a pipeline, checked, without torch (the studio reads and writes them at import time).

- ``compile``: False (off), True (regional ``torch.compile`` of the transformer's blocks where it helps: CUDA; on
  the CPU it is left off with a note), or the name of a ``torch.compile`` backend ("inductor", "aot_eager",
  "eager"), which forces it on any device (tests use "aot_eager": inductor on a CPU takes minutes to compile).
- ``attention_backend``: "auto" (diffusers' default: torch's SDPA picks its kernel), "sdpa" (torch's SDPA, the
  same), "flash", "cudnn", "efficient" (one SDPA kernel forced; "flash" prefers the flash-attn package).
- ``fp8_compute``: fp8 matmuls through torchao's float8 (GPUs of compute capability 8.9 and up).
- ``step_cache``: the first-block step cache's threshold (diffusers' FirstBlockCache); 0 = off. A per-call
  option of the pipelines (``pipe(..., step_cache=0.1)``); the value here is what a call without one uses.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import EngineError

ATTENTION_CHOICES = ("auto", "sdpa", "flash", "cudnn", "efficient")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
MAX_STEP_CACHE = 1.0     # a relative change of the first block's residual: above 1 every step would be skipped


class SettingError(EngineError, ValueError):
    """A speed setting that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class AccelerationSettings:
    compile: object = False
    attention_backend: str = "auto"
    fp8_compute: bool = False
    step_cache: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def is_default(self) -> bool:
        return self == AccelerationSettings()

    def changed(self, **values) -> "AccelerationSettings":
        """A copy with the values that are not None, each checked."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise SettingError(f"Unknown speed settings {sorted(unknown)}: use compile, attention_backend, "
                               f"fp8_compute, step_cache.")
        checks = {"compile": check_compile, "attention_backend": check_attention, "fp8_compute": check_flag,
                  "step_cache": check_step_cache}
        return replace(self, **{k: checks[k](v) for k, v in given.items()})


def check_compile(value):
    """False / True, or a torch.compile backend's name (forces compiling on any device)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "off", "false", "no"):
            return False
        if text in ("on", "true", "yes", "auto"):
            return True
        if text in COMPILE_BACKENDS:
            return text
    raise SettingError(f"compile must be True, False or a torch.compile backend ({', '.join(COMPILE_BACKENDS)}), "
                       f"got {value!r:.40}.")


def check_attention(value) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text == "native":
        text = "sdpa"
    if text not in ATTENTION_CHOICES:
        raise SettingError(f"Unknown attention backend {value!r:.40}: use one of {', '.join(ATTENTION_CHOICES)}.")
    return text


def check_flag(value, name: str = "fp8_compute") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise SettingError(f"{name} must be True or False, got {value!r:.40}.")


def check_step_cache(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not 0 <= number <= MAX_STEP_CACHE:
        raise SettingError(f"step_cache is the first-block cache's threshold, a number from 0 (off) to "
                           f"{MAX_STEP_CACHE:g} (0.05-0.15 is usual), got {value!r:.40}.")
    return number
