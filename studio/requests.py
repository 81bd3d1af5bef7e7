"""Typed requests: what a tab asks for, and the checks that turn it into a job.

A request arrives as a dict of settings (the keys the tabs and API clients send: ``request_defaults``). ``validate``
checks it in this order, so that nothing is opened or loaded for a request that is refused anyway:

1. the dict itself: no unknown keys, lists where lists belong, every file it names inside the folders the studio may
   read (``FileAccess``);
2. the base settings every job has (``Request``: typed, in range) and the model variant;
3. each feature's inputs (its own dataclass, ``studio.features``) into its typed state, reading the files;
4. the size the model works at (multiples of 16) and the LoRA files.

The result is a ``ValidJob``: the variant, the typed settings, the size, the notes for the person, and each used
feature's state. No torch here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from engine import registry
from engine.errors import EngineError
from engine.sizes import normalize_size

MAX_IMAGES = 16
MAX_STEPS = 200
MAX_T5_TOKENS = 512                 # T5's sequence for FLUX.1
SCHEDULES = ("seed", "bfl")         # engine.scheduler's schedules (that module imports torch)
DEFAULT_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class Request:
    """The settings every job has: the seed's parameter names and defaults. ``width``/``height`` None: not given (an
    input image may then set the size; else 1024). ``loras``: [{"name", "weight"}] (names in the LoRA folder)."""

    variant: Optional[str] = None
    prompt: str = ""
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    num_inference_steps: int = 30
    embedded_guidance: float = 3.5
    cfg_scale: float = 1.0
    seed: int = -1
    num_images: int = 1
    t5_sequence_length: int = 512
    schedule: str = "seed"
    sigma_shift: Optional[float] = None
    rand_device: str = "cpu"
    # a list of names / {"name", "weight"} / [name, weight] (a path or JSON text is also taken)
    loras: tuple = dataclasses.field(default=(), metadata={"kinds": (list, tuple, str)})

    @property
    def size_given(self) -> bool:
        return bool(self.width and self.height)

    @classmethod
    def from_values(cls, values: dict) -> "Request":
        """The base settings out of a request's values (defaults filled in), typed and checked."""
        v = {f.name: values.get(f.name, f.default) for f in dataclasses.fields(cls)}
        width, height = v["width"], v["height"]
        try:
            width = None if width is None else int(width)
            height = None if height is None else int(height)
        except (TypeError, ValueError, OverflowError):
            raise EngineError(f"Width and height must be whole numbers, got {width!r} x {height!r}.") from None
        out = cls(variant=v["variant"] or None, prompt=str(v["prompt"] or ""),
                  negative_prompt=str(v["negative_prompt"] or ""), width=width, height=height,
                  num_inference_steps=_whole(v, "num_inference_steps"),
                  embedded_guidance=_number(v, "embedded_guidance"), cfg_scale=_number(v, "cfg_scale"),
                  seed=_whole(v, "seed"), num_images=_whole(v, "num_images"),
                  t5_sequence_length=_whole(v, "t5_sequence_length"), schedule=v["schedule"],
                  sigma_shift=None if v["sigma_shift"] is None else _number(v, "sigma_shift"),
                  rand_device=v["rand_device"], loras=_loras(v["loras"]))
        out.check()
        return out

    def check(self) -> None:
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise EngineError(f"Steps must be between 1 and {MAX_STEPS}, got {self.num_inference_steps}.")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise EngineError(f"Number of images must be between 1 and {MAX_IMAGES}, got {self.num_images}.")
        if self.cfg_scale <= 0:
            raise EngineError("CFG scale must be positive (1 turns true CFG off).")
        if self.seed < -1 or self.seed >= 2 ** 63:
            raise EngineError("Seed must be -1 (random) or a whole number from 0 up.")
        if not 1 <= self.t5_sequence_length <= MAX_T5_TOKENS:
            raise EngineError(f"The T5 sequence length must be between 1 and {MAX_T5_TOKENS} tokens, got "
                              f"{self.t5_sequence_length}.")
        if self.schedule not in SCHEDULES:
            raise EngineError(f"Unknown schedule {self.schedule!r:.40}: use one of {', '.join(SCHEDULES)}.")
        if not isinstance(self.rand_device, str) or not self.rand_device.strip():
            raise EngineError(f"rand_device names a device for the initial noise (\"cpu\", \"cuda\"), got "
                              f"{self.rand_device!r:.40}.")


def _whole(values: dict, key: str) -> int:
    try:
        return int(values[key])
    except (TypeError, ValueError, OverflowError):
        raise EngineError(f"A setting has the wrong type: {key} must be a whole number, got "
                          f"{values[key]!r:.40}.") from None


