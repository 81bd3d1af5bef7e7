"""The studio's engine: one process-wide object that owns the loaded models and runs one job at a time.

Tabs call it with plain dicts and get file paths back; it never imports gradio. It resolves a variant's files
(downloading when allowed), keeps components that variants share (text encoders, VAE) when the person
switches model, caches prompt encodings, reports progress after every step, and stops at the next step when
cancelled, releasing memory.
"""
from __future__ import annotations

import pathlib
import random
import threading
from typing import Callable, Optional

from . import recipe as recipe_mod
from . import registry
from .downloads import models_base_path
from .errors import EngineError, JobCancelled
from .model_config import ModelConfig, _match_local
from .sizes import normalize_size

ENGINE_VERSION = "0.1.0"
REQUEST_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "width": 1024, "height": 1024, "num_inference_steps": 30,
    "embedded_guidance": 3.5, "cfg_scale": 1.0, "seed": -1, "num_images": 1, "t5_sequence_length": 512,
    "schedule": "seed", "sigma_shift": None, "rand_device": "cpu",
}
MAX_IMAGES = 16
MAX_STEPS = 200
Progress = Callable[[int, int, str], None]


class Engine:
    def __init__(self, models_dir=None, device: Optional[str] = None, vram_limit: Optional[float] = None,
                 demo: bool = False, outputs_dir=None):
        self.models_dir = pathlib.Path(models_dir or models_base_path())
        self.outputs_dir = pathlib.Path(outputs_dir or "outputs")
        self.device = device
        self.vram_limit = vram_limit
        self.demo = demo
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._modules: dict = {}      # (role, files) -> loaded module, shared across variants
        self._tokenizers: dict = {}
        self._pipe = None
        self._pipe_variant = None
        if demo or not any(self._available(v) for v in registry.VARIANTS if not v.demo):
            self._ensure_demo()

    # ------------------------------------------------------------------------------------ catalogue
    def _ensure_demo(self):
        from .demo import write_demo_model
        write_demo_model(self.models_dir)

    def _available(self, variant) -> bool:
        return all(_match_local(self.models_dir / f.model_id, [f.pattern]) for f in variant.files)

    def variants(self) -> list[dict]:
        out = []
        for v in registry.VARIANTS:
            available = self._available(v)
            if v.demo and not available:
                continue
            out.append({"name": v.name, "label": v.label + ("" if available or v.demo else " (download)"),
                        "available": available, "downloadable": not v.demo, "demo": v.demo,
                        "description": v.description, "default_steps": v.default_steps,
                        "default_guidance": v.default_guidance})
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
        return not any(self._available(v) for v in registry.VARIANTS if not v.demo)

    @staticmethod
    def size_rule(width, height) -> dict:
        w, h, note = normalize_size(width, height)
        return {"width": w, "height": h, "note": note}

    # ------------------------------------------------------------------------------------- models
    def _torch_dtype(self, variant):
        import torch
        device = self._device()
        if variant.demo and device.type == "cpu":
            return torch.float32       # the demo is tiny; fp32 is faster than bf16 on most CPUs
        return torch.bfloat16

    def _device(self):
        import torch
        from .pipeline import default_device
        return torch.device(self.device or default_device())

    def pipeline(self, variant_name: str, progress: Optional[Progress] = None):
        """The pipeline for a variant, loading only the components that differ from what is loaded."""
        from .loading import load_models
        from .pipeline import FluxImagePipeline
        from .text_encoding import load_tokenizer
        variant = registry.get_variant(variant_name)
        if self._pipe is not None and self._pipe_variant == variant.name:
            return self._pipe
        dtype = self._torch_dtype(variant)
        wanted, tokenizers = {}, {}
        for spec in variant.files:
            if progress:
                progress(0, 1, f"Preparing {spec.model_id}/{spec.pattern}")
            files = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(self.models_dir)
            key = (spec.role, tuple(str(f) for f in files), str(dtype))
            if spec.role.startswith("tokenizer"):
                if key not in self._tokenizers:
                    self._tokenizers[key] = load_tokenizer(files[0], "CLIP" if spec.role == "tokenizer_1" else "T5")
                tokenizers[spec.role] = self._tokenizers[key]
                continue
            wanted[key] = files
        # Drop what the new variant does not use before loading, so two transformers never sit in memory together.
        for key in list(self._modules):
            if key not in wanted:
                del self._modules[key]
        self._pipe = None
        from .placement import release_memory
        release_memory()
        for key, files in wanted.items():
            if key not in self._modules:
                if progress:
                    progress(0, 1, f"Loading {key[0]} from {files[0].name}")
                loaded = load_models(files, torch_dtype=dtype, device="cpu", expect={str(f): key[0] for f in files})
                if key[0] not in loaded:
                    raise EngineError(f"{files[0]} does not hold the {key[0]} that {variant.name} needs.")
                self._modules[key] = loaded[key[0]]
        pipe = FluxImagePipeline(device=str(self._device()), torch_dtype=dtype)
        pipe.vram_limit = self.vram_limit
        pipe.set_models({key[0]: module for key, module in self._modules.items()})
        pipe.tokenizer_1, pipe.tokenizer_2 = tokenizers.get("tokenizer_1"), tokenizers.get("tokenizer_2")
        self._pipe, self._pipe_variant = pipe, variant.name
        return pipe

    # --------------------------------------------------------------------------------------- jobs
    def validate(self, request: dict) -> dict:
        unknown = set(request) - set(REQUEST_DEFAULTS) - {"variant"}
        if unknown:
            raise EngineError(f"Unknown settings {sorted(unknown)}.")
        req = {**REQUEST_DEFAULTS, **{k: v for k, v in request.items() if v is not None}}
        req["variant"] = registry.get_variant(request.get("variant") or self.default_variant()).name
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
        return req

    def generate(self, request: dict, progress: Optional[Progress] = None) -> list[dict]:
        req = self.validate(request)
        progress = progress or (lambda done, total, message: None)
        with self._lock:
            self._cancel.clear()
            try:
                return self._run(req, progress)
            finally:
                from .placement import release_memory
                release_memory()

    def _run(self, req: dict, progress: Progress) -> list[dict]:
        pipe = self.pipeline(req["variant"], progress)
        self._check_cancel()
        steps, n = req["num_inference_steps"], req["num_images"]
        base_seed = random.randrange(2 ** 31) if req["seed"] == -1 else req["seed"]
        results = []
        for k in range(n):
            seed = base_seed + k

            def on_step(done, _total, k=k):
                progress(k * steps + done, n * steps, f"Image {k + 1}/{n}, step {done}/{steps}")
                self._check_cancel()

            image = pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"], cfg_scale=req["cfg_scale"],
                         embedded_guidance=req["embedded_guidance"], t5_sequence_length=req["t5_sequence_length"],
                         height=req["height"], width=req["width"], seed=seed, rand_device=req["rand_device"],
                         sigma_shift=req["sigma_shift"], num_inference_steps=steps, schedule=req["schedule"],
                         progress_bar_cmd=lambda it: it, step_callback=on_step)
            recipe = self._recipe(req, seed, pipe)
            path = recipe_mod.save_image(image, recipe, self.outputs_dir)
            results.append({"path": str(path), "seed": seed, "width": image.width, "height": image.height,
                            "recipe": recipe, "info": recipe_mod.a1111_parameters(recipe)})
        return results

    def _check_cancel(self):
        if self._cancel.is_set():
            raise JobCancelled("Cancelled; memory released.")

    def cancel(self):
        """The running job stops after its current step."""
        self._cancel.set()

    def _recipe(self, req: dict, seed: int, pipe) -> dict:
        from .fingerprints import fingerprint
        files = {}
        for role, paths in pipe.model_files.items():
            files[role] = [{"file": _relative(p, self.models_dir), "fingerprint": fingerprint(p)} for p in paths]
        keep = ("variant", "prompt", "negative_prompt", "width", "height", "num_inference_steps", "embedded_guidance",
                "cfg_scale", "t5_sequence_length", "schedule", "sigma_shift", "rand_device")
        recipe = {k: req[k] for k in keep}
        recipe.update(seed=seed, model_files=files, app="FLUX Studio", engine_version=ENGINE_VERSION)
        if req.get("size_note"):
            recipe["size_note"] = req["size_note"]
        return recipe

    def read_recipe(self, path) -> Optional[dict]:
        """Settings to restore from a PNG made here (or by A1111/Forge), with the request's keys."""
        found = recipe_mod.read_recipe(path)
        if not found:
            return None
        return {k: found[k] for k in list(REQUEST_DEFAULTS) + ["variant"] if k in found}


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
