"""The studio's engine: one process-wide object that owns the loaded models and runs one job at a time.

Tabs call it with plain dicts and get file paths back; it never imports gradio. It resolves a variant's files
(downloading when allowed), keeps components that variants share (text encoders, VAE) when the person
switches model, caches prompt encodings, reports progress after every step, and stops at the next step when
cancelled, releasing memory.
"""
from __future__ import annotations

import pathlib
import random
from collections import OrderedDict
import threading
from typing import Callable, Optional

from studio import recipes as recipe_mod
from engine import registry
from engine.downloads import models_base_path
from engine.errors import EngineError, JobCancelled
from studio.file_access import FileAccess, checks_paths
from studio.work_files import WorkFolder
from engine import safe_files
from studio.jobs import Job, JobBoard
from engine.model_config import ModelConfig, _match_local
from engine.sizes import normalize_size

ENGINE_VERSION = "0.1.0"
REQUEST_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "width": 1024, "height": 1024, "num_inference_steps": 30,
    "embedded_guidance": 3.5, "cfg_scale": 1.0, "seed": -1, "num_images": 1, "t5_sequence_length": 512,
    "schedule": "seed", "sigma_shift": None, "rand_device": "cpu", "loras": (),
    # Editing: reference images (file paths) for the variants that take them (registry extra_inputs).
    "kontext_images": (), "step1x_reference_image": None,
    # Inpainting and control (engine.inpaint_jobs): the image, its mask (white / painted = repaint), control images.
    "inpaint_image": None, "inpaint_mask": None, "mask_invert": False, "mask_feather": 8, "controls": (),
    # EliGen (engine.eligen_jobs): regional prompts; input_image only with eligen_enable_inpaint.
    "eligen_entity_prompts": (), "eligen_entity_masks": (), "eligen_enable_on_negative": False,
    "eligen_enable_inpaint": False, "input_image": None,
}
# Request key -> how a person calls it, for messages.
EDIT_INPUTS = {"kontext_images": "Kontext reference images", "step1x_reference_image": "a Step1X-Edit reference image"}
# Every image input saved beside a result (``<name>.ref<i>.png``) so that the job can be restored and redone.
FILE_INPUTS = {**EDIT_INPUTS, "inpaint_image": "the image to inpaint", "inpaint_mask": "the inpainting mask"}
# File roles that are resolved (downloaded) but not loaded on their own, and the roles Step1X's loader reads.
NOT_LOADED = ("qwen_processor",)
STEP1X_ROLES = ("step1x_connector", "qwen_vl")
# Settings that hold lists (a path or JSON text is also taken where shown).
LIST_SETTINGS = {"loras": (list, tuple, str), "controls": (list, tuple), "eligen_entity_prompts": (list, tuple),
                 "eligen_entity_masks": (list, tuple), "kontext_images": (list, tuple, str, pathlib.Path)}
MAX_IMAGES = 16
MAX_STEPS = 200
Progress = Callable[[int, int, str], None]


