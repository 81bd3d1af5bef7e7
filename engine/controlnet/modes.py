"""The InstantX Union ControlNet's control modes: ``processor_id`` -> the row of ``controlnet_mode_embedder``.

The ids are the ones DiffSynth-Studio gives that file (and InstantX's model card): the embedder has 10 rows, 7 named.
"""
from __future__ import annotations

from typing import Optional, Union

from ..errors import EngineError

UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


def union_mode(processor_id: Optional[Union[str, int]], num_mode: int, what: str = "the Union ControlNet") -> int:
    """The mode row for ``processor_id`` (a name above, or the row number itself); a clear error otherwise."""
    names = ", ".join(UNION_MODES)
    if processor_id is None or processor_id == "":
        raise EngineError(f"{what} needs to know what the control image is: set processor_id to one of {names}.")
    if isinstance(processor_id, int) or (isinstance(processor_id, str) and processor_id.isdigit()):
        mode = int(processor_id)
    else:
        mode = UNION_MODES.get(str(processor_id).lower())
        if mode is None:
            raise EngineError(f"processor_id {processor_id!r} is not a mode of {what}; use one of {names}.")
    if not 0 <= mode < num_mode:
        raise EngineError(f"processor_id {processor_id!r}: {what} has modes 0..{num_mode - 1}.")
    return mode
