"""The VRAM planner: where each model component lives, chosen from its size and a memory budget.

Pure arithmetic on sizes (no torch needed), so a plan can be made from the checkpoint manifests or from the
safetensors headers of files not yet loaded, and the studio can show it before anything is in memory.

Per component one of these strategies (``Entry.strategy``):

- ``resident``      on the GPU for the whole session (fastest).
- ``offload``       rests in CPU RAM and is moved to the GPU for its stage of a job; it stays there until another
                    component needs the room (text encoders run once per prompt, the VAE once per image).
- ``fp8``           resident, stored as float8_e4m3fn and computed in the compute dtype (bf16) one layer at a time
                    (diffusers' layer-wise casting): half the memory, a small loss of precision.
- ``fp8+offload``   both.
- ``stream``        rests in CPU RAM; during its stage diffusers' group offloading moves one block at a time to the
                    GPU, and on CUDA the next block is copied on a side stream while the current one computes.
                    Storage may be bf16 or fp8 (``storage_dtype``); ``pinned`` says whether the RAM copy is pinned
                    (fast copies) or is the memory-mapped file itself (no private RAM, read from the page cache).

The choice: every combination of the per-component options is scored with a fixed cost per component (quality
first, then speed: offloading text encoders and the VAE is nearly free, offloading the transformer costs a copy per
new prompt, fp8 costs precision, streaming the transformer costs a copy per step), the costs compared
lexicographically with the transformer first (it runs at every step), then T5, the VAE and CLIP, and the best
combination whose predicted peak fits the budget wins. Because the set of combinations that fit only grows with the
budget, more budget never gives a worse plan: the transformer's strategy never gets worse, and another component's
only when a more important one got better (T5 may be kept resident beside a streamed transformer at 12 GB and
streamed beside an fp8 one at 16 GB). Predicted peak VRAM = the largest stage (the weights on the GPU while one
component computes + that stage's activations at the planned resolution + the transient bf16 copy of one fp8
layer) + a runtime reserve (CUDA context, cuBLAS workspace, allocator slack). Sizes are GiB (1024**3 bytes), written
"GB" as everywhere else.

The seed's per-file fields (``offload_dtype``, ``offload_device``, ``onload_dtype``, ``onload_device``,
``preparing_dtype``, ``preparing_device``, ``computation_dtype``, ``computation_device``) pin a component's strategy
(see :func:`options_from_fields`); without them the planner decides.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

GiB = 1024 ** 3
FP8 = "float8_e4m3fn"
FP8_NAMES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

LABELS = {"dit": "FLUX transformer", "text_encoder_1": "CLIP-L text encoder", "text_encoder_2": "T5-XXL text encoder",
          "vae": "VAE (autoencoder)", "qwen_vl": "Qwen2.5-VL encoder (Step1X-Edit)",
          "step1x_connector": "Step1X-Edit connector", "controlnet": "ControlNet"}
ROLE_ORDER = ("text_encoder_1", "text_encoder_2", "qwen_vl", "step1x_connector", "dit", "controlnet", "vae")
# Components that compute in the same stage (every denoising step): all of them are on the device together.
STAGE_PARTNERS = {"dit": ("controlnet",), "controlnet": ("dit",)}

# Runtime reserve on a CUDA device: the context (~0.3-0.5 GB, outside torch's allocator), cuBLAS workspaces and
# allocator slack. Counted in the predicted peak so that it is comparable with the driver's view (nvidia-smi).
CUDA_RESERVE_GB = 0.6
# Python, torch, transformers, diffusers (and the CUDA libraries) in RAM before any weight is loaded.
PROCESS_RAM_GB = {"cuda": 2.5, "other": 1.0}

# Activation estimates, fitted on CPU runs of the real-width modules (tests/test_vram.py documents the method):
# FLUX block peak ~24 x tokens x hidden elements (attention by SDPA, no N^2 matrix); the VAE decoder's last up-blocks
# ~8 x pixels x 128 channels; T5 ~ sequence x (3 d_ff + 6 d_model). Rounded up.
DIT_ACT_FACTOR = 28
VAE_ACT_FACTOR = 9

# ---------------------------------------------------------------------------------------------------------------
# Options: (strategy, fp8 storage?, pinned?) and their cost per role. Lower is better.
OPTIONS = {
    "R": ("resident", False, True),
    "O": ("offload", False, True),
    "F": ("fp8", True, True),
    "FO": ("fp8+offload", True, True),
    "S": ("stream", False, True),
    "SF": ("stream", True, True),
    "SM": ("stream", False, False),    # streamed from the memory-mapped file: no private RAM, slowest
    "SFM": ("stream", True, False),    # only through the seed's fields ("disk" with an fp8 preparing dtype)
}
# Quality first, then speed. The text encoders run once per prompt and the VAE once per image, so moving them is
# cheap; offloading the transformer costs ~2 copies of it per new prompt; fp8 costs precision (T5 less than the
# DiT); streaming the transformer costs a copy of it per step (hidden behind compute on slow GPUs, not on fast ones).
COSTS = {
    "dit": {"R": 0, "O": 5, "F": 20, "FO": 22, "S": 40, "SF": 45, "SM": 60, "SFM": 65},
    "text_encoder_2": {"R": 0, "O": 2, "F": 9, "FO": 10, "S": 12, "SF": 14, "SM": 16, "SFM": 18},
    "text_encoder_1": {"R": 0, "O": 1, "F": 6, "FO": 7, "S": 8, "SF": 9, "SM": 10, "SFM": 11},
    "vae": {"R": 0, "O": 1, "F": 6, "FO": 7, "S": 8, "SF": 9, "SM": 10, "SFM": 11},
    # Step1X-Edit: Qwen2.5-VL runs once per prompt (as T5); the connector runs at every step (as the transformer)
    # but is small, so moving it costs little.
    "qwen_vl": {"R": 0, "O": 2, "F": 9, "FO": 10, "S": 12, "SF": 14, "SM": 16, "SFM": 18},
    "step1x_connector": {"R": 0, "O": 3, "F": 15, "FO": 16, "S": 30, "SF": 33, "SM": 45, "SFM": 48},
    # ControlNets run at every step beside the transformer: offloading costs a copy per new prompt, fp8 precision.
    "controlnet": {"R": 0, "O": 4, "F": 18, "FO": 20, "S": 35, "SF": 40, "SM": 55, "SFM": 60},
}
DEFAULT_COSTS = {"R": 0, "O": 3, "F": 15, "FO": 16, "S": 30, "SF": 33, "SM": 45, "SFM": 48}
# What the planner itself may pick (the fields may ask for more): fp8 and streaming only where they pay.
PLANNER_OPTIONS = {
    "dit": ("R", "O", "F", "FO", "S", "SF", "SM"),
    "text_encoder_2": ("R", "O", "F", "FO", "S", "SF", "SM"),
    "text_encoder_1": ("R", "O"),
    "vae": ("R", "O"),
    # Qwen2.5-VL: resident or offloaded only. Its blocks sit two levels down and transformers calls its embedding
    # outside its forward, which diffusers' block streaming does not cover, and fp8 storage would change what
    # ``model.dtype`` reports to its vision tower; both are left to a GPU-tested change.
    "qwen_vl": ("R", "O"),
    "step1x_connector": ("R", "O"),
    # No streaming: a ControlNet is a few blocks and runs at every step, so it is resident, offloaded or fp8.
    "controlnet": ("R", "O", "F", "FO"),
}
DEFAULT_PLANNER_OPTIONS = ("R", "O", "FO", "S")
STRATEGY_RANK = {"resident": 0, "offload": 1, "fp8": 2, "fp8+offload": 3, "stream": 4}


def gb(nbytes) -> float:
    return float(nbytes) / GiB


def dtype_name(dtype) -> Optional[str]:
    """torch.bfloat16 / "torch.bfloat16" / "bfloat16" / "BF16" -> "bfloat16"; "disk" stays; None stays."""
    if dtype is None:
        return None
    text = str(dtype).replace("torch.", "")
    return SAFETENSORS_DTYPES.get(text, text)


def device_name(device) -> Optional[str]:
    """"cuda" -> "cuda:0" (so that "cuda" and "cuda:0" compare equal), "cpu" -> "cpu"; None stays."""
    if device is None:
        return None
    text = str(device)
    if text == "cuda":
        return "cuda:0"
    return text


def is_fp8(dtype) -> bool:
    return dtype_name(dtype) in FP8_NAMES


# ---------------------------------------------------------------------------------------------------------------
# Sizes
@dataclass(frozen=True)
class ComponentSize:
    """What the planner needs to know about one component, in parameter counts (dtype-free)."""

    role: str
    params: int                          # all parameters (tied ones once)
    fp8_params: int = 0                  # of these, the ones stored in fp8 when the component is stored in fp8
    blocks: tuple = ()                   # parameters of each streamable block, in order
    block_fp8: tuple = ()                # fp8-castable parameters of each block
    largest_layer: int = 0               # parameters of the largest fp8-castable layer (cast to bf16 one at a time)
    file_dtype: Optional[str] = None     # the dtype most of the file is stored in
    dims: Mapping = field(default_factory=dict)  # widths for activation estimates (hidden, channels, d_model, d_ff)

    def nbytes(self, storage: str, compute: str) -> int:
        if is_fp8(storage):
            return self.fp8_params * ITEMSIZE[storage] + (self.params - self.fp8_params) * ITEMSIZE[compute]
        return self.params * ITEMSIZE[storage]

    def nonblock_bytes(self, storage: str, compute: str) -> int:
        rest = self.params - sum(self.blocks)
        rest_fp8 = self.fp8_params - sum(self.block_fp8)
        if is_fp8(storage):
            return rest_fp8 * ITEMSIZE[storage] + (rest - rest_fp8) * ITEMSIZE[compute]
        return rest * ITEMSIZE[storage]

    def max_block_bytes(self, storage: str, compute: str) -> int:
        if not self.blocks:
            return 0
        if is_fp8(storage):
            return max(f * ITEMSIZE[storage] + (n - f) * ITEMSIZE[compute] for n, f in zip(self.blocks, self.block_fp8))
        return max(self.blocks) * ITEMSIZE[storage]


_BLOCK_RE = {
    "dit": re.compile(r"(?:^|\.)(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\."),
    "text_encoder_2": re.compile(r"(?:^|\.)(block)\.(\d+)\."),
    "text_encoder_1": re.compile(r"(?:^|\.)(layers)\.(\d+)\."),
}


def _castable_key(role: str, key: str, shape, shapes: Mapping) -> bool:
    """Whether a tensor (by file key) is stored in fp8 under fp8 storage; mirrors ``placement.fp8_layers``."""
    def weight_like(k, s):
        if len(s) >= 2:
            return True
        if k.endswith(".bias"):  # the bias of a Linear/Conv goes with its weight
            w = shapes.get(k[:-5] + ".weight")
            return w is not None and len(w) >= 2
        return False

    if "lora_" in key:
        return False
    if role in ("dit", "controlnet"):  # only the blocks; norms (1-D scales) and embedders stay in the compute dtype
        return bool(_BLOCK_RE["dit"].search(key)) and weight_like(key, shape)
    if role == "text_encoder_2":
        return len(shape) >= 2 and "relative_attention_bias" not in key
    if role == "text_encoder_1":
        return bool(_BLOCK_RE["text_encoder_1"].search(key)) and weight_like(key, shape)
    # VAE and anything else: every Linear/Conv/Embedding weight but norms, embeddings and the in/out convolutions
    return weight_like(key, shape) and not any(w in key for w in ("norm", "conv_in", "conv_out", "embeddings",
                                                                   "pos_embed", "patch_embed"))


def sizes_from_tensors(role: str, tensors: Mapping) -> ComponentSize:
    """Sizes from a state-dict description {key: {"shape": [...], "dtype": "BF16"}} (a checkpoint manifest's
    ``tensors`` or a safetensors header) or {key: tensor}."""
    shapes, dtypes = {}, {}
    for key, info in tensors.items():
        if key == "__metadata__":
            continue
        if isinstance(info, Mapping):
            shapes[key] = tuple(int(d) for d in info["shape"])
            dtypes[key] = dtype_name(info.get("dtype"))
        else:  # a tensor
            shapes[key] = tuple(info.shape)
            dtypes[key] = dtype_name(info.dtype)
    if role == "text_encoder_2" and any(k.endswith("shared.weight") for k in shapes):
        shapes = {k: s for k, s in shapes.items() if not k.endswith("embed_tokens.weight")}  # tied to shared
    if role == "dit":
        shapes = {k: s for k, s in shapes.items() if not k.startswith("connector.")}  # Step1X's side model
    if role == "step1x_connector":
        shapes = {k: s for k, s in shapes.items() if k.startswith("connector.")}      # the rest is the DiT
    numel = {k: _prod(s) for k, s in shapes.items()}
    castable = {k for k, s in shapes.items() if _castable_key(role, k, s, shapes)}
    blocks: dict = {}
    rx = _BLOCK_RE.get(role)
    for k, n in numel.items():
        m = rx.search(k) if rx else None
        if m:
            b = blocks.setdefault((m.group(1), int(m.group(2))), [0, 0])
            b[0] += n
            b[1] += n if k in castable else 0
    order = sorted(blocks, key=lambda bk: (0 if bk[0] in ("double_blocks", "transformer_blocks", "block", "layers")
                                            else 1, bk[1]))
    layers: dict = {}
    for k in castable:
        layers[k.rsplit(".", 1)[0]] = layers.get(k.rsplit(".", 1)[0], 0) + numel[k]
    counts: dict = {}
    for k, n in numel.items():
        counts[dtypes.get(k)] = counts.get(dtypes.get(k), 0) + n
    file_dtype = max(counts, key=counts.get) if counts else None
    return ComponentSize(role=role, params=sum(numel.values()), fp8_params=sum(numel[k] for k in castable),
                         blocks=tuple(blocks[b][0] for b in order), block_fp8=tuple(blocks[b][1] for b in order),
                         largest_layer=max(layers.values(), default=0), file_dtype=file_dtype,
                         dims=_dims_from_shapes(role, shapes))


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _dims_from_shapes(role: str, shapes: Mapping) -> dict:
    def find(*suffixes):
        for k, s in shapes.items():
            if any(k.endswith(x) for x in suffixes):
                return s
        return None

    if role == "dit":
        s = find("img_in.weight", "x_embedder.weight")
        return {"hidden": s[0]} if s else {}
    if role == "text_encoder_2":
        s, f = find("shared.weight"), find("DenseReluDense.wi_0.weight", "DenseReluDense.wi.weight")
        return {k: v for k, v in (("d_model", s[1] if s else None), ("d_ff", f[0] if f else None)) if v}
    if role == "vae":
        s = find("decoder.conv_out.weight")
        return {"channels": s[1]} if s else {}
    if role == "text_encoder_1":
        s = find("token_embedding.weight")
        return {"hidden": s[1]} if s else {}
    if role == "qwen_vl":
        s, f = find("embed_tokens.weight"), find("mlp.gate_proj.weight")
        return {k: v for k, v in (("hidden", s[1] if s else None), ("d_ff", f[0] if f else None)) if v}
    if role == "controlnet":       # its width and how many residuals it returns (one per block, all nets)
        s = find("x_embedder.weight")
        outs = sum(1 for k in shapes if re.search(r"(?:^|\.)controlnet_(single_)?blocks\.\d+\.weight$", k))
        return {"hidden": s[0], "outputs": outs} if s else {}
    return {}


def sizes_from_manifests(paths: Mapping) -> dict:
    """{role: manifest json path(s)} -> {role: ComponentSize}; several paths (shards) are merged."""
    import json
    out = {}
    for role, p in paths.items():
        tensors = {}
        for path in (p if isinstance(p, (list, tuple)) else [p]):
            with open(path, encoding="utf-8") as f:
                tensors.update(json.load(f)["tensors"])
        out[role] = sizes_from_tensors(role, tensors)
    return out


def sizes_from_files(files_by_role: Mapping) -> dict:
    """{role: [safetensors files]} -> {role: ComponentSize}, from the headers alone (no tensor data is read)."""
    from .loading.files import read_header
    out = {}
    for role, files in files_by_role.items():
        tensors = {}
        for path in files:
            tensors.update(read_header(path))
        out[role] = sizes_from_tensors(role, tensors)
    return out


def sizes_from_module(role: str, module) -> ComponentSize:
    """Exact sizes of a loaded (or meta-device) module, with the same fp8 and block rules the placement applies."""
    from .placement import fp8_layers, stream_blocks
    params = {id(p): p for p in module.parameters()}
    castable_ids = {}
    largest = 0
    for _name, layer in fp8_layers(role, module):
        n = 0
        for p in layer.parameters():
            castable_ids[id(p)] = p
            n += p.numel()
        largest = max(largest, n)
    blocks, block_fp8 = [], []
    for blk in stream_blocks(role, module):
        ps = {id(p): p for p in blk.parameters()}
        blocks.append(sum(p.numel() for p in ps.values()))
        block_fp8.append(sum(p.numel() for i, p in ps.items() if i in castable_ids))
    counts: dict = {}
    for p in params.values():
        counts[dtype_name(p.dtype)] = counts.get(dtype_name(p.dtype), 0) + p.numel()
    files = getattr(module, "flux_studio_files", None)
    file_dtype = getattr(module, "flux_studio_file_dtype", None)
    if file_dtype is None and files:
        try:
            from .loading.files import read_header
            fcounts: dict = {}
            for path in files:
                for info in read_header(path).values():
                    d = dtype_name(info["dtype"])
                    fcounts[d] = fcounts.get(d, 0) + _prod(info["shape"])
            file_dtype = max(fcounts, key=fcounts.get) if fcounts else None
        except Exception:  # noqa: BLE001 - a guess only; the file may have moved
            file_dtype = None
        try:
            module.flux_studio_file_dtype = file_dtype
        except Exception:  # noqa: BLE001
            pass
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    return ComponentSize(role=role, params=sum(p.numel() for p in params.values()),
                         fp8_params=sum(p.numel() for p in castable_ids.values()), blocks=tuple(blocks),
                         block_fp8=tuple(block_fp8), largest_layer=largest, file_dtype=file_dtype,
                         dims=_dims_from_shapes(role, shapes))


# ---------------------------------------------------------------------------------------------------------------
# Activations
def activation_bytes(role: str, size: ComponentSize, compute: str, width: int, height: int,
                     t5_sequence_length: int = 512) -> int:
    """Peak activation memory of one call of the component at this resolution (batch 1)."""
    b = ITEMSIZE.get(compute, 2)
    if role == "dit":
        hidden = size.dims.get("hidden", 3072)
        tokens = (height // 16) * (width // 16) + t5_sequence_length
        return int(DIT_ACT_FACTOR * tokens * hidden * b)
    if role == "vae":
        ch = size.dims.get("channels", 128)
        return int(VAE_ACT_FACTOR * width * height * ch * b)
    if role == "text_encoder_2":
        d, f = size.dims.get("d_model", 4096), size.dims.get("d_ff", 10240)
        heads = max(1, d // 64)       # T5 v1.1: 64 per head; the scores (with the position bias) are materialised
        return int(t5_sequence_length * (3 * f + 6 * d) * b + 2 * heads * t5_sequence_length ** 2 * b)
    if role == "text_encoder_1":
        return int(77 * size.dims.get("hidden", 768) * 16 * b)
    if role == "controlnet":
        # its own forward (as the transformer's, per token) + the residuals it hands the transformer, one per block
        hidden = size.dims.get("hidden", 3072)
        image_tokens = (height // 16) * (width // 16)
        return int((DIT_ACT_FACTOR * (image_tokens + t5_sequence_length) + size.dims.get("outputs", 15) * image_tokens)
                   * hidden * b)
    if role == "qwen_vl":
        # 640 text tokens + the reference image's tokens (one per 28x28 pixels); one layer's hidden states and MLP.
        d, f = size.dims.get("hidden", 3584), size.dims.get("d_ff", 18944)
        tokens = 640 + (width // 28 + 1) * (height // 28 + 1)
        return int(tokens * (12 * d + 3 * f) * b)
    return int(0.05 * size.params * b)  # unknown adapters: a guess


# ---------------------------------------------------------------------------------------------------------------
# Plans
@dataclass
class Entry:
    role: str
    label: str
    option: str                    # key of OPTIONS
    strategy: str
    storage_dtype: str             # dtype of the weights on the GPU (and in RAM)
    compute_dtype: str
    compute_device: str
    rest_device: str               # where it lies between stages
    pinned: bool = True            # stream: pinned RAM copy (True) or the memory-mapped file (False)
    prefetch: bool = False         # stream: the next block is copied on a side stream
    vram_bytes: int = 0            # weights on the compute device during its own stage
    ram_bytes: int = 0             # weights in RAM between stages
    activation_bytes: int = 0
    source: str = "planner"        # "planner" or "fields" (the seed's per-file settings)
    note: str = ""
    on_device: bool = True         # computes on the plan's device (whose memory the budget governs)

    def describe(self) -> dict:
        return {"role": self.role, "label": self.label, "strategy": self.strategy,
                "storage_dtype": self.storage_dtype, "compute_dtype": self.compute_dtype,
                "vram_gb": round(gb(self.vram_bytes), 6), "ram_gb": round(gb(self.ram_bytes), 6),
                "compute_device": self.compute_device, "source": self.source}


@dataclass
class Plan:
    entries: dict
    device: str
    vram_limit_gb: Optional[float]       # what was asked (None = none)
    budget_gb: Optional[float]           # what the plan was fitted to (the limit, or the free memory, or None)
    ram_limit_gb: Optional[float]
    width: int
    height: int
    predicted_peak_vram_gb: float
    predicted_peak_ram_gb: float
    peak_stage: Optional[str]
    fits: bool
    cost: tuple                          # per-component costs, most important component first
    notes: list = field(default_factory=list)
    stage_peaks_gb: dict = field(default_factory=dict)

    def describe(self) -> list:
        return [self.entries[r].describe() for r in _ordered(self.entries)]

    def as_dict(self) -> dict:
        return {"device": self.device, "vram_limit_gb": self.vram_limit_gb, "budget_gb": self.budget_gb,
                "ram_limit_gb": self.ram_limit_gb, "components": self.describe(),
                "predicted_peak_vram_gb": round(self.predicted_peak_vram_gb, 2),
                "predicted_peak_ram_gb": round(self.predicted_peak_ram_gb, 2),
                "peak_stage": self.peak_stage, "fits": self.fits, "resolution": f"{self.width}x{self.height}",
                "stage_peaks_gb": {k: round(v, 2) for k, v in self.stage_peaks_gb.items()},
                "notes": list(self.notes)}

    def strategies(self) -> dict:
        return {r: e.strategy for r, e in self.entries.items()}

    @property
    def budget_bytes(self) -> Optional[int]:
        return None if self.budget_gb is None else int(self.budget_gb * GiB)

    @property
    def reserve_bytes(self) -> int:
        return int(CUDA_RESERVE_GB * GiB) if self.device.startswith("cuda") else 0

    def resident_bytes(self) -> int:
        """Weights that stay on the compute device between stages."""
        return sum(e.vram_bytes for e in self.entries.values() if e.on_device and e.strategy in ("resident", "fp8"))


def _importance(role: str):
    """Lexicographic order of the plan's cost: the transformer first (it runs at every step), then T5, the VAE and
    CLIP; other components (adapters) right after the transformer."""
    order = {"dit": 0, "controlnet": 0.5, "text_encoder_2": 2, "qwen_vl": 2, "vae": 3, "text_encoder_1": 4}
    return (order.get(role, 1), role)


def _ordered(roles: Iterable) -> list:
    roles = list(roles)
    return sorted(roles, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r))


def options_from_fields(fields: Mapping, device: str, default_dtype: str) -> tuple:
    """The seed's per-file fields -> (allowed options, compute device, compute dtype, note).

    DiffSynth-Studio's semantics (docs/en/Pipeline_Usage/VRAM_management.md and diffsynth/core/vram): VRAM management
    is on only when both ``offload_dtype`` and ``offload_device`` are set; otherwise the model is loaded in
    ``computation_dtype`` on ``computation_device`` and stays there. Unset onload/preparing fields default to the
    computation ones. A layer rests in the offload state (offload dtype/device) while its model is not in use, is in
    the onload state during its model's stage, moves to the preparing state on its first call when the limit leaves
    room (or there is no limit), and is cast to the computation dtype/device for the call itself. Mapped onto ours:

    - onload on the computation device (resident during the stage) -> ``offload`` (``resident`` if it also rests
      there; ``fp8...`` when the dtype on the device is fp8 and the computation dtype is not);
    - onload on the CPU, preparing on the computation device -> moved in when the budget leaves room, otherwise
      streamed (the planner picks ``offload``/``stream`` from the budget, as DiffSynth's check does per layer);
    - onload and preparing on the CPU -> ``stream`` (every call copies the layer in);
    - ``"disk"`` -> ``stream`` from the memory-mapped file, unpinned (no copy in RAM).
    """
    f = {k: v for k, v in fields.items() if v is not None}
    comp_dtype = dtype_name(f.get("computation_dtype")) or default_dtype
    comp_dev = device_name(f.get("computation_device")) or device
    notes = []
    if is_fp8(comp_dtype):
        notes.append(f"computation_dtype {comp_dtype}: fp8 matrix multiplication is not used; weights stay in "
                     f"{comp_dtype} and are computed in bfloat16.")
        comp_dtype = "bfloat16"
        f["onload_dtype"] = f.get("onload_dtype") or FP8
        f["preparing_dtype"] = f.get("preparing_dtype") or FP8
        f.setdefault("offload_dtype", FP8)
        f.setdefault("offload_device", comp_dev)
    off_dt, off_dev = dtype_name(f.get("offload_dtype")), device_name(f.get("offload_device"))
    if off_dt is None or off_dev is None:
        return ("R",), comp_dev, comp_dtype, " ".join(notes)
    on_dt = dtype_name(f.get("onload_dtype")) or comp_dtype
    on_dev = device_name(f.get("onload_device")) or comp_dev
    prep_dt = dtype_name(f.get("preparing_dtype")) or comp_dtype
    prep_dev = device_name(f.get("preparing_device")) or comp_dev
    if "disk" in (off_dt, off_dev, on_dt, on_dev):
        gpu_dt = prep_dt if prep_dt != "disk" else comp_dtype
        fp8 = is_fp8(gpu_dt)
        notes.append("disk offload: streamed from the memory-mapped file (the page cache holds what was read).")
        return (("SFM",) if fp8 else ("SM",)), comp_dev, comp_dtype, " ".join(notes)
    gpu_dt = prep_dt if prep_dev == comp_dev else on_dt
    fp8 = is_fp8(gpu_dt)
    if off_dt != gpu_dt:
        notes.append(f"offload_dtype {off_dt} differs from the dtype on the device ({gpu_dt}): the weights are kept in "
                     f"{gpu_dt} in RAM too (cast once, not at every move).")
    if on_dev == comp_dev and off_dev == comp_dev:
        opts = ("F",) if fp8 else ("R",)
    elif on_dev == comp_dev:
        opts = ("FO",) if fp8 else ("O",)
    elif prep_dev == comp_dev:
        opts = ("FO", "SF") if fp8 else ("O", "S")
    else:
        opts = ("SF",) if fp8 else ("S",)
    return opts, comp_dev, comp_dtype, " ".join(notes)


def plan(sizes: Mapping, device="cuda", vram_limit_gb: Optional[float] = None, ram_limit_gb: Optional[float] = None,
         compute_dtype="bfloat16", width: int = 1024, height: int = 1024, t5_sequence_length: int = 512,
         fields: Optional[Mapping] = None, free_vram_gb: Optional[float] = None,
         prefetch: Optional[bool] = None) -> Plan:
    """Choose a strategy for every component in ``sizes`` ({role: ComponentSize}).

    ``vram_limit_gb`` None: fit to ``free_vram_gb`` when given (the device's free memory), else unlimited.
    ``fields`` {role: the seed's per-file fields}: a component with any field set follows them.
    """
    device = device_name(device) or "cpu"
    compute_dtype = dtype_name(compute_dtype)
    fields = fields or {}
    budget = vram_limit_gb if vram_limit_gb is not None else free_vram_gb
    on_cuda = device.startswith("cuda")
    prefetch = on_cuda if prefetch is None else prefetch
    reserve = CUDA_RESERVE_GB * GiB if on_cuda else 0
    roles = _ordered(sizes)
    importance = sorted(roles, key=_importance)

    per_role = {}
    for role in roles:
        f = {k: v for k, v in (fields.get(role) or {}).items() if v is not None}
        if f:
            opts, cdev, cdt, note = options_from_fields(f, device, compute_dtype)
            per_role[role] = (opts, cdev, cdt, "fields", note)
        else:
            per_role[role] = (PLANNER_OPTIONS.get(role, DEFAULT_PLANNER_OPTIONS), device, compute_dtype, "planner", "")

    def entry(role, opt) -> Entry:
        size = sizes[role]
        _opts, cdev, cdt, source, note = per_role[role]
        strategy, fp8, pinned = OPTIONS[opt]
        storage = FP8 if fp8 else cdt
        full = size.nbytes(storage, cdt)
        gpu = cdev == device
        if strategy == "stream":
            window = 2 if (prefetch and cdev.startswith("cuda")) else 1
            vram = size.nonblock_bytes(storage, cdt) + window * size.max_block_bytes(storage, cdt)
            if not size.blocks:
                vram = full
        else:
            vram = full
        if cdev.startswith("cpu"):        # computes on the CPU: everything lies in RAM
            ram = full
        elif strategy in ("resident", "fp8"):
            ram = 0
        elif strategy == "stream" and not pinned and size.file_dtype == storage:
            ram = 0                       # the memory-mapped file is the copy
        else:
            ram = full
        act = activation_bytes(role, size, cdt, width, height, t5_sequence_length)
        rest = cdev if strategy in ("resident", "fp8") else "cpu"
        return Entry(role=role, label=LABELS.get(role, role), option=opt, strategy=strategy, storage_dtype=storage,
                     compute_dtype=cdt, compute_device=cdev, rest_device=rest, pinned=pinned,
                     prefetch=bool(strategy == "stream" and prefetch and cdev.startswith("cuda")),
                     vram_bytes=int(vram) if gpu else 0, ram_bytes=int(ram), activation_bytes=act, source=source,
                     note=note, on_device=gpu)

    def evaluate(combo: dict):
        stage_peaks = {}
        for stage in roles:
            e_stage = combo[stage]
            if not e_stage.on_device:
                continue
            group = (stage,) + tuple(r for r in STAGE_PARTNERS.get(stage, ()) if r in combo)
            total = 0
            for r, e in combo.items():
                if not e.on_device:
                    continue
                if e.strategy in ("resident", "fp8") or r in group:
                    total += e.vram_bytes
            # one fp8 layer's compute-dtype copy at a time; the group's activations (a ControlNet's residuals are
            # held while the transformer runs)
            total += max((sizes[r].largest_layer * ITEMSIZE[combo[r].compute_dtype] for r in group
                          if is_fp8(combo[r].storage_dtype)), default=0)
            total += sum(combo[r].activation_bytes for r in group) + reserve
            stage_peaks[stage] = total
        peak = max(stage_peaks.values(), default=0)
        ram = sum(e.ram_bytes for e in combo.values())
        cost = tuple(COSTS.get(r, DEFAULT_COSTS)[combo[r].option] for r in importance)
        return peak, ram, cost, stage_peaks

    budget_b = None if budget is None else budget * GiB
    process = PROCESS_RAM_GB["cuda" if on_cuda else "other"] * GiB
    ram_b = None if ram_limit_gb is None else ram_limit_gb * GiB - process
    best = best_vram_only = best_any = None
    for opts in itertools.product(*(per_role[r][0] for r in roles)):
        combo = {r: entry(r, o) for r, o in zip(roles, opts)}
        peak, ram, cost, stage_peaks = evaluate(combo)
        vram_ok = budget_b is None or peak <= budget_b
        ram_ok = ram_b is None or ram <= ram_b
        cand = (combo, peak, ram, cost, stage_peaks)
        if vram_ok and ram_ok and (best is None or (cost, peak, ram) < (best[3], best[1], best[2])):
            best = cand
        if vram_ok and (best_vram_only is None or (ram, cost) < (best_vram_only[2], best_vram_only[3])):
            best_vram_only = cand
        if best_any is None or (peak, cost) < (best_any[1], best_any[3]):
            best_any = cand
    fits = True
    notes = []
    chosen = best
    if chosen is None and best_vram_only is not None:
        chosen, fits = best_vram_only, False
        notes.append(f"Not enough RAM for any plan within {ram_limit_gb:g} GB of RAM: the plan that needs the least "
                     f"RAM ({gb(chosen[2] + process):.1f} GB) is used; the system may swap.")
    elif chosen is None:
        chosen, fits = best_any, False
        notes.append(f"Nothing fits in {budget:g} GB of VRAM at {width}x{height}: the plan that needs the least "
                     f"({gb(chosen[1]):.1f} GB) is used and may run out of memory. Try a smaller image size, tiled VAE "
                     f"decoding, or a higher --vram-limit.")
    combo, peak, ram, cost, stage_peaks = chosen
    peak_stage = max(stage_peaks, key=stage_peaks.get) if stage_peaks else None
    result = Plan(entries=combo, device=device, vram_limit_gb=vram_limit_gb,
                  budget_gb=None if budget is None else float(budget), ram_limit_gb=ram_limit_gb, width=width,
                  height=height, predicted_peak_vram_gb=gb(peak), predicted_peak_ram_gb=gb(ram + process),
                  peak_stage=peak_stage, fits=fits, cost=cost, notes=notes,
                  stage_peaks_gb={k: gb(v) for k, v in stage_peaks.items()})
    result.notes.extend(_notes(result, sizes, budget, vram_limit_gb, free_vram_gb))
    return result


def _notes(p: Plan, sizes: Mapping, budget, vram_limit_gb, free_vram_gb) -> list:
    out = []
    if p.device.startswith("cpu"):
        if budget is None:
            out.append("Running on the CPU: every component lives in RAM.")
        else:
            out.append(f"Running on the CPU: the {budget:g} GB budget is applied as if it were VRAM (offloading is a "
                       f"no-op there; fp8 storage and block streaming are real).")
    elif vram_limit_gb is None and free_vram_gb is not None:
        out.append(f"No VRAM limit set: planned for the {free_vram_gb:.1f} GB free on {p.device}.")
    elif budget is None:
        out.append("No VRAM limit: everything stays on the GPU.")
    if p.peak_stage and not p.device.startswith("cpu"):
        what = {"dit": "denoising", "vae": "VAE decoding", "text_encoder_2": "T5 encoding",
                "text_encoder_1": "CLIP encoding", "qwen_vl": "Qwen2.5-VL encoding",
                "step1x_connector": "the Step1X connector",
                "controlnet": "denoising with the ControlNet"}.get(p.peak_stage, p.peak_stage)
        reserve = f" incl. {CUDA_RESERVE_GB:g} GB runtime reserve" if p.device.startswith("cuda") else ""
        out.append(f"Predicted peak {p.predicted_peak_vram_gb:.1f} GB during {what} at {p.width}x{p.height}{reserve}.")
    for role in _ordered(p.entries):
        e = p.entries[role]
        label = e.label
        if e.source == "fields":
            out.append(f"{label}: placed as its ModelConfig's VRAM fields ask ({e.strategy}, {e.storage_dtype})."
                       + (f" {e.note}" if e.note else ""))
        if e.strategy == "stream":
            how = ("the next block copied on a side stream while one computes" if e.prefetch else "one block at a time")
            src = "pinned RAM" if e.pinned else "the memory-mapped file (no RAM copy)"
            out.append(f"{label} is streamed to the GPU block by block from {src}, {how}.")
        if is_fp8(e.storage_dtype) and e.source == "planner":
            out.append(f"{label} is stored in fp8 (e4m3) and computed in {e.compute_dtype}: half the memory, a small "
                       f"loss of precision.")
    vae = p.entries.get("vae")
    if vae is not None and vae.on_device and p.budget_gb is not None and gb(vae.activation_bytes) > 0.25 * p.budget_gb:
        out.append(f"VAE decoding at {p.width}x{p.height} needs about {gb(vae.activation_bytes):.1f} GB of "
                   f"activations; for larger images turn on tiled decoding.")
    return out


def tighter(p: Plan, factor: float = 0.6) -> float:
    """The VRAM budget (GB) to re-plan with after an out-of-memory error: ``factor`` x the smaller of the budget
    and the predicted peak."""
    base = p.predicted_peak_vram_gb
    if p.budget_gb is not None:
        base = min(base, p.budget_gb)
    return max(0.5, round(base * factor, 2))


__all__ = ["ComponentSize", "Entry", "Plan", "plan", "sizes_from_tensors", "sizes_from_manifests", "sizes_from_files",
           "sizes_from_module", "activation_bytes", "options_from_fields", "tighter", "GiB", "FP8", "OPTIONS",
           "COSTS", "STRATEGY_RANK"]
