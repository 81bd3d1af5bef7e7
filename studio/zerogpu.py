"""ZeroGPU: the studio's image jobs through ``spaces.GPU``, on a ZeroGPU Space only. The rest of the studio does not
know: ``Engine.generate`` hands each validated job to ``run_job``, which runs it at once unless ``install`` was
called (launch.py does, on a ZeroGPU Space).

What the ``spaces`` package (0.51) does, and what that asks of us:

- Off ZeroGPU (SPACES_ZERO_GPU unset), ``spaces.GPU(fn)`` is ``fn`` itself.
- On ZeroGPU, importing ``spaces`` patches torch in this process: CUDA looks present, and what is moved to "cuda"
  before the page is served stays in RAM, is packed once at ``launch`` and copied onto the GPU lent for each call.
  So the default model is loaded at start (``preload``), never inside the GPU function (that would read the files
  into GPU time on every call).
- A decorated call is scheduled for ``duration`` seconds (a number, or a function of the call's arguments:
  ``job_seconds``), then runs in a *forked worker process* that holds the GPU (reused by later calls while it is
  idle). Its arguments and its return value cross the process boundary pickled: no callbacks, no locks. So the GPU
  function takes the validated job (``ValidJob``: plain data, images and all, checked here against the visitor's
  limits and files), the outputs folder it saves into and a call number, finds the engine as the fork inherited it,
  and answers with plain data; an EngineError or a cancel comes back as data too (spaces turns any other exception
  into "ZeroGPU worker error" and loses its message).
- Progress, previews and cancel cross through a ``Channel`` made before the first fork (a pipe from the worker, an
  event to it), relayed in this process by a thread while the call runs.
- The quota is charged to the visitor of the gradio request in the calling thread's context (spaces reads gradio's
  ``LocalContext.request``); the tabs' jobs run in such a context. A job from the studio's queue runs in the queue's
  worker thread, outside any request: spaces then schedules it without a visitor token (the Space's own quota).
- No ``torch.compile`` there: each call may start a fresh worker, which would compile again inside the GPU time, and
  the transformer's compiled code cannot be handed to the worker (``check_speed`` refuses it).

No torch and no gradio at import; ``spaces`` is imported by ``install`` only.
"""
from __future__ import annotations

import contextvars
import itertools
import logging
import multiprocessing
import os
import threading
from typing import Callable, Optional

from engine.errors import EngineError, JobCancelled

log = logging.getLogger("flux_studio")

MIN_SECONDS, MAX_SECONDS = 20, 240     # what one call may ask for (MAX: FLUX_STUDIO_GPU_MAX_S)
OVERHEAD_S = 15                        # a worker's start, the weights onto the GPU, decoding and saving the images
# Seconds per transformer pass at 1024x1024 on a ZeroGPU slice (an H200 MIG 3g, ~half an H100), by the variant name's
# words; FLUX.1 (12B) otherwise. Rough on purpose: the duration is a reservation, and a job that overruns is cut off.
STEP_SECONDS = (("random-demo", 0.05), ("flux.2-dev", 1.6), ("klein-9b", 0.45), ("klein-4b", 0.25),
                ("klein", 0.35), ("nexus-gen", 0.6), ("step1x", 0.6), ("flex.2", 0.45))
FLUX1_STEP_SECONDS = 0.55
COMPILE_REFUSED = ("torch.compile is off on a ZeroGPU Space: each job may run in a fresh GPU worker process, which "
                   "would compile again inside the job's GPU time. Leave Compile unticked here (it helps on a GPU of "
                   "your own: python launch.py).")


def max_seconds() -> int:
    try:
        return max(MIN_SECONDS, int(os.environ.get("FLUX_STUDIO_GPU_MAX_S", MAX_SECONDS)))
    except ValueError:
        return MAX_SECONDS


