"""Nexus-GenV2's autoregressive model: transformers 5's Qwen2.5-VL plus ``vision_head`` and
``image_prefill_embeds``, and its 81 target embeddings computed in one forward pass (the seed's
``NexusGenAutoregressiveModel.get_target_embeddings``; see the package docstring for what the port changed).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..step1x.encoder import convert_qwen_vl, materialise_rotary, qwen_config

ROLE = "nexus_gen"
NUM_IMAGE_TOKENS = 81                 # the white 252x252 placeholder: 18x18 patches merged 2x2
PLACEHOLDER_SIZE = 252
MAX_PIXELS = 262640                   # the reference's bound (the seed's bound_image)
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"

# DiffSynth-Studio/Nexus-GenV2's config (the seed's nexus_gen.py), used when the weights' folder has no config.json.
PUBLISHED_CONFIG = {
    "model_type": "qwen2_5_vl", "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "image_token_id": 151655, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643,
    "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": False, "use_sliding_window": False, "video_token_id": 151656,
    "vision_config": {"hidden_size": 1280, "in_chans": 3, "model_type": "qwen2_5_vl", "spatial_patch_size": 14,
                      "tokens_per_second": 2, "torch_dtype": "bfloat16"},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652, "vision_token_id": 151654, "vocab_size": 152064,
}


def is_nexus_gen_ar(keys) -> bool:
    ks = set(keys)
    return "vision_head.weight" in ks and "image_prefill_embeds.weight" in ks


def nexus_gen_class():
    """The model class, made on first use (transformers is imported lazily)."""
    global _CLASS
    if _CLASS is None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        class NexusGenAR(Qwen2_5_VLForConditionalGeneration):
            """Qwen2.5-VL with the two heads Nexus-Gen adds (keys ``vision_head.weight``,
            ``image_prefill_embeds.weight`` beside transformers 5's own)."""

            def __init__(self, config):
                super().__init__(config)
                hidden = config.text_config.hidden_size
                self.vision_head = torch.nn.Linear(hidden, hidden, bias=False)
                self.image_prefill_embeds = torch.nn.Embedding(NUM_IMAGE_TOKENS, hidden)

        _CLASS = NexusGenAR
    return _CLASS


_CLASS = None


def config_of(folder) -> "object":
    """The folder's config.json if present, else the published one."""
    path = Path(folder) / "config.json"
    return qwen_config(json.loads(path.read_text()) if path.is_file() else PUBLISHED_CONFIG)


def convert_keys(sd: dict) -> dict:
    """The published (transformers 4.49) keys -> ``NexusGenAR``'s (transformers 5) keys; one to one."""
    return convert_qwen_vl(sd)


def build(config, device=None):
    model = nexus_gen_class()(config)
    if device is not None and torch.device(device).type != "meta":
        materialise_rotary(model, torch.device(device))
    return model


# ------------------------------------------------------------------------------------------------ inputs

def bound_image(image: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The seed's ``bound_image``: both sides multiples of 28, at most ``max_pixels`` pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    h, w = smart_resize(image.height, image.width, max_pixels=max_pixels)
    return image.resize((w, h))


def messages(instruction: str, editing: bool) -> list:
    """The seed's chat messages: the assistant's ``<image>`` is the target the model fills in."""
    if editing:
        if "<image>" not in instruction:
            instruction = "<image> " + instruction
        return [{"role": "user", "content": instruction},
                {"role": "assistant", "content": "Here is the image: <image>"}]
    instruction = f"Generate an image according to the following description: {instruction}"
    return [{"role": "user", "content": instruction},
            {"role": "assistant", "content": "Here is an image based on the description: <image>"}]


def processor_inputs(processor, instruction: str, reference: Image.Image | None):
    """Token ids, attention mask, pixel values and image grids: the reference (bounded) first when editing, then the
    white placeholder whose tokens the model predicts."""
    images = [Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), (255, 255, 255))]
    if reference is not None:
        images = [bound_image(reference.convert("RGB"))] + images
    text = processor.apply_chat_template(messages(instruction, reference is not None), tokenize=False,
                                         add_generation_prompt=False)
    text = text.replace("<image>", VISION_TOKENS)
    return processor(text=[text], images=images, padding=True, return_tensors="pt")


# ------------------------------------------------------------------------------------------------ forward

@torch.no_grad()
def target_embeddings(model, processor, instruction: str, reference: Image.Image | None = None, device=None,
                      num_tokens: int = NUM_IMAGE_TOKENS):
    """(target (81, H), reference tokens (n, H), image grids (images, 3)) as the seed's get_target_embeddings: one
    forward pass with the placeholder's tokens replaced by ``image_prefill_embeds``; the target is the
    ``vision_head`` output one position before each placeholder token."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    inputs = processor_inputs(processor, instruction, reference)
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    grid = inputs["image_grid_thw"].to(device)
    qwen = model.model
    embeds = qwen.get_input_embeddings()(ids)
    pixels = inputs["pixel_values"].to(device=device, dtype=qwen.visual.dtype)
    image_embeds = qwen.visual(pixels, grid_thw=grid).pooler_output.to(embeds.dtype)
    n_in = image_embeds.shape[0] - num_tokens              # the reference's tokens (0 when generating)
    image_mask = ids == model.config.image_token_id
    in_mask = image_mask & (image_mask.cumsum(dim=1) <= n_in)
    target_mask = image_mask & ~in_mask
    embeds = embeds.masked_scatter(in_mask.unsqueeze(-1).expand_as(embeds), image_embeds[:n_in])
    prefill = model.image_prefill_embeds(torch.arange(num_tokens, device=device)).to(embeds.dtype)
    embeds = embeds.masked_scatter(target_mask.unsqueeze(-1).expand_as(embeds), prefill)
    position_ids, _ = qwen.get_rope_index(ids, image_mask.int(), image_grid_thw=grid, attention_mask=mask)
    hidden = qwen.language_model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask,
                                 use_cache=False).last_hidden_state          # after the final norm
    out = model.vision_head(hidden)
    return out[:, :-1][target_mask[:, 1:]], image_embeds[:n_in], grid


__all__ = ["ROLE", "NUM_IMAGE_TOKENS", "PUBLISHED_CONFIG", "MAX_PIXELS", "bound_image", "build", "config_of",
           "convert_keys", "is_nexus_gen_ar", "messages", "nexus_gen_class", "processor_inputs",
           "target_embeddings"]