class Engine:
    def __init__(self, models_dir=None, device: Optional[str] = None, vram_limit: Optional[float] = None,
                 demo: bool = False, outputs_dir=None, allow_dirs=()):
        self.models_dir = pathlib.Path(models_dir or models_base_path())
        self.outputs_dir = pathlib.Path(outputs_dir or "outputs")
        # The folders whose files a request may name (the web app adds its upload folder): see file_access.
        self.files = FileAccess([self.models_dir, self.outputs_dir, *allow_dirs])
        self.work = WorkFolder(self.outputs_dir)   # scratch files for the page; what dead studios left is removed
        self.device = device
        self.vram_limit = vram_limit
        self.demo = demo
        self._lock = threading.Lock()
        self._jobs = JobBoard()       # running and waiting jobs, so that a cancel finds its owner's
        self._job: Optional[Job] = None   # the job running now (its cancel flag is checked after every step)
        self._modules: dict = {}      # (role, files) -> loaded module, shared across variants
        self._tokenizers: dict = {}
        self._pipe = None
        self._pipe_variant = None
        self._prompt_cache = OrderedDict()
        self._demo_written = False
        self._training = None         # studio.training.TrainingJobs, made on first use (the Train tab)
        if demo or not any(self._available(v) for v in registry.studio_variants() if not v.demo):
            self._ensure_demo()

    # ------------------------------------------------------------------------------------ catalogue
    def _ensure_demo(self):
        from engine.demo import write_demo_model
        write_demo_model(self.models_dir)
        self._demo_written = True

    def _write_demo(self, variant):
        """Write a demo variant's random-weight files (the Step1X-Edit demo is written on first use: it takes a few
        seconds, and only the Edit tab needs it)."""
        ids = {f.model_id for f in variant.files}
        if registry.STEP1X_DEMO_ID in ids:
            from engine.demo import write_step1x_demo
            write_step1x_demo(self.models_dir)
            return
        self._ensure_demo()
        if registry.FILL_DEMO_ID in ids or registry.FLEX_DEMO_ID in ids:
            from engine.demo import write_inpaint_demos
            write_inpaint_demos(self.models_dir)

    def _available(self, variant) -> bool:
        return all(_match_local(self.models_dir / f.model_id, [f.pattern]) for f in variant.files)

    def variants(self) -> list[dict]:
        out = []
        for v in registry.studio_variants():
            # A demo's files are written on first use when the engine runs on demo weights: available to use.
            available = self._available(v) or (v.demo and self._demo_written)
            if v.demo and not available:
                continue
            out.append({"name": v.name, "label": v.label + ("" if available or v.demo else " (download)"),
                        "available": available, "downloadable": not v.demo, "demo": v.demo,
                        "description": v.description, "default_steps": v.default_steps,
                        "default_guidance": v.default_guidance, "extra_inputs": list(v.extra_inputs),
                        "default_cfg": v.default_cfg, "uses_guidance": v.uses_guidance, "inpaint": v.inpaint,
                        "control": v.control})
        return out

    def default_variant(self) -> str:
        variants = self.variants()
        if self.demo:
            return registry.get_variant(registry.DEMO_ID.split("/")[1]).name
        for v in variants:
            if v["available"] and not v["demo"]:
                return v["name"]
        return next((v["name"] for v in variants if v["demo"]), variants[0]["name"])

    @property
    def demo_only(self) -> bool:
        return not any(self._available(v) for v in registry.studio_variants() if not v.demo)

    @staticmethod
    def size_rule(width, height) -> dict:
        w, h, note = normalize_size(width, height)
        return {"width": w, "height": h, "note": note}

    @checks_paths(image_path="the image to edit")
    def edit_size(self, image_path, width=None, height=None, megapixels=1.0) -> dict:
        """The output size of an edit of ``image_path``: by default its aspect at about ``megapixels`` MP (multiples
        of 16, never cropped); an explicit width and/or height as asked. {"width", "height", "note"}; an image that
        cannot be edited (tiny, huge, not an image) is an EngineError naming it."""
        from engine.images import edit_output_size, load_user_image
        notes: list = []
        img = load_user_image(image_path, notes=notes)
        try:
            pixels = float(megapixels or 1.0) * 1024 * 1024
        except (TypeError, ValueError):
            raise EngineError(f"Megapixels must be a number, got {megapixels!r}.") from None
        w, h, note = edit_output_size(img.size, pixels, width=width or None, height=height or None)
        normalize_size(w, h)   # inside the engine's range
        return {"width": w, "height": h, "note": " ".join(notes + [note])}

    # ------------------------------------------------------------------------------------- models
    def _torch_dtype(self, variant):
        import torch
        device = self._device()
        if variant.demo and device.type == "cpu":
            return torch.float32       # the demo is tiny; fp32 is faster than bf16 on most CPUs
        return torch.bfloat16

    def _device(self):
        import torch
        from engine.pipeline import default_device
        return torch.device(self.device or default_device())

    def pipeline(self, variant_name: str, progress: Optional[Progress] = None):
        """The pipeline for a variant, loading only the components that differ from what is loaded."""
        from engine.loading import load_models
        from engine.pipeline import FluxImagePipeline
        from engine.text_encoding import load_tokenizer
        variant = registry.get_variant(variant_name)
        if self._pipe is not None and self._pipe_variant == variant.name:
            return self._pipe
        if variant.demo and not self._available(variant):
            if progress:
                progress(0, 1, f"Writing the {variant.label}")
            self._write_demo(variant)
        dtype = self._torch_dtype(variant)
        wanted, tokenizers = {}, {}
        for spec in variant.files:
            if progress:
                progress(0, 1, f"Preparing {spec.model_id}/{spec.pattern}")
            files = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(self.models_dir)
            key = (spec.role, tuple(str(f) for f in files), str(dtype))
            if spec.role in NOT_LOADED:
                continue          # present for another role's loader (Qwen's processor files)
            if spec.role.startswith("tokenizer"):
                if key not in self._tokenizers:
                    self._tokenizers[key] = load_tokenizer(files[0], "CLIP" if spec.role == "tokenizer_1" else "T5")
                tokenizers[spec.role] = self._tokenizers[key]
                continue
            wanted[key] = files
        # Drop what the new variant does not use before loading, so two transformers never sit in memory together
        # (RAM or VRAM): the old pipeline goes too (it references them), and what it had moved in goes back first.
        if self._pipe is not None:
            self._pipe.residency.offload_all()
        for key in list(self._modules):
            if key not in wanted:
                del self._modules[key]
        self._pipe = self._pipe_variant = None
        from engine.memory.place import release_memory
        release_memory()
        for key, files in wanted.items():
            if key not in self._modules:
                if progress:
                    progress(0, 1, f"Loading {key[0]} from {files[0].name}")
                if key[0] in STEP1X_ROLES:
                    from engine.step1x.load import load_role
                    self._modules[key] = load_role(key[0], files, torch_dtype=dtype, device="cpu")
                    continue
                loaded = load_models(files, torch_dtype=dtype, device="cpu", expect={str(f): key[0] for f in files})
                if key[0] not in loaded:
                    raise EngineError(f"{files[0]} does not hold the {key[0]} that {variant.name} needs.")
                self._modules[key] = loaded[key[0]]
        pipe = FluxImagePipeline(device=str(self._device()), torch_dtype=dtype)
        pipe.prompt_cache = self._prompt_cache       # prompt encodings survive a switch of model
        pipe.vram_limit, pipe.ram_limit = self.vram_limit, self._ram_limit()
        if progress:
            progress(0, 1, "Placing the models for the VRAM limit")
        pipe.set_models({key[0]: module for key, module in self._modules.items()})
        pipe.tokenizer_1, pipe.tokenizer_2 = tokenizers.get("tokenizer_1"), tokenizers.get("tokenizer_2")
        self._pipe, self._pipe_variant = pipe, variant.name
        return pipe

    # ------------------------------------------------------------------------------------- memory
    def _ram_limit(self) -> Optional[float]:
        """RAM the plan may use, in GB: ``ram_limit`` when set, else 90% of this machine's memory."""
        limit = getattr(self, "ram_limit", None)
        if limit is not None:
            return float(limit)
        try:
            import psutil
            return round(psutil.virtual_memory().total / 1024 ** 3 * 0.9, 1)
        except Exception:  # noqa: BLE001 - no psutil: no RAM budget
            return None

    def memory_plan(self) -> dict:
        """Where each component lives and the predicted peaks: ``engine.vram.Plan.as_dict()`` of the loaded
        pipeline, or, before anything is loaded, the plan for the default model made from its files' headers.

        {"device", "vram_limit_gb" (None = no limit), "components": [{"role", "label", "strategy", "storage_dtype",
        "compute_dtype", "vram_gb", "ram_gb", ...}], "predicted_peak_vram_gb", "predicted_peak_ram_gb", "notes",
        "budget_gb", "fits", "resolution", "variant", "loaded"}."""
        pipe, variant = self._pipe, self._pipe_variant
        if pipe is not None and pipe.plan is not None:
            out = pipe.plan.as_dict()
            out.update(variant=variant, loaded=True)
        else:
            out = self._header_plan(self.default_variant())
        out["device"] = str(self._device())
        out["vram_limit_gb"] = self.vram_limit
        return out

    def _header_plan(self, variant_name: str) -> dict:
        from engine import memory as vram
        variant = registry.get_variant(variant_name)
        files = {}
        try:
            for spec in variant.files:
                if not spec.role.startswith("tokenizer") and spec.role not in NOT_LOADED:
                    files[spec.role] = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(
                        self.models_dir, allow_download=False)
            sizes = vram.sizes_from_files(files)
        except Exception as exc:  # noqa: BLE001 - a missing or broken file is reported when the model loads
            return {"components": [], "predicted_peak_vram_gb": None, "predicted_peak_ram_gb": None,
                    "variant": variant.name, "loaded": False,
                    "notes": [f"{variant.label} is not in the models folder yet ({exc}); the plan is made when it "
                              f"is loaded."]}
        device = self._device()
        free = None
        if self.vram_limit is None and device.type == "cuda":
            import torch
            free_b, _total = torch.cuda.mem_get_info(device)
            free = (free_b + torch.cuda.memory_reserved(device)) / vram.GiB
        plan = vram.plan(sizes, str(device), self.vram_limit, self._ram_limit(),
                         compute_dtype=str(self._torch_dtype(variant)), free_vram_gb=free)
        out = plan.as_dict()
        out["notes"] = [f"{variant.label} is not loaded yet: planned from its files' headers."] + out["notes"]
        out.update(variant=variant.name, loaded=False)
        return out

    def set_vram_limit(self, gb: Optional[float]) -> dict:
        """Change the VRAM limit (GB; None = no limit) without restarting: re-plans and re-places the loaded models
        at once (waiting for a running job to finish). Returns the new ``memory_plan()``.

        Moving between resident / offloaded / streamed and bf16 -> fp8 happen in place; a component that must go
        back from fp8 to full precision is re-read from its file (its fp8 copy has lost the low bits)."""
        if gb is not None:
            try:
                gb = float(gb)
            except (TypeError, ValueError):
                raise EngineError(f"The VRAM limit must be a number of GB, got {gb!r}.") from None
            if not gb > 0 or gb != gb or gb == float("inf"):
                raise EngineError(f"The VRAM limit must be a positive number of GB (or none for no limit), got {gb}.")
        with self._lock:
            self.vram_limit = gb
            if self._pipe is not None:
                self._replan()
        return self.memory_plan()

    def _replan(self):
        """Re-plan the loaded pipeline for ``self.vram_limit`` and re-place its modules (no restart)."""
        from engine.memory import place as placement
        from engine.loading import load_models
        pipe = self._pipe
        pipe.vram_limit, pipe.ram_limit = self.vram_limit, self._ram_limit()
        pipe.residency.offload_all()
        installed = pipe.installed_models()
        preview = placement.plan_modules(installed, pipe._vram_fields, pipe.device, pipe.torch_dtype,
                                         pipe.vram_limit, pipe.ram_limit, *pipe.plan_size,
                                         text_tokens=pipe.plan_text_tokens)
        for role, entry in preview.entries.items():
            if not placement.needs_reload(installed[role], placement.from_entry(entry)):
                continue
            key = next((k for k, m in self._modules.items() if m is installed[role]), None)
            files = list(getattr(installed[role], "flux_studio_files", []))
            if key is None or not files:
                continue
            # Drop the fp8 copy before reading the file again: never both in memory.
            del self._modules[key]
            setattr(pipe, role, None)
            installed.pop(role)
            placement.release_memory()
            loaded = load_models(files, torch_dtype=pipe.torch_dtype, device="cpu", expect={f: role for f in files})
            self._modules[key] = installed[role] = loaded[role]
        pipe.set_models(installed)

    # --------------------------------------------------------------------------------------- jobs
    def validate(self, request: dict) -> dict:
        if not isinstance(request, dict):
            raise EngineError(f"A request is a dict of settings, got {type(request).__name__}.")
        unknown = set(request) - set(REQUEST_DEFAULTS) - {"variant"}
        if unknown:
            raise EngineError(f"Unknown settings {sorted(unknown)}.")
        for key, kinds in LIST_SETTINGS.items():
            if request.get(key) is not None and not isinstance(request[key], kinds):
                raise EngineError(f"{key} must be a list, got {type(request[key]).__name__}.")
        for what, path in request_paths(request):     # before anything is opened
            self.files.check(path, what)
        req = {**REQUEST_DEFAULTS, **{k: v for k, v in request.items() if v is not None}}
        variant = registry.get_variant(request.get("variant") or self.default_variant())
        if not variant.in_studio:
            raise EngineError(f"{variant.name} runs through the Python API (FluxImagePipeline) for now; the studio "
                              f"cannot load all of its files yet.")
        req["variant"] = variant.name
        self._validate_references(req, variant, request)
        from studio.features import inpaint as inpaint_jobs
        notes = req.setdefault("reference_notes", [])
        inpaint_jobs.validate(req, variant, notes)
        from studio.features import eligen as eligen_jobs
        eligen_jobs.validate(req, variant, notes)
        if req.get("_inpaint"):
            req["_references"]["inpaint_image"] = req["_inpaint"]["image"]
            req["_references"]["inpaint_mask"] = req["_inpaint"]["given_mask"]
        if not notes:
            del req["reference_notes"]
        req["width"], req["height"], req["size_note"] = normalize_size(req["width"], req["height"])
        try:
            req["num_inference_steps"] = int(req["num_inference_steps"])
            req["num_images"] = int(req["num_images"])
            req["seed"] = int(req["seed"])
            req["embedded_guidance"] = float(req["embedded_guidance"])
            req["cfg_scale"] = float(req["cfg_scale"])
        except (TypeError, ValueError) as exc:
            raise EngineError(f"A setting has the wrong type: {exc}.") from None
        if not 1 <= req["num_inference_steps"] <= MAX_STEPS:
            raise EngineError(f"Steps must be between 1 and {MAX_STEPS}, got {req['num_inference_steps']}.")
        if not 1 <= req["num_images"] <= MAX_IMAGES:
            raise EngineError(f"Number of images must be between 1 and {MAX_IMAGES}, got {req['num_images']}.")
        if req["cfg_scale"] <= 0:
            raise EngineError("CFG scale must be positive (1 turns true CFG off).")
        if req["seed"] < -1 or req["seed"] >= 2 ** 63:
            raise EngineError("Seed must be -1 (random) or a whole number from 0 up.")
        req["prompt"] = str(req["prompt"] or "")
        req["negative_prompt"] = str(req["negative_prompt"] or "")
        from engine.lora import library
        req["loras"] = library.normalize(req["loras"])
        for item in req["loras"]:
            library.resolve(self.models_dir, item["name"])     # a missing LoRA is refused before any work
        return req

    def _validate_references(self, req: dict, variant, request: dict) -> None:
        """Reference images for editing: the variant must take them; each is read (upright RGB) into
        ``req["_references"]`` (request key -> PIL image or list of them). Without a width/height in the request the
        output follows the first reference's aspect at about 1 MP."""
        from engine.images import edit_output_size, load_user_image
        kontext = req.get("kontext_images") or ()
        if isinstance(kontext, (str, pathlib.Path)):
            kontext = [kontext]
        kontext = [str(p) for p in kontext if p]
        step1x = req.get("step1x_reference_image") or None
        req["kontext_images"] = kontext
        req["step1x_reference_image"] = str(step1x) if step1x else None
        given = [k for k, v in (("kontext_images", kontext), ("step1x_reference_image", step1x)) if v]
        refs, notes, first = {}, [], None
        for key in given:
            if key not in variant.extra_inputs:
                takes = ", ".join(EDIT_INPUTS.get(k, k) for k in variant.extra_inputs) or "no reference images"
                editors = [v.name for v in registry.studio_variants() if key in v.extra_inputs]
                raise EngineError(f"{variant.name} does not take {EDIT_INPUTS[key]} ({key}); it takes {takes}. "
                                  f"Choose an editing model" + (f": {', '.join(editors)}." if editors else "."))
            paths = kontext if key == "kontext_images" else [step1x]
            images = [load_user_image(p, notes=notes) for p in paths]
            first = images[0] if first is None else first
            refs[key] = images if key == "kontext_images" else images[0]
        if first is not None and not (request.get("width") and request.get("height")):
            req["width"], req["height"], _ = edit_output_size(first.size, width=request.get("width") or None,
                                                              height=request.get("height") or None)
        req["_references"] = refs
        if notes:
            req["reference_notes"] = notes

    def loras(self) -> list[dict]:
        """LoRA files under ``<models>/loras/``: [{"name" (relative to that folder), "path", "size_mb"}]."""
        from engine.lora import library
        return library.list_loras(self.models_dir)

    @property
    def training(self):
        """The studio's training runs (start, follow, stop, resume), sharing this engine's device and VRAM."""
        if self._training is None:
            from studio.training import TrainingJobs
            self._training = TrainingJobs(self)
        return self._training

    def _refuse_while_training(self) -> None:
        """Training and generation share the VRAM budget: while a run trains, image jobs are refused, said why."""
        if self._training is not None:
            message = self._training.busy_message()
            if message:
                raise EngineError(message)

    def release_models(self) -> None:
        """Unload the pipeline and every cached module (so a training run gets the device's memory)."""
        with self._lock:
            self._pipe = None
            self._pipe_variant = None
            self._modules.clear()
            self._prompt_cache.clear()
            from engine.memory.place import release_memory
            release_memory()

    def generate(self, request: dict, progress: Optional[Progress] = None, job: Optional[Job] = None) -> list[dict]:
        """Run one image job. ``job`` says whose it is (``cancel(owner)`` stops only that owner's jobs) and carries
        its cancel flag; a job cancelled before or while it runs raises JobCancelled and saves nothing more."""
        self._refuse_while_training()
        req = self.validate(request)
        progress = progress or (lambda done, total, message: None)
        job = job or Job()
        self._jobs.add(job)
        try:
            with self._lock:
                self._job = job
                try:
                    self._check_cancel()       # cancelled while it waited for the engine
                    return self._run(req, progress)
                finally:
                    self._job = None
                    from engine.memory.place import release_memory
                    release_memory()
        finally:
            self._jobs.remove(job)

    def _run(self, req: dict, progress: Progress) -> list[dict]:
        notes: list[str] = []   # what the engine did to finish the job (out-of-memory recovery), shown with results
        pipe = self._oom_guard(lambda: self.pipeline(req["variant"], progress), notes, progress)
        # The references as the model gets them (the copies beside the result keep the input's own size).
        refs = {k: _fit_references(v, req["width"] * req["height"], notes)
                for k, v in req.get("_references", {}).items() if k in EDIT_INPUTS}
        tokens = _sequence_tokens(req, refs)
        if req["width"] * req["height"] > pipe.plan_size[0] * pipe.plan_size[1] or tokens > pipe.plan_text_tokens:
            # Room for this size's activations (and the sequence's extra tokens) from now on.
            if req["width"] * req["height"] > pipe.plan_size[0] * pipe.plan_size[1]:
                pipe.plan_size = (req["width"], req["height"])
            pipe.plan_text_tokens = max(pipe.plan_text_tokens, tokens)
            self._oom_guard(self._replan, notes, progress)
        from studio.features import inpaint as inpaint_jobs
        variant = registry.get_variant(req["variant"])
        specs = inpaint_jobs.controlnet_specs(req, variant)
        self._oom_guard(lambda: self._attach_controlnets(pipe, specs, progress), notes, progress)
        from studio.features import eligen as eligen_jobs
        extra = {**inpaint_jobs.pipe_kwargs(req, variant, specs), **eligen_jobs.pipe_kwargs(req)}
        from engine.lora import library
        side = []
        if req.get("_eligen"):       # the EliGen LoRA goes beside the person's LoRAs
            side.append({"name": eligen_jobs.ELIGEN_LORA_NAME, "weight": 1.0,
                         "path": eligen_jobs.lora_file(variant, self.models_dir)})
        loras = library.sync(pipe.dit, self.models_dir, req["loras"], extra=side)   # kept while unchanged
        self._check_cancel()
        steps, n = req["num_inference_steps"], req["num_images"]
        base_seed = random.randrange(2 ** 31) if req["seed"] == -1 else req["seed"]
        results = []
        for k in range(n):
            seed = base_seed + k

            def on_step(done, _total, k=k):
                progress(k * steps + done, n * steps, f"Image {k + 1}/{n}, step {done}/{steps}")
                self._check_cancel()

            def make(seed=seed, on_step=on_step):
                # Reference images go in only when given, so variants without them keep their signature.
                return pipe(**refs, **extra,
                            prompt=req["prompt"], negative_prompt=req["negative_prompt"], cfg_scale=req["cfg_scale"],
                            embedded_guidance=req["embedded_guidance"], t5_sequence_length=req["t5_sequence_length"],
                            height=req["height"], width=req["width"], seed=seed, rand_device=req["rand_device"],
                            sigma_shift=req["sigma_shift"], num_inference_steps=steps, schedule=req["schedule"],
                            progress_bar_cmd=lambda it: it, step_callback=on_step)

            image = inpaint_jobs.finish(req, self._oom_guard(make, notes, progress))
            self._check_cancel()        # cancelled during the last step: nothing is saved
            recipe = self._recipe(req, seed, pipe, loras)
            if (recipe["width"], recipe["height"]) != image.size:      # inpainting: the padding was cropped
                recipe.update(width=image.width, height=image.height,
                              work_size=[req["width"], req["height"]])
            path = recipe_mod.save_image(image, recipe, self.outputs_dir)
            self._save_references(req, path)
            eligen_jobs.save_copies(req, path)
            result = {"path": str(path), "seed": seed, "width": image.width, "height": image.height,
                      "recipe": recipe, "info": recipe_mod.a1111_parameters(recipe)}
            if notes or req.get("reference_notes"):
                result["notes"] = list(req.get("reference_notes") or []) + list(notes)
            results.append(result)
        return results

    # ------------------------------------------------------------------------------- out of memory
    def _oom_guard(self, fn: Callable, notes: list, progress: Progress):
        """Run ``fn``; on a GPU out-of-memory error free what is held, re-plan for 0.6 x the smaller of the limit
        and the predicted peak (the next strategies down), retry once and say so in ``notes``. A second
        out-of-memory error raises an EngineError naming the limit to try; the engine stays usable either way."""
        from engine import memory as vram
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raised
            if not _is_oom(exc):
                raise
            first = _oom_text(exc)
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        self._free_after_oom()
        before = self._pipe.plan if self._pipe is not None and self._pipe.plan is not None else None
        old_limit = self.vram_limit
        if before is not None:
            new_limit = vram.tighter(before)
        else:
            new_limit = max(0.5, round((old_limit or self._device_total_gb() or 8.0) * 0.6, 2))
        self.vram_limit = new_limit
        if self._pipe is not None:
            self._replan()
        after = self._pipe.plan if self._pipe is not None else None
        was = f"{old_limit:g} GB" if old_limit is not None else "no limit"
        what = _plan_words(after) if after is not None else "a tighter plan"
        notes.append(f"The GPU ran out of memory ({first}; limit: {was}). The engine freed what it held, re-planned "
                     f"for a {new_limit:g} GB limit ({what}) and ran it again. The VRAM limit stays at "
                     f"{new_limit:g} GB: raise it under Models & memory if this was a one-off.")
        progress(0, 1, f"Out of GPU memory: re-planned for {new_limit:g} GB, retrying")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if not _is_oom(exc):
                raise
            second = _oom_text(exc)
        self._free_after_oom()
        suggest = max(0.5, round(new_limit * 0.6, 1))
        raise EngineError(
            f"Out of GPU memory twice: with {was} and again after re-planning for {new_limit:g} GB ({second}). "
            f"Try a lower limit (--vram-limit {suggest:g}, or under Models & memory), a smaller image size, or close "
            f"other programs that use the GPU. The engine is still loaded and ready.")

    def _free_after_oom(self):
        from engine.memory.place import release_memory
        if self._pipe is not None:
            try:
                self._pipe.residency.offload_all()
            except Exception:  # noqa: BLE001 - moving out can itself fail half-way; the re-plan re-places all
                self._pipe.residency.forget()
        release_memory()

    def _device_total_gb(self) -> Optional[float]:
        import torch
        device = self._device()
        if device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.mem_get_info(device)[1] / 1024 ** 3
        return None

    def _check_cancel(self):
        if self._job is not None and self._job.cancelled:
            raise JobCancelled("Cancelled; memory released.")

    def cancel(self, owner: Optional[str] = None) -> int:
        """Stop ``owner``'s jobs after their current step (every job when ``owner`` is None: a script owns the
        whole engine). Returns how many jobs were told to stop; another owner's job runs on."""
        return self._jobs.cancel(owner)

    def _recipe(self, req: dict, seed: int, pipe, loras=()) -> dict:
        from engine.fingerprints import fingerprint
        files = {}
        for role, paths in pipe.model_files.items():
            files[role] = [{"file": _relative(p, self.models_dir), "fingerprint": fingerprint(p)} for p in paths]
        keep = ("variant", "prompt", "negative_prompt", "width", "height", "num_inference_steps", "embedded_guidance",
                "cfg_scale", "t5_sequence_length", "schedule", "sigma_shift", "rand_device")
        recipe = {k: req[k] for k in keep}
        if not registry.get_variant(req["variant"]).uses_guidance:
            del recipe["embedded_guidance"]      # no guidance embedder: the value did nothing
        recipe.update(seed=seed, model_files=files, app="FLUX Studio", engine_version=ENGINE_VERSION)
        if loras:
            recipe["loras"] = [dict(item, name=item["file"]) for item in loras]
        if req.get("size_note"):
            recipe["size_note"] = req["size_note"]
        for key, entries in self._reference_entries(req).items():
            recipe[key] = entries if key == "kontext_images" else entries[0]
        if req.get("_inpaint"):
            recipe.update(mask_invert=req["mask_invert"], mask_feather=req["mask_feather"])
        from studio.features import eligen as eligen_jobs
        recipe.update(eligen_jobs.recipe_entries(req))
        if req.get("_controls"):
            from engine.fingerprints import fingerprint
            recipe["controls"] = []
            for i, c in enumerate(req["_controls"]):
                entry = {k: c[k] for k in ("preprocessor", "controlnet", "scale", "start", "end") if k in c}
                entry.update(file=pathlib.Path(str(c["image"])).name, copy=f".ctl{i}.png",
                             size=list(c["_original"].size))
                try:
                    entry["fingerprint"] = fingerprint(c["image"])
                except OSError:
                    pass
                recipe["controls"].append(entry)
        return recipe

    @staticmethod
    def _reference_entries(req: dict) -> dict:
        """Recipe entries of the reference images: {key: [{"file", "fingerprint", "size", "copy"}]}. ``copy`` is the
        suffix of the RGB copy saved next to the result (``<result name><copy>``), so the edit can be redone."""
        from engine.fingerprints import fingerprint
        out, index = {}, 0
        for key in FILE_INPUTS:
            value = req.get(key)
            paths = list(value) if isinstance(value, (list, tuple)) else ([value] if value else [])
            images = req.get("_references", {}).get(key)
            images = images if isinstance(images, list) else [images]
            entries = []
            for path, img in zip(paths, images):
                entry = {"file": pathlib.Path(path).name, "copy": f".ref{index}.png"}
                try:
                    entry["fingerprint"] = fingerprint(path)
                except OSError:
                    pass
                if img is not None:
                    entry["size"] = [img.width, img.height]
                entries.append(entry)
                index += 1
            if entries:
                out[key] = entries
        return out

    @staticmethod
    def _save_references(req: dict, result_path) -> None:
        """The reference images as the model saw them (upright RGB), next to the result: <name>.ref0.png, ..."""
        index = 0
        result_path = pathlib.Path(result_path)
        for key in FILE_INPUTS:
            images = req.get("_references", {}).get(key)
            if images is None:
                continue
            for img in images if isinstance(images, list) else [images]:
                safe_files.save_image(img, result_path.with_name(result_path.stem + f".ref{index}.png"))
                index += 1
        for i, c in enumerate(req.get("_controls") or []):
            safe_files.save_image(c["_original"], result_path.with_name(result_path.stem + f".ctl{i}.png"))

    @checks_paths(result_path="the result")
    def before_after(self, result_path) -> Optional[tuple[str, str]]:
        """(before, after) for a before/after view of an edit: its input (the copy beside it) resized to the result's
        size, among the scratch files, and the result; None when the result has no whole input copy."""
        from PIL import Image
        before = _sidecar(result_path, ".ref0.png")
        if before is None:
            return None
        with Image.open(before) as ref, Image.open(result_path) as out:
            resized = ref.convert("RGB").resize(out.size, Image.Resampling.LANCZOS)
        return str(self.work.save(resized, "before")), str(result_path)

    @checks_paths(path="the image to read")
    def read_recipe(self, path) -> Optional[dict]:
        """Settings to restore from a PNG made here (or by A1111/Forge), with the request's keys."""
        found = recipe_mod.read_recipe(path)
        if not found:
            return None
        out = {k: found[k] for k in list(REQUEST_DEFAULTS) + ["variant"] if k in found}
        # Reference images: the copies saved next to the image (when they are still there).
        for key in FILE_INPUTS:
            if key not in out:
                continue
            entries = out[key] if isinstance(out[key], list) else [out[key]]
            paths = []
            for entry in entries:
                where = _sidecar(path, entry.get("copy")) if isinstance(entry, dict) else None
                if where is not None:
                    paths.append(str(where))
            if not paths:
                del out[key]
            else:
                out[key] = paths if key == "kontext_images" else paths[0]
        if "loras" in out:
            # A feature's own LoRA (EliGen's) comes back with the feature, not in the LoRA picker.
            out["loras"] = [{"name": item.get("name") or item.get("file"), "weight": item.get("weight", 1.0)}
                            for item in out["loras"] if isinstance(item, dict) and not item.get("feature")]
        if "controls" in out:
            controls = []
            for entry in out["controls"] if isinstance(out["controls"], list) else []:
                where = _sidecar(path, entry.get("copy")) if isinstance(entry, dict) else None
                if where is not None:
                    controls.append({**{k: entry[k] for k in ("preprocessor", "controlnet", "scale", "start", "end")
                                        if k in entry}, "image": str(where)})
            out["controls"] = controls
        return out

    @checks_paths(path="the image to restore")
    def restore_inputs(self, path) -> dict:
        """The image inputs of a result made here, for a tab to put back: {"inpaint_image", "inpaint_mask" (as
        painted), "mask_invert", "mask_feather", "controls": [{"image", ...}]} (what was found)."""
        found = self.read_recipe(path) if path else None
        if not found:
            return {}
        out = {k: found[k] for k in ("inpaint_image", "inpaint_mask", "controls", "mask_invert", "mask_feather")
               if k in found}
        if out.get("inpaint_image"):
            from engine.images import load_user_image
            from studio.features.inpaint import image_key
            out["image_key"] = image_key(load_user_image(out["inpaint_image"]))
        return out

    # ---------------------------------------------------------------------------- inpainting helpers
    @checks_paths(image_path="the image to inpaint")
    def inpaint_size(self, image_path) -> dict:
        """The output size of an inpainting job on this image: its own ({"width", "height", "note"})."""
        from studio.features import inpaint as inpaint_jobs
        from engine.images import load_user_image
        notes: list = []
        img = load_user_image(image_path, notes=notes)
        work = inpaint_jobs.work_size(img.size)
        if tuple(work) != img.size:
            notes.append(f"The model works on {work[0]}x{work[1]} (multiples of 16) and the result is cropped back.")
        else:
            notes.append("The image's own size; unpainted pixels stay exactly as they are.")
        return {"width": img.width, "height": img.height, "note": " ".join(notes)}

    @checks_paths(image_path="the image to inpaint", layer_path="the painted mask", extra_mask_path="the mask")
    def mask_preview(self, image_path, layer_path=None, extra_mask_path=None, invert=False, extra_key=None) -> dict:
        """The mask an inpainting job will use and a preview of it (see ``inpaint_jobs.mask_preview``)."""
        from studio.features import inpaint as inpaint_jobs
        return inpaint_jobs.mask_preview(image_path, layer_path, extra_mask_path, self.work,
                                         invert=bool(invert), extra_key=extra_key)

    @checks_paths(image_path="the image to extend", mask_path="the mask")
    def outpaint_canvas(self, image_path, mask_path=None, left=0, right=0, top=0, bottom=0) -> dict:
        """Extend an image's canvas for outpainting: {"image", "mask", "note"} (files under outputs/.work; the mask
        covers the new area and what ``mask_path`` covered)."""
        from studio.features import inpaint as inpaint_jobs
        return inpaint_jobs.outpaint_canvas(image_path, mask_path, self.work, left=left,
                                            right=right, top=top, bottom=bottom)

    @staticmethod
    def preprocessors() -> list[dict]:
        """The control-image preprocessors: [{"name", "label", "mode"}] (engine.preprocess)."""
        from engine import preprocess
        return preprocess.describe()

    @checks_paths(image_path="the control image")
    def preview_control(self, image_path, preprocessor) -> dict:
        """A preprocessor's output for an image, as a file under outputs/.work: {"path"}."""
        from engine import preprocess
        from engine.images import load_user_image
        img = preprocess.preprocess(preprocessor or "none", load_user_image(image_path))
        return {"path": str(self.work.save(img, f"control-{preprocess.get(preprocessor).name}"))}

    def controlnet_choices(self, variant_name) -> list[dict]:
        """The ControlNets offered as control beside a variant: [{"name", "label", "kind", "available"}]."""
        variant = registry.get_variant(variant_name)
        if variant.control != "controlnet":
            return []
        out = []
        for spec in registry.CONTROLNETS:
            if spec.kind == "inpaint":
                continue
            spec = registry.get_controlnet(spec.name, demo=variant.demo)
            available = variant.demo or bool(_match_local(self.models_dir / spec.model_id, [spec.pattern]))
            out.append({"name": spec.name, "label": spec.label + ("" if available else " (download)"),
                        "kind": spec.kind, "available": available})
        return out

    # ------------------------------------------------------------------------------------ EliGen page helpers
    def eligen_info(self) -> dict:
        """What the EliGen tab offers: {"variants": [{"name", "label", "demo"}], "colours", "max_entities", "note"}."""
        from studio.features import eligen as eligen_jobs
        from studio import eligen_layout
        names = [v["name"] for v in self.variants() if v["available"] or v["downloadable"]]
        variants = [v for v in self.variants() if v["name"] in names
                    and v["name"] in {x.name for x in eligen_jobs.studio_variants()}]
        if any(v["available"] and not v["demo"] for v in variants):
            variants = [v for v in variants if not v["demo"]]
        variants.sort(key=lambda v: (not v["demo"]) if self.demo_only else v["demo"])
        note = ("FLUX.1-dev with the EliGen LoRA (DiffSynth-Studio/Eligen, downloaded on first use): each entity's "
                "prompt acts only in its area; the global prompt describes the whole picture.")
        return {"variants": [{"name": v["name"], "label": v["label"], "demo": v["demo"]} for v in variants],
                "colours": list(eligen_layout.COLOURS), "max_entities": eligen_layout.MAX_ENTITIES, "note": note}

    @checks_paths(image_path="the input image")
    def eligen_canvas(self, width, height, image_path=None) -> dict:
        """A canvas for the EliGen tab: a plain one of the size asked (rounded to 16), or the input image (its own
        size: an inpainting job pads it to multiples of 16 and crops the result back): {"image" (file under
        outputs/.work), "width", "height", "note"}."""
        from PIL import Image
        notes = []
        if image_path:
            from engine.images import load_user_image
            from studio.features.inpaint import work_size
            img = load_user_image(image_path, notes=notes)
            work_size(img.size)                    # a size the engine can work at (else a message saying so)
            w, h, note = img.width, img.height, ""
            out = self.work.save(img, f"eligen-input-{w}x{h}")
        else:
            w, h, note = normalize_size(width or 1024, height or 1024)
            # A plain canvas is the same for every page of one size: one file, reused (not one per page load).
            out = self.work.keep(Image.new("RGB", (w, h), (236, 236, 236)), f"eligen-canvas-{w}x{h}.png")
        return {"image": str(out), "width": w, "height": h, "note": " ".join(notes + ([note] if note else []))}

    @checks_paths(canvas_path="the canvas", layer_path="the painted layer")
    def eligen_layout(self, canvas_path, layer_path=None, kept=None, prompts=(), labels=True) -> dict:
        """The entity masks of the page's state: the painted layer split by colour, united with the kept masks
        (those of another canvas size are resized). Writes one mask file per entity (None where nothing is
        painted) and the preview (labelled with the prompts unless ``labels`` is False: the tab shows kept masks
        tinted on the canvas, since its editor cannot draw a layer sent to it): {"masks", "preview", "width",
        "height"}."""
        from studio import eligen_layout
        from engine.images import load_user_image
        canvas = load_user_image(canvas_path)
        n = max(len(prompts), 1)
        painted = eligen_layout.masks_from_layer(layer_path, canvas.size, n) if layer_path else [None] * n
        kept_files = list((kept or {}).get("masks") or []) if isinstance(kept, dict) else []
        self.files.check_all(kept_files, "a kept entity mask")
        masks, files = [], []
        for k in range(n):
            mask = painted[k] if painted[k] is not None and painted[k].getbbox() else None
            if k < len(kept_files) and kept_files[k]:
                mask = eligen_layout.union(mask, eligen_layout.fit(kept_files[k], canvas.size)[0])
            masks.append(mask)
            files.append(str(self.work.save(mask, f"eligen-mask{k}")) if mask is not None and mask.getbbox()
                         else None)
        preview = self.work.save(eligen_layout.preview(canvas, masks, list(prompts), labels=labels), "eligen-preview")
        return {"masks": files, "preview": str(preview), "width": canvas.width, "height": canvas.height}

    @checks_paths(mask_files="an entity mask")
    def eligen_save_layout(self, width, height, prompt, prompts, mask_files) -> str:
        """A layout zip (DiffSynth-Studio's EliGen folder format) under outputs/layouts/, never overwriting."""
        from studio import eligen_layout
        from engine.images import load_user_image
        from studio.work_files import stamp
        masks = [load_user_image(f).convert("L") if f else None for f in mask_files]
        path = self.outputs_dir / "layouts" / f"eligen-{stamp()}.zip"
        return str(eligen_layout.save_layout_zip(path, width, height, prompt, list(prompts), masks))

    @checks_paths(path="the layout file")
    def eligen_load_layout(self, path) -> dict:
        """A saved layout for the page: {"width", "height", "prompt", "prompts", "masks" (files), "canvas"}."""
        from studio import eligen_layout
        data = eligen_layout.load_layout_file(path)
        canvas = self.eligen_canvas(data["width"], data["height"])
        size = (canvas["width"], canvas["height"])
        files = [str(self.work.save(m.resize(size), f"eligen-loaded{k}")) for k, m in enumerate(data["masks"])]
        return {**data, "masks": files, "canvas": canvas["image"], "width": canvas["width"],
                "height": canvas["height"]}

    @checks_paths(path="the image to restore")
    def eligen_restore(self, path) -> dict:
        """The entities of an image made in the EliGen tab: {"prompts", "masks" (the copies beside it), "canvas",
        "width", "height", "inpaint", "input_image" (the input copy, in inpaint mode), "on_negative"}; {} when it
        has none."""
        found = recipe_mod.read_recipe(path) if path else None
        if not found or not found.get("eligen_entity_prompts"):
            return {}
        result = pathlib.Path(str(path))
        masks = []
        for entry in found.get("eligen_entity_masks") or []:
            copy = _sidecar(result, entry.get("copy")) if isinstance(entry, dict) else None
            masks.append(str(copy) if copy is not None else None)
        canvas_source = _sidecar(result, ".input.png")
        canvas = self.eligen_canvas(found.get("width"), found.get("height"),
                                    str(canvas_source) if canvas_source else None)
        inpaint = bool(found.get("eligen_enable_inpaint")) and canvas_source is not None
        return {"prompts": list(found["eligen_entity_prompts"]), "masks": masks, "canvas": canvas["image"],
                "width": canvas["width"], "height": canvas["height"], "inpaint": inpaint,
                "input_image": str(canvas_source) if inpaint else None,
                "on_negative": bool(found.get("eligen_enable_on_negative"))}

    def _attach_controlnets(self, pipe, specs: list, progress: Optional[Progress] = None) -> None:
        """Put exactly these ControlNets (in order) on the pipeline, loading what is not loaded; none removes them.
        Loaded ControlNets are kept (like the shared components) while later jobs use them."""
        current = getattr(pipe, "controlnet", None)
        names = tuple(s.name for s in specs)
        if getattr(current, "flux_studio_names", ()) == names and (current is not None) == bool(specs):
            return
        from engine.controlnet import MultiControlNet, load_controlnet
        models = []
        for spec in specs:
            if spec.demo:
                from engine.demo import write_controlnet_demo
                write_controlnet_demo(self.models_dir, spec.kind, spec.model_id)
            files = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(self.models_dir)
            key = ("controlnet", tuple(str(f) for f in files), str(pipe.torch_dtype))
            if key not in self._modules:
                if progress:
                    progress(0, 1, f"Loading the {spec.label} ControlNet")
                self._modules[key] = load_controlnet(files, torch_dtype=pipe.torch_dtype, device="cpu")
            models.append(self._modules[key])
        # ControlNets no job uses any more leave memory.
        keep = {id(m) for m in models}
        for key in [k for k in self._modules if k[0] == "controlnet" and id(self._modules[k]) not in keep]:
            del self._modules[key]
        multi = None
        if models:
            multi = MultiControlNet(models)
            multi.flux_studio_names = names
            multi.flux_studio_files = [f for m in models for f in getattr(m, "flux_studio_files", [])]
        pipe.residency.offload_all()
        pipe.controlnet = None
        pipe.model_files.pop("controlnet", None)
        pipe.set_models({"controlnet": multi} if multi is not None else {})


