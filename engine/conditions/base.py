"""The interface between the denoising loop and its extra inputs (``Condition``), and how several combine.

Every extra input of ``pipe(...)`` is a ``Condition`` subclass in its own module. A subclass declares the call
arguments it reads (``call_args`` with their defaults), says whether a call asks for it (``requested``), prepares
itself once per image (``prepare``: images encoded, prompts encoded, inputs checked), and then plugs into the loop
through hooks. Each hook's default adds nothing, so a condition overrides only the ones it uses:

====================  ===========================================================  =============================
hook                  what it changes                                              who uses it
====================  ===========================================================  =============================
``prompt_text``       the text every model reads (T5-space tokens, pooled vector)   Redux, LoRA Encoder, Step1X
``image_tokens``      clean tokens appended to the image sequence (+ their ids)    Kontext, Step1X's reference
``features``          input channels concatenated to each latent token             FLUX.1-Fill, Flex.2
``dit_kwargs``        keyword arguments of the transformer call (residuals)        ControlNets, InfuseNet
``attention_kwargs``  entries of ``joint_attention_kwargs`` (mask, extra k/v)      EliGen, IP-Adapter
``transformer_text``  the text the transformer alone reads (others see the plain)  EliGen's entity prompts
``velocity``          the velocity after CFG, before the Euler step                 EliGen inpainting
====================  ===========================================================  =============================

The loop (``engine.pipeline``) calls the hooks of every prepared condition in ``CONDITIONS`` order and knows no
condition by name. ``engine.conditions.build_conditions`` dispatches the call's keyword arguments to the conditions
that declare them; an argument no condition declares is an error naming the known ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from PIL import Image

# Keyword arguments of diffusers' FluxTransformer2DModel that several conditions may each give: summed (several
# ControlNets add their residuals, as diffusers' FluxMultiControlNetModel does).
SUMMED_KWARGS = ("controlnet_block_samples", "controlnet_single_block_samples")


@dataclass
class Text:
    """What the models read beside the image: T5-space tokens (1, T, 4096), CLIP's pooled vector (1, 768) and
    the tokens' position ids (T, 3)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    ids: torch.Tensor


@dataclass
class ImageTokens:
    """Clean tokens appended after the generated image's in the transformer's sequence; their velocity is dropped."""

    tokens: torch.Tensor           # (1, N, C) packed latents, float32
    ids: torch.Tensor              # (N, 3) position ids


@dataclass
class ConditionContext:
    """What a condition needs to prepare itself for one image."""

    pipe: object                                  # the FluxImagePipeline
    height: int
    width: int
    device: torch.device                          # where the transformer computes
    dtype: torch.dtype                            # the transformer's compute dtype
    sigmas: torch.Tensor                          # the schedule: steps + 1 values, sigmas[i] at step i
    # PIL (already at the size wanted), or a (1, 3, H, W) tensor in [-1, 1] (FLUX.1-Fill's masked image) -> VAE
    # latents (1, 16, h/8, w/8)
    encode_image: Callable[[Image.Image], torch.Tensor]
    # prompt -> Text (CLIP + T5 at the call's t5_sequence_length, in the transformer's dtype); cached per prompt
    encode_prompt: Optional[Callable[[str], Text]] = None
    t5_sequence_length: int = 512
    cfg_scale: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    clean_latents: Optional[torch.Tensor] = None  # the encoded input_image (1, 16, h/8, w/8), when one is given

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass
class StepState:
    """One transformer call as the hooks see it."""

    step: int
    negative: bool                 # the CFG negative pass
    latents: torch.Tensor          # (1, N, 64) the generated image's tokens alone (what a ControlNet takes)
    latent_ids: torch.Tensor       # (N, 3)
    hidden_states: torch.Tensor    # what the transformer gets: latents + features, then the image tokens
    image_ids: torch.Tensor        # their ids
    timestep: torch.Tensor         # sigma, (1,)
    guidance: Optional[torch.Tensor]
    text: Text                     # the pass's text after ``prompt_text`` (before ``transformer_text``)
    extra: dict = field(default_factory=dict)


