"""LoRA Fusion (DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev): the learned gate merging several LoRAs per layer.

The reference is DiffSynth-Studio's math written out as its own layers compute it: one FUSED Linear per FluxDiT layer
(``a_to_qkv`` = q|k|v, ``to_qkv_mlp`` = q|k|v|mlp), the LoRAs on it as (A, B) pairs with the weight folded into A and
the split LoRAs' up matrices block-diagonal in the fused rows, and ``LoraMerger.forward``::

    gate = sigmoid(LN_base(out) * w_base + LN_lora(l) * w_lora + LN_base(out) * LN_lora(l) * w_cross + bias)
    out  = out + (w_out * gate * l).sum(0)        # l: the LoRAs' outputs stacked [n, ..., dim]

with the two LayerNorms as ``torch.nn.LayerNorm(dim, eps=1e-5)`` modules. The engine's version works on diffusers'
split Linears with the runtime adapters; both must agree (one layer group, and a whole transformer forward).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.loading import load_models
from engine.loading.lora_fusion import is_lora_fusion, load_lora_fusion
from engine.lora import LoraError, attach_lora, detach_loras
from engine.lora.fusion import LoraFusion, default_dims, disable_lora_fusion, enable_lora_fusion, groups

pytestmark = pytest.mark.filterwarnings("ignore")
FP8 = torch.float8_e4m3fn
W1, W2 = 0.8, 1.5      # the two LoRAs' weights (the seed folds them into A)


# ------------------------------------------------------------------------------------------------ the seed's math

def seed_merger(p: dict, base, loras):
    """DiffSynth's ``LoraMerger.forward`` with its parameters ``p`` (the file's names)."""
    dim = base.shape[-1]
    norm_base, norm_lora = torch.nn.LayerNorm(dim, eps=1e-5), torch.nn.LayerNorm(dim, eps=1e-5)
    norm_base.load_state_dict({"weight": p["norm_base.weight"], "bias": p["norm_base.bias"]})
    norm_lora.load_state_dict({"weight": p["norm_lora.weight"], "bias": p["norm_lora.bias"]})
    nb, nl = norm_base(base), norm_lora(loras)
    gate = torch.sigmoid(nb * p["weight_base"] + nl * p["weight_lora"] + nb * nl * p["weight_cross"] + p["bias"])
    return base + (p["weight_out"] * gate * loras).sum(dim=0)


class SeedLayer:
    """DiffSynth's fused Linear with hot-loaded LoRAs and its merger: ``out = merger(x W^T + b, [x A_i^T B_i^T])``."""

    def __init__(self, members, pairs_per_lora, gate_params):
        self.W = torch.cat([m.weight.float() for m in members])
        self.b = torch.cat([m.bias.float() for m in members])
        self.widths = [m.out_features for m in members]
        self.loras = []                  # fused (A, B) per LoRA: A rank-stacked (weight folded in), B block-diagonal
        for weight, per_member in pairs_per_lora:
            As, Bs, offset = [], [], 0
            for width, pair in zip(self.widths, per_member):
                if pair is not None:
                    A, B = pair
                    As.append(A * weight)
                    block = torch.zeros(sum(self.widths), A.shape[0])
                    block[offset:offset + width] = B
                    Bs.append(block)
                offset += width
            if As:
                self.loras.append((torch.cat(As), torch.cat(Bs, dim=1)))
        self.p = gate_params

    def __call__(self, x):
        out = F.linear(x, self.W, self.b)
        if not self.loras:
            return out
        return seed_merger(self.p, out, torch.stack([x @ A.T @ B.T for A, B in self.loras]))


class Slice(torch.nn.Module):
    def __init__(self, layer, start, end):
        super().__init__()
        self.layer, self.start, self.end = layer, start, end

    def forward(self, x):
        return self.layer(x)[..., self.start:self.end]


# ---------------------------------------------------------------------------------------------- fixtures, helpers