def _fit_references(images, area: int, notes: list):
    """Reference images (one or a list) no larger than about the output's area (aspect kept; multiples of 16 are the
    pipeline's business): their tokens join the sequence, so a 2048x2048 reference beside a small output would cost
    minutes and gigabytes for detail the output cannot show."""
    if isinstance(images, list):
        return [_fit_references(im, area, notes) for im in images]
    image = images
    if image.width * image.height <= area * 1.1:
        return image
    from PIL import Image
    scale = (area / (image.width * image.height)) ** 0.5
    size = (max(16, round(image.width * scale)), max(16, round(image.height * scale)))
    notes.append(f"A reference image ({image.width}x{image.height}) was downscaled to {size[0]}x{size[1]}, about "
                 f"the output's area: the model uses it at that size.")
    return image.resize(size, Image.Resampling.LANCZOS)


def _sidecar(result, suffix) -> Optional[pathlib.Path]:
    """The copy saved beside a result (``<result stem><suffix>``, e.g. ``.ref0.png``) when it is a whole image; None
    when missing, torn or not an image (a recipe names only plain suffixes: anything with a path in it is ignored)."""
    if not isinstance(suffix, str) or not suffix.startswith(".") or "/" in suffix or "\\" in suffix:
        return None
    result = pathlib.Path(str(result))
    return safe_files.whole_image(result.with_name(result.stem + suffix))


