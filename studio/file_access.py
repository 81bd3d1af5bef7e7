"""Which files a request may name: the one rule for every path that arrives from the page or an API client.

A studio shared through a link (or reachable from a browser page on the same machine) must not read or write
whatever the server process can. A path in a request is accepted only when it lies, after resolving symbolic links,
inside a folder the person chose: the models folder, the outputs folder, the folder where the web app keeps uploads,
and any folder named on the command line with ``--allow-dir``. Anything else is refused with the same message
whether or not it exists, so a refusal tells nothing about the server's files.

Pure Python (no torch, no gradio). The studio's engine holds one ``FileAccess`` (``engine.files``) and checks every
path it is handed through it; the web app adds its upload folder when it starts.
"""
from __future__ import annotations

import functools
import inspect
import os
import pathlib
from typing import Any, Callable, Iterable, Optional

from engine.errors import EngineError

MAX_PATH_CHARS = 4096


def _resolved(path: Any) -> Optional[pathlib.Path]:
    """The absolute path with every link followed, or None for something that is no usable path."""
    if isinstance(path, pathlib.PurePath):
        text = str(path)
    elif isinstance(path, str):
        text = path
    else:
        return None
    if not text.strip() or "\x00" in text or len(text) > MAX_PATH_CHARS:
        return None
    try:
        return pathlib.Path(os.path.realpath(os.path.expanduser(text)))
    except (OSError, ValueError, RuntimeError):
        return None


class FileAccess:
    """The folders whose files a request may name, and the check."""

    def __init__(self, roots: Iterable[Any] = ()):
        self._roots: dict[pathlib.Path, str] = {}
        self._private: Optional[tuple[pathlib.Path, Callable[[], Optional[Any]], tuple]] = None
        for root in roots:
            self.allow(root)

    def make_private(self, folder: Any, own: Callable[[], Optional[Any]], open_names: Iterable[str] = ()) -> None:
        """In a shared studio, of the files inside ``folder`` (the outputs folder) a request may name only those in
        ``own()`` (the asking person's part of it; None: the whole folder, the person at the console) and in its
        subfolders ``open_names`` (the scratch files, whose names no one can guess). Others' images are refused
        with the same message as a file outside every allowed folder."""
        real = pathlib.Path(os.path.realpath(os.path.expanduser(str(folder))))
        self._private = (real, own, tuple(real / name for name in open_names))

    def allow(self, folder: Any, label: Optional[str] = None) -> None:
        """Let requests name files inside ``folder`` (created if missing, so that its real path is known)."""
        path = pathlib.Path(os.path.expanduser(str(folder)))
        path.mkdir(parents=True, exist_ok=True)
        real = pathlib.Path(os.path.realpath(path))
        self._roots.setdefault(real, label or str(path))

    @property
    def roots(self) -> list[pathlib.Path]:
        return list(self._roots)

    def contains(self, path: Any) -> bool:
        real = _resolved(path)
        if real is None or not any(real == root or real.is_relative_to(root) for root in self._roots):
            return False
        return self._private is None or self._own(real)

    def _own(self, real: pathlib.Path) -> bool:
        """Whether the asking person may name ``real`` under the private folder (anything outside it: yes)."""
        folder, own, open_folders = self._private
        if not real.is_relative_to(folder) or any(real.is_relative_to(f) for f in open_folders):
            return True
        mine = own()
        if mine is None:
            return True
        mine = pathlib.Path(os.path.realpath(os.path.expanduser(str(mine))))
        return real.is_relative_to(mine)

    def refusal(self, what: str) -> EngineError:
        """The one message for a path outside the allowed folders: the same whether or not the file exists."""
        what = what[:1].upper() + what[1:] if what else "That file"     # "Nexus-GenV2 ..." keeps its capitals
        return EngineError(
            f"{what} is not a file the studio may read: it accepts uploads "
            f"and files inside its own folders (models, outputs, or a folder given with --allow-dir). Upload the "
            f"file instead, or restart the studio with --allow-dir <its folder>.")

    def check(self, path: Any, what: str = "") -> pathlib.Path:
        """``path`` resolved, when a request may name it; an EngineError otherwise (see ``refusal``)."""
        if not self.contains(path):
            raise self.refusal(what)
        return _resolved(path)

    def check_all(self, paths: Any, what: str = "") -> None:
        """Check a path, or each path of a list / tuple (None and empty entries are skipped)."""
        for item in paths if isinstance(paths, (list, tuple)) else [paths]:
            if item is not None and item != "":
                self.check(item, what)


def checks_paths(**params: str) -> Callable:
    """Decorate an engine method whose named parameters carry paths from a request: each (a path, or a list of them)
    goes through ``self.files.check`` before the method runs. ``params`` maps a parameter's name to how a person
    calls that file, for the message: ``@checks_paths(image_path="the image")``."""

    def decorate(method: Callable) -> Callable:
        signature = inspect.signature(method)
        for name in params:
            if name not in signature.parameters:
                raise TypeError(f"{method.__qualname__} has no parameter {name!r}")

        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            for name, what in params.items():
                if name in bound.arguments:
                    self.files.check_all(bound.arguments[name], what)
            return method(self, *args, **kwargs)

        checked.checked_paths = dict(params)
        return checked

    return decorate
