"""The studio's scratch files (mask previews, canvases, control previews) and their housekeeping.

The page shows these files while a person works, so they live a while, but none of them is a result: they go in
``<outputs>/.work/<process id>-<random>/`` (one folder per engine) and are cleaned up:

- at start, the folders of studio processes that are no longer running are removed (two studios may share one
  outputs folder: a live one's files are left alone);
- after each new file, files older than ``MAX_AGE_S`` are removed, and the oldest beyond ``MAX_FILES``.

Every file is written atomically (``safe_files``). Pillow only.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import threading
import time
import uuid
from typing import Any

from PIL import Image

from engine import safe_files

WORK = ".work"
MAX_AGE_S = 6 * 3600       # longer than a working session on one page; the page's file is then "gone, upload again"
MAX_FILES = 400            # ~1 MB a preview: bounded at a few hundred MB even when a page is left running for days


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True          # exists, owned by someone else
    return True


def stamp() -> str:
    """A unique part for a file name. Its random half is long enough that no one guesses it: in a shared studio
    every visitor may name the scratch folder's files in a request (``FileAccess.make_private``), but only the ones
    they were shown."""
    return time.strftime("%H%M%S") + "-" + uuid.uuid4().hex[:16]


class WorkFolder:
    """This process's scratch folder under ``<outputs>/.work/``."""

    def __init__(self, outputs_dir: Any, max_age_s: float = MAX_AGE_S, max_files: int = MAX_FILES):
        self.parent = pathlib.Path(outputs_dir) / WORK
        # One folder per engine (a process may hold several, tests do): <process id>-<random>.
        self.path = self.parent / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.max_age_s, self.max_files = max_age_s, max_files
        self._lock = threading.Lock()
        self.clean_stale()

    def clean_stale(self) -> None:
        """Remove what studio processes that are gone left behind (and loose files of older versions)."""
        if not self.parent.is_dir():
            return
        for entry in self.parent.iterdir():
            pid = entry.name.split("-", 1)[0]
            if entry.is_dir() and not entry.is_symlink() and pid.isdigit():
                if not _pid_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)

    def new_path(self, prefix: str, suffix: str = ".png") -> pathlib.Path:
        """A fresh, unused name in the folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / f"{prefix}-{stamp()}{suffix}"

    def save(self, image: Image.Image, prefix: str) -> pathlib.Path:
        """Save a PNG under a new name (atomically), then prune; returns its path."""
        path = safe_files.save_image(image, self.new_path(prefix))
        self.prune()
        return path

    def keep(self, image: Image.Image, name: str) -> pathlib.Path:
        """A PNG under a fixed name, written once and reused while it is whole (a plain canvas of one size)."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / name
        if safe_files.whole_image(path) is None:
            safe_files.save_image(image, path)
            self.prune()
        else:
            os.utime(path)       # in use again: not pruned as old
        return path

    def prune(self) -> None:
        with self._lock:
            try:
                files = [(p.stat().st_mtime, p) for p in self.path.iterdir() if p.is_file()]
            except OSError:
                return
            files.sort()
            cutoff = time.time() - self.max_age_s
            extra = max(0, len(files) - self.max_files)
            for k, (mtime, p) in enumerate(files):
                if k < extra or mtime < cutoff:
                    p.unlink(missing_ok=True)
