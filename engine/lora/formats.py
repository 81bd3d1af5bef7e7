"""LoRA key formats, told apart from the keys, and mapped onto diffusers' ``FluxTransformer2DModel`` module names.

A LoRA file is a set of pairs (down ``A`` [rank, in], up ``B`` [out, rank]) and optionally a per-pair ``alpha``;
the change it makes to a linear layer is ``scale * B @ A`` with ``scale = alpha / rank`` (1 without alpha). The
formats differ in how they name the layer and the two matrices:

=================  =====================================================================  =============================
format             a key                                                                  matrices / alpha
=================  =====================================================================  =============================
kohya              ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``            lora_down/lora_up, ``.alpha``
                   (sd-scripts: ``lora_unet_`` + BFL module path with '.' -> '_')
OneTrainer         ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``   lora_down/lora_up, ``.alpha``
                   (kohya-style over the diffusers module path)
diffusers/PEFT     ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``           lora_A/lora_B; alpha from
                   (also ``base_model.model.`` prefix, no prefix, ``.lora_A.default.``)   ``.alpha`` keys, the
                                                                                          ``lora_adapter_metadata``
                                                                                          JSON or adapter_config.json
ai-toolkit         diffusers naming; told apart by its ``software`` metadata              as diffusers
BFL                ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``         lora_A/lora_B (+ ``lora_B``
                   (ComfyUI, BFL's control LoRAs)                                         bias), or lora_down/up+alpha
XLabs              ``double_blocks.0.processor.qkv_lora1.down.weight``                    down/up, no alpha
DiffSynth          ``blocks.0.attn.a_to_qkv.lora_A.default.weight`` over DiffSynth's      lora_A/lora_B (PEFT inside
                   own FluxDiT names (``a_to_qkv``, ``to_qkv_mlp``, ``norm1_a.linear``)   DiffSynth's trainer), no alpha
=================  =====================================================================  =============================

Fused projections are split onto diffusers' separate layers, with every width taken from the tensors:

- ``qkv`` (BFL ``img_attn.qkv`` / ``txt_attn.qkv``, DiffSynth ``a_to_qkv`` / ``b_to_qkv``, XLabs ``qkv_lora*``): the
  down matrix is shared and the up matrix is split row-wise into three equal parts (rows / 3) for q, k, v.
- ``linear1`` (BFL single block ``linear1``, DiffSynth ``to_qkv_mlp``) = q | k | v | mlp: parts (h, h, h, rest) where
  h is the layer's input width (the columns of the down matrix, which is the hidden size of the block); an up matrix
  of only 3h rows (XLabs) covers q, k, v.
- When the up matrix is block-diagonal (a LoRA that was itself made by concatenating per-projection LoRAs, as
  diffusers/ai-toolkit -> kohya converters and DiffSynth's converter do), the down matrix is split too, so each part
  keeps its own rank; the result is the same product either way.
- ``final_layer.adaLN_modulation.1`` (BFL) / ``final_norm_out.linear`` (DiffSynth) -> ``norm_out.linear`` with the two
  halves of the up matrix (and bias) swapped: BFL orders the final modulation (shift, scale), diffusers (scale, shift).
- ``img_mod.lin`` / ``txt_mod.lin`` / single ``modulation.lin`` (DiffSynth ``norm1_a.linear`` / ``norm1_b.linear`` /
  ``norm.linear``) -> ``norm1.linear`` / ``norm1_context.linear`` / ``norm.linear``: same row order in all three.

diffusers' own converters (``_convert_kohya_flux_lora_to_diffusers``, ``_convert_bfl_flux_control_lora_to_diffusers``)
hard-code 19/38 blocks and the 3072 width for ``linear1``, and fold alpha into the weights, so the mapping is written
here as tables over module names; the block-diagonal test follows theirs.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .errors import LoraError, few

# ---------------------------------------------------------------------------------------------------------------------
# Module-name tables: (kind, diffusers targets). kind: "plain", "qkv" (3-way split), "linear1" (q|k|v|mlp), "swap".

_QKV_IMG = ("qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
_QKV_TXT = ("qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
_LINEAR1 = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))


def _p(*targets):
    return ("plain", targets)


BFL_DOUBLE = {
    "img_attn.qkv": _QKV_IMG, "txt_attn.qkv": _QKV_TXT,
    "img_attn.proj": _p("attn.to_out.0"), "txt_attn.proj": _p("attn.to_add_out"),
    "img_mlp.0": _p("ff.net.0.proj"), "img_mlp.2": _p("ff.net.2"),
    "txt_mlp.0": _p("ff_context.net.0.proj"), "txt_mlp.2": _p("ff_context.net.2"),
    "img_mod.lin": _p("norm1.linear"), "txt_mod.lin": _p("norm1_context.linear"),
}
BFL_SINGLE = {"linear1": _LINEAR1, "linear2": _p("proj_out"), "modulation.lin": _p("norm.linear")}
BFL_TOP = {
    "img_in": _p("x_embedder"), "txt_in": _p("context_embedder"),
    "time_in.in_layer": _p("time_text_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": _p("time_text_embed.timestep_embedder.linear_2"),
    "vector_in.in_layer": _p("time_text_embed.text_embedder.linear_1"),
    "vector_in.out_layer": _p("time_text_embed.text_embedder.linear_2"),
    "guidance_in.in_layer": _p("time_text_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": _p("time_text_embed.guidance_embedder.linear_2"),
    "final_layer.linear": _p("proj_out"),
    "final_layer.adaLN_modulation.1": ("swap", ("norm_out.linear",)),
}

_DIFFUSERS_DOUBLE_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                             "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                             "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear")
_DIFFUSERS_SINGLE_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
_DIFFUSERS_TOP_LINEARS = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                          "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                          "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
                          "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2")
DIFFUSERS_DOUBLE = {**{n: _p(n) for n in _DIFFUSERS_DOUBLE_LINEARS},
                    "attn.to_qkv": _QKV_IMG, "attn.to_added_qkv": _QKV_TXT}  # diffusers' fused projections
DIFFUSERS_SINGLE = {**{n: _p(n) for n in _DIFFUSERS_SINGLE_LINEARS}, "attn.to_qkv": _QKV_IMG}
DIFFUSERS_TOP = {n: _p(n) for n in _DIFFUSERS_TOP_LINEARS}

# DiffSynth-Studio's FluxDiT (diffsynth/models/flux_dit.py); the correspondence is its state-dict converter's
# (diffsynth/utils/state_dict_converters/flux_dit.py): img_mod.lin -> norm1_a.linear, linear1 -> to_qkv_mlp, ...
DIFFSYNTH_DOUBLE = {
    "attn.a_to_qkv": _QKV_IMG, "attn.b_to_qkv": _QKV_TXT,
    "attn.a_to_q": _p("attn.to_q"), "attn.a_to_k": _p("attn.to_k"), "attn.a_to_v": _p("attn.to_v"),
    "attn.b_to_q": _p("attn.add_q_proj"), "attn.b_to_k": _p("attn.add_k_proj"), "attn.b_to_v": _p("attn.add_v_proj"),
    "attn.a_to_out": _p("attn.to_out.0"), "attn.b_to_out": _p("attn.to_add_out"),
    "ff_a.0": _p("ff.net.0.proj"), "ff_a.2": _p("ff.net.2"),
    "ff_b.0": _p("ff_context.net.0.proj"), "ff_b.2": _p("ff_context.net.2"),
    "norm1_a.linear": _p("norm1.linear"), "norm1_b.linear": _p("norm1_context.linear"),
}
DIFFSYNTH_SINGLE = {
    "to_qkv_mlp": _LINEAR1, "proj_out": _p("proj_out"), "norm.linear": _p("norm.linear"),
    "a_to_q": _p("attn.to_q"), "a_to_k": _p("attn.to_k"), "a_to_v": _p("attn.to_v"),
    "proj_in_besides_attn": _p("proj_mlp"),
}
DIFFSYNTH_TOP = {
    "x_embedder": _p("x_embedder"), "context_embedder": _p("context_embedder"),
    "time_embedder.timestep_embedder.0": _p("time_text_embed.timestep_embedder.linear_1"),
    "time_embedder.timestep_embedder.2": _p("time_text_embed.timestep_embedder.linear_2"),
    "guidance_embedder.timestep_embedder.0": _p("time_text_embed.guidance_embedder.linear_1"),
    "guidance_embedder.timestep_embedder.2": _p("time_text_embed.guidance_embedder.linear_2"),
    "pooled_text_embedder.0": _p("time_text_embed.text_embedder.linear_1"),
    "pooled_text_embedder.2": _p("time_text_embed.text_embedder.linear_2"),
    "final_norm_out.linear": ("swap", ("norm_out.linear",)),  # AdaLayerNormContinuous there: (shift, scale)
    "final_proj_out": _p("proj_out"),
}

# XLabs' x-flux: LoRA processors beside the BFL blocks (DoubleStreamBlockLoraProcessor: qkv_lora1/proj_lora1 on the
# image stream, qkv_lora2/proj_lora2 on the text stream; SingleStreamBlockLoraProcessor: qkv_lora on the q|k|v part
# of linear1, proj_lora on linear2).
XLABS_DOUBLE = {"processor.qkv_lora1": _QKV_IMG, "processor.qkv_lora2": _QKV_TXT,
                "processor.proj_lora1": _p("attn.to_out.0"), "processor.proj_lora2": _p("attn.to_add_out")}
XLABS_SINGLE = {"processor.qkv_lora": _QKV_IMG, "processor.proj_lora": _p("proj_out")}

# naming -> (double block prefix, single block prefix, double table, single table, top table)
NAMINGS = {
    "diffusers": ("transformer_blocks", "single_transformer_blocks", DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE,
                  DIFFUSERS_TOP),
    "BFL": ("double_blocks", "single_blocks", BFL_DOUBLE, BFL_SINGLE, BFL_TOP),
    "DiffSynth": ("blocks", "single_blocks", DIFFSYNTH_DOUBLE, DIFFSYNTH_SINGLE, DIFFSYNTH_TOP),
    "XLabs": ("double_blocks", "single_blocks", XLABS_DOUBLE, XLABS_SINGLE, {}),
}
_UNDERSCORED = ("diffusers", "BFL")  # the namings kohya-style files use, with '.' -> '_'
_US_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)_(\d+)_(.+)$")
_DOT_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks|blocks)\.(\d+)\."
                        r"(.+)$")


def _underscored(table):
    return {k.replace(".", "_"): v for k, v in table.items()}


_US_TABLES = {n: (NAMINGS[n][0], NAMINGS[n][1], _underscored(NAMINGS[n][2]), _underscored(NAMINGS[n][3]),
                  _underscored(NAMINGS[n][4])) for n in _UNDERSCORED}


def _lookup(path: str, tables: dict, block_re: re.Pattern):
    """[(naming, kind, full diffusers target names)] for every naming that knows ``path``."""
    hits = []
    m = block_re.match(path)
    for naming, (dbl, sgl, dtab, stab, top) in tables.items():
        if m:
            blk, i, rest = m.groups()
            if blk == dbl and rest in dtab:
                kind, ts = dtab[rest]
                hits.append((naming, kind, tuple(f"transformer_blocks.{i}.{t}" for t in ts)))
            elif blk == sgl and rest in stab:
                kind, ts = stab[rest]
                hits.append((naming, kind, tuple(f"single_transformer_blocks.{i}.{t}" for t in ts)))
        elif path in top:
            kind, ts = top[path]
            hits.append((naming, kind, ts))
    return hits


# ---------------------------------------------------------------------------------------------------------------------
# Keys -> (module path, role)

_ROLE_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora_B.default.bias", "up_bias"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
    (".lora_magnitude_vector.default.weight", "dora"), (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector", "dora"), (".dora_scale", "dora"),
)
_XLABS_SUFFIXES = ((".down.weight", "down"), (".up.weight", "up"))
_LYCORIS = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|oft_blocks|oft_diag)"
                      r"(\.weight)?$")
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "pipe.dit.", "dit.")
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_encoders.", "te.", "te1.", "te2.", "clip_l.", "t5xxl.",
                 "text_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_flux_")


def _split_key(key: str):
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    for suffix, role in _XLABS_SUFFIXES:
        if key.endswith(suffix) and "lora" in key[: -len(suffix)].rsplit(".", 1)[-1]:
            return key[: -len(suffix)], role
    if _LYCORIS.search(key):
        return key.rsplit(".", 1)[0], "lycoris"
    return key, "other"


def _strip_prefixes(path: str) -> tuple[str, str]:
    stripped = ""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if path.startswith(p) and len(path) > len(p):
                path, stripped, changed = path[len(p):], stripped + p, True
    return path, stripped


# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoraFile:
    """A LoRA file read and mapped onto diffusers' FLUX transformer module names.

    ``targets``: {diffusers module name: (down A [r, in], up B [out, r], scale)} with ``scale = alpha / rank``
    (1 without alpha); the change to that layer's weight is ``scale * B @ A``. ``biases``: {module: up bias} for the
    few LoRAs whose up layer has a bias (BFL's control LoRAs).
    """

    path: str
    format: str
    rank: int | None
    targets: dict = field(default_factory=dict)
    biases: dict = field(default_factory=dict)
    source_of: dict = field(default_factory=dict)   # target -> the module name as the file spells it
    pairs: int = 0                                  # LoRA pairs aimed at the transformer (mapped or not)
    unmapped: list = field(default_factory=list)    # transformer-side modules with no FLUX counterpart
    problems: list = field(default_factory=list)    # "module: why it cannot be used"
    text_encoder: list = field(default_factory=list)  # text-encoder modules (not applied to the transformer)
    ignored: list = field(default_factory=list)     # tensors that are not LoRA pairs (full weights, norm deltas)
    metadata: dict = field(default_factory=dict)
    hint: str = ""                                  # what the unmapped names suggest ("for Stable Diffusion 1.x")
    family: str | None = None                       # the family its names and widths say ("FLUX.1", "FLUX.2", None)
    mapped_for: str = "FLUX.1"                      # the family whose module names ``targets`` holds

    @property
    def total(self) -> int:
        """Targets the transformer should get: mapped modules plus those nothing maps (each counts once)."""
        return len(self.targets) + len(self.unmapped) + len(self.problems)

    def describe(self) -> str:
        r = f", rank {self.rank}" if self.rank else ""
        return (f"{article(self.format)} {self.format} LoRA{r} ({self.pairs} pairs -> {len(self.targets)} transformer "
                f"layers)")


def article(word: str) -> str:
    """'a' or 'an' before a format name (an ai-toolkit, an XLabs, a kohya)."""
    return "an" if word.lower().startswith(("a", "e", "i", "u", "x")) else "a"


def _alpha_config(metadata: dict) -> dict:
    """PEFT-style {lora_alpha, r, alpha_pattern, use_rslora} from diffusers' metadata or adapter_config.json."""
    cfg = metadata.get("adapter_config") or {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            data = json.loads(raw)
        except Exception:
            data = {}
        if isinstance(data, dict):
            sub = {k[len("transformer."):]: v for k, v in data.items() if k.startswith("transformer.")}
            cfg = {**cfg, **(sub or data)}
    return cfg if isinstance(cfg, dict) else {}


def _peft_scale(cfg: dict, path: str, rank: int) -> float | None:
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", path)
        except re.error:
            hit = path.endswith(pattern)
        if hit:
            alpha = value
            break
    if alpha is None:
        return None
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _is_ai_toolkit(metadata: dict) -> bool:
    sw = metadata.get("software") or ""
    return "ai-toolkit" in str(sw).lower() or "ostris" in str(sw).lower()


def _format_name(naming: str, prefix: str, metadata: dict) -> str:
    if prefix == "lora_transformer_":
        return "OneTrainer"
    if prefix:  # lora_unet_ / lora_flux_: sd-scripts' naming
        return "kohya"
    if naming == "diffusers":
        return "ai-toolkit" if _is_ai_toolkit(metadata) else "diffusers/PEFT"
    return naming  # "BFL", "DiffSynth", "XLabs"


def _guess_format(paths, metadata) -> str:
    """The format by its key style alone, for files whose module names map to nothing."""
    if any(p.startswith("lora_transformer_") for p in paths):
        return "OneTrainer"
    if any(p.startswith(("lora_unet_", "lora_te")) for p in paths):
        return "kohya"
    if any(".processor." in p for p in paths):
        return "XLabs"
    if _is_ai_toolkit(metadata):
        return "ai-toolkit"
    return "diffusers/PEFT"


def _model_hint(unmapped: list, tensors_by_module: dict, text_encoder: list) -> str:
    """What model the unmapped module names suggest the LoRA was made for."""
    names = " ".join(unmapped)
    if re.search(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)", names):
        widths = set()
        for m in unmapped:
            if "attn2" in m and "to_k" in m:
                down = tensors_by_module.get(m, {}).get("down")
                if down is not None and down.ndim >= 2:
                    widths.add(int(down.shape[1]))
        if any(t.startswith(("lora_te2_", "te2.", "text_encoder_2")) for t in text_encoder) or 2048 in widths:
            return "for SDXL (UNet down/mid/up blocks)"
        if 1024 in widths:
            return "for Stable Diffusion 2.x (UNet down/mid/up blocks)"
        if 768 in widths:
            return "for Stable Diffusion 1.x (UNet down/mid/up blocks)"
        return "for a Stable Diffusion UNet (SD 1.x / 2.x / SDXL: down/mid/up blocks)"
    if "joint_blocks" in names:
        return "for Stable Diffusion 3 (MMDiT joint blocks)"
    if re.search(r"(double_stream_modulation|single_stream_modulation)", names):
        return "for FLUX.2 (its shared modulation layers)"
    if re.search(r"(img_mlp\.net|txt_mlp\.net|img_mod\.1|txt_mod\.1)", names):
        return "for Qwen-Image"
    if re.search(r"(cross_attn|self_attn)\.(q|k|v|o)\b", names):
        return "for a video model such as Wan"
    return ""


def _block_sparse(B: torch.Tensor, sizes, rank: int) -> bool:
    """True when B (rows split by ``sizes``) is block-diagonal with equal rank chunks."""
    n = len(sizes)
    if B.device.type == "meta" or rank % n or rank < n:
        return False
    rr, row = rank // n, 0
    for j, s in enumerate(sizes):
        part = B[row: row + s]
        if torch.count_nonzero(part[:, : j * rr]) or torch.count_nonzero(part[:, (j + 1) * rr:]):
            return False
        row += s
    return True


def _split(A, B, bias, sizes):
    """[(A_j, B_j, bias_j)] for the row parts ``sizes`` of a fused up matrix."""
    rank = A.shape[0]
    Bs = B.split(list(sizes), dim=0)
    biases = bias.split(list(sizes), dim=0) if bias is not None else [None] * len(sizes)
    if _block_sparse(B, sizes, rank):
        rr = rank // len(sizes)
        return [(A[j * rr:(j + 1) * rr], Bj[:, j * rr:(j + 1) * rr], bj) for j, (Bj, bj) in enumerate(zip(Bs, biases))]
    return [(A, Bj, bj) for Bj, bj in zip(Bs, biases)]


def parse_lora(tensors: dict, metadata: dict | None = None, label: str = "<state dict>", namings=None,
               underscored=None, mapped_for: str = "FLUX.1") -> LoraFile:
    """Map a LoRA state dict onto diffusers' FLUX transformer module names (see the module docstring).
    ``namings`` / ``underscored``: another family's name tables (``engine.lora.flux2_names``), ``mapped_for`` its
    name."""
    from .family import family_of_shapes
    namings, underscored = namings or NAMINGS, underscored or _US_TABLES
    metadata = dict(metadata or {})
    modules: dict[str, dict] = {}
    ignored, dora, lycoris = [], [], []
    for key, t in tensors.items():
        path, role = _split_key(key)
        if role == "other":
            ignored.append(key)
            continue
        if role == "dora":
            dora.append(key)
            continue
        if role == "lycoris":
            lycoris.append(key)
            continue
        modules.setdefault(path, {})[role] = t
    if lycoris:
        raise LoraError(f"{label} is a LyCORIS LoHa/LoKr/OFT file (keys like {few(lycoris, 2)}), not a plain LoRA: "
                        f"those are not supported. Use a LoRA (lora_down/lora_up or lora_A/lora_B) release.", label)
    if dora:
        raise LoraError(f"{label} is a DoRA (weight-decomposed LoRA: keys like {few(dora, 2)}): applying it without "
                        f"its magnitude vectors would be wrong, and DoRA is not supported. Use a plain LoRA.", label)
    if not modules:
        from engine.loading.detect import detect_component
        role, _fmt, desc = detect_component({k: v for k, v in tensors.items()})
        if role not in ("lora", "unknown"):
            raise LoraError(f"{label} holds {desc}, not a LoRA: load it as a model (or pick a LoRA file).", label)
        raise LoraError(f"{label} has no LoRA tensors (no lora_down/lora_up or lora_A/lora_B pairs; keys like "
                        f"{few(sorted(tensors), 3)}): it is not a LoRA file.", label)

    alpha_cfg = _alpha_config(metadata)
    out = LoraFile(path=label, format="", rank=None, metadata=metadata, ignored=ignored, mapped_for=mapped_for,
                   family=family_of_shapes({k: tuple(t.shape) for k, t in tensors.items()}))
    votes: Counter = Counter()
    ranks: Counter = Counter()
    entries = []  # (source path, kind, targets, A, B, bias, scale)
    unmapped_info: dict[str, dict] = {}
    for path, parts in modules.items():
        stripped, _prefix = _strip_prefixes(path)
        if stripped.startswith(_TEXT_ENCODER):
            out.text_encoder.append(path)
            continue
        if "down" not in parts or "up" not in parts:
            if "down" in parts or "up" in parts:
                out.pairs += 1
                have = "down" if "down" in parts else "up"
                out.problems.append(f"{path}: has a {have} matrix but no {'up' if have == 'down' else 'down'} "
                                    f"matrix")
            else:
                out.ignored.extend(f"{path}.{r}" for r in parts)
            continue
        out.pairs += 1
        A, B = parts["down"], parts["up"]
        if A.ndim == 4 and A.shape[2:] == (1, 1):  # 1x1 convs stored by some converters
            A, B = A.flatten(1), B.flatten(1)
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            out.problems.append(f"{path}: down {list(A.shape)} and up {list(B.shape)} are not a LoRA pair")
            continue
        kohya = next((p for p in _KOHYA_PREFIXES if stripped.startswith(p)), "")
        if kohya:
            hits = _lookup(stripped[len(kohya):], underscored, _US_BLOCK)
        else:
            hits = _lookup(stripped, namings, _DOT_BLOCK)
            if not hits and "_" in stripped and "." not in stripped:  # kohya-style without the lora_unet_ prefix
                hits = _lookup(stripped, underscored, _US_BLOCK)
                kohya = "lora_unet_" if hits else ""
        if not hits:
            out.unmapped.append(path)
            unmapped_info[path] = parts
            continue
        if len({h[0] for h in hits}) == 1:
            votes[_format_name(hits[0][0], kohya, metadata)] += 1
        _naming, kind, targets = hits[0]
        rank = int(A.shape[0])
        ranks[rank] += 1
        if "alpha" in parts:
            alpha = parts["alpha"]
            scale = float(alpha.float().reshape(-1)[0]) / rank
        else:
            scale = _peft_scale(alpha_cfg, stripped, rank) if alpha_cfg else None
            scale = 1.0 if scale is None else scale
        entries.append((path, kind, targets, A, B, parts.get("up_bias"), scale))

    out.format = votes.most_common(1)[0][0] if votes else _guess_format(list(modules), metadata)
    out.rank = ranks.most_common(1)[0][0] if ranks else None
    out.hint = _model_hint(out.unmapped, unmapped_info, out.text_encoder)

    for path, kind, targets, A, B, bias, scale in entries:
        try:
            pieces = _convert(kind, targets, A, B, bias)
        except ValueError as e:
            out.problems.append(f"{path}: {e}")
            continue
        for target, (a, b, bb) in pieces.items():
            _add(out, target, a, b, bb, scale, path)
    return out


def _convert(kind, targets, A, B, bias) -> dict:
    rows, cols = int(B.shape[0]), int(A.shape[1])
    if kind == "plain":
        return {targets[0]: (A, B, bias)}
    if kind == "swap":
        if rows % 2:
            raise ValueError(f"the final modulation's up matrix has {rows} rows, not an even number (shift|scale)")
        h = rows // 2
        B = torch.cat([B[h:], B[:h]], dim=0)
        bias = torch.cat([bias[h:], bias[:h]], dim=0) if bias is not None else None
        return {targets[0]: (A, B, bias)}
    if kind == "qkv":
        if rows % 3:
            raise ValueError(f"the fused q|k|v up matrix has {rows} rows, not a multiple of 3")
        sizes = [rows // 3] * 3
        return dict(zip(targets, _split(A, B, bias, sizes)))
    if kind == "linear1":
        h = cols  # linear1 maps the block's hidden width h to q|k|v|mlp
        if rows == 3 * h:  # q|k|v only (XLabs-style)
            return dict(zip(targets[:3], _split(A, B, bias, [h, h, h])))
        if rows <= 3 * h:
            raise ValueError(f"the fused q|k|v|mlp up matrix has {rows} rows, too few for width {h}")
        return dict(zip(targets, _split(A, B, bias, [h, h, h, rows - 3 * h])))
    raise ValueError(f"unknown kind {kind}")


def _add(out: LoraFile, target, A, B, bias, scale, source):
    if target in out.targets:  # two source pairs on one layer: one pair of the combined rank
        A0, B0, s0 = out.targets[target]
        b0 = out.biases.get(target)
        parts = [b * s for b, s in ((b0, s0), (bias, scale)) if b is not None]
        bias = sum(parts[1:], parts[0]) if parts else None
        A = torch.cat([A0, A], dim=0)
        B = torch.cat([B0 * s0, B * scale], dim=1)
        scale = 1.0
        source = f"{out.source_of[target]} + {source}"
    out.targets[target] = (A, B, float(scale))
    if bias is not None:
        out.biases[target] = bias
    out.source_of[target] = source
