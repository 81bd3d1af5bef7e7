"""LoRA Fusion (DiffSynth-Studio's ``LoRAFusion-preview-FLUX.1-dev``): a learned gate per transformer Linear that
merges several LoRAs instead of adding them.

For one layer with base output ``y`` (the layer without LoRAs) and the LoRAs' outputs ``l_i`` (each already scaled by
its weight), with two LayerNorms over the layer's output width::

    gate_i = sigmoid(LN_base(y) * w_base + LN_lora(l_i) * w_lora + LN_base(y) * LN_lora(l_i) * w_cross + bias)
    out    = y + sum_i w_out * gate_i * l_i

The gates are trained on DiffSynth's own FluxDiT, whose attention projections are fused: ``a_to_qkv`` is diffusers'
``to_q | to_k | to_v`` (9216 wide) and a single block's ``to_qkv_mlp`` is ``to_q | to_k | to_v | proj_mlp`` (21504).
The LayerNorms run over those fused widths, so here a gate covers a GROUP of diffusers Linears that read the same
input: the first of them to run computes the others' base outputs (their own ``forward``, so fp8 storage and
offloading hooks apply), merges the group once and hands each member its slice when it runs; a forward pre-hook
makes the later members' own calls run on an empty batch, so no base output is computed twice.

How it wraps the runtime adapters (``engine.lora.attach``): enabling it marks each covered Linear with a
``_Member`` (a plain attribute); an adapter hook that finds one hands its LoRAs to the gate instead of adding them.
A layer no gate covers, or a transformer without ``enable_lora_fusion``, adds its LoRAs as before. A part of a group
that no LoRA covers is unchanged (its ``l_i`` is zero there), so only covered members are ever rewritten.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoraError

MEMBER = "_flux_studio_lora_fusion"      # attribute of a covered nn.Linear: its _Member
FUSION = "_flux_studio_lora_fusion_model"  # attribute of the transformer: the enabled LoraFusion

# DiffSynth FluxDiT layer (in a block) -> the diffusers Linears whose outputs it concatenates, in that order.
DOUBLE = {
    "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.a_to_out": ("attn.to_out.0",),
    "ff_a.0": ("ff.net.0.proj",), "ff_a.2": ("ff.net.2",), "norm1_a.linear": ("norm1.linear",),
    "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.b_to_out": ("attn.to_add_out",),
    "ff_b.0": ("ff_context.net.0.proj",), "ff_b.2": ("ff_context.net.2",), "norm1_b.linear": ("norm1_context.linear",),
}
SINGLE = {"to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "proj_out": ("proj_out",),
          "norm.linear": ("norm.linear",)}
FIELDS = ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias")


class LoraGate(nn.Module):
    """One layer's gate; parameter names as in the published file (``model_dict.<layer>.<name>``)."""

    def __init__(self, dim: int):
        super().__init__()
        for name in FIELDS:
            setattr(self, name, nn.Parameter(torch.zeros(dim)))
        self.norm_base = nn.LayerNorm(dim, eps=1e-5)
        self.norm_lora = nn.LayerNorm(dim, eps=1e-5)

    def _params(self, device, dtype) -> dict:
        """The parameters on the compute device and dtype, kept from the last call: the gates stay where they were
        loaded (the CPU) and are copied once per device, not at every step."""
        key = (device, dtype, tuple(t.data_ptr() for t in self.parameters()))
        cached = self.__dict__.get("_cast")
        if cached is None or cached[0] != key:
            cached = (key, {n: t.detach().to(device=device, dtype=dtype) for n, t in self.named_parameters()})
            self.__dict__["_cast"] = cached
        return cached[1]

    def forward(self, base: torch.Tensor, loras: torch.Tensor) -> torch.Tensor:
        """``base`` [..., dim], ``loras`` [n, ..., dim] -> the merged output [..., dim], in ``base``'s dtype."""
        p = self._params(base.device, base.dtype)
        nb = F.layer_norm(base, base.shape[-1:], p["norm_base.weight"], p["norm_base.bias"], 1e-5)
        nl = F.layer_norm(loras, loras.shape[-1:], p["norm_lora.weight"], p["norm_lora.bias"], 1e-5)
        # The formula regrouped so that only three elementwise passes run over all n LoRAs (the rest is per token):
        # sigmoid((nb w_base + bias) + nl (w_lora + nb w_cross)), and w_out taken out of the sum.
        per_token = nb * p["weight_base"] + p["bias"]
        gate = torch.sigmoid(torch.addcmul(per_token, nl, p["weight_lora"] + nb * p["weight_cross"]))
        return base + (gate * loras).sum(dim=0) * p["weight_out"]


