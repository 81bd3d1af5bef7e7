"""The model family a training run trains, read from its files, and what differs by family: one row each.

A run's family comes from its model files' tensor names (headers only, nothing loads): FLUX 3 when any file is a
FLUX 3 transformer or its Qwen3-VL text encoder; FLUX.2 when any is a FLUX.2 component (the FLUX.2 VAE, which FLUX 3
uses too, counts for FLUX 3 only beside a FLUX 3 file); FLUX.1 otherwise (the loaders name unknown files later).

Each family is implemented by one module of this package with the same functions -- ``flux1``, ``flux2``, ``flux3``:
``load_pipeline``, ``load_encoders`` (split training's stage 1), ``resolve_targets`` (``--lora_target_modules``),
``encode`` (a record as the transformer's inputs), ``schedule`` (the timestep sampler), ``training_module`` (the
loss), ``load_lora_weights``, ``save_lora``, ``detect`` (a file's role from its keys) and ``known_layer_paths`` (the
names a target may match, before anything loads). The training loop asks the family and never branches on it.
"""
from __future__ import annotations

import importlib
import pathlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import EngineError


@dataclass(frozen=True)
class TrainingFamily:
    name: str                        # as LoRA files' metadata and caches record it
    module: str                      # the submodule implementing it
    extra_inputs: tuple[str, ...]    # --extra_inputs it encodes
    kinds: tuple[str, ...]           # --task kinds it trains
    open_formats: tuple[str, ...]    # --opensource_format values it writes with --align_to_opensource_format
    memory_plan: bool                # whether --vram_limit / the offload flags plan its training

    @property
    def impl(self) -> ModuleType:
        return importlib.import_module(f".{self.module}", __package__)

    def __getattr__(self, name: str):
        """The implementing module's functions (``family.encode(...)``, ``family.save_lora(...)``), looked up at call
        time (tests replace them on the module)."""
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.impl, name)

    def check_task(self, kind: str) -> None:
        if kind not in self.kinds:
            raise EngineError(f"--task {kind} trains {' and '.join(f.name for f in FAMILIES if kind in f.kinds)} "
                              f"transformers here; {self.name} takes {', '.join(self.kinds)}.")

    def check_open_format(self, config) -> None:
        if config.is_lora and config.align_to_opensource_format and config.opensource_format not in self.open_formats:
            raise EngineError(
                f"--align_to_opensource_format --opensource_format {config.opensource_format}: {self.name} LoRAs are "
                f"written in DiffSynth-Studio's keys (leave the flag out, as its scripts do) or "
                f"{' / '.join(self.open_formats)} (--opensource_format {self.open_formats[0]}).")


FLUX1 = TrainingFamily("FLUX.1", "flux1", ("kontext_images",), ("sft", "direct_distill"), ("kohya", "diffusers"),
                       memory_plan=True)
FLUX2 = TrainingFamily("FLUX.2", "flux2", ("edit_image",), ("sft",), ("diffusers",), memory_plan=False)
FLUX3 = TrainingFamily("FLUX 3", "flux3", ("edit_image",), ("sft",), ("diffusers",), memory_plan=False)
FAMILIES = (FLUX1, FLUX2, FLUX3)


def by_name(name: str) -> TrainingFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise EngineError(f"No training family {name!r}; known: {', '.join(f.name for f in FAMILIES)}.")


def _file_keys(model_configs):
    """The tensor names of every safetensors model among ``model_configs`` (other files are passed over: FLUX.1's
    loaders read other formats and name problems themselves)."""
    from ..loading.files import read_state_dict, resolve_group
    for model_config in model_configs:
        try:
            items = model_config.resolve()
        except Exception:  # noqa: BLE001 - left to the loader, which names the problem
            continue
        for item in items:
            name = pathlib.Path(item).name
            if pathlib.Path(item).is_file() and not name.endswith((".safetensors", ".safetensors.index.json")):
                continue
            try:
                yield read_state_dict(resolve_group(item), device="meta").keys()
            except Exception:  # noqa: BLE001 - not a safetensors model
                continue


def family_of_configs(model_configs) -> TrainingFamily:
    """The family of these ModelConfigs' files (see the module's docstring)."""
    from ..flux2.loading import detect_flux2
    from ..flux3.loading import detect_flux3
    flux2 = False
    for keys in _file_keys(model_configs):
        if detect_flux3(keys)[0] in ("dit", "text_encoder"):
            return FLUX3
        flux2 = flux2 or detect_flux2(keys)[0] != "unknown"
    return FLUX2 if flux2 else FLUX1


def family_of(config) -> TrainingFamily:
    """The family of a run (``--model_paths``, ``--model_id_with_origin_paths``)."""
    from .model import parse_model_configs
    return family_of_configs([c for c, _fp8 in parse_model_configs(config)])
