"""The studio's loaded models: one pipeline at a time, assembled from cached components, placed for a VRAM limit.

Components that variants share (text encoders, VAE) stay loaded when the person switches model; only what differs
is read, and what the new variant does not use leaves memory first (two transformers never sit in memory together).
Prompt encodings are cached across switches. Features put extra models in pipeline slots (ControlNets) through
``attach``; they stay loaded while later jobs ask for the same ones. ``replan`` re-places everything for a new VRAM
limit or a bigger job without a restart; ``memory_plan`` says where each component lives.

No torch at import: torch and the engine's loaders are imported when a model is first needed.
"""
from __future__ import annotations

import pathlib
from collections import OrderedDict
from typing import Callable, Optional

from engine import registry
from engine.acceleration.settings import AccelerationSettings
from engine.errors import EngineError
from engine.model_config import ModelConfig
from engine.roles import roles_of

from .families import FLUX1, family_of

# File roles that are resolved (downloaded) but not loaded on their own, and the roles Step1X's loader reads.
NOT_LOADED = ("qwen_processor", "nexus_gen_processor")   # read by the Qwen2.5-VL / Nexus-Gen AR loaders
NEXUS_GEN_ROLES = roles_of("nexus_gen")
STEP1X_ROLES = roles_of("step1x")
Progress = Callable[[int, int, str], None]


def _no_progress(done, total, message):
    pass


def load_role(role: str, files, torch_dtype, needed_by: str = "the model"):
    """A variant's component from its files, on the CPU (the loader that fits the role)."""
    if role in STEP1X_ROLES:
        from engine.step1x.load import load_role as load_step1x
        return load_step1x(role, files, torch_dtype=torch_dtype, device="cpu")
    if role in NEXUS_GEN_ROLES or (role == "dit" and str(files[0]).endswith(".bin")):   # a Nexus-Gen decoder's DiT
        from engine.nexus_gen.load import load_role as load_nexus_gen
        return load_nexus_gen(role, files, torch_dtype=torch_dtype, device="cpu")
    from engine.loading import load_models
    loaded = load_models(files, torch_dtype=torch_dtype, device="cpu", expect={str(f): role for f in files})
    if role not in loaded:
        raise EngineError(f"{files[0]} does not hold the {role} that {needed_by} needs.")
    return loaded[role]


def loading_message(role: str, files, pipeline: Optional[str] = None) -> str:
    """What a job waits for while a component loads, naming its file and size: "Loading the FLUX transformer from
    flux1-dev.safetensors (22.2 GB)"."""
    from engine.roles import label
    files = [pathlib.Path(f) for f in files]
    size = sum(f.stat().st_size for f in files if f.is_file()) / 1024 ** 2
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    amount = f"{size / 1024:.1f} GB" if size >= 1024 else f"{size:.1f} MB" if size < 10 else f"{size:.0f} MB"
    return f"Loading the {label(role, pipeline)} from {files[0].name}{more} ({amount})"


def _release_memory():
    from engine.memory.place import release_memory
    release_memory()