class LoraFusion(nn.Module):
    """The gates by DiffSynth layer name (dots as ``___``), as the published file stores them."""

    def __init__(self, dims: dict):
        super().__init__()
        self.model_dict = nn.ModuleDict({name: LoraGate(dim) for name, dim in dims.items()})

    def gate(self, layer: str) -> LoraGate | None:
        return self.model_dict[layer.replace(".", "___")] if layer.replace(".", "___") in self.model_dict else None


def default_dims(double: int = 19, single: int = 38, width: int = 3072, mlp: int = 12288) -> dict:
    """The gates' widths of FluxDiT (FLUX.1: 19 + 38 blocks, width 3072, MLP 12288), keyed as in the file."""
    per_double = {"attn.a_to_qkv": 3 * width, "attn.a_to_out": width, "ff_a.0": mlp, "ff_a.2": width,
                  "norm1_a.linear": 6 * width}
    per_double.update({k.replace("a_", "b_").replace("_a", "_b"): v for k, v in per_double.items()})
    per_single = {"to_qkv_mlp": 3 * width + mlp, "proj_out": width, "norm.linear": 3 * width}
    dims = {f"blocks.{i}.{k}": v for i in range(double) for k, v in per_double.items()}
    dims.update({f"single_blocks.{i}.{k}": v for i in range(single) for k, v in per_single.items()})
    return {k.replace(".", "___"): v for k, v in dims.items()}


def groups(dit) -> dict:
    """{DiffSynth layer name: (diffusers member names)} for this transformer's blocks."""
    out = {}
    for i in range(len(dit.transformer_blocks)):
        out.update({f"blocks.{i}.{k}": tuple(f"transformer_blocks.{i}.{m}" for m in v) for k, v in DOUBLE.items()})
    for i in range(len(dit.single_transformer_blocks)):
        out.update({f"single_blocks.{i}.{k}": tuple(f"single_transformer_blocks.{i}.{m}" for m in v)
                    for k, v in SINGLE.items()})
    return out


class _Group:
    """The diffusers Linears one gate covers, and the merged outputs of the current input until each member took
    its slice."""

    def __init__(self, name: str, gate: LoraGate, modules: list, names: tuple):
        self.name, self.gate, self.modules, self.names = name, gate, modules, names
        self.widths = [m.out_features for m in modules]
        self._input = None
        self._pending: dict[int, torch.Tensor] = {}
        self._skip = None             # the member whose own call was emptied by ``pre``

    def pre(self, index: int, args, kwargs):
        """Before a member runs: when its merged output is already waiting for this very input, it computes on an
        empty batch instead (its hooks, fp8 casts and offloading still run), so no base output is computed twice."""
        x = args[0] if args else kwargs.get("input")
        if x is None or x is not self._input or index not in self._pending:
            return None
        self._skip = index
        if args:
            return (x[:0], *args[1:]), kwargs
        return args, {**kwargs, "input": x[:0]}

    def output(self, index: int, module, x, output, slots: dict):
        if self._skip == index:
            self._skip = None
            out = self._pending.pop(index)
            if not self._pending:
                self._input = None
            return out
        if self._input is not x or index not in self._pending:
            self._pending = self._merge(index, x, output, slots)
            self._input = x
        out = self._pending.pop(index, output)
        if not self._pending:
            self._input = None        # every covered member took its slice: drop the input reference
        return out

    def _merge(self, index: int, x, output, slots: dict) -> dict:
        bases = [output if i == index else m.forward(x) for i, m in enumerate(self.modules)]
        loras = _lora_outputs(x, [slots.get(n) for n in self.names], bases)
        if loras is None:
            return {}
        merged = self.gate(torch.cat(bases, dim=-1), loras).to(output.dtype)
        parts = merged.split(self.widths, dim=-1)
        covered = {i for i, n in enumerate(self.names) if slots.get(n) is not None and slots[n].pairs}
        return {i: parts[i] for i in covered}


