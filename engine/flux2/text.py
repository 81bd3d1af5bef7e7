"""FLUX.2 prompt encoding: a chat-formatted prompt through the language model, three hidden states side by side.

klein (Qwen3): the user message alone, the chat template with the generation prompt and ``enable_thinking=False``
(so the assistant turn opens with an empty think block), padded to 512 tokens; ``hidden_states[9]``, ``[18]`` and
``[27]`` (index 0 is the embeddings) are stacked on the channel axis: (1, 512, 3 x hidden) -- 7680 for Qwen3-4B,
12288 for Qwen3-8B, the DiT's ``context_embedder`` width. [dev] (Mistral Small 3.x): BFL's system message and the
user message through the chat template without a generation prompt, padded to 512; layers 10/20/30 -> 15360.
This is how DiffSynth-Studio's ``Flux2ImagePipeline`` and diffusers' ``Flux2KleinPipeline`` / ``Flux2Pipeline``
encode; padding tokens are encoded too (the attention mask keeps them out of the real tokens' attention) and the DiT
reads all 512.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .loading import MISTRAL_LAYERS, QWEN3_LAYERS

MAX_LENGTH = 512
MISTRAL_SYSTEM = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object attribution and actions without speculation.")


def load_tokenizer(folder):
    """The tokenizer of an official ``tokenizer/`` folder (offline)."""
    from transformers import AutoTokenizer

    from ..errors import EngineError
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable folder gets the same message
        raise EngineError(f"Could not read the FLUX.2 tokenizer in {folder}: {exc}. The folder should hold the "
                          f"files of the model's tokenizer/ folder.") from exc


def qwen3_ids(tokenizer, prompt: str, max_length: int = MAX_LENGTH):
    """(input_ids, attention_mask) of a klein prompt, (1, max_length) each."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    enc = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
    return enc["input_ids"], enc["attention_mask"]


def mistral_ids(tokenizer, prompt: str, max_length: int = MAX_LENGTH):
    """(input_ids, attention_mask) of a [dev] prompt: BFL's system message, then the prompt ([IMG] removed)."""
    messages = [[{"role": "system", "content": [{"type": "text", "text": MISTRAL_SYSTEM}]},
                 {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                        return_tensors="pt", padding="max_length", truncation=True,
                                        max_length=max_length)
    return enc["input_ids"], enc["attention_mask"]


def stacked_hidden_states(model, input_ids, attention_mask, layers) -> torch.Tensor:
    """The chosen hidden states side by side: (B, L, len(layers) x hidden)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    x = torch.stack([out.hidden_states[k] for k in layers], dim=1)          # (B, n, L, D)
    b, n, length, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, length, n * d)


class Flux2PromptEncoder:
    """Encodes prompts with one FLUX.2 text encoder; results cached by prompt (a new seed or size re-encodes
    nothing). ``kind`` is "qwen3" (klein) or "mistral3" ([dev])."""

    def __init__(self, tokenizer, text_encoder, kind: str = "qwen3", cache_size: int = 16):
        self.tokenizer, self.text_encoder, self.kind = tokenizer, text_encoder, kind
        self.layers = getattr(text_encoder, "flux_studio_layers", None) or (
            QWEN3_LAYERS if kind == "qwen3" else MISTRAL_LAYERS)
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    def ids(self, prompt: str, max_length: int = MAX_LENGTH):
        return (qwen3_ids if self.kind == "qwen3" else mistral_ids)(self.tokenizer, prompt, max_length)

    @torch.no_grad()
    def encode(self, prompt: str, max_length: int = MAX_LENGTH, run_model=None) -> torch.Tensor:
        """(1, max_length, 3 x hidden) on the CPU in the encoder's dtype; ``run_model(module, fn)`` lets the
        pipeline move the encoder in for its call."""
        key = (prompt, int(max_length))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        ids, mask = self.ids(prompt, max_length)
        run = run_model or (lambda module, fn: fn(module))

        def call(m):
            dev = next(m.parameters()).device
            return stacked_hidden_states(m, ids.to(dev), mask.to(dev), self.layers)

        emb = run(self.text_encoder, call).detach().cpu()
        self.cache[key] = emb
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return emb
