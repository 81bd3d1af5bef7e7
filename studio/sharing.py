"""A studio several people use at once: who is asking, where their images go, and the limits on one job.

A studio is *shared* when it is served through a ``--share`` link, behind ``--auth``, or on a Hugging Face Space
(``SPACE_ID`` set). Then each person has their own part of the outputs folder, and sees, lists and may name only
the images in it:

- with ``--auth``, the login name: ``<outputs>/<user>/<day>/...`` (the same history from any browser);
- otherwise, the visitor's browser: ``<outputs>/visitors/<id>/<day>/...``, where ``<id>`` is a hash of a random id
  the browser keeps (``gr.BrowserState``, the queue panel's), so a reload keeps one's history. The page binds that id
  to its Gradio session when it loads (``bind``); a caller with no bound id (an API client) is its session.

A studio on one person's machine (no link, no login, no Space) is not shared: one outputs folder, as always, and
whoever uses it sees everything.

Who is asking comes from the web app (``identify``, a function it sets: this package imports no gradio), or from
``acting_as`` (the queue's worker runs a job as the person who queued it). ``None`` is the person at the console
(a script, a test): the whole outputs folder.

Limits (``Limits``) cap one job's image size, steps and number of images; they come from ``--max-pixels``,
``--max-steps``, ``--max-batch`` or, on a Space (no command line), the ``FLUX_STUDIO_MAX_PIXELS``,
``FLUX_STUDIO_MAX_STEPS``, ``FLUX_STUDIO_MAX_BATCH`` variables. No limits unless given. Plain Python.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import pathlib
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping, Optional

from engine.errors import EngineError

VISITORS = "visitors"              # <outputs>/visitors/<hash of the browser's id>/
USER_PREFIX, VISITOR_PREFIX = "user:", "visitor:"
RESERVED = {VISITORS, "layouts"}   # folders of the outputs root that no user folder may take
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
DAY_LIKE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
REMEMBER_SESSIONS = 10_000         # page sessions whose browser id is kept (the oldest are forgotten)
# (flag, environment variable, what it limits)
LIMIT_SOURCES = {"max_pixels": ("--max-pixels", "FLUX_STUDIO_MAX_PIXELS"),
                 "max_steps": ("--max-steps", "FLUX_STUDIO_MAX_STEPS"),
                 "max_batch": ("--max-batch", "FLUX_STUDIO_MAX_BATCH")}

_acting_as: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("flux_studio_viewer", default=None)


def user_key(name: str) -> str:
    return USER_PREFIX + str(name)


def visitor_key(browser_id: str) -> str:
    return VISITOR_PREFIX + str(browser_id)


def _digest(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


def folder_name(viewer: str) -> pathlib.PurePosixPath:
    """Where a viewer's images go, relative to the outputs folder: ``<user>`` for a login (a name that is no plain
    folder name, or that a studio folder or a day folder takes, gets a hash after it), ``visitors/<hash>`` for a
    browser (the hash, not the id itself: the id is what proves a browser is that visitor)."""
    if viewer.startswith(USER_PREFIX):
        name = viewer[len(USER_PREFIX):]
        if SAFE_NAME.match(name) and name.lower() not in RESERVED and not DAY_LIKE.match(name):
            return pathlib.PurePosixPath(name)
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:24].strip("_-") or "user"
        return pathlib.PurePosixPath(f"{slug}-{_digest(name, 10)}")
    return pathlib.PurePosixPath(VISITORS, _digest(viewer, 24))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one job may ask for in a shared studio (None: no limit)."""

    max_pixels: Optional[int] = None     # per image, width x height (after a hires fix's upscale)
    max_steps: Optional[int] = None
    max_batch: Optional[int] = None      # images per job

    def __post_init__(self):
        for name in LIMIT_SOURCES:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                flag, env = LIMIT_SOURCES[name]
                raise EngineError(f"{flag} (or {env}) must be a whole number from 1 up, got {value!r}.")

    @classmethod
    def from_options(cls, max_pixels=None, max_steps=None, max_batch=None,
                     env: Optional[Mapping[str, str]] = None) -> "Limits":
        """The limits from the command line, each falling back to its ``FLUX_STUDIO_MAX_*`` variable in ``env``."""
        given = {"max_pixels": max_pixels, "max_steps": max_steps, "max_batch": max_batch}
        values = {}
        for name, (flag, var) in LIMIT_SOURCES.items():
            value = given[name]
            if value is None and env and str(env.get(var) or "").strip():
                text = str(env[var]).strip().replace("_", "")
                try:
                    value = int(text)
                except ValueError:
                    raise EngineError(f"{var} must be a whole number from 1 up, got {env[var]!r}.") from None
            values[name] = value
        return cls(**values)

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in LIMIT_SOURCES)

    def describe(self) -> str:
        """"This studio allows up to 1 MP, 30 steps, 2 images per job." ("" without limits)."""
        parts = []
        if self.max_pixels is not None:
            parts.append(f"{megapixels(self.max_pixels)} MP")
        if self.max_steps is not None:
            parts.append(f"{self.max_steps} steps")
        if self.max_batch is not None:
            parts.append(f"{self.max_batch} image{'s' if self.max_batch != 1 else ''}")
        return f"This studio allows up to {', '.join(parts)} per job." if parts else ""

    def check(self, width: int, height: int, steps: int, images: int, scale: float = 1.0) -> None:
        """An EngineError naming the limit and how it is set when a job asks for more."""
        if self.max_steps is not None and steps > self.max_steps:
            raise EngineError(f"{steps} steps is more than this studio allows: at most {self.max_steps} steps "
                              f"(set with {self._source('max_steps')}). Lower the steps.")
        if self.max_batch is not None and images > self.max_batch:
            raise EngineError(f"{images} images is more than this studio allows: at most {self.max_batch} per job "
                              f"(set with {self._source('max_batch')}). Ask for fewer images.")
        if self.max_pixels is not None:
            w, h = (round(width * scale), round(height * scale)) if scale and scale > 1 else (width, height)
            if w * h > self.max_pixels:
                made = f"{w}×{h}" + (f" (after the {scale:g}× hires fix)" if scale and scale > 1 else "")
                raise EngineError(f"{made} is {megapixels(w * h)} MP, more than this studio allows: at most "
                                  f"{megapixels(self.max_pixels)} MP ({self.max_pixels:,} pixels, set with "
                                  f"{self._source('max_pixels')}). Choose a smaller size.")

    @staticmethod
    def _source(name: str) -> str:
        flag, env = LIMIT_SOURCES[name]
        return f"{flag} / {env}"