@pytest.fixture(scope="module")
def demo_dit(demo_dir):
    """The demo transformer (hidden 64, 2 double + 2 single blocks), float32."""
    return load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]


def fusion_for(dit, seed=0) -> LoraFusion:
    """Random gates (every parameter random, so each term of the formula counts) for this transformer."""
    c = dit.config
    width = c.num_attention_heads * c.attention_head_dim
    mlp = dit.single_transformer_blocks[0].proj_mlp.out_features
    fusion = LoraFusion(default_dims(len(dit.transformer_blocks), len(dit.single_transformer_blocks), width, mlp))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return fusion.eval().requires_grad_(False)


def lora_sd(dit, names, seed, rank=3, scale=0.3):
    """A diffusers/PEFT LoRA state dict over ``names``, and {layer: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    layers, sd, pairs = dict(dit.named_modules()), {}, {}
    for n in names:
        m = layers[n]
        A = torch.randn(rank, m.in_features, generator=g) * scale
        B = torch.randn(m.out_features, rank, generator=g) * scale
        sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = A, B
        pairs[n] = (A, B)
    return sd, pairs


def all_gated(dit):
    return [m for ms in groups(dit).values() for m in ms]


def partial(dit):
    """A second LoRA reaching only parts of groups (q and v of a double block, the MLP part of a single block)."""
    return ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.ff.net.2",
            "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.norm.linear"]


def seed_reference(dit, fusion, loras):
    """A copy of ``dit`` (taken before any LoRA was attached) whose gated layers compute as DiffSynth's do
    (``loras``: [(weight, {layer: (A, B)})]); layers no gate covers get the LoRAs merged into their weights (plain
    addition, as in the seed)."""
    ref = copy.deepcopy(dit)
    layers = dict(ref.named_modules())
    for name, members in groups(ref).items():
        mods = [layers[m] for m in members]
        params = {k: v.float() for k, v in fusion.gate(name).state_dict().items()}
        seed = SeedLayer(mods, [(w, [pairs.get(m) for m in members]) for w, pairs in loras], params)
        start = 0
        for m, mod in zip(members, mods):
            parent, _, leaf = m.rpartition(".")
            setattr(layers[parent], leaf, Slice(seed, start, start + mod.out_features))
            start += mod.out_features
    gated = set(all_gated(dit))
    with torch.no_grad():
        for w, pairs in loras:
            for n, (A, B) in pairs.items():
                if n not in gated:
                    layers[n].weight += w * B @ A
    return ref


def inputs(dit, seed=0):
    c, g = dit.config, torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g), timestep=torch.tensor([0.6]),
                img_ids=img_ids, txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


@torch.no_grad()
def run(model, seed=0):
    return model(**inputs(model, seed))[0]


@pytest.fixture
def dit(demo_dit):
    yield demo_dit
    disable_lora_fusion(demo_dit)
    detach_loras(demo_dit)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in demo_dit.modules())


# ------------------------------------------------------------------------------------------------------ the tests

@torch.no_grad()
def test_one_layer_group_two_loras_matches_seed(dit):
    """to_q | to_k | to_v of a double block = DiffSynth's a_to_qkv: LN over the fused 3 x 64 output; the second
    LoRA reaches only q and v (zero in k's rows, as the seed's fused LoRA)."""
    fusion = fusion_for(dit)
    names = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
    sd1, p1 = lora_sd(dit, names, seed=1)
    sd2, p2 = lora_sd(dit, names[::2], seed=2)
    attach_lora(dit, sd1, weight=W1, name="one")
    attach_lora(dit, sd2, weight=W2, name="two")
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    attn = dit.transformer_blocks[0].attn
    added = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)
    assert enable_lora_fusion(dit, fusion) == len(groups(dit))
    seen = []                                         # what k's and v's Linears compute on, after the gate's pre-hook
    spies = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0])) for m in (attn.to_k, attn.to_v)]
    ours = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)
    for h in spies:
        h.remove()
    assert seen == [0, 0]      # q's call computed k's and v's base outputs once: their own calls ran on an empty batch
    seed = SeedLayer([attn.to_q, attn.to_k, attn.to_v], [(W1, [p1[n] for n in names]),
                                                         (W2, [p2.get(n) for n in names])],
                     {k: v for k, v in fusion.gate("blocks.0.attn.a_to_qkv").state_dict().items()})
    torch.testing.assert_close(ours, seed(x), rtol=1e-5, atol=1e-5)
    assert (ours - added).abs().max() > 1e-2          # the gate changes the result
    out = attn.to_out[0]                              # gated, but no LoRA on it: no hook, computes as loaded
    assert "_flux_studio_lora_fusion" in out.__dict__ and not out._forward_hooks
    disable_lora_fusion(dit)                          # without the merger the LoRAs add as before
    torch.testing.assert_close(torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1), added)


@torch.no_grad()
def test_transformer_two_loras_matches_seed(dit):
    """A whole forward with two LoRAs (one on every Linear, x_embedder included, one on parts of groups) merged by
    the gates equals the transformer whose layers compute as DiffSynth's."""
    fusion = fusion_for(dit, seed=5)
    sd1, p1 = lora_sd(dit, all_gated(dit) + ["x_embedder"], seed=6, scale=0.15)
    sd2, p2 = lora_sd(dit, partial(dit), seed=7, scale=0.15)
    base = run(dit)
    clean = copy.deepcopy(dit)
    enable_lora_fusion(dit, fusion)                   # enabled before loading, as the seed's example does
    attach_lora(dit, sd1, weight=W1, name="one")
    attach_lora(dit, sd2, weight=W2, name="two")
    ours = run(dit)
    ref = run(seed_reference(clean, fusion, [(W1, p1), (W2, p2)]))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    disable_lora_fusion(dit)
    added = run(dit)
    assert (ours - added).abs().max() > 1e-2 and (added - base).abs().max() > 1e-2
    detach_loras(dit)
    torch.testing.assert_close(run(dit), base)        # everything removed: the transformer as loaded


