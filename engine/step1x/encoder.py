"""Qwen2.5-VL as Step1X-Edit's multimodal encoder: (instruction, reference image) -> hidden states and mask.

Follows the model authors' ``Qwen25VL_7b_Embedder`` (stepfun-ai/Step1X-Edit ``modules/conditioner.py``) exactly:

- processor loaded with ``min_pixels = 256*28*28``, ``max_pixels = 324*28*28``;
- one user message: the authors' prompt-enhancement PREFIX text, the reference image, the instruction; rendered with
  the processor's chat template (``add_generation_prompt=True, add_vision_id=True``);
- the text is re-tokenised piece by piece with their quote handling (``split_pieces``: quotes after character 155
  wrap each quoted character as ``“c”`` and the wrapping quote tokens are dropped again), and the sequence is the
  processor's ids up to ``<|vision_end|>`` followed by the re-tokenised ids from ``<|vision_end|>`` on;
  the attention mask is ``ids > 0``;
- the last hidden state of the language model (after its final norm) is taken, its first ``PREFIX_TOKENS`` (217)
  tokens dropped, and the rest written into a zero tensor of ``MAX_LENGTH`` (640) tokens with a 1/0 mask.

217 is the authors' constant for the Qwen2.5-VL tokenizer (the template's tokens before the user content that
follows the prefix). For a tokenizer with another vocabulary (the small test models) the same point is computed:
the number of tokens of the rendered template up to the end of the prefix text.

The published Qwen2.5-VL-7B-Instruct files use the transformers < 4.52 layout (``model.*``, ``visual.*``,
``lm_head.weight``); ``convert_qwen_vl`` maps them onto transformers 5's ``Qwen2_5_VLForConditionalGeneration``
(``model.language_model.*``, ``model.visual.*``, ``lm_head.*``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

MAX_LENGTH = 640
PREFIX_TOKENS = 217
QUOTE_INDEX = 155
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 324 * 28 * 28
REAL_VOCAB = 151643  # the Qwen2 BPE vocabulary (without added tokens): where the authors' constants apply

PREFIX = '''Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:
- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.
- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.\n
Here are examples of how to transform or refine prompts:
- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.
- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.\n
Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:
User Prompt:'''


# ------------------------------------------------------------------------------------------------ layout

def convert_qwen_vl(sd) -> dict:
    """Published (transformers < 4.52) keys -> transformers 5 ``Qwen2_5_VLForConditionalGeneration`` keys.
    Keys already in the new layout pass through."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("model.language_model.", "model.visual.", "lm_head.")):
            nk = k
        elif k.startswith("visual."):
            nk = "model." + k
        elif k.startswith("model."):
            nk = "model.language_model." + k[len("model."):]
        else:
            nk = k
        out[nk] = v
    return out


def is_qwen_vl(keys) -> bool:
    ks = list(keys)
    return any(k.startswith(("visual.", "model.visual.")) for k in ks) and any(
        k.startswith(("model.layers.", "model.language_model.")) for k in ks)


def qwen_config(config_json: dict):
    from transformers import Qwen2_5_VLConfig
    cfg = {k: v for k, v in config_json.items() if k not in ("architectures", "transformers_version")}
    return Qwen2_5_VLConfig(**cfg)


def build_qwen_vl(config):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration(config)


def load_processor(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """The Qwen2.5-VL processor with the authors' pixel bounds (``None``: the folder's own, as Nexus-Gen uses it).
    ``AutoProcessor`` as the authors do; where its video processor cannot be built (it needs torchvision, which
    image-only encoding does not), the same processor is assembled from the folder's tokenizer, image processor and
    chat template without one."""
    from transformers import AutoProcessor
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        return AutoProcessor.from_pretrained(str(folder), **bounds)
    except ImportError:
        pass
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import Qwen2VLImageProcessor as ImageProcessor
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre = {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}
    pre.update(bounds)
    if bounds:
        pre.pop("size", None)     # the bounds given replace the folder's size
    image_processor = ImageProcessor(**pre)
    template = None
    for name in ("chat_template.json", "chat_template.jinja"):
        p = folder / name
        if p.is_file():
            text = p.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=template or getattr(tokenizer, "chat_template", None))


def load_qwen_vl(group, dtype, device):
    """A ``FileGroup`` of the Qwen2.5-VL weights (its folder holds config.json) -> the model, via the engine's
    meta-device assembly (one to one, shape-exact, memory-mapped)."""
    from ..loading.errors import ModelFileError
    from ..loading.files import read_state_dict
    from ..loading.load import assemble
    cfg_path = Path(group.folder) / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(f"{group.label}: Qwen2.5-VL needs its config.json beside the weights ({cfg_path}); "
                             f"download the whole Qwen/Qwen2.5-VL-7B-Instruct folder.", group.label)
    config = qwen_config(json.loads(cfg_path.read_text()))
    sd = read_state_dict(group, device="meta" if torch.device(device).type == "meta" else None)
    dev = torch.device(device)

    def build():
        model = build_qwen_vl(config)
        if dev.type != "meta":
            materialise_rotary(model, dev)   # before assembly: the file holds no rotary buffers
        return model

    return assemble(build, convert_qwen_vl(sd), dtype, dev)


