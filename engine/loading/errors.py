"""The one error the loader raises, and the words it uses for the model roles."""
from __future__ import annotations

from .. import roles as role_table

try:  # the engine's base class for errors shown to people, when present
    from engine.errors import EngineError as _Base
except Exception:  # pragma: no cover - the loader also works on its own
    _Base = Exception

# The roles the loader reads from a plain file (FLUX.1's four components) and how a person calls each
# ("... this slot expects <name>"): both from the Role table.
ROLES = role_table.BASE_ROLES
ROLE_NAMES = {r: role_table.ROLES[r].loader_name for r in ROLES}
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


def check_fits(tensors: dict, want: dict, left_out: set = frozenset()) -> None:
    """``tensors`` (the file's, by the model's names) match the model's ``want`` one to one and shape-exact (but
    ``left_out``, which the model fills itself); else a ModelFileError naming what is missing, extra or misshapen."""
    missing = set(want) - set(tensors) - set(left_out)
    unexpected = set(tensors) - set(want)
    wrong = [f"{k} {list(tensors[k].shape)} (model: {list(want[k].shape)})"
             for k in tensors if k in want and tuple(tensors[k].shape) != tuple(want[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model needs are missing ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) have no place in the model ({few(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) have the wrong shape ({few(wrong, 3)})")
    if problems:
        raise ModelFileError("the file does not fit the model inferred from it: " + "; ".join(problems) + ".")
