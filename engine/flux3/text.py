"""FLUX 3 Image Klein prompt encoding: the prompt through Qwen3-VL-4B-Instruct, eight hidden states side by side.

As diffusers' modular ``Flux3TextEncoderStep`` (``_get_qwen3_vl_prompt_embeds``) does it: the prompt alone as the user
message through the chat template with the generation prompt (no system message; Qwen3-VL Instruct opens no think
block); the token window is the prompt's length rounded up to a multiple of 80 (``PAD_MULTIPLE``), capped at
``max_sequence_length``, right-padded; ``hidden_states[4]``, ``[8]``, ..., ``[32]`` (index 0 is the embeddings) are
stacked on the channel axis: (1, L, 8 x 2560) = 20480, the DiT's ``context_embedder`` width. The padding is masked
inside Qwen3-VL but the DiT reads every token of the window, so the padding's own position ids change the result:

- ``"seed"`` (DiffSynth-Studio, the default): position ids ``cumsum(mask) - 1`` -- the padding repeats the last real
  position -- and at most 4096 tokens;
- ``"diffusers"``: the real tokens 0, 1, ... and every padding token 1 (what transformers 4.57, BFL's training
  environment, gave), at most 8192 tokens.

For a prompt that fills its window exactly (no padding) and is shorter than 4096 tokens the two agree.
``layers`` is a parameter (the pipeline takes it from the encoder's ``flux_studio_layers`` when the loader set one;
tiny test models have fewer layers). The encoder may be ``Qwen3VLForConditionalGeneration`` or its text model alone:
both take ``input_ids``, ``attention_mask``, ``position_ids`` (B, L) and return ``hidden_states``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from ..errors import EngineError

LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)
PAD_MULTIPLE = 80
MAX_LENGTH = {"seed": 4096, "diffusers": 8192}


def load_tokenizer(folder):
    """The Qwen3-VL processor of an official folder (offline), else its tokenizer alone (the prompt needs only the
    chat template and the tokenizer); a template kept in the folder's chat_template.jinja / .json is used when the
    loaded object has none."""
    from transformers import AutoProcessor, AutoTokenizer
    try:
        tokenizer = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception:  # noqa: BLE001 - no image/video processor (or torchvision): the tokenizer is enough for prompts
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable folder gets the same message
            raise EngineError(f"Could not read the FLUX 3 (Qwen3-VL) tokenizer in {folder}: {exc}. The folder should "
                              f"hold Qwen3-VL-4B-Instruct's tokenizer files (tokenizer.json, tokenizer_config.json and "
                              f"its chat template).") from exc
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = folder_chat_template(folder)
    return tokenizer


def folder_chat_template(folder):
    """The chat template a processor folder keeps beside the tokenizer (chat_template.jinja / .json), else None."""
    import json
    import pathlib
    folder = pathlib.Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None


def text_tokenizer(tokenizer):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def prompt_inputs(tokenizer, prompt: str, max_length: int, pad_multiple: int = PAD_MULTIPLE,
                  convention: str = "seed"):
    """(input_ids, attention_mask, position_ids), (1, L) each, L = the window."""
    if not isinstance(prompt, str):
        raise EngineError(f"The prompt must be a str, got {type(prompt).__name__}.")
    if getattr(tokenizer, "chat_template", None) is None and getattr(text_tokenizer(tokenizer), "chat_template",
                                                                     None) is None:
        raise EngineError("The FLUX 3 tokenizer has no chat template: load Qwen3-VL-4B-Instruct's tokenizer folder "
                          "(its chat_template.json / chat_template.jinja).")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    tok = text_tokenizer(tokenizer)
    real = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].shape[1]
    window = min(math.ceil(real / pad_multiple) * pad_multiple, max_length)
    enc = tok(text, return_tensors="pt", padding="max_length", padding_side="right", truncation=True,
              max_length=window)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if convention == "seed":
        positions = mask.long().cumsum(-1) - 1
    elif convention == "diffusers":
        positions = torch.arange(ids.shape[1])[None].masked_fill(mask == 0, 1)
    else:
        raise ValueError(f"unknown text convention {convention!r}; use 'seed' or 'diffusers'")
    return ids, mask, positions


def stacked_hidden_states(model, input_ids, attention_mask, position_ids, layers) -> torch.Tensor:
    """The chosen hidden states side by side: (B, L, len(layers) x hidden)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states
    if max(layers) >= len(hidden):
        raise EngineError(f"The FLUX 3 text encoder returns {len(hidden)} hidden states; hidden state {max(layers)} is "
                          f"needed (layers {tuple(layers)}).")
    x = torch.stack([hidden[k] for k in layers], dim=1)                 # (B, n, L, D)
    b, n, length, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, length, n * d)


class Flux3PromptEncoder:
    """Encodes prompts with Qwen3-VL; results cached by (prompt, length, convention)."""

    def __init__(self, tokenizer, text_encoder, layers=None, pad_multiple: int = PAD_MULTIPLE, cache_size: int = 16):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.layers = tuple(layers or getattr(text_encoder, "flux_studio_layers", None) or LAYERS)
        self.pad_multiple = int(pad_multiple)
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    def inputs(self, prompt: str, max_length=None, convention: str = "seed"):
        length = int(max_length or MAX_LENGTH.get(convention, MAX_LENGTH["seed"]))
        return prompt_inputs(self.tokenizer, prompt, length, self.pad_multiple, convention)

    @torch.no_grad()
    def encode(self, prompt: str, max_length=None, convention: str = "seed", run_model=None) -> torch.Tensor:
        """(1, L, 8 x hidden) on the CPU in the encoder's dtype; ``run_model(module, fn)`` lets the pipeline move the
        encoder in for its call."""
        key = (prompt, max_length, convention)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        ids, mask, positions = self.inputs(prompt, max_length, convention)
        run = run_model or (lambda module, fn: fn(module))

        def call(m):
            dev = next(m.parameters()).device
            return stacked_hidden_states(m, ids.to(dev), mask.to(dev), positions.to(dev), self.layers)

        emb = run(self.text_encoder, call).detach().cpu()
        self.cache[key] = emb
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return emb
