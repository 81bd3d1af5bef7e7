"""BFL's FLUX 3 prompt upsampler (black-forest-labs/flux-3-image-klein-pup), which the model card says to run before
FLUX 3 Image Klein: it expands a short request into the long caption the model was trained on (text-to-image), or an
edit instruction into the full instruction, written from the reference images (editing).

The upsampler is a Qwen3.5 fine-tune, loaded with transformers' ``Qwen3_5ForConditionalGeneration`` and its processor
from the local folder (no remote code). The request is run exactly as diffusers' FLUX 3 modular pipelines run it
(``diffusers.modular_pipelines.flux3.prompt_upsampler``, whose functions are called here): BFL's system prompt per
mode (``t2i``; ``i2i`` when there are references), the user turn (the request; for an edit the reference images, each
turned RGB over white, resized to a multiple of 32 within a pixel budget by reference count and re-encoded as JPEG 92,
then BFL's scaffold around the instruction), the chat template without thinking, one GREEDY generation of at most
3584 new tokens (``do_sample=False``, whatever the folder's generation config says), and the cleanup: the new tokens
decoded without special tokens, stripped; an empty caption is an error.

Not in diffusers' block, and off unless asked: ``canvas=True`` puts the output's aspect ratio on a first line
``TARGET CANVAS: W:H`` (reduced, e.g. 16:9) in a text-to-image request, which BFL's t2i system prompt says the
request may begin with.

The studio calls ``upsample_prompt(...)`` before the job and records the caption it returns; the pipeline itself
does not run the upsampler (a ~9B model: load it, upsample, ``release()`` it, then load FLUX 3).
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Optional

from ..errors import EngineError

MODEL_NAME = "FLUX.3-Image-Klein-pup"                       # the engine.registry ADAPTERS row
MODEL_ID = "black-forest-labs/flux-3-image-klein-pup"
PATTERNS = ("*.safetensors", "*.json", "chat_template.jinja")
MAX_NEW_TOKENS = 3584                                       # diffusers' MAX_NEW_TOKENS
MAX_REFERENCES = 10


# ------------------------------------------------------------------------------------------------------------- files

def pup_folder(models_dir=None, demo: bool = False) -> pathlib.Path:
    """Where the upsampler's files live: ``<models>/black-forest-labs/flux-3-image-klein-pup/`` (the demo:
    ``<models>/FLUX-Studio/FLUX.3-Image-Klein-pup-random-demo/``)."""
    from ..downloads import local_dir_for, models_base_path
    if demo:
        from ..demo.flux3_pup import flux3_pup_demo_dir
        return flux3_pup_demo_dir(models_dir or models_base_path())
    return local_dir_for(pathlib.Path(models_dir or models_base_path()), MODEL_ID)


def missing_files(folder) -> list:
    """What the folder lacks to run the upsampler (empty when it is complete)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return ["the folder itself"]
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("the weights (*.safetensors)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        missing.append("tokenizer.json")
    if not _has_chat_template(folder):
        missing.append("chat_template.jinja")
    return missing


def _has_chat_template(folder: pathlib.Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        import json
        return "chat_template" in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def is_available(models_dir=None, demo: bool = False) -> bool:
    """Whether the upsampler can be offered (its files are all there); the studio hides the option otherwise."""
    return not missing_files(pup_folder(models_dir, demo))


def check_folder(folder) -> pathlib.Path:
    """The folder, or an EngineError naming what is missing and what to download where."""
    folder = pathlib.Path(folder)
    missing = missing_files(folder)
    if missing:
        target = f"models/{MODEL_ID}/"
        raise EngineError(
            f"The FLUX 3 prompt upsampler is not complete in {folder} (missing: {', '.join(missing)}). Download "
            f"all files of {MODEL_ID} (about 19 GB) into {target} under your models folder, e.g. "
            f"`hf download {MODEL_ID} --local-dir {target}`, or let the studio download it; or turn the prompt "
            "upsampler off to use the prompt as written.")
    return folder


# ------------------------------------------------------------------------------------------------------------ loading

def load_processor(folder):
    """The folder's processor: ``AutoProcessor`` (Qwen3.5's Qwen3VLProcessor); where its video processor cannot be
    built (transformers needs torchvision for it), the same processor without one: the tokenizer, the image processor
    and the chat template, which is all the upsampler uses."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen3VLProcessor
    try:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        pass

    class ImageOnlyProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    folder = pathlib.Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    template = (folder / "chat_template.jinja").read_text(encoding="utf-8") \
        if (folder / "chat_template.jinja").is_file() else getattr(tokenizer, "chat_template", None)
    return ImageOnlyProcessor(image_processor=AutoImageProcessor.from_pretrained(str(folder), local_files_only=True),
                              tokenizer=tokenizer, video_processor=None, chat_template=template)


class PromptUpsampler:
    """BFL's prompt upsampler: ``model`` (Qwen3_5ForConditionalGeneration) and ``processor``."""

    def __init__(self, model, processor, folder=None):
        self.model, self.processor, self.folder = model, processor, folder

    @classmethod
    def from_folder(cls, folder, device: str = "cpu", torch_dtype=None) -> "PromptUpsampler":
        """Load from the pup folder (offline; an EngineError names what is missing). ``torch_dtype``: bfloat16 by
        default, as the weights are stored."""
        import torch
        from transformers import Qwen3_5ForConditionalGeneration
        folder = check_folder(folder)
        model = Qwen3_5ForConditionalGeneration.from_pretrained(
            str(folder), local_files_only=True, dtype=torch_dtype or torch.bfloat16)
        return cls(model.to(device).eval(), load_processor(folder), folder)

    @classmethod
    def from_models_dir(cls, models_dir=None, demo: bool = False, **kwargs) -> "PromptUpsampler":
        """From ``<models>/black-forest-labs/flux-3-image-klein-pup/``; ``demo`` writes (once) and loads the
        random-weight twin."""
        if demo:
            from ..demo.flux3_pup import write_flux3_pup_demo
            from ..downloads import models_base_path
            write_flux3_pup_demo(models_dir or models_base_path())
        return cls.from_folder(pup_folder(models_dir, demo), **kwargs)

    def release(self) -> None:
        """Free the model (before FLUX 3 loads); the object cannot upsample afterwards."""
        self.model = None
        import gc
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def upsample(self, prompt: str, references=None, width: Optional[int] = None, height: Optional[int] = None,
                 seed: Optional[int] = None, canvas: bool = False, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """The upsampled caption of ``prompt``: text-to-image, or an edit of ``references`` (a PIL image, a path or a
        list of up to ten). Greedy, as diffusers: ``seed`` changes nothing (kept so callers pass the job's seed).
        ``canvas``: tell the upsampler the output's aspect ratio (``width`` x ``height``; text-to-image only, not in
        diffusers' block)."""
        from diffusers.modular_pipelines.flux3 import prompt_upsampler as dp
        if self.model is None:
            raise EngineError("This prompt upsampler was released; load it again (PromptUpsampler.from_folder).")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EngineError("The prompt upsampler needs a prompt to expand: write one, or turn the upsampler off.")
        images = _reference_images(references)
        request = prompt
        if canvas and not images:
            request = canvas_line(width, height) + "\n" + prompt
        try:
            prepared = dp.prepare_references(images) if images else None
            return dp.upsample_prompt(self.model, self.processor, request, images=prepared,
                                      max_new_tokens=int(max_new_tokens))
        except RuntimeError as e:
            if "empty caption" in str(e):
                raise EngineError("The prompt upsampler returned an empty caption; use the prompt as written or "
                                  "try other wording.") from e
            raise
        except ValueError as e:                  # a reference image over 200:1
            raise EngineError(f"The prompt upsampler cannot take this reference image: {e}") from e


def canvas_line(width, height) -> str:
    """``TARGET CANVAS: W:H``, the output's aspect ratio reduced (1360 x 768 -> 85:48)."""
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise EngineError(f"The canvas line needs the output's width and height in pixels, got {width} x {height}.")
    g = math.gcd(width, height)
    return f"TARGET CANVAS: {width // g}:{height // g}"


def _reference_images(references) -> list:
    """PIL images from a PIL image, a path, or a list of either (at most ten)."""
    import PIL.Image
    if references is None:
        return []
    items = list(references) if isinstance(references, (list, tuple)) else [references]
    if len(items) > MAX_REFERENCES:
        raise EngineError(f"The prompt upsampler takes at most {MAX_REFERENCES} reference images, got {len(items)}; "
                          "remove some.")
    images = []
    for i, item in enumerate(items):
        if isinstance(item, PIL.Image.Image):
            images.append(item)
        elif isinstance(item, (str, os.PathLike)):
            try:
                with PIL.Image.open(item) as im:
                    im.load()
                    images.append(im.copy())
            except OSError as e:
                raise EngineError(f"Reference image {i + 1} ({item}) cannot be read as an image: {e}") from e
        else:
            raise EngineError(f"Reference image {i + 1} must be a PIL image or a file path, got "
                              f"{type(item).__name__}.")
    return images


# ------------------------------------------------------------------------------------------------------- studio entry

def upsample_prompt(pipe_or_upsampler, prompt: str, references=None, width: Optional[int] = None,
                    height: Optional[int] = None, seed: Optional[int] = None, **kwargs) -> str:
    """The upsampled prompt, for the studio to call before a FLUX 3 job and record. ``pipe_or_upsampler``: a
    ``PromptUpsampler``, a pipeline carrying one as ``.prompt_upsampler``, or the pup folder (loaded for this call).
    ``references``: the job's reference images (``edit_image``); keyword arguments go to ``PromptUpsampler.upsample``.
    """
    upsampler = pipe_or_upsampler
    if isinstance(upsampler, (str, os.PathLike)):
        upsampler = PromptUpsampler.from_folder(upsampler)
    elif not isinstance(upsampler, PromptUpsampler):
        upsampler = getattr(pipe_or_upsampler, "prompt_upsampler", None)
        if not isinstance(upsampler, PromptUpsampler):
            raise EngineError(
                f"No prompt upsampler to run: {type(pipe_or_upsampler).__name__} carries none. Load one with "
                "engine.flux3.upsampler.PromptUpsampler.from_models_dir() (its files: "
                f"models/{MODEL_ID}/) and pass it, or set pipe.prompt_upsampler to it.")
    return upsampler.upsample(prompt, references=references, width=width, height=height, seed=seed, **kwargs)
