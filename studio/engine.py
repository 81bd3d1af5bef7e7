"""The studio's engine: one process-wide object that owns the loaded models and runs one job at a time.

Tabs call it with plain dicts and get dicts and file paths back; it never imports gradio, and torch only when a job
first needs it. It is a front: the work is done by

- ``catalogue``   the variants on offer, which are in the models folder, the demos;
- ``models``      the loaded components and the pipeline, placed for the VRAM limit (``ModelCache``);
- ``requests``    a request dict checked and read into a ``ValidJob``, through the ``features``;
- ``runner``      one job: pipeline, features, images, recipes (out-of-memory recovery in ``oom``);
- ``recipes``     the settings stored in each image, the input copies beside it, restore;
- ``features/``   one module per kind of extra input, and the page helpers of their tabs;
- ``queue``       jobs waiting in order, moved and cancelled one by one, run by a worker of their own.

Every path that arrives from a page goes through ``files`` (``FileAccess``) before anything opens it: the methods
taking paths say which with ``@checks_paths``. A job belongs to its owner (``Job``); ``cancel(owner)`` stops that
owner's jobs at their next step.

A shared studio (``sharing``: a --share link, --auth, a Space) saves each person's images in their own part of the
outputs folder, lets a request name only those of the outputs folder's files, and holds every job to its limits
(``studio.sharing``); a studio on one person's machine is not shared and works on the whole folder.
"""
from __future__ import annotations

import pathlib
import threading
from typing import Callable, Optional

from engine import safe_files
from engine.downloads import models_base_path
from engine.errors import EngineError, JobCancelled
from engine.sizes import normalize_size

from . import recipes, requests, runner, zerogpu
from .catalogue import Catalogue
from .features import FEATURES
from .features import edit, eligen_page, inpaint_page
from .file_access import FileAccess, checks_paths
from .jobs import Job, JobBoard
from .models import ModelCache
from .queue import JobQueue
from .sharing import Sharing
from .work_files import WorkFolder

REQUEST_DEFAULTS = requests.request_defaults(FEATURES)   # every request key but "variant", with its default
Progress = Callable[[int, int, str], None]