@torch.no_grad()
def test_unchanged_without_merger(dit):
    """Never enabled: the LoRAs add exactly as the runtime adapters always did (x (W + w B A)^T + b)."""
    sd1, p1 = lora_sd(dit, ["transformer_blocks.0.attn.to_q"], seed=8)
    sd2, p2 = lora_sd(dit, ["transformer_blocks.0.attn.to_q"], seed=9)
    attach_lora(dit, sd1, weight=W1), attach_lora(dit, sd2, weight=W2, name="b")
    m = dit.transformer_blocks[0].attn.to_q
    x = torch.randn(2, 64)
    (A1, B1), (A2, B2) = p1[next(iter(p1))], p2[next(iter(p2))]
    torch.testing.assert_close(m(x), F.linear(x, m.weight + W1 * B1 @ A1 + W2 * B2 @ A2, m.bias))


@pytest.mark.parametrize("streamed", [False, True])
@torch.no_grad()
def test_fp8_storage(demo_dit, streamed):
    """Base weights stored in fp8 (diffusers' layer-wise casting, computing in float32), and also streamed block by
    block (diffusers' group offloading, as engine.memory.place streams; CPU to CPU here): the gate sees the layers'
    real outputs (the other members' computed through their own hooks); equals the seed's math on the fp8-rounded
    weights."""
    from diffusers.hooks import apply_group_offloading, apply_layerwise_casting
    dit8 = copy.deepcopy(demo_dit)
    apply_layerwise_casting(dit8, storage_dtype=FP8, compute_dtype=torch.float32)
    if streamed:
        apply_group_offloading(dit8, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
    rounded = copy.deepcopy(demo_dit)
    with torch.no_grad():
        for (n, p), (_, q) in zip(rounded.named_parameters(), dit8.named_parameters()):
            p.copy_(q.float())
    fusion = fusion_for(demo_dit, seed=11)
    sd1, p1 = lora_sd(demo_dit, all_gated(demo_dit), seed=12, scale=0.15)
    sd2, p2 = lora_sd(demo_dit, partial(demo_dit), seed=13, scale=0.15)
    enable_lora_fusion(dit8, fusion)
    attach_lora(dit8, sd1, weight=W1), attach_lora(dit8, sd2, weight=W2, name="b")
    assert dit8.transformer_blocks[0].attn.to_k.weight.dtype == FP8
    ours = run(dit8)
    assert dit8.transformer_blocks[0].attn.to_k.weight.dtype == FP8     # still stored in fp8 after the call
    ref = run(seed_reference(rounded, fusion, [(W1, p1), (W2, p2)]))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_manifest_keys_map_exactly(manifests_dir):
    """The published file's 2736 keys and shapes are exactly our model's state dict (304 gates), and every gate
    finds its layers on FLUX.1-dev's transformer (meta), widths matching."""
    from engine.loading import build_transformer, infer_transformer_config
    folder = manifests_dir / "adapters" / "DiffSynth-Studio--LoRAFusion-preview-FLUX.1-dev"
    man = json.loads((folder / "model.safetensors.json").read_text())["tensors"]
    with torch.device("meta"):
        fusion = LoraFusion(default_dims())
    ours = {k: list(v.shape) for k, v in fusion.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in man.items()} and len(ours) == 2736
    dev = json.loads((manifests_dir / "FLUX.1-dev" / "flux1-dev.safetensors.json").read_text())["tensors"]
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in dev.items()}
    with torch.device("meta"):
        meta_dit = build_transformer(infer_transformer_config(sd))
    assert enable_lora_fusion(meta_dit, fusion) == 304


