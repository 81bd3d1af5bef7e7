"""The one error the loader raises, and the words it uses for the model roles."""
from __future__ import annotations

try:  # the engine's base class for errors shown to people, when present
    from engine.errors import EngineError as _Base
except Exception:  # pragma: no cover - the loader also works on its own
    _Base = Exception

# role -> how a person calls it ("... this slot expects <name>")
ROLE_NAMES = {
    "dit": "the FLUX transformer (DiT)",
    "vae": "the FLUX VAE",
    "text_encoder_1": "the CLIP-L text encoder (text_encoder)",
    "text_encoder_2": "the T5-XXL text encoder (text_encoder_2)",
}
ROLES = tuple(ROLE_NAMES)
ANY_MODEL = "a .safetensors weights file of a FLUX.1 component (transformer, VAE, CLIP-L or T5)"


class ModelFileError(_Base):
    """A model file is missing, corrupt, truncated, of the wrong kind or does not fit the model.

    ``str(e)`` names the file and what was expected, and says what to do. ``path`` is the file (or folder)
    concerned when known.
    """

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def few(items, n: int = 5) -> str:
    """'a, b, c and 7 more' for error messages."""
    items = sorted(map(str, items))
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
