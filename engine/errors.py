"""Errors the engine raises for people, not for programmers: the message names the problem and the fix."""


class EngineError(Exception):
    """A request the engine cannot carry out; str(e) is shown to the person as is."""


class JobCancelled(EngineError):
    """The running job was cancelled at a step boundary; its memory has been released."""

    def __init__(self, message="Cancelled."):
        super().__init__(message)


class ModelNotFoundError(EngineError):
    """A model file is neither in the models folder nor downloadable right now."""