class Engine:
    def __init__(self, models_dir=None, device: Optional[str] = None, vram_limit: Optional[float] = None,
                 demo: bool = False, outputs_dir=None, allow_dirs=(), features=FEATURES, defer_demo: bool = False,
                 sharing: Optional[Sharing] = None):
        self.models_dir = pathlib.Path(models_dir or models_base_path())
        self.outputs_dir = pathlib.Path(outputs_dir or "outputs")
        # Several people at once (a link, a login, a Space), or one person's studio (not shared): see sharing.
        self.sharing = sharing or Sharing()
        # The folders whose files a request may name (the web app adds its upload folder): see file_access.
        self.files = FileAccess([self.models_dir, self.outputs_dir, *allow_dirs])
        self.work = WorkFolder(self.outputs_dir)   # scratch files for the page; what dead studios left is removed
        if self.sharing.shared:    # of the outputs, each person names only their own images (and scratch files)
            self.files.make_private(self.outputs_dir, self._own_outputs, open_names=(self.work.parent.name,))
        self.demo = demo
        self.features = tuple(features)
        self.catalogue = Catalogue(self.models_dir, demo, defer_demo)   # deferred: see prepare_in_background
        self.models = ModelCache(self.catalogue, device, vram_limit)
        self._lock = threading.Lock()      # one job (or re-plan) at a time; a training launch waits on it too
        self._jobs = JobBoard()            # running and waiting jobs, so that a cancel finds its owner's
        self._job: Optional[Job] = None    # the job running now (its cancel flag is checked after every step)
        self._training = None              # studio.training.TrainingJobs, made on first use (the Train tab)
        self._previews = None              # engine.preview.PreviewCache, made by the first job that shows previews
        self.executor = None               # where jobs run when not here: studio.serving (launch.py --serve ray)
        # Queued jobs, run in order (its worker starts with the first), each as the person who queued it.
        # As many queued jobs at once as the engine runs (Ray Serve replicas, ``executor.slots``; else one).
        self.queue = JobQueue(self.generate, self.validate, who=self.viewer,
                              workers=lambda: getattr(self.executor, "slots", 1))

    # ------------------------------------------------------------------------------------------- catalogue
    def variants(self) -> list[dict]:
        return self.catalogue.variants()

    def default_variant(self) -> str:
        return self.catalogue.default_variant()

    @property
    def demo_only(self) -> bool:
        return self.catalogue.demo_only

    @staticmethod
    def size_rule(width, height) -> dict:
        w, h, note = normalize_size(width, height)
        return {"width": w, "height": h, "note": note}

    def loras(self) -> list[dict]:
        """LoRA files under ``<models>/loras/``: [{"name" (relative to that folder), "path", "size_mb"}]."""
        from engine.lora import library
        return library.list_loras(self.models_dir)

    # ---------------------------------------------------------------------------------------------- models
    @property
    def device(self) -> Optional[str]:
        return self.models.device

    @property
    def vram_limit(self) -> Optional[float]:
        return self.models.vram_limit

    @property
    def _pipe(self):
        """The loaded pipeline, or None (for tests that look inside)."""
        return self.models.pipe

    @property
    def _modules(self) -> dict:
        """The loaded components by (role, files, dtype) (for tests that look inside)."""
        return self.models.modules

    def prepare_in_background(self) -> Optional[threading.Thread]:
        """Write the demo model a deferred start left for later (``defer_demo``), in a thread: launch.py serves the
        page first; a job that comes sooner waits for it (``Catalogue.ensure_demo``'s lock) and says so."""
        if not self.catalogue.demo_pending:
            return None

        def write():
            try:
                self.catalogue.ensure_demo()
                if self.demo:
                    self.write_demo_loras()
            except Exception:  # noqa: BLE001 - the first job writes it again and reports the error itself
                pass

        thread = threading.Thread(target=write, name="flux-studio-demo-writer", daemon=True)
        thread.start()
        return thread

    def write_demo_loras(self) -> None:
        """In demo mode, two random FLUX.1 LoRAs that cover every layer of the demo transformer, in
        ``<models>/loras/demo/`` (once: a folder already there is left alone), so the LoRA picker's options (encode
        as prompt, LoRA Fusion) can be tried without real LoRAs."""
        from engine.lora.names import lora_dir
        folder = lora_dir(self.models_dir) / "demo"
        if not folder.exists():
            from engine.demo.flux1_loras import write_flux1_demo_loras
            write_flux1_demo_loras(folder)

    def pipeline(self, variant_name: str, progress: Optional[Progress] = None):
        """The pipeline for a variant, loading only the components that differ from what is loaded."""
        return self.models.pipeline(variant_name, progress)

    def memory_plan(self) -> dict:
        """Where each component lives and the predicted peaks (``ModelCache.memory_plan``): the loaded pipeline's
        plan, or before anything is loaded the default model's, made from its files' headers."""
        return self.models.memory_plan(self.default_variant())

    def speed_settings(self) -> dict:
        """The speed settings the next job uses: {"compile", "attention_backend", "fp8_compute", "step_cache"}."""
        return self.models.acceleration.as_dict()

    def set_acceleration(self, **values) -> dict:
        """Change the speed settings (None: unchanged; an attention backend this machine lacks is refused, naming
        the ones it has); the next job applies them and records them in its recipe. Returns ``speed_settings()``."""
        self._owner_only("The speed settings")
        zerogpu.check_speed(values)        # no torch.compile on a ZeroGPU Space
        self.models.set_acceleration(**values)
        return self.speed_settings()

    def _owner_only(self, what: str) -> None:
        """Settings that apply to every job are not changed from a shared studio's page (any visitor could)."""
        if self.sharing.shared:
            raise EngineError(f"{what} applies to everyone's jobs on this shared studio, so it is set by whoever "
                              f"starts it (launch.py --vram-limit, and the defaults for speed), not from the page.")

    def speed_notes(self) -> dict:
        """What each speed setting does on this machine (``ModelCache.speed_notes``)."""
        return self.models.speed_notes()

    def set_vram_limit(self, gb: Optional[float]) -> dict:
        """Change the VRAM limit (GB; None = no limit) without restarting: re-plans and re-places the loaded models
        at once (waiting for a running job to finish). Returns the new ``memory_plan()``."""
        self._owner_only("The VRAM limit")
        with self._lock:
            self.models.set_vram_limit(gb)
        return self.memory_plan()

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the running image job (if any) to end; False when it still runs."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def release_models(self) -> None:
        """Unload the pipeline and every cached module (so a training run gets the device's memory)."""
        with self._lock:
            self.models.release()

    @property
    def training(self):
        """The studio's training runs (start, follow, stop, resume), sharing this engine's device and VRAM."""
        if self._training is None:
            from .training import TrainingJobs
            self._training = TrainingJobs(self)
        return self._training

    # ---------------------------------------------------------------------------------------------- people
    def viewer(self) -> Optional[str]:
        """Who is asking (``sharing.viewer``): None when the studio is not shared, or for the person at the console."""
        return self.sharing.viewer()

    def viewer_outputs(self, viewer: Optional[str] = None) -> pathlib.Path:
        """The outputs folder of ``viewer`` (default: who is asking): the whole folder unless the studio is shared."""
        return self.sharing.folder(self.outputs_dir, viewer if viewer is not None else self.viewer())

    def _own_outputs(self) -> Optional[pathlib.Path]:
        """The asking person's outputs folder; None for the person at the console (the whole folder)."""
        viewer = self.viewer()
        return self.viewer_outputs(viewer) if viewer else None

    # ------------------------------------------------------------------------------------------------ jobs
    def validate(self, request: dict) -> requests.ValidJob:
        """The request checked and read (its files too) into a ``ValidJob``; an EngineError says what is wrong (a
        shared studio's limits included)."""
        return requests.validate(request, self.features, self.files, self.default_variant, self.models_dir,
                                 limits=self.sharing.limits)

    def generate(self, request: dict, progress: Optional[Progress] = None, job: Optional[Job] = None,
                 preview: Optional[Callable[[str], None]] = None, viewer: Optional[str] = None) -> list[dict]:
        """Run one image job. ``job`` says whose it is (``cancel(owner)`` stops only that owner's jobs) and carries
        its cancel flag; a job cancelled before or while it runs raises JobCancelled and saves nothing more.
        ``preview(path)`` is called every few steps with a small picture of the image being made (a file under
        outputs/.work; see ``engine.preview``). ``viewer``: whose job it is in a shared studio (default: who is
        asking), which decides where its images are saved and which files it may name.
        Returns [{"path", "seed", "width", "height", "recipe", "info", "notes" (when any)}], one per image."""
        if viewer is not None:
            with self.sharing.acting_as(viewer):
                return self.generate(request, progress, job, preview)
        self._refuse_while_training()
        valid = self.validate(request)
        outputs = self.viewer_outputs()
        progress = progress or (lambda done, total, message: None)
        job = job or Job()
        self._jobs.add(job)
        try:
            if self.executor is not None:      # a replica of the Ray Serve deployment runs it (studio.serving)
                return self.executor.run(valid, outputs, progress, job, preview)
            with self._lock:
                self._job = job
                finished = False
                try:
                    self._check_cancel()       # cancelled while it waited for the engine
                    results = zerogpu.run_job(self, valid, outputs, progress, self._check_cancel, preview)
                    finished = True
                    return results
                finally:
                    self._job = None
                    release_after_job(finished)
        finally:
            self._jobs.remove(job)

    def run_valid(self, valid: requests.ValidJob, progress: Progress, check_cancel: Callable[[], None],
                  preview: Optional[Callable[[str], None]] = None, outputs=None) -> list[dict]:
        """Run one validated job on the loaded models now, saving into ``outputs`` (default: the outputs folder):
        ``generate`` calls it under the job lock through ``zerogpu.run_job``; on a ZeroGPU Space, spaces' GPU worker
        does."""
        return runner.run(valid, self.features, self.models, outputs or self.outputs_dir, progress, check_cancel,
                          self._preview_stream(preview))

    def _preview_stream(self, send: Optional[Callable[[str], None]]):
        """pipeline -> its preview_callback, whose pictures are saved under outputs/.work and handed to ``send``
        (JPEG: small and quick to write, and never mistaken for a result, which is always a PNG)."""
        if send is None:
            return None

        def save(image, done, total):
            path = safe_files.save_image(image, self.work.new_path("preview", ".jpg"), format="JPEG", quality=85)
            self.work.prune()
            send(str(path))

        def for_pipeline(pipe):
            from engine.preview import PreviewCache, PreviewStream
            if self._previews is None:
                self._previews = PreviewCache()
            _, decode = self._previews.decoder(pipe, self.models_dir)
            return PreviewStream(decode, save)
        return for_pipeline

    def cancel(self, owner: Optional[str] = None) -> int:
        """Stop ``owner``'s jobs after their current step (every job when ``owner`` is None: a script owns the
        whole engine). Returns how many jobs were told to stop; another owner's job runs on."""
        return self._jobs.cancel(owner)

    def _check_cancel(self) -> None:
        if self._job is not None and self._job.cancelled:
            raise JobCancelled("Cancelled; memory released.")

    def _refuse_while_training(self) -> None:
        """Training and generation share the VRAM budget: while a run trains, image jobs are refused, said why."""
        if self._training is not None:
            message = self._training.busy_message()
            if message:
                raise EngineError(message)

    # -------------------------------------------------------------------------------------------- recipes
    @checks_paths(path="the image to read")
    def read_recipe(self, path) -> Optional[dict]:
        """Settings to restore from a PNG made here (or by A1111/Forge), with the request's keys; the image inputs
        point at the copies saved beside it (those still whole)."""
        return recipes.restore(path, requests.BASE_KEYS, self.features)

    # --------------------------------------------------------------------------------- Generate helpers
    def identity_status(self) -> Optional[str]:
        """None when InfiniteYou can read real identity photos; else what to install and where the face models go
        (the demo model reads photos with a stand-in and needs neither)."""
        from .features.infiniteyou import setup_status
        return setup_status(self.models_dir)

    # --------------------------------------------------------------------------------------- Edit helpers
    @checks_paths(image_path="the image to edit")
    def edit_size(self, image_path, width=None, height=None, megapixels=1.0) -> dict:
        """The output size of an edit of ``image_path`` (see ``features.edit.edit_size``)."""
        return edit.edit_size(image_path, width, height, megapixels)

    @checks_paths(result_path="the result")
    def before_after(self, result_path) -> Optional[tuple[str, str]]:
        """(before, after) for a before/after view of an edit; None when the result has no whole input copy."""
        return edit.before_after(result_path, self.work)

    # -------------------------------------------------------------------------------- Inpaint & Control helpers
    @checks_paths(image_path="the image to inpaint")
    def inpaint_size(self, image_path) -> dict:
        """The output size of an inpainting job on this image: its own ({"width", "height", "note"})."""
        return inpaint_page.inpaint_size(image_path)

    @checks_paths(image_path="the image to inpaint", layer_path="the painted mask", extra_mask_path="the mask")
    def mask_preview(self, image_path, layer_path=None, extra_mask_path=None, invert=False, extra_key=None) -> dict:
        """The mask an inpainting job will use and a preview of it (see ``inpaint_page.mask_preview``)."""
        return inpaint_page.mask_preview(image_path, layer_path, extra_mask_path, self.work, invert=bool(invert),
                                         extra_key=extra_key)

    @checks_paths(image_path="the image to extend", mask_path="the mask")
    def outpaint_canvas(self, image_path, mask_path=None, left=0, right=0, top=0, bottom=0) -> dict:
        """Extend an image's canvas for outpainting: {"image", "mask", "note"} (files under outputs/.work; the mask
        covers the new area and what ``mask_path`` covered)."""
        return inpaint_page.outpaint_canvas(image_path, mask_path, self.work, left=left, right=right, top=top,
                                            bottom=bottom)

    @staticmethod
    def preprocessors() -> list[dict]:
        """The control-image preprocessors: [{"name", "label", "mode"}] (engine.preprocess)."""
        return inpaint_page.preprocessors()

    @checks_paths(image_path="the control image")
    def preview_control(self, image_path, preprocessor) -> dict:
        """A preprocessor's output for an image, as a file under outputs/.work: {"path"}."""
        return inpaint_page.preview_control(image_path, preprocessor, self.work)

    def controlnet_choices(self, variant_name) -> list[dict]:
        """The ControlNets offered as control beside a variant: [{"name", "label", "kind", "available"}]."""
        return inpaint_page.controlnet_choices(variant_name, self.catalogue)

    @checks_paths(path="the image to restore")
    def restore_inputs(self, path) -> dict:
        """The image inputs of a result made here, for a tab to put back: {"inpaint_image", "inpaint_mask" (as
        painted), "mask_invert", "mask_feather", "controls": [{"image", ...}], "image_key"} (what was found)."""
        found = self.read_recipe(path) if path else None
        return inpaint_page.inputs_to_restore(found) if found else {}

    # ------------------------------------------------------------------------------------------ EliGen helpers
    def eligen_info(self) -> dict:
        """What the EliGen tab offers: {"variants": [{"name", "label", "demo"}], "colours", "max_entities", "note"}."""
        return eligen_page.info(self.variants(), self.demo_only)

    @checks_paths(image_path="the input image")
    def eligen_canvas(self, width, height, image_path=None) -> dict:
        """A canvas for the EliGen tab: {"image" (file under outputs/.work), "width", "height", "note"}."""
        return eligen_page.canvas(self.work, width, height, image_path)

    @checks_paths(canvas_path="the canvas", layer_path="the painted layer")
    def eligen_layout(self, canvas_path, layer_path=None, kept=None, prompts=(), labels=True) -> dict:
        """The entity masks of the page's state and their preview (see ``eligen_page.layout``; the kept masks'
        files are checked there): {"masks", "preview", "width", "height"}."""
        return eligen_page.layout(self.work, self.files, canvas_path, layer_path, kept, prompts, labels)

    @checks_paths(mask_files="an entity mask")
    def eligen_save_layout(self, width, height, prompt, prompts, mask_files) -> str:
        """A layout zip (DiffSynth-Studio's EliGen folder format) under outputs/layouts/, never overwriting."""
        return eligen_page.save_layout(self.viewer_outputs(), width, height, prompt, prompts, mask_files)

    @checks_paths(path="the layout file")
    def eligen_load_layout(self, path) -> dict:
        """A saved layout for the page: {"width", "height", "prompt", "prompts", "masks" (files), "canvas"}."""
        return eligen_page.load_layout(self.work, path)

    @checks_paths(path="the image to restore")
    def eligen_restore(self, path) -> dict:
        """The entities of an image made in the EliGen tab (see ``eligen_page.restore``); {} when it has none."""
        return eligen_page.restore(self.work, path, recipes.read_recipe(path) if path else None)


_engine: Optional[Engine] = None
_engine_lock = threading.Lock()


def configure_engine(**kwargs) -> Engine:
    """Create (or replace) the process-wide engine with these settings; see ``Engine``."""
    global _engine
    with _engine_lock:
        _engine = Engine(**kwargs)
        return _engine


def get_engine() -> Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine


def release_after_job(finished: bool) -> None:
    """Give a job's memory back. A finished job's own reference cycles are young objects, so collecting the young
    generations frees them; a full pass walks every object in the process (gradio's included: ~0.4 s on a small
    machine, per job) and runs only after a failed or cancelled job, whose traceback holds the frames and their
    tensors. Loading or unloading models collects fully on its own (``studio.models``)."""
    import gc

    from engine.memory.place import release_memory
    gc.collect(2 if not finished else 1)
    release_memory(collect=False)