def materialise_rotary(model, device):
    """Rotary ``inv_freq`` buffers are not in the file (not persistent): rebuild each rotary module on ``device``
    from its config, as transformers' own constructor computes them, and take its buffers."""
    for name, mod in model.named_modules():
        bufs = dict(mod.named_buffers(recurse=False))
        if not any(b.is_meta for b in bufs.values()):
            continue
        if not hasattr(mod, "config") or "inv_freq" not in bufs:
            raise RuntimeError(f"buffer(s) {sorted(bufs)} of {name} are not stored in the file and have no known value")
        with torch.device(device):
            fresh = type(mod)(mod.config)
        for n, b in fresh.named_buffers(recurse=False):
            mod.register_buffer(n, b, persistent=n not in mod._non_persistent_buffers_set)
        if hasattr(fresh, "attention_scaling"):
            mod.attention_scaling = fresh.attention_scaling


_materialise_rotary = materialise_rotary   # the name engine.flux2.loading imports


# ------------------------------------------------------------------------------------------------ encoding

def split_pieces(s: str) -> list[str]:
    """The authors' ``split_string``: straight quotes everywhere; past character 155, a quoted passage becomes
    one piece per character, each wrapped in curly quotes."""
    s = s.replace("“", '"').replace("”", '"').replace("'", '"')
    out, in_quotes, temp = [], False, ""
    for idx, ch in enumerate(s):
        if ch == '"' and idx > QUOTE_INDEX:
            temp += ch
            if not in_quotes:
                out.append(temp)
                temp = ""
            in_quotes = not in_quotes
            continue
        if in_quotes:
            out.append("“" + ch + "”")
        else:
            temp += ch
    if temp:
        out.append(temp)
    return out


def _single_id(tokenizer, text, fallback):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else fallback


class Step1XEncoder:
    """Runs Qwen2.5-VL the authors' way. ``encode(prompt, image) -> (hidden [1, 640, H], mask [1, 640] long)``."""

    def __init__(self, model, processor, max_length: int = MAX_LENGTH):
        self.model = model
        self.processor = processor
        self.max_length = max_length
        tok = processor.tokenizer
        real = len(tok) >= REAL_VOCAB
        self.vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        # the curly quotes: 2073 and 854 in Qwen's vocabulary (the authors' constants)
        self.open_quote = 2073 if real else _single_id(tok, "“", -1)
        self.close_quote = 854 if real else _single_id(tok, "”", -1)
        self.drop = PREFIX_TOKENS if real else None

    def _messages(self, prompt, image):
        return [{"role": "user", "content": [{"type": "text", "text": PREFIX}, {"type": "image", "image": image},
                                             {"type": "text", "text": prompt}]}]

    def _prefix_tokens(self, text: str) -> int:
        if self.drop is not None:
            return self.drop
        head = text[: text.index(PREFIX) + len(PREFIX)]
        return len(self.processor.tokenizer(head).input_ids)

    def input_ids(self, prompt: str, image: Image.Image):
        proc = self.processor
        text = proc.apply_chat_template(self._messages(prompt, image), tokenize=False, add_generation_prompt=True,
                                        add_vision_id=True)
        inputs = proc(text=[text], images=[image], padding=True, return_tensors="pt")
        old = inputs.input_ids
        pieces = []
        for piece in split_pieces(text):
            # text only: what the processor does without images (transformers 5's processor refuses the unexpanded
            # <|image_pad|> in a piece, so the tokenizer is called directly, which gives the same ids)
            ids = proc.tokenizer(piece, padding=True, return_tensors="pt").input_ids
            if ids[0][0] == self.open_quote and ids[0][-1] == self.close_quote:
                ids = ids[:, 1:-1]
            pieces.append(ids)
        new = torch.cat(pieces, dim=1)
        i1 = (old == self.vision_end).nonzero(as_tuple=True)[1][0]
        i2 = (new == self.vision_end).nonzero(as_tuple=True)[1][0]
        ids = torch.cat([old[0, :i1], new[0, i2:]], dim=0).unsqueeze(0)
        return ids, inputs.pixel_values, inputs.image_grid_thw, self._prefix_tokens(text)

    @torch.no_grad()
    def encode(self, prompt: str, image: Image.Image, device=None, dtype=torch.bfloat16):
        model = self.model
        device = device or next(model.parameters()).device
        ids, pixels, grid, drop = self.input_ids(prompt, image.convert("RGB"))
        mask = (ids > 0).long()
        out = model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                          pixel_values=pixels.to(device=device, dtype=model.dtype),
                          image_grid_thw=grid.to(device), use_cache=False, return_dict=True)
        emb = out.last_hidden_state                                  # = hidden_states[-1]: after the final norm
        hidden = torch.zeros(1, self.max_length, emb.shape[-1], dtype=dtype, device=emb.device)
        keep = torch.zeros(1, self.max_length, dtype=torch.long, device=emb.device)
        n = max(0, min(self.max_length, emb.shape[1] - drop))
        hidden[0, :n] = emb[0, drop:][:n].to(dtype)
        keep[0, :n] = 1
        return hidden, keep