def megapixels(pixels: int) -> str:
    """1048576 -> '1', 1500000 -> '1.43' (MP as 2**20 pixels, the sizes' usual unit: 1024×1024 is 1 MP)."""
    return f"{pixels / 2 ** 20:.2f}".rstrip("0").rstrip(".")


class Sharing:
    """Whether the studio is shared, who is asking, where their images go, and the limits on one job."""

    def __init__(self, shared: bool = False, by_login: bool = False, limits: Optional[Limits] = None,
                 reason: str = ""):
        self.shared = bool(shared)
        self.by_login = bool(by_login)
        self.limits = limits or Limits()
        self.reason = reason                 # "--share", "--auth", "a Space" (for the page's note)
        self.identify: Callable[[], Optional[str]] = lambda: None    # set by the web app
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_launch(cls, share: bool = False, auth: bool = False, space_id: Optional[str] = None,
                   max_pixels=None, max_steps=None, max_batch=None,
                   env: Optional[Mapping[str, str]] = None) -> "Sharing":
        """What launch.py starts: shared with --share, --auth or on a Space (``SPACE_ID``); limits from its flags or
        the ``FLUX_STUDIO_MAX_*`` variables."""
        reasons = [r for r, on in (("--share", share), ("--auth", auth), ("a Space", bool(space_id))) if on]
        limits = Limits.from_options(max_pixels, max_steps, max_batch, env=env)
        return cls(shared=bool(reasons), by_login=bool(auth), limits=limits, reason=", ".join(reasons))

    # ------------------------------------------------------------------------------------------- who asks
    def bind(self, session: Optional[str], browser_id: Optional[str]) -> None:
        """The page of ``session`` belongs to the browser ``browser_id`` (told by the page when it loads)."""
        if not session or not browser_id:
            return
        with self._lock:
            self._sessions[str(session)] = str(browser_id)
            self._sessions.move_to_end(str(session))
            while len(self._sessions) > REMEMBER_SESSIONS:
                self._sessions.popitem(last=False)

    def browser_of(self, session: Optional[str]) -> Optional[str]:
        with self._lock:
            return self._sessions.get(str(session)) if session else None

    def viewer_for(self, username: Optional[str], session: Optional[str]) -> Optional[str]:
        """The viewer key of a web request: its login with --auth, else its browser's id (or its session)."""
        if not self.shared:
            return None
        if self.by_login and username:
            return user_key(username)
        browser = self.browser_of(session)
        if browser:
            return visitor_key(browser)
        return visitor_key("session-" + session) if session else None

    def viewer(self) -> Optional[str]:
        """Who is asking now: None when the studio is not shared, or for the person at the console."""
        if not self.shared:
            return None
        return _acting_as.get() or self.identify()

    @contextlib.contextmanager
    def acting_as(self, viewer: Optional[str]) -> Iterator[None]:
        """Run the body as ``viewer`` (the queue's worker runs a job as the person who queued it)."""
        token = _acting_as.set(viewer)
        try:
            yield
        finally:
            _acting_as.reset(token)

    # --------------------------------------------------------------------------------------------- folders
    def folder(self, outputs_dir: Any, viewer: Optional[str]) -> pathlib.Path:
        """A viewer's outputs folder (the whole folder for None or when not shared)."""
        root = pathlib.Path(outputs_dir)
        if not self.shared or not viewer:
            return root
        return root / folder_name(viewer)

    def describe(self) -> str:
        return self.limits.describe()