def request_paths(request: dict):
    """(what, path) for every file a request names (reference images, the image to inpaint and its mask, control
    images, entity masks, EliGen's input image), to be checked before any is opened."""
    for key, what in {**FILE_INPUTS, "input_image": "the input image", "eligen_entity_masks": "an entity mask"}.items():
        value = request.get(key)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and item != "":
                yield what, item
    for c in request.get("controls") or ():
        if isinstance(c, dict) and c.get("image") not in (None, ""):
            yield "a control image", c["image"]


def _sequence_tokens(req: dict, references: dict) -> int:
    """The tokens the transformer sees beside the output image's: the prompt's T5 tokens, EliGen's entity prompts
    (as many again each) and the reference images' tokens (Kontext, Step1X), which the VRAM plan must make room for."""
    t5 = int(req.get("t5_sequence_length") or 512)
    entities = len((req.get("_eligen") or {}).get("prompts") or [])
    refs = []
    for found in references.values():
        refs += found if isinstance(found, list) else [found]
    return t5 * (1 + entities) + sum(-(-im.width // 16) * -(-im.height // 16) for im in refs if im is not None)


def _is_oom(exc: BaseException) -> bool:
    """A device out-of-memory error: torch's OutOfMemoryError, or a RuntimeError saying so (cuBLAS, other backends)."""
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def _oom_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def _plan_words(plan) -> str:
    from engine.roles import LABELS
    parts = []
    for role, entry in plan.entries.items():
        label = LABELS.get(role, role).split(" (")[0]
        dtype = " fp8" if "float8" in entry.storage_dtype and entry.strategy == "stream" else ""
        parts.append(f"{label}: {entry.strategy}{dtype}")
    return "; ".join(parts) + f"; predicted peak {plan.predicted_peak_vram_gb:.1f} GB"


def _relative(path, base) -> str:
    try:
        return pathlib.Path(path).resolve().relative_to(pathlib.Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)


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