class Condition:
    """One kind of extra input of the loop. Subclasses override what they use; the defaults add nothing."""

    name = "condition"
    # The pipe(...) keyword arguments this condition reads, with their defaults (the seed's names and values).
    call_args: Mapping[str, object] = {}
    # Whether the prepared condition makes the text itself, so the pipeline does not run CLIP/T5 (set per instance
    # in ``prepare`` when it depends on the arguments).
    replaces_prompt = False

    # --------------------------------------------------------------------------------------------- dispatch
    @classmethod
    def requested(cls, args: Mapping, pipe) -> bool:
        """Whether a call with these arguments asks for this condition: by default when any of its inputs (the
        arguments whose default is None) is given (not None, not an empty list); a setting alone
        (``flex_control_strength``, ``eligen_enable_inpaint``) asks for nothing. A condition its model always
        needs (Fill) overrides this."""
        return any(_given(args.get(name)) for name, default in cls.call_args.items() if default is None)

    @classmethod
    def prepare(cls, ctx: ConditionContext, args: Mapping) -> Optional["Condition"]:
        """The condition for one image (inputs checked, images encoded), or None when it adds nothing."""
        raise NotImplementedError

    @classmethod
    def extra_tokens(cls, args: Mapping, width: int, height: int, t5_sequence_length: int = 512) -> int:
        """Tokens it adds to the transformer's sequence (text or image), estimated before anything is loaded: the
        memory planner makes room for them. ``t5_sequence_length``: the prompt's T5 tokens in this call."""
        return 0

    # ------------------------------------------------------------------------------------------------ hooks
    def prompt_text(self, text: Optional[Text], step: int, negative: bool) -> Optional[Text]:
        """The text every model reads at ``step`` for this pass (``text`` is None when a condition replaces the
        prompt and none has made it yet)."""
        return text

    def image_tokens(self) -> Optional[ImageTokens]:
        return None

    def features(self, step: int) -> Optional[torch.Tensor]:
        """Packed features (1, N, C) concatenated after the 64 latent features of each image token at ``step``
        (FLUX.1-Fill: 320, Flex.2: 132); None adds nothing."""
        return None

    def dit_kwargs(self, state: StepState) -> dict:
        """Extra keyword arguments of the transformer call (ControlNet residuals)."""
        return {}

    def attention_kwargs(self, state: StepState) -> dict:
        """Entries of the transformer's ``joint_attention_kwargs`` (EliGen's attention mask, IP-Adapter's keys)."""
        return {}

    def transformer_text(self, text: Text, negative: bool) -> Text:
        """The text the transformer alone reads (EliGen joins its entity prompts in front)."""
        return text

    def velocity(self, v: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """The velocity after CFG, before the Euler step (``tokens``: the generated image's current tokens)."""
        return v


def finite_number(value, name: str, hint: str) -> float:
    """A call argument that must be a finite number (a scale), as a float; anything else is named with ``hint`` (what
    the usual values mean)."""
    import math
    from numbers import Real
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        from ..errors import EngineError
        raise EngineError(f"{name} {value!r} is not a number ({hint}).")
    return float(value)


def pil_images(value, name: str) -> list:
    """``None``, one image or a list/tuple of images (the call argument ``name``) -> a list of PIL images; anything
    else is named, with how to open it."""
    if value is None:
        return []
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            from ..errors import EngineError
            raise EngineError(f"{where} is a {type(image).__name__}, not a PIL image; open it with "
                              f"engine.images.load_user_image (or PIL.Image.open) first.")
    return images


def _given(value) -> bool:
    if value is None:
        return False
    if isinstance(value, (list, tuple)) and not value:
        return False
    return True


def merge_dit_kwargs(parts: list) -> dict:
    """Combine the conditions' transformer arguments: residual lists are summed element-wise; any other argument
    given twice is an error (two conditions cannot both set it)."""
    out: dict = {}
    for part in parts:
        for key, value in (part or {}).items():
            if key not in out:
                out[key] = value
            elif key in SUMMED_KWARGS:
                if out[key] is None:
                    out[key] = value
                elif value is not None:
                    if len(out[key]) != len(value):
                        raise ValueError(f"{key}: residual lists of different lengths ({len(out[key])}, {len(value)})")
                    out[key] = [a + b for a, b in zip(out[key], value)]
            else:
                raise ValueError(f"Two conditions both set the transformer's {key!r}.")
    return out


def merge_attention_kwargs(parts: list) -> dict:
    """Combine the conditions' ``joint_attention_kwargs`` entries; an entry given twice is an error."""
    out: dict = {}
    for part in parts:
        for key, value in (part or {}).items():
            if key in out:
                raise ValueError(f"Two conditions both set the attention's {key!r}.")
            out[key] = value
    return out


def in_channels(pipe) -> int:
    """The transformer's input features per token: 64 (FLUX.1), 384 (FLUX.1-Fill), 196 (Flex.2)."""
    dit = getattr(pipe, "dit", None)
    return int(getattr(getattr(dit, "config", None), "in_channels", 64) or 64)