def test_file_loading_and_pipeline(demo_dir, tmp_path):
    """A file in the published layout (native keys, widths from the file) loads through FluxImagePipeline's
    model_configs; enable_lora_merger then load_lora merges; refusals name the fix."""
    from engine import FluxImagePipeline, ModelConfig
    from engine.errors import EngineError
    from engine.loading.errors import ModelFileError
    from engine.registry import get_adapter
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=demo_dir / "flux1-dev.safetensors")])
    with pytest.raises(EngineError, match="LoRAFusion-preview-FLUX.1-dev"):
        pipe.enable_lora_merger()
    fusion = fusion_for(pipe.dit, seed=21)
    spec = get_adapter("LoRAFusion-preview-FLUX.1-dev").file("lora_patcher")    # the registry row
    path = tmp_path / "models" / spec.model_id / spec.pattern
    path.parent.mkdir(parents=True)
    save_file({f"model_dict.{k}": v.to(torch.bfloat16).contiguous() for k, v in fusion.model_dict.state_dict().items()},
              str(path))
    assert is_lora_fusion(path) and not is_lora_fusion(demo_dir / "flux1-dev.safetensors")
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=demo_dir / "flux1-dev.safetensors"),
        ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern)],
        models_dir=tmp_path / "models")
    assert pipe.lora_patcher is not None and pipe.dit is not None
    loaded = pipe.lora_patcher.gate("blocks.1.attn.b_to_qkv").weight_cross
    torch.testing.assert_close(loaded, fusion.gate("blocks.1.attn.b_to_qkv").weight_cross.to(torch.bfloat16).float())
    pipe.enable_lora_merger()
    sd1, _ = lora_sd(pipe.dit, all_gated(pipe.dit), seed=22)
    pipe.load_lora(pipe.dit, state_dict=sd1, verbose=0)
    assert pipe.dit.transformer_blocks[0].attn.to_q.__dict__.get("_flux_studio_lora_fusion") is not None
    bad = {f"model_dict.{k}": v for k, v in fusion.model_dict.state_dict().items() if "weight_out" not in k}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match="weight_out"):
        load_lora_fusion(tmp_path / "bad.safetensors")
    wide = LoraFusion(default_dims(1, 1, 96, 384))
    with pytest.raises(LoraError, match="does not fit"):
        enable_lora_fusion(pipe.dit, wide)
