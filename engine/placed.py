"""What both pipelines (FLUX.1's ``FluxImagePipeline``, FLUX.2's ``Flux2ImagePipeline``) share about their components:
installing them, placing them by the memory plan (``engine.memory``), moving one in for its stage, and the speed
settings carried over to the transformer as placed (``engine.acceleration``).

A pipeline class names its slots (``ROLE_NAMES``, rows of ``engine.roles``) and how the plan labels them
(``PLAN_LABELS``: "flux2" for FLUX.2's names of the shared dit/vae rows), calls ``init_placement()`` in its
``__init__`` and gets ``set_models``, ``set_acceleration``, ``installed_models``, ``run_model`` and ``vram_fields``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from .acceleration import Acceleration
from .errors import EngineError
from .memory import place as placement_mod


class PlacedPipeline:
    ROLE_NAMES: tuple = ()              # the pipeline's component slots
    PLAN_LABELS: Optional[str] = None   # engine.roles' labels column to name them by (None: FLUX.1's)
    WHOSE = ""                          # how errors name the components ("FLUX.2 ")

    def init_placement(self) -> None:
        for role in self.ROLE_NAMES:
            setattr(self, role, None)
        self.model_files: dict[str, list[str]] = {}
        self.placements: dict = {}
        self.vram_limit = None            # GB of VRAM the plan may use (None: everything on the device)
        self.ram_limit = None             # GB of RAM the plan may use (None: no limit)
        self.plan = None                  # the engine.memory.Plan in force
        self.plan_size = (1024, 1024)     # (width, height) whose activations the plan makes room for
        self.plan_text_tokens = 512       # and the tokens beside the image's: the prompt's, references', entities'
        self.plan_steps = 28              # the steps per image the plan's predicted time assumes
        self.residency = placement_mod.Residency()
        self._vram_fields: dict = {}
        self._prompt_encoder = None
        self.prompt_cache: OrderedDict = OrderedDict()   # prompt encodings across jobs; the studio shares one
        self.acceleration = Acceleration()   # compile, attention backend, fp8 compute, step cache

    def set_models(self, modules: dict, vram_fields: Optional[dict] = None):
        """Install loaded components (role -> module) and place them all for this pipeline's device, VRAM limit,
        RAM budget and planned job (``engine.memory.place.place_modules``). Components already installed and not in
        ``modules`` are kept and re-placed with the rest; ``vram_fields`` ({role: the seed's per-file fields}) pin a
        component's placement."""
        unknown = set(modules) - set(self.ROLE_NAMES)
        if unknown:
            raise EngineError(f"Unknown {self.WHOSE}component roles {sorted(unknown)}; expected {self.ROLE_NAMES}.")
        self._vram_fields.update({r: dict(f) for r, f in (vram_fields or {}).items() if f})
        installed = self.installed_models()
        installed.update(modules)
        self.plan, self.placements, placed = placement_mod.place_modules(
            installed, self._vram_fields, self.device, self.torch_dtype, self.residency, self.vram_limit,
            self.ram_limit, *self.plan_size, text_tokens=self.plan_text_tokens, pipeline=self.PLAN_LABELS,
            steps=self.plan_steps)
        for role, module in placed.items():
            setattr(self, role, module)
            self.model_files[role] = [str(f) for f in getattr(installed[role], "flux_studio_files", [])]
        self._prompt_encoder = None
        self.set_acceleration()           # the speed settings carried over to the transformer as now placed

    def set_acceleration(self, compile=None, attention_backend: Optional[str] = None,
                         fp8_compute: Optional[bool] = None, step_cache: Optional[float] = None) -> list:
        """Change the speed settings (None: unchanged; ``engine.acceleration``): regional ``torch.compile`` of the
        transformer's blocks, the attention backend ("auto", "sdpa", "flash", "cudnn", "efficient"), torchao's fp8
        matmuls, and the step cache threshold calls use by default. Returns notes on what cannot help here."""
        return self.acceleration.apply(self.dit, self.placements.get("dit"), compile=compile,
                                       attention_backend=attention_backend, fp8_compute=fp8_compute,
                                       step_cache=step_cache)

    def enable_context_parallel(self, ulysses_degree=None, ring_degree=None, uneven: bool = False):
        """Split each image's tokens over the processes torchrun started (call it in every one; ``engine.parallel``)."""
        from .parallel import enable_context_parallel
        return enable_context_parallel(self, ulysses_degree, ring_degree, uneven)

    @property
    def vram_fields(self) -> dict:
        """{role: the seed's per-file placement fields} pinned so far (what a re-plan must keep)."""
        return self._vram_fields

    def installed_models(self) -> dict:
        """role -> module of every component installed on this pipeline."""
        return {r: getattr(self, r) for r in self.ROLE_NAMES if getattr(self, r) is not None}

    def run_model(self, role: str, module, fn: Callable):
        """``fn(module)`` with the module where it computes: a component that rests off the device is moved in for
        its stage (and stays until another needs the room); a streamed one moves block by block inside its call."""
        place = self.placements.get(role)
        if place is not None and place.needs_room:
            self.residency.onload(role, module, place)
        return fn(module)