def _number(values: dict, key: str) -> float:
    try:
        value = float(values[key])
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise EngineError(f"A setting has the wrong type: {key} must be a number, got {values[key]!r:.40}.")
    return value


def _loras(wanted) -> tuple:
    from engine.lora.names import normalize     # the engine's naming rules, without torch
    return tuple(normalize(wanted))


BASE_KEYS = tuple(f.name for f in dataclasses.fields(Request))


@dataclasses.dataclass
class ValidJob:
    """A request checked and read: what the job runner needs. Features set ``width``/``height`` while validating (an
    image to inpaint sets its own size); after validation they are the size the model works at."""

    variant: Any                    # engine.registry.Variant
    settings: Request
    width: int
    height: int
    size_note: str = ""
    notes: list = dataclasses.field(default_factory=list)    # what reading the inputs did (resized, ...), for people
    states: dict = dataclasses.field(default_factory=dict)   # feature name -> its validated state (features in use)
    models_dir: Any = None          # the models folder the job reads (its LoRA folder is <models_dir>/loras)


def request_defaults(features) -> dict:
    """Every request key but ``variant`` with its default: the base settings', then each feature's."""
    out = {f.name: f.default for f in dataclasses.fields(Request) if f.name != "variant"}
    for feature in features:
        clash = set(out) & set(feature.defaults())
        if clash:
            raise ValueError(f"feature {feature.name!r} declares request keys already taken: {sorted(clash)}")
        out.update(feature.defaults())
    return out


def parse(raw: Any, features, files) -> tuple[dict, dict]:
    """(settings with defaults filled in, {feature name: its inputs}) of a request dict, every file it names checked
    by ``files`` before anything is read."""
    if not isinstance(raw, dict):
        raise EngineError(f"A request is a dict of settings, got {type(raw).__name__}.")
    defaults = request_defaults(features)
    unknown = set(raw) - set(defaults) - {"variant"}
    if unknown:
        raise EngineError(f"Unknown settings {sorted(map(str, unknown))}.")
    kinds = {f.name: f.metadata["kinds"] for f in dataclasses.fields(Request) if "kinds" in f.metadata}
    for feature in features:
        kinds.update(feature.list_kinds())
    for key, allowed in kinds.items():
        if raw.get(key) is not None and not isinstance(raw[key], allowed):
            raise EngineError(f"{key} must be a list, got {type(raw[key]).__name__}.")
    values = {**defaults, **{k: v for k, v in raw.items() if v is not None}}
    inputs = {feature.name: feature.read_inputs(values) for feature in features}
    for feature in features:
        for what, path in feature.paths(inputs[feature.name]):
            files.check(path, what)
    return values, inputs


def validate(raw: Any, features, files, default_variant: Callable[[], str], models_dir, limits=None) -> ValidJob:
    """The ``ValidJob`` of a request dict (see the module's docstring); an EngineError names what is wrong.
    ``limits`` (``studio.sharing.Limits``): a shared studio's caps on size, steps and images, checked before any
    file is read."""
    values, inputs = parse(raw, features, files)
    if limits is not None:     # the steps and images asked for, before anything is read (the size once known)
        base = Request.from_values({**values, "variant": None})
        limits.check(0, 0, base.num_inference_steps, base.num_images)
    variant = registry.get_variant(values.get("variant") or default_variant())
    if not variant.in_studio:
        raise EngineError(f"{variant.name} runs through the Python API (FluxImagePipeline) for now; the studio "
                          f"cannot load all of its files yet.")
    settings = Request.from_values({**values, "variant": variant.name})
    job = ValidJob(variant=variant, settings=settings, width=DEFAULT_SIZE if settings.width is None else settings.width,
                   height=DEFAULT_SIZE if settings.height is None else settings.height, models_dir=models_dir)
    for feature in features:
        state = feature.validate(inputs[feature.name], job)
        if state is not None:
            job.states[feature.name] = state
    from .families import family_of
    family_of(variant).check(job)       # what the variant's family cannot do yet, refused by name
    job.width, job.height, job.size_note = normalize_size(job.width, job.height)
    if limits is not None:
        scale = max([float(getattr(state, "hires_scale", 1.0) or 1.0) for state in job.states.values()], default=1.0)
        limits.check(job.width, job.height, settings.num_inference_steps, settings.num_images, scale)
    from engine.lora import library
    from engine.lora.family import file_family, mismatch_message
    for item in settings.loras:
        path = library.resolve(models_dir, item["name"])     # a missing LoRA is refused before any work
        made_for = file_family(path)                          # so is one of the other family (header only)
        if made_for is not None and made_for != family_of(variant).name:
            raise EngineError(mismatch_message(item["name"], made_for, family_of(variant).name, variant.label))
    return job
