"""Prompt encoding for FLUX.1: CLIP-L's pooled vector (77 tokens) and T5-XXL's hidden states.

Both are tokenised with padding to max_length and truncation, as the seed and diffusers do. Encodings are
cached by prompt, so regenerating with a new seed or size does not run the text encoders again.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

CLIP_MAX_LENGTH = 77


def load_tokenizer(folder, kind: str):
    """A tokenizer from one of the official folders (``tokenizer/`` for CLIP, ``tokenizer_2/`` for T5), offline."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        from .errors import EngineError
        raise EngineError(f"Could not read the {kind} tokenizer in {folder}: {exc}. "
                          f"The folder should hold the files of the model's {'tokenizer/' if kind == 'CLIP' else 'tokenizer_2/'} folder.") from exc


def _identity(module) -> tuple:
    """What makes an encoder's output: its files (stable across pipelines) and how its weights are stored."""
    files = tuple(str(f) for f in getattr(module, "flux_studio_files", ()))
    dtype = next((str(p.dtype) for p in module.parameters()), "")
    return (files or id(module), dtype)


class PromptEncoder:
    """``cache`` may be shared between pipelines (the studio keeps one across model switches): entries are keyed
    by the encoders' files and storage dtype, never by object identity."""

    def __init__(self, tokenizer_1, tokenizer_2, text_encoder_1, text_encoder_2, cache_size: int = 16,
                 cache: OrderedDict | None = None):
        self.tokenizer_1, self.tokenizer_2 = tokenizer_1, tokenizer_2
        self.text_encoder_1, self.text_encoder_2 = text_encoder_1, text_encoder_2
        self._cache: OrderedDict = OrderedDict() if cache is None else cache
        self.cache_size = cache_size

    def clear(self):
        self._cache.clear()

    def _ids(self, tokenizer, prompt, max_length):
        return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompt: str, t5_sequence_length: int = 512, device="cpu", run_model=None):
        """Returns ``(prompt_emb (1, T, D), pooled (1, P))`` on ``device``; ``run_model(name, module, fn)``
        lets the pipeline move an encoder in for its call (offloading)."""
        key = (prompt, int(t5_sequence_length), _identity(self.text_encoder_1), _identity(self.text_encoder_2),
               getattr(self.tokenizer_1, "name_or_path", id(self.tokenizer_1)),
               getattr(self.tokenizer_2, "name_or_path", id(self.tokenizer_2)))
        if key in self._cache:
            self._cache.move_to_end(key)
            emb, pooled = self._cache[key]
            return emb.to(device), pooled.to(device)
        run = run_model or (lambda name, module, fn: fn(module))
        clip_ids = self._ids(self.tokenizer_1, prompt, CLIP_MAX_LENGTH)
        t5_ids = self._ids(self.tokenizer_2, prompt, int(t5_sequence_length))
        pooled = run("text_encoder_1", self.text_encoder_1,
                     lambda m: m(clip_ids.to(m.device), output_hidden_states=False).pooler_output)
        emb = run("text_encoder_2", self.text_encoder_2, lambda m: m(t5_ids.to(m.device)).last_hidden_state)
        self._cache[key] = (emb.detach().cpu(), pooled.detach().cpu())
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb.to(device), pooled.to(device)
