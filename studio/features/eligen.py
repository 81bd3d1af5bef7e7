"""EliGen: regional prompts. Entity prompts and mask files -> the pipeline's seed arguments, with the EliGen LoRA
(``DiffSynth-Studio/Eligen``) attached beside the person's own LoRAs.

Request keys: ``eligen_entity_prompts`` (list of str), ``eligen_entity_masks`` (one file per prompt; white or
painted = the entity's area), ``eligen_enable_on_negative``, ``eligen_enable_inpaint`` (with ``input_image``: only
the entities' areas of that image are repainted). Masks of another size are fitted to the output size (noted);
an entity without a prompt, or a prompt without a painted area, is refused by its number. The masks as used are
saved beside the result (``<name>.ent0.png``, ...; the input image as ``<name>.input.png``).

The EliGen tab's page helpers (canvas, painted layout, layout files, restore) are in ``eligen_page``.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

from engine import registry
from engine.errors import EngineError

from .base import Feature
from .padding import cropped, padded, padded_mask, work_size

ELIGEN_LORA = ("DiffSynth-Studio/Eligen", "model_bf16.safetensors")
ELIGEN_LORA_NAME = "EliGen"
DEMO_LORA_ID = "FLUX-Studio/Eligen-random-demo"
INPUT_COPY = ".input.png"        # the input image of inpaint mode, beside the result


@dataclasses.dataclass(frozen=True)
class EligenInputs:
    """The request keys of EliGen (as sent)."""

    eligen_entity_prompts: tuple = dataclasses.field(default=(), metadata={"kinds": (list, tuple)})
    eligen_entity_masks: tuple = dataclasses.field(default=(), metadata={"kinds": (list, tuple),
                                                                        "file": "an entity mask"})
    eligen_enable_on_negative: bool = False
    eligen_enable_inpaint: bool = False
    input_image: Optional[str] = dataclasses.field(default=None, metadata={"file": "the input image"})


@dataclasses.dataclass
class EligenState:
    prompts: list                # one per entity
    masks: list                  # "L" images at the output size, 255 = the entity's area
    on_negative: bool
    inpaint: bool
    input: Optional[object]      # the input image (inpaint mode), its own size
    crop_to: Optional[tuple]     # the output size when the model works on a padded one


def studio_variants() -> list:
    """The variants EliGen works with: FLUX.1-dev-type transformers (its LoRA's base)."""
    return [v for v in registry.studio_variants() if v.control == "controlnet"]


def _entities(prompts: list, paths: list, size, notes: list) -> tuple:
    """(prompts, masks) of the entities a page sent: empty rows skipped, half-filled ones refused by number."""
    from studio import eligen_layout
    entity_prompts, masks = [], []
    for k in range(max(len(prompts), len(paths))):
        prompt = prompts[k] if k < len(prompts) else ""
        path = paths[k] if k < len(paths) else None
        mask = None
        if path:
            mask, note = eligen_layout.fit(path, size)
            if note:
                notes.append(f"Entity {k + 1}: {note}")
            if not mask.getbbox():
                mask = None
        if not prompt and mask is None:
            continue                               # an empty row on the page
        if not prompt:
            raise EngineError(f"Entity {k + 1} has a painted area but no prompt: write what it shows, or clear its "
                              f"area.")
        if mask is None:
            raise EngineError(f"Entity {k + 1} ({prompt!r}) has no painted area: paint where it goes in its colour, "
                              f"or remove the entity.")
        entity_prompts.append(prompt)
        masks.append(mask)
    if not entity_prompts:
        raise EngineError("No entities: paint an area and give it a prompt.")
    return entity_prompts, masks


class EligenFeature(Feature):
    name = "eligen"
    Inputs = EligenInputs

    def validate(self, inputs: EligenInputs, job) -> Optional[EligenState]:
        prompts = [str(p or "").strip() for p in (inputs.eligen_entity_prompts or [])]
        paths = list(inputs.eligen_entity_masks or [])
        on_negative, inpaint = bool(inputs.eligen_enable_on_negative), bool(inputs.eligen_enable_inpaint)
        if not prompts and not any(paths):
            if inputs.input_image or inpaint:
                raise EngineError("An input image is used with EliGen's inpaint mode only: add entities, or leave it "
                                  "out.")
            return None
        if job.variant.control != "controlnet":      # FLUX.1-dev-type transformers (the EliGen LoRA's base)
            raise EngineError(f"EliGen works with FLUX.1-dev (its LoRA was trained on it), not {job.variant.name}.")
        from engine.sizes import normalize_size
        w, h, _ = normalize_size(job.width, job.height)
        size, image, crop_to = (w, h), None, None
        if inpaint:
            # The output keeps the input's own size: the model works on it padded (edges repeated) to multiples of
            # 16, the padding belongs to no entity (so it is kept), and it is cropped away after.
            if not inputs.input_image:
                raise EngineError("Inpaint mode repaints the entities' areas of an input image: upload one.")
            from engine.images import load_user_image
            image = load_user_image(inputs.input_image, notes=job.notes)
            size = image.size
            job.width, job.height = work_size(size)
            crop_to = size if (job.width, job.height) != size else None
        entity_prompts, masks = _entities(prompts, paths, size, job.notes)
        return EligenState(entity_prompts, masks, on_negative, inpaint, image, crop_to)

    def pipe_kwargs(self, state: EligenState, job, notes: list) -> dict:
        work = (job.width, job.height)
        out = {"eligen_entity_prompts": state.prompts,
               "eligen_entity_masks": [padded_mask(m, work) for m in state.masks],
               "eligen_enable_on_negative": state.on_negative, "eligen_enable_inpaint": state.inpaint}
        if state.input is not None:
            out["input_image"] = padded(state.input, work)
        return out

    def loras(self, state: EligenState, job, models_dir) -> list:
        return [{"name": ELIGEN_LORA_NAME, "weight": 1.0, "path": lora_file(job.variant, models_dir)}]

    def finish(self, state: EligenState, job, image):
        return cropped(image, state.crop_to)

    def recipe(self, state: EligenState, job, copies) -> dict:
        if state.input is not None:
            copies.add(state.input, suffix=INPUT_COPY)
        return {"eligen_entity_prompts": state.prompts,
                "eligen_entity_masks": [{"copy": copies.add(m, "ent"), "size": list(m.size)} for m in state.masks],
                "eligen_enable_on_negative": state.on_negative, "eligen_enable_inpaint": state.inpaint}

    def restore(self, found: dict, result) -> dict:
        """The entities with their masks' copies (None for one that is gone), the flags, and in inpaint mode the
        input image's copy."""
        from ..recipes import sidecar
        out = {k: found[k] for k in ("eligen_entity_prompts", "eligen_enable_on_negative", "eligen_enable_inpaint")
               if k in found}
        if isinstance(found.get("eligen_entity_masks"), list):
            copies = [sidecar(result, e.get("copy")) if isinstance(e, dict) else None
                      for e in found["eligen_entity_masks"]]
            out["eligen_entity_masks"] = [str(c) if c else None for c in copies]
        source = sidecar(result, INPUT_COPY) if found.get("eligen_enable_inpaint") else None
        if source is not None:
            out["input_image"] = str(source)
        return out

    def describe(self, recipe: dict) -> list:
        """Each entity's prompt with its mask's copy beside the image (so the layout can be redone)."""
        prompts = recipe.get("eligen_entity_prompts") or []
        if not prompts:
            return []
        masks = recipe.get("eligen_entity_masks") or []
        lines = ["Entities (EliGen regional prompts):"]
        for k, prompt in enumerate(prompts):
            entry = masks[k] if k < len(masks) and isinstance(masks[k], dict) else {}
            lines.append(f"  {k + 1}: {prompt}  · mask <image name>{entry.get('copy', '?')}")
        flags = [name for key, name in (("eligen_enable_on_negative", "on the negative prompt too"),
                                        ("eligen_enable_inpaint", "inpainted into the input (<image name>.input.png)"))
                 if recipe.get(key)]
        if flags:
            lines.append("  Regions applied " + "; ".join(flags))
        return lines


def lora_file(variant, models_dir) -> pathlib.Path:
    """The EliGen LoRA for this variant (the demo's random-weight twin for a demo variant), downloaded if needed."""
    from engine.model_config import ModelConfig
    if variant.demo:
        return write_demo_lora(models_dir)
    return ModelConfig(model_id=ELIGEN_LORA[0], origin_file_pattern=ELIGEN_LORA[1]).resolve(models_dir)[0]


def write_demo_lora(models_dir, seed: int = 0) -> pathlib.Path:
    """A random-weight stand-in for the EliGen LoRA, in its file's layout (DiffSynth-Studio's LoRA keys over its
    FluxDiT names, as ``model_bf16.safetensors``), sized for the random-weight demo transformer. Written once,
    atomically."""
    import torch
    from safetensors.torch import save_file
    from engine.demo import TRANSFORMER
    path = pathlib.Path(models_dir) / DEMO_LORA_ID / ELIGEN_LORA[1]
    if path.is_file():
        return path
    width = TRANSFORMER["hidden_size"]
    rank, gen, tensors = 4, torch.Generator().manual_seed(seed), {}
    for i in range(TRANSFORMER["depth"]):
        for name in ("a_to_qkv", "b_to_qkv"):
            key = f"blocks.{i}.attn.{name}"
            tensors[f"{key}.lora_A.default.weight"] = (torch.randn(rank, width, generator=gen) * 0.3).bfloat16()
            tensors[f"{key}.lora_B.default.weight"] = (torch.randn(3 * width, rank, generator=gen) * 0.3).bfloat16()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".tmp")
    save_file(tensors, str(part))
    part.replace(path)
    return path