def _lora_outputs(x, slots: list, bases: list) -> torch.Tensor | None:
    """The LoRAs' outputs over the group's full width, [n, ..., width] in attach order, zeros where one does not
    reach; LoRAs of weight 0 are left out (their term is zero whatever the gate); None when none is left."""
    children = []
    for slot in slots:
        for child, pair in (slot.pairs.items() if slot is not None else ()):
            if child not in children and pair.record.weight * pair.scale != 0:
                children.append(child)
    if not children:
        return None
    children.sort(key=lambda c: int(c.rsplit("_", 1)[-1]))
    base = bases[0]
    # written in place into one tensor: no per-LoRA concatenation and stacking (the gate itself is the real cost)
    out = base.new_zeros((len(children), *base.shape[:-1], sum(b.shape[-1] for b in bases)))
    for n, child in enumerate(children):
        start = 0
        for slot, b in zip(slots, bases):
            pair = slot.pairs.get(child) if slot is not None else None
            if pair is not None:
                out[n, ..., start:start + b.shape[-1]] = _pair_output(pair, x, b.dtype)
            start += b.shape[-1]
    return out


def _pair_output(pair, x, dtype):
    A, B, b = pair.down, pair.up, pair.up_bias
    if A.device != x.device or A.dtype != x.dtype:
        A, B = A.to(device=x.device, dtype=x.dtype), B.to(device=x.device, dtype=x.dtype)
        b = None if b is None else b.to(device=x.device, dtype=x.dtype)
    return (F.linear(F.linear(x, A), B, b) * (pair.record.weight * pair.scale)).to(dtype)


class _Member:
    """What a covered Linear carries: its group and place in it. Called by the adapter hook with the layer's slot."""

    def __init__(self, group: _Group, index: int, dit):
        self.group, self.index = group, index
        self.dit_ref = dit.__dict__      # the transformer's attributes (no module reference: no cycle in children)
        self.handle = None               # the pre-hook of a member of a group of several Linears

    def pre(self, module, args, kwargs):
        return self.group.pre(self.index, args, kwargs)

    def __call__(self, module, x, output):
        from .attach import STATE
        st = self.dit_ref.get(STATE)
        slots = st.slots if st is not None else {}
        return self.group.output(self.index, module, x, output, slots)


def enable_lora_fusion(dit, fusion: LoraFusion) -> int:
    """Route the LoRAs of every layer a gate covers through the gate (LoRAs attached before or after). Returns the
    number of gates used. A gate whose width does not fit the transformer's layers is refused by name."""
    disable_lora_fusion(dit)
    layers = dict(dit.named_modules())
    used, problems = 0, []
    for name, members in groups(dit).items():
        gate = fusion.gate(name)
        mods = [layers.get(m) for m in members]
        if gate is None or any(not isinstance(m, nn.Linear) for m in mods):
            continue
        width = sum(m.out_features for m in mods)
        if gate.weight_base.shape[0] != width:
            problems.append(f"{name}: gate width {gate.weight_base.shape[0]}, layers {width}")
            continue
        group = _Group(name, gate, mods, members)
        for i, m in enumerate(mods):
            member = m.__dict__[MEMBER] = _Member(group, i, dit)
            if len(mods) > 1:
                member.handle = m.register_forward_pre_hook(member.pre, with_kwargs=True)
        used += 1
    if problems:
        disable_lora_fusion(dit)
        raise LoraError(f"The LoRA Fusion model does not fit this transformer ({'; '.join(problems[:3])}): it was "
                        f"made for FLUX.1-dev's transformer (width 3072, 19 + 38 blocks). Use it with FLUX.1-dev.")
    if used == 0:
        raise LoraError("The LoRA Fusion model has no gate for any layer of this transformer: it was made for "
                        "FLUX.1-dev's transformer. Use it with FLUX.1-dev.")
    dit.__dict__[FUSION] = fusion
    return used


def disable_lora_fusion(dit) -> None:
    """LoRAs add again as without the gates."""
    for m in dit.modules():
        member = m.__dict__.pop(MEMBER, None)
        if member is not None and member.handle is not None:
            member.handle.remove()
    dit.__dict__.pop(FUSION, None)


def fusion_enabled(dit) -> bool:
    return FUSION in dit.__dict__
