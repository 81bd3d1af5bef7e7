"""The one error the LoRA code raises for people."""
from __future__ import annotations

try:  # the engine's base class for errors shown to people
    from engine.errors import EngineError as _Base
except Exception:  # pragma: no cover - the LoRA code also works on its own
    _Base = Exception


class LoraError(_Base):
    """A LoRA file cannot be read, is not a LoRA, or does not fit this FLUX transformer.

    ``str(e)`` names the file, the format found and what is wrong. ``path`` is the file when known.
    """

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def few(items, n: int = 3) -> str:
    """'a, b, c and 7 more' for messages (order kept)."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