def _number(value, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def job_seconds(job, *_args, **_kwargs) -> int:
    """The GPU time to reserve for a validated job (the ``duration`` of ``spaces.GPU``, called with the GPU
    function's arguments): images x steps x passes (two with true CFG; a hires fix's refining pass counts as one more
    at its size) x the variant's time per pass at 1 MP x the size's factor (pixels, and attention growing faster than
    them), plus the start; from MIN_SECONDS to max_seconds()."""
    settings = job.settings
    steps = max(1.0, _number(settings.num_inference_steps, 30))
    images = max(1.0, _number(settings.num_images, 1))
    megapixels = _number(job.width, 1024) * _number(job.height, 1024) / 1024 ** 2
    scale = max([_number(getattr(state, "hires_scale", 1.0), 1.0) for state in job.states.values()], default=1.0)
    size_factor = sum(mp * (0.8 + 0.2 * mp) for mp in {megapixels, megapixels * scale * scale})
    passes = 2 if _number(settings.cfg_scale, 1.0) > 1 else 1
    name = str(getattr(job.variant, "name", ""))
    words = name.lower()
    per_step = next((s for key, s in STEP_SECONDS if key in words), FLUX1_STEP_SECONDS)
    seconds = OVERHEAD_S + images * steps * passes * per_step * size_factor
    return int(min(max_seconds(), max(MIN_SECONDS, round(seconds))))


class Channel:
    """Progress and previews from the GPU worker, cancel to it: made before spaces forks its first worker, so that
    every worker inherits both ends (a worker is reused across calls: the messages carry the call's number)."""

    def __init__(self):
        context = multiprocessing.get_context("fork")
        self.inbox, self.outbox = context.Pipe(duplex=False)    # the worker sends on outbox, we read inbox
        self.cancel = context.Event()
        self._send_lock = threading.Lock()

    def send(self, call: int, kind: str, payload) -> None:
        with self._send_lock:
            self.outbox.send((call, kind, payload))

    def relay(self, call: int, progress: Callable, preview: Optional[Callable], check_cancel: Callable,
              done: threading.Event) -> None:
        """(In this process, while call ``call`` runs.) Hand its messages to ``progress`` / ``preview``; a cancel
        of the job (``check_cancel`` raises) sets the event the worker checks after every step."""
        while True:
            finished = done.is_set()
            try:
                check_cancel()
            except Exception:  # noqa: BLE001 - JobCancelled: the worker stops at its next step
                self.cancel.set()
            while self.inbox.poll(0 if finished else 0.1):
                number, kind, payload = self.inbox.recv()
                if number != call:
                    continue                   # left over from an earlier call
                try:        # a failing callback must not stop the relay: the worker would block on a full pipe
                    if kind == "progress":
                        progress(*payload)
                    elif kind == "preview" and preview is not None:
                        preview(payload)
                except Exception:  # noqa: BLE001 - logged; the job goes on
                    log.exception("ZeroGPU: the job's %s callback failed", kind)
            if finished:
                return


class _Installed:
    engine = None
    channel: Optional[Channel] = None
    gpu_call: Optional[Callable] = None
    variant: Optional[str] = None      # the model loaded at start (``preload``): the one real model jobs may use
    calls = itertools.count(1)


KEEP_MODEL_FILES = "/flux-studio-keeps-its-model-files/*"     # a pattern no file matches: spaces prunes nothing


def import_spaces() -> None:
    """Import ``spaces`` before torch is (on ZeroGPU it patches torch and refuses to start after CUDA was touched).
    Unless the Space's owner set ZEROGPU_MMAP_AUTOPRUNE_PATTERN, the model files are kept: spaces otherwise deletes
    the Hub cache's files whose memory-mapped weights it packed at launch (the engine maps them: engine.loading), and
    the studio still reads them afterwards (the catalogue sees which models are present, each image's recipe
    fingerprints its model files). That costs the disk twice the model's size (the files and spaces' pack)."""
    os.environ.setdefault("ZEROGPU_MMAP_AUTOPRUNE_PATTERN", KEEP_MODEL_FILES)
    import spaces  # noqa: F401


def install(engine) -> None:
    """Route ``engine``'s jobs through ``spaces.GPU(duration=job_seconds)`` (a no-op wrapper off ZeroGPU, where the
    job still goes through the channel: what the tests run). Call before the page is served."""
    import spaces
    _Installed.engine = engine
    _Installed.channel = Channel()
    _Installed.gpu_call = spaces.GPU(duration=job_seconds)(gpu_job)


def uninstall() -> None:
    _Installed.engine = _Installed.channel = _Installed.gpu_call = _Installed.variant = None


def installed() -> bool:
    return _Installed.gpu_call is not None


def installed_channel() -> Optional[Channel]:
    """The channel ``install`` made (for a test that plays spaces' worker)."""
    return _Installed.channel


def preload(engine, progress: Optional[Callable] = None) -> str:
    """Load the default variant's models now, before the page is served: on ZeroGPU what is placed on "cuda" then
    is packed at launch and copied onto each lent GPU. Returns the variant's name."""
    name = engine.default_variant()
    engine.pipeline(name, progress)
    _Installed.variant = name
    return name


def check_variant(variant) -> None:
    """On ZeroGPU only the model loaded at start runs (and the tiny demos): another one would be read from disk, or
    downloaded, inside the lent GPU time, every time a fresh worker starts."""
    if _Installed.variant is None or variant.name == _Installed.variant or variant.demo:
        return
    raise EngineError(f"This ZeroGPU Space runs {_Installed.variant} only: ZeroGPU lends a GPU for one job at a time, "
                      f"and {variant.name} would be read from disk inside that time at every start. Choose "
                      f"{_Installed.variant}, or run the studio on a GPU of your own (a Space with a dedicated GPU, or "
                      f"python launch.py) to switch models.")


def check_speed(values: dict) -> None:
    """On ZeroGPU, refuse turning torch.compile on (the other speed settings apply inside the GPU worker)."""
    if not installed() or not values.get("compile"):
        return
    from engine.acceleration.settings import SettingError, check_compile
    if check_compile(values["compile"]):
        raise SettingError(COMPILE_REFUSED)


def run_job(engine, valid, outputs, progress: Callable, check_cancel: Callable,
            preview: Optional[Callable] = None) -> list:
    """One validated job saving into ``outputs`` (``Engine.generate`` holds the job lock): here and now, or through
    the GPU function when ``install`` was called for this engine."""
    if _Installed.gpu_call is None or _Installed.engine is not engine:
        return engine.run_valid(valid, progress, check_cancel, preview, outputs=outputs)
    check_variant(valid.variant)
    channel, call = _Installed.channel, next(_Installed.calls)
    channel.cancel.clear()
    done = threading.Event()
    relay = threading.Thread(target=contextvars.copy_context().run, name="flux-studio-zerogpu-relay", daemon=True,
                             args=(channel.relay, call, progress, preview, check_cancel, done))
    relay.start()
    try:
        outcome = _Installed.gpu_call(valid, str(outputs), call, preview is not None)
    finally:
        done.set()
        relay.join()
        channel.cancel.clear()         # the next call starts uncancelled (a worker may be reused)
    if "cancelled" in outcome:
        raise JobCancelled(outcome["cancelled"])
    if "error" in outcome:
        raise EngineError(outcome["error"])
    return outcome["results"]


def gpu_job(valid, outputs: str, call: int, previews: bool) -> dict:
    """The GPU function (in spaces' worker process on ZeroGPU): the job on the engine the worker inherited, its
    progress and previews sent through the channel. Returns {"results": [...]} or {"cancelled" / "error": message}."""
    engine, channel = _Installed.engine, _Installed.channel

    def progress(done, total, message):
        channel.send(call, "progress", (int(done), int(total or 0), str(message)))

    def check_cancel():
        if channel.cancel.is_set():
            raise JobCancelled("Cancelled; memory released.")

    def preview(path):
        channel.send(call, "preview", str(path))

    try:
        return {"results": engine.run_valid(valid, progress, check_cancel, preview if previews else None,
                                            outputs=outputs)}
    except JobCancelled as exc:
        return {"cancelled": str(exc) or "Cancelled."}
    except EngineError as exc:
        return {"error": str(exc)}
