"""Training captions drafted by Qwen2.5-VL, the vision-language model Step1X-Edit already uses (its published
``Qwen/Qwen2.5-VL-7B-Instruct`` folder, loaded by ``engine.step1x``): one short sentence per image, for the person
to read and correct before training.

```python
captioner = Captioner(find_qwen_folder("models"), device="cuda")
captioner.caption(Image.open("dog.png"))      # "A brown dog sitting on green grass in the sun."
captioner.close()
```
"""
from __future__ import annotations

import gc
import pathlib
from typing import Optional

import torch
from PIL import Image

from ..errors import EngineError
from ..registry import QWEN_VL

INSTRUCTION = ("Write one caption for this image, as used to train an image generator: a single plain sentence "
               "naming the subject, what it does, the setting, the lighting and the style. No preamble.")
MAX_NEW_TOKENS = 60


def qwen_files(folder) -> list[str]:
    """The weight files of a Qwen2.5-VL folder (config.json beside them), or [] when it is not one."""
    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file():
        return []
    return sorted(str(p) for p in folder.glob("model*.safetensors"))


def find_qwen_folder(models_dir) -> Optional[pathlib.Path]:
    """``<models>/Qwen/Qwen2.5-VL-7B-Instruct`` (the seed's models-folder layout) when its files are there."""
    folder = pathlib.Path(models_dir) / QWEN_VL
    return folder if qwen_files(folder) else None


class Captioner:
    """Qwen2.5-VL loaded once for a batch of captions (greedy decoding: the same image gives the same caption)."""

    def __init__(self, folder, device: str = "cpu", dtype: Optional[torch.dtype] = None):
        from ..step1x.load import load_role
        files = qwen_files(folder)
        if not files:
            raise EngineError(f"{folder} is not a Qwen2.5-VL folder (config.json and model*.safetensors).")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.device = torch.device(device)
        self.model = load_role("qwen_vl", files, torch_dtype=dtype, device=str(self.device)).eval()
        self.processor = self.model.flux_studio_processor

    @torch.no_grad()
    def caption(self, image: Image.Image, instruction: str = INSTRUCTION, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return " ".join(self.processor.batch_decode(new, skip_special_tokens=True)[0].split())

    def close(self) -> None:
        """Give the model's memory back (the training run or the next image job needs it)."""
        self.model = self.processor = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
