"""The seed's validate step: generate with the trained weights, fixed prompts and seed, images saved in the run.

During training (``--validate_prompt``, ``--validate_steps``) the pipeline being trained samples with its LoRA layers
active (or its updated full weights); afterwards ``validate_lora`` does what the seed's ``validate_lora/*.py``
scripts do: load the base model, ``pipe.load_lora(pipe.dit, file)`` and generate.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

from PIL import Image

from .checkpoints import SAMPLES_DIR, unique_path


def load_images(paths: Sequence) -> list:
    return [p if isinstance(p, Image.Image) else Image.open(p).convert("RGB") for p in paths or []]


def sample(pipe, prompts: Sequence[str], folder, step: int, seed: int = 0, height: int = 512, width: int = 512,
           num_inference_steps: int = 30, embedded_guidance: float = 3.5, kontext_images=None,
           label: Optional[str] = None, edit_images=None, cfg_scale: float = 1.0) -> list[str]:
    """Generate one image per prompt with ``pipe`` as it is now; returns the saved paths (never overwriting).
    A FLUX.2 pipeline takes ``edit_images`` (references) and ``cfg_scale``; a FLUX.1 one ``kontext_images``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dit = pipe.dit
    was_training = dit.training
    dit.eval()
    kind = type(pipe).__name__
    references = kind in ("Flux2ImagePipeline", "Flux3ImagePipeline")   # edit_image + true CFG; FLUX.1: Kontext
    refs = load_images(edit_images if references else kontext_images) or None
    extra = {"edit_image": refs, "cfg_scale": cfg_scale} if references else {"kontext_images": refs}
    if kind != "Flux3ImagePipeline":   # FLUX 3 has no guidance embedding
        extra["embedded_guidance"] = embedded_guidance
    paths = []
    try:
        for i, prompt in enumerate(prompts):
            image = pipe(prompt=prompt, seed=seed, height=height, width=width,
                         num_inference_steps=num_inference_steps, progress_bar_cmd=lambda x: x, **extra)
            name = f"{label or f'step-{int(step):06d}'}-{i}.png"
            path = unique_path(folder / name)
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            tmp.replace(path)
            paths.append(str(path))
    finally:
        dit.train(was_training)
    return paths


def metadata_references(config, column: str) -> list[str]:
    """The reference image paths of the dataset's first record in ``column`` (``kontext_images`` / ``edit_image``),
    when the run trains with that extra input from a metadata file; else []. An edit LoRA's samples need a
    reference, and the first training pair's is the one the person knows."""
    if column not in config.extra_input_names() or not config.dataset_metadata_path:
        return []
    from .data import cell_paths, read_metadata
    path = pathlib.Path(config.dataset_metadata_path).expanduser()
    rows = read_metadata(path) if path.is_file() else []
    base = pathlib.Path(config.dataset_base_path or ".").expanduser()
    for row in rows[:1]:
        return [str(base / p) for p in cell_paths(row.get(column)) or []]
    return []


def sample_into_run(pipe, run_dir, config, step: int) -> list[str]:
    """The validation samples of step ``step``; without ``--validate_kontext_image`` (``--validate_edit_image``) a
    Kontext (FLUX.2 edit) run samples with its dataset's first reference image."""
    kontext = config.validate_kontext_images or metadata_references(config, "kontext_images")
    edit = config.validate_edit_images or metadata_references(config, "edit_image")
    return sample(pipe, config.validate_prompts, pathlib.Path(run_dir) / SAMPLES_DIR, step,
                  seed=config.validate_seed, height=config.validate_height, width=config.validate_width,
                  num_inference_steps=config.validate_num_inference_steps,
                  embedded_guidance=config.validate_embedded_guidance,
                  kontext_images=kontext, edit_images=edit, cfg_scale=config.validate_cfg_scale)


def validate_lora(model_configs, lora_path, prompts: Sequence[str], folder, alpha: float = 1.0,
                  torch_dtype=None, device: Optional[str] = None, tokenizer_1_config=None,
                  tokenizer_2_config=None, progress: Optional[Callable] = None, tokenizer_config=None,
                  **sample_kwargs) -> list[str]:
    """The seed's validate_lora script as a function: base model + ``pipe.load_lora`` + generate. FLUX.2 and FLUX 3
    model files (the seed's validate_lora/FLUX.2-*.py) load ``Flux2ImagePipeline`` / ``Flux3ImagePipeline`` with
    ``tokenizer_config``, and take ``cfg_scale`` and ``edit_images`` among ``sample_kwargs``."""
    import torch

    from .families import FLUX1, FLUX3, family_of_configs
    dtype = torch_dtype or torch.bfloat16
    family = family_of_configs(model_configs)
    if family is not FLUX1:
        from ..lora import LoraError, attach_lora
        if family is FLUX3:
            from ..flux3.pipeline import Flux3ImagePipeline as pipeline_class
        else:
            from ..flux2.pipeline import Flux2ImagePipeline as pipeline_class
        pipe = pipeline_class.from_pretrained(torch_dtype=dtype, device=device, model_configs=model_configs,
                                              tokenizer_config=tokenizer_config)
        try:
            attach_lora(pipe.dit, str(lora_path), weight=alpha)
        except LoraError as exc:
            from ..errors import EngineError
            raise EngineError(str(exc)) from exc
    else:
        from ..pipeline import FluxImagePipeline
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=model_configs,
                                                 tokenizer_1_config=tokenizer_1_config,
                                                 tokenizer_2_config=tokenizer_2_config)
        pipe.load_lora(pipe.dit, str(lora_path), alpha=alpha, verbose=0)
    return sample(pipe, prompts, folder, step=0, label=pathlib.Path(lora_path).stem, **sample_kwargs)
