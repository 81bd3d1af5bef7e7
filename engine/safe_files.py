"""Writing the studio's files so that a crash never leaves a torn one, and reading back only whole ones.

Every file is written under a hidden temporary name in its folder, flushed to disk (fsync), then renamed into place:
a reader (or a restore after a crash) sees the old file, or no file, or the whole new one, never a truncated one.
``exclusive=True`` never replaces an existing file: the finished temporary file is hard-linked to the name, which
fails when the name is taken (the caller then picks another name).

Pillow only (no torch): the studio's services and the tabs may use it.
"""
from __future__ import annotations

import errno
import io
import os
import pathlib
import uuid
from typing import Any, Optional

from PIL import Image

# Filesystems without hard links (FAT, some network shares) answer link() with one of these.
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _temporary(path: pathlib.Path) -> pathlib.Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _sync_folder(folder: pathlib.Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Any, data: bytes, exclusive: bool = False) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically (temporary name, fsync, rename). With ``exclusive`` an existing file is
    never replaced: FileExistsError is raised instead."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)
    return path


def _link_exclusive(tmp: pathlib.Path, path: pathlib.Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: claim the name with an exclusive create, then rename the whole file over the claim.
        with open(path, "xb"):
            pass
        os.replace(tmp, path)


def write_text(path: Any, text: str, exclusive: bool = False) -> pathlib.Path:
    return write_bytes(path, text.encode("utf-8"), exclusive=exclusive)


def image_bytes(image: Image.Image, format: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def save_image(image: Image.Image, path: Any, format: str = "PNG", exclusive: bool = False,
               **params: Any) -> pathlib.Path:
    """``image.save(path)``, atomically (see ``write_bytes``)."""
    return write_bytes(path, image_bytes(image, format, **params), exclusive=exclusive)


def copy_file(source: Any, target: Any, exclusive: bool = True) -> pathlib.Path:
    """Copy a file atomically (read whole, then ``write_bytes``); by default never over an existing file."""
    return write_bytes(target, pathlib.Path(source).read_bytes(), exclusive=exclusive)


def whole_image(path: Any) -> Optional[pathlib.Path]:
    """``path`` when it is a complete image file (Pillow can decode all of it), else None: a sidecar torn by a crash
    of an older version, or damaged since, is not offered back."""
    path = pathlib.Path(str(path))
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im.load()
    except Exception:  # noqa: BLE001 - any decoder error (truncated, not an image, a bomb): not whole
        return None
    return path
