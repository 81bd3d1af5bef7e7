"""The studio's EliGen requests: entity prompts and mask files -> the pipeline's seed arguments, and the EliGen
LoRA the job needs (``DiffSynth-Studio/Eligen``, attached beside the person's own LoRAs).

Request keys: ``eligen_entity_prompts`` (list of str), ``eligen_entity_masks`` (one file per prompt; white or
painted = the entity's area), ``eligen_enable_on_negative``, ``eligen_enable_inpaint`` (with ``input_image``: only
the entities' areas of that image are repainted). Masks of another size are fitted to the output size (noted);
an entity without a prompt, or a prompt without a painted area, is refused by its number.
"""
from __future__ import annotations

import pathlib

from engine import registry
from engine import safe_files
from engine.errors import EngineError

ELIGEN_LORA = ("DiffSynth-Studio/Eligen", "model_bf16.safetensors")
ELIGEN_LORA_NAME = "EliGen"


def validate(req: dict, variant, notes: list) -> None:
    """Read and check the EliGen part of ``req`` in place: ``req["_eligen"]`` = {"prompts", "masks", "input"}."""
    prompts = [str(p or "").strip() for p in (req.get("eligen_entity_prompts") or [])]
    paths = list(req.get("eligen_entity_masks") or [])
    req["eligen_enable_on_negative"] = bool(req.get("eligen_enable_on_negative"))
    req["eligen_enable_inpaint"] = bool(req.get("eligen_enable_inpaint"))
    if not prompts and not any(paths):
        if req.get("input_image") or req["eligen_enable_inpaint"]:
            raise EngineError("An input image is used with EliGen's inpaint mode only: add entities, or leave it out.")
        return
    if variant.control != "controlnet":      # FLUX.1-dev-type transformers (the EliGen LoRA's base)
        raise EngineError(f"EliGen works with FLUX.1-dev (its LoRA was trained on it), not {variant.name}.")
    from studio import eligen_layout
    from engine.sizes import normalize_size
    w, h, _ = normalize_size(req["width"], req["height"])
    size = (w, h)
    image = None
    if req["eligen_enable_inpaint"]:
        # The output keeps the input's own size: the model works on it padded (edges repeated) to multiples of 16,
        # the padding belongs to no entity (so it is kept), and it is cropped away after (as in Inpaint & Control).
        if not req.get("input_image"):
            raise EngineError("Inpaint mode repaints the entities' areas of an input image: upload one.")
        from engine.images import load_user_image
        from studio.features.inpaint import work_size
        image = load_user_image(req["input_image"], notes=notes)
        size = image.size
        work = work_size(size)
        req["width"], req["height"] = work
        if work != size:
            req["_crop_to"] = size
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
    req["_eligen"] = {"prompts": entity_prompts, "masks": masks, "input": image}


def pipe_kwargs(req: dict) -> dict:
    e = req.get("_eligen")
    if not e:
        return {}
    masks = e["masks"]
    if e["input"] is not None and e["input"].size != (req["width"], req["height"]):
        from studio.features.inpaint import padded, padded_mask
        work = (req["width"], req["height"])
        masks = [padded_mask(m, work) for m in masks]
    out = {"eligen_entity_prompts": e["prompts"], "eligen_entity_masks": masks,
           "eligen_enable_on_negative": req["eligen_enable_on_negative"],
           "eligen_enable_inpaint": req["eligen_enable_inpaint"]}
    if e["input"] is not None:
        out["input_image"] = e["input"] if e["input"].size == (req["width"], req["height"]) else \
            padded(e["input"], (req["width"], req["height"]))
    return out


def lora_file(variant, models_dir) -> pathlib.Path:
    """The EliGen LoRA for this variant (the demo's random-weight twin for a demo variant), downloaded if needed."""
    from engine.model_config import ModelConfig
    if variant.demo:
        return write_demo_lora(models_dir)
    return ModelConfig(model_id=ELIGEN_LORA[0], origin_file_pattern=ELIGEN_LORA[1]).resolve(models_dir)[0]


def recipe_entries(req: dict) -> dict:
    e = req.get("_eligen")
    if not e:
        return {}
    return {"eligen_entity_prompts": e["prompts"],
            "eligen_entity_masks": [{"copy": f".ent{k}.png", "size": list(m.size)} for k, m in enumerate(e["masks"])],
            "eligen_enable_on_negative": req["eligen_enable_on_negative"],
            "eligen_enable_inpaint": req["eligen_enable_inpaint"]}


def save_copies(req: dict, result_path) -> None:
    e = req.get("_eligen")
    if not e:
        return
    result_path = pathlib.Path(result_path)
    for k, m in enumerate(e["masks"]):
        safe_files.save_image(m, result_path.with_name(result_path.stem + f".ent{k}.png"))
    if e["input"] is not None:
        safe_files.save_image(e["input"], result_path.with_name(result_path.stem + ".input.png"))


def studio_variants() -> list:
    return [v for v in registry.studio_variants() if v.control == "controlnet"]


DEMO_LORA_ID = "FLUX-Studio/Eligen-random-demo"


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