class ModelCache:
    """The loaded components and the pipeline of one studio (see the module's docstring). Not thread-safe: the studio
    engine calls it under its job lock."""

    def __init__(self, catalogue, device: Optional[str] = None, vram_limit: Optional[float] = None):
        self.catalogue = catalogue
        self.models_dir = catalogue.models_dir
        self.device = device
        self.vram_limit = vram_limit
        self.ram_limit: Optional[float] = None    # GB the plan may use in RAM (--ram-limit); None: what is free
        self.pipe = None
        self.pipe_variant: Optional[str] = None
        self.family = FLUX1              # the loaded pipeline's family (studio.families)
        self.modules: dict = {}          # (role, files, dtype) -> loaded module, shared across variants
        self._loaders: dict = {}         # the same keys -> how to read the module again (files, dtype) -> module
        self._tokenizers: dict = {}
        self.prompt_cache = OrderedDict()
        # Speed settings (engine.acceleration), applied to the pipeline by the next job (``pipeline``), under its lock.
        self.acceleration = AccelerationSettings()

    # ------------------------------------------------------------------------------------------------ device
    def torch_device(self):
        import torch
        from engine.pipeline import default_device
        return torch.device(self.device or default_device())

    def torch_dtype(self, variant):
        import torch
        if variant.demo and self.torch_device().type == "cpu":
            return torch.float32       # the demo is tiny; fp32 is faster than bf16 on most CPUs
        return torch.bfloat16

    def ram_budget(self) -> Optional[float]:
        """RAM the plan may use, in GB: ``ram_limit`` (``--ram-limit``) when set, else what the machine has free plus
        what this process already holds (its loaded weights are its own to re-plan), at most 90% of the memory."""
        if self.ram_limit is not None:
            return float(self.ram_limit)
        try:
            import psutil
            free = psutil.virtual_memory().available + psutil.Process().memory_info().rss
            return round(min(free, psutil.virtual_memory().total * 0.9) / 1024 ** 3, 1)
        except Exception:  # noqa: BLE001 - no psutil: no RAM budget
            return None

    def device_total_gb(self) -> Optional[float]:
        import torch
        device = self.torch_device()
        if device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.mem_get_info(device)[1] / 1024 ** 3
        return None

    # ---------------------------------------------------------------------------------------------- pipeline
    def pipeline(self, variant_name: str, progress: Optional[Progress] = None):
        """The pipeline for a variant, loading only the components that differ from what is loaded."""
        variant = registry.get_variant(variant_name)
        if self.pipe is not None and self.pipe_variant == variant.name:
            if self._accelerate(self.pipe):
                return self.pipe
        progress = progress or _no_progress
        family = family_of(variant)
        if variant.demo and not self.catalogue.available(variant):
            progress(0, 1, f"Writing the {variant.label}")
            self.catalogue.write_demo(variant)
        dtype = self.torch_dtype(variant)
        wanted, tokenizers = self._resolve(variant, dtype, progress, family)
        # Drop what the new variant does not use before loading, so two transformers never sit in memory together
        # (RAM or VRAM): the old pipeline goes too (it references them), and what it had moved in goes back first.
        # Another family shares nothing: all of the old one's components go (its prompt encodings too).
        if self.pipe is not None:
            self.family.offload_all(self.pipe)
        for key in [k for k in self.modules if k not in wanted]:
            self._forget(key)
        if family is not self.family:
            self.prompt_cache.clear()
        self.pipe = self.pipe_variant = None
        _release_memory()
        for key, files in wanted.items():
            if key not in self.modules:
                progress(0, 1, loading_message(key[0], files, family.pipeline))
                self._load(key, files, dtype, lambda f, d, role=key[0]: family.load(role, f, d, variant.name))
        modules = {key[0]: module for key, module in self.modules.items()}
        self.plan_steps = variant.default_steps or 28     # the steps the plan's predicted time assumes
        pipe = family.build(self, modules, tokenizers, dtype, progress)
        pipe.prompt_cache = self.prompt_cache        # prompt encodings across jobs and switches (either family)
        self.pipe, self.pipe_variant, self.family = pipe, variant.name, family
        if not self._accelerate(pipe):     # fp8 compute switched off on a shared transformer: it is read again
            return self.pipeline(variant_name, progress)
        return pipe

    def _resolve(self, variant, dtype, progress: Progress, family=FLUX1) -> tuple:
        """({module key: files} of the variant's components, {tokenizer role: tokenizer}), downloading what is
        missing (and allowed) and loading the tokenizers (small, cached)."""
        wanted, tokenizers = {}, {}
        for spec in variant.files:
            progress(0, 1, f"Preparing {spec.model_id}/{spec.pattern}")
            files = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(self.models_dir)
            key = (spec.role, tuple(str(f) for f in files), str(dtype))
            if spec.role in NOT_LOADED:
                continue          # present for another role's loader (Qwen's processor files)
            if spec.role.startswith("tokenizer"):
                if key not in self._tokenizers:
                    self._tokenizers[key] = family.tokenizer(spec.role, files)
                tokenizers[spec.role] = self._tokenizers[key]
                continue
            wanted[key] = files
        return wanted, tokenizers

    def _load(self, key, files, dtype, loader: Callable):
        self.modules[key] = loader(files, dtype)
        self._loaders[key] = loader
        return self.modules[key]

    def _forget(self, key) -> None:
        self.modules.pop(key, None)
        self._loaders.pop(key, None)

    def attach(self, pipe, role: str, models: list, combine: Callable, progress: Optional[Progress] = None) -> None:
        """Put exactly these extra models (``ExtraModel``s, in order) in the pipeline's ``role`` slot, combined by
        ``combine(role, modules)``, loading what is not loaded; none empties the slot. Loaded ones are kept (like
        the shared components) while later jobs use them; the rest of that role leave memory."""
        progress = progress or _no_progress
        current = getattr(pipe, role, None)
        names = tuple(m.name for m in models)
        if getattr(current, "flux_studio_names", ()) == names and (current is not None) == bool(models):
            return
        loaded = []
        for model in models:
            if model.write_demo is not None:
                model.write_demo(self.models_dir)
            files = ModelConfig(model_id=model.model_id, origin_file_pattern=model.pattern).resolve(self.models_dir)
            key = (role, tuple(str(f) for f in files), str(pipe.torch_dtype))
            if key not in self.modules:
                progress(0, 1, f"Loading {model.label}")
                self._load(key, files, pipe.torch_dtype, model.load)
            loaded.append(self.modules[key])
        keep = {id(m) for m in loaded}
        for key in [k for k in self.modules if k[0] == role and id(self.modules[k]) not in keep]:
            self._forget(key)
        module = None
        if loaded:
            module = combine(role, loaded)
            module.flux_studio_names = names
            module.flux_studio_files = [f for m in loaded for f in getattr(m, "flux_studio_files", [])]
        self.family.offload_all(pipe)
        setattr(pipe, role, None)
        pipe.model_files.pop(role, None)
        pipe.set_models({role: module} if module is not None else {})

    def release(self) -> None:
        """Unload the pipeline and every cached module (so a training run gets the device's memory)."""
        self.pipe = self.pipe_variant = None
        self.family = FLUX1
        self.modules.clear()
        self._loaders.clear()
        self.prompt_cache.clear()
        _release_memory()

    def free_after_oom(self) -> None:
        """Move everything out of the device after an out-of-memory error (the re-plan places it again)."""
        if self.pipe is not None:
            try:
                self.family.offload_all(self.pipe)
            except Exception:  # noqa: BLE001 - moving out can itself fail half-way; the re-plan re-places all
                self.family.forget_placement(self.pipe)
        _release_memory()

    # ------------------------------------------------------------------------------------------------ memory
    def replan(self) -> None:
        """Re-plan the loaded pipeline for ``vram_limit`` and re-place its modules (no restart). Moves between
        resident / offloaded / streamed and bf16 -> fp8 happen in place; a component that must go back from fp8 to
        full precision is read again from its file (its fp8 copy has lost the low bits)."""
        from engine.memory import place
        pipe = self.pipe
        if not self.family.planned:          # no planner (FLUX.2): on the device, or in RAM between stages
            self.family.place(pipe, self.vram_limit)
            return
        pipe.vram_limit, pipe.ram_limit = self.vram_limit, self.ram_budget()
        pipe.residency.offload_all()
        installed = pipe.installed_models()
        preview = place.plan_modules(installed, pipe.vram_fields, pipe.device, pipe.torch_dtype, pipe.vram_limit,
                                     pipe.ram_limit, *pipe.plan_size, text_tokens=pipe.plan_text_tokens,
                                     steps=getattr(pipe, "plan_steps", 28))
        for role, entry in preview.entries.items():
            if not place.needs_reload(installed[role], place.from_entry(entry)):
                continue
            key = next((k for k, m in self.modules.items() if m is installed[role]), None)
            files = [pathlib.Path(f) for f in getattr(installed[role], "flux_studio_files", [])]
            if key is None or not files:
                continue
            # Drop the fp8 copy before reading the file again: never both in memory.
            loader = self._loaders[key]
            self._forget(key)
            setattr(pipe, role, None)
            installed.pop(role)
            place.release_memory()
            installed[role] = self._load(key, files, pipe.torch_dtype, loader)
        pipe.set_models(installed)

    def memory_plan(self, default_variant: str) -> dict:
        """Where each component lives and the predicted peaks: ``engine.memory.Plan.as_dict()`` of the loaded
        pipeline, or, before anything is loaded, the plan for ``default_variant`` made from its files' headers.

        {"device", "vram_limit_gb" (None = no limit), "components": [{"role", "label", "strategy", "storage_dtype",
        "compute_dtype", "vram_gb", "ram_gb", ...}], "predicted_peak_vram_gb", "predicted_peak_ram_gb", "notes",
        "budget_gb", "fits", "resolution", "variant", "loaded"}."""
        out = self.family.loaded_plan(self.pipe, self.pipe_variant) if self.pipe is not None else None
        if out is None:
            out = self._header_plan(default_variant)
        out["device"] = str(self.torch_device())
        out["vram_limit_gb"] = self.vram_limit
        return out

    def _header_plan(self, variant_name: str) -> dict:
        from engine import memory
        variant = registry.get_variant(variant_name)
        files = {}
        if not family_of(variant).planned:
            return {"components": [], "predicted_peak_vram_gb": None, "predicted_peak_ram_gb": None,
                    "variant": variant.name, "loaded": False,
                    "notes": [f"{variant.label} is not loaded yet, and {family_of(variant).name} has no memory "
                              f"planner: what is loaded shows here once it is."]}
        try:
            for spec in variant.files:
                if not spec.role.startswith("tokenizer") and spec.role not in NOT_LOADED:
                    files[spec.role] = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(
                        self.models_dir, allow_download=False)
            sizes = memory.sizes_from_files(files)
        except Exception as exc:  # noqa: BLE001 - a missing or broken file is reported when the model loads
            return {"components": [], "predicted_peak_vram_gb": None, "predicted_peak_ram_gb": None,
                    "variant": variant.name, "loaded": False,
                    "notes": [f"{variant.label} is not in the models folder yet ({exc}); the plan is made when it "
                              f"is loaded."]}
        device = self.torch_device()
        free = None
        if self.vram_limit is None and device.type == "cuda":
            import torch
            free_b, _total = torch.cuda.mem_get_info(device)
            free = (free_b + torch.cuda.memory_reserved(device)) / memory.GiB
        plan = memory.plan(sizes, str(device), self.vram_limit, self.ram_budget(),
                           compute_dtype=str(self.torch_dtype(variant)), free_vram_gb=free,
                           pipeline=family_of(variant).pipeline, steps=variant.default_steps or 28)
        out = plan.as_dict()
        out["notes"] = [f"{variant.label} is not loaded yet: planned from its files' headers."] + out["notes"]
        out.update(variant=variant.name, loaded=False)
        return out

    # ------------------------------------------------------------------------------------------------- speed
    def set_acceleration(self, **values) -> AccelerationSettings:
        """Change the speed settings (``compile``, ``attention_backend``, ``fp8_compute``, ``step_cache``; None:
        unchanged). Checked now (an attention backend this machine lacks is refused, naming those it has); the next
        job applies them to its pipeline. No lock needed: one assignment, read by the job thread."""
        new = self.acceleration.changed(**values)
        if new.attention_backend != self.acceleration.attention_backend:
            from engine.acceleration import attention
            attention.backend_for(new.attention_backend, self.torch_device(), self._compute_dtype())
        self.acceleration = new
        return new

    def _compute_dtype(self):
        import torch
        if self.pipe is not None:
            place = self.pipe.placements.get("dit")
            return place.compute_dtype if place is not None else self.pipe.torch_dtype
        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32

    def _accelerate(self, pipe) -> bool:
        """Apply the speed settings to the pipeline; False when its transformer must be read again first (fp8
        compute switched off: its fp8 weights lost their low bits), which drops it and the pipeline."""
        from engine.acceleration import fp8_compute
        if fp8_compute.is_applied(pipe.dit) and not self.acceleration.fp8_compute:
            key = next((k for k, m in self.modules.items() if m is pipe.dit), None)
            if key is not None:
                self._forget(key)
            self.family.offload_all(pipe)
            self.pipe = self.pipe_variant = None
            _release_memory()
            return False
        pipe.set_acceleration(**self.acceleration.as_dict())
        return True

    def speed_notes(self) -> dict:
        """{"settings", "attention_choices" (those this machine has), "notes": {setting: why it cannot help here,
        or what it costs}, "applied" (the loaded pipeline's notes)} for the Models & memory tab."""
        from engine.acceleration import attention, compile as compiling, fp8_compute
        device = self.torch_device()
        notes = {"compile": compiling.CPU_NOTE if device.type != "cuda" else
                 "The first image at each new size waits for compiling (about a minute); later ones are faster.",
                 "attention_backend": "",
                 "fp8_compute": fp8_compute.support(device)[1] or
                 "fp8 matmuls on this GPU; switching it off reads the transformer again.",
                 "step_cache": "Skips the transformer's later blocks at steps whose first block changed less than "
                               "the threshold: 0 = off, 0.05-0.15 is usual; higher is faster and less exact."}
        choices = attention.available(device, self._compute_dtype())
        missing = [c for c in attention.ATTENTION_CHOICES if c not in choices]
        notes["attention_backend"] = f"This machine has {', '.join(choices)}" + (
            f"; not {', '.join(missing)}." if missing else ".")
        applied = list(self.pipe.acceleration.notes) if self.pipe is not None else []
        return {"settings": self.acceleration.as_dict(), "attention_choices": choices, "notes": notes,
                "applied": applied}

    def set_vram_limit(self, gb) -> None:
        """Change the VRAM limit (GB; None = no limit), re-placing the loaded models at once."""
        if gb is not None:
            try:
                gb = float(gb)
            except (TypeError, ValueError, OverflowError):
                raise EngineError(f"The VRAM limit must be a number of GB, got {gb!r}.") from None
            if not gb > 0 or gb != gb or gb == float("inf"):
                raise EngineError(f"The VRAM limit must be a positive number of GB (or none for no limit), got {gb}.")
        self.vram_limit = gb
        if self.pipe is not None:
            self.replan()
