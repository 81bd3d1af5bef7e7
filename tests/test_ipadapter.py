"""InstantX's FLUX.1 IP-Adapter: its files (manifests on meta, the nested pickle read with weights_only, files of the
wrong kind), parity with DiffSynth-Studio's math written out here (all 57 blocks, an end-to-end image), the attention
processor beside EliGen's mask and LoRAs, the demo and the studio feature.

diffusers has no loader for this format: ``FluxTransformer2DModel._convert_ip_adapter_attn_to_diffusers`` is XLabs'
(biased ``to_k_ip``/``to_v_ip`` in the 19 double blocks only, added after ``to_out``, no key norm, an image projection
named ``proj.weight``); a test below shows it failing on InstantX's layout. Parity is therefore against the seed's math.
"""
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine import ModelConfig
from engine import latents as lat
from engine import scheduler as sched
from engine.errors import EngineError
from engine.ipadapter import attention, load as ipa_load, model as ipa_model
from engine.loading import ModelFileError
from tests.helpers import no_bar, smooth_photo, tiny_flux_modules, write_sparse_safetensors

pytestmark = pytest.mark.filterwarnings("ignore")

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
IPA_MANIFEST = "adapters/InstantX--FLUX.1-dev-IP-Adapter/ip-adapter.bin.json"
SIGLIP_MANIFEST = "adapters/google--siglip-so400m-patch14-384/model.safetensors.json"
H = W = 64
T5_LEN = 32
STEPS = 3
TEXT = 32                 # the tiny T5 width = the image tokens' width
HEADS, HEAD_DIM = 2, 32
BLOCKS = 57               # 19 double + 38 single, as FLUX.1-dev


def manifest(root, rel):
    return json.loads((root / rel).read_text())


def meta_sd(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def as_array(image):
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------------ manifests
def test_ip_adapter_manifest_maps_exactly_on_meta(manifests_dir):
    m = manifest(manifests_dir, IPA_MANIFEST)
    sd = meta_sd(m)
    cfg = ipa_model.infer_config(sd)
    assert cfg == dict(siglip_dim=1152, hidden_dim=2304, cross_dim=4096, num_tokens=128, inner_dim=3072, blocks=57)
    module = ipa_load.adapter_from_tensors(sd, torch.bfloat16, "meta")      # one to one and shape-exact, or raises
    got = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert got == {k: v["shape"] for k, v in m["tensors"].items()}
    assert sum(v.numel() for v in module.state_dict().values()) == m["param_count"]
    # Made for FLUX.1-dev's transformer: 57 blocks of 24 heads x 128.
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        dit = FluxTransformer2DModel()
    assert ipa_model.head_layout(dit) == (24, 128, 57) and cfg["inner_dim"] == 24 * 128


def test_the_whole_siglip_file_gives_the_vision_tower_through_the_real_reading_path(manifests_dir, tmp_path):
    m = manifest(manifests_dir, SIGLIP_MANIFEST)
    path = tmp_path / "model.safetensors"
    write_sparse_safetensors(m["tensors"], path)             # the real header, a hole for the data
    enc = ipa_load.load_encoder([path], torch.bfloat16, "meta")
    c = enc.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.image_size,
            c.patch_size) == (1152, 4304, 27, 16, 384, 14)
    vision = {k: v for k, v in m["tensors"].items() if k.startswith("vision_model.")}
    assert sum(p.numel() for p in enc.parameters()) == 428_225_600 == sum(np.prod(v["shape"]) for v in vision.values())
    assert ipa_load.claims(path) == "ipadapter_image_encoder"


def test_the_planner_sizes_both_components_from_their_role_rows(manifests_dir):
    from engine import memory
    from engine.memory.activations import activation_bytes
    from engine.roles import ROLES
    ipa = manifest(manifests_dir, IPA_MANIFEST)["tensors"]
    vision = {k: v for k, v in manifest(manifests_dir, SIGLIP_MANIFEST)["tensors"].items()
              if k.startswith("vision_model.")}
    sizes = {"ipadapter": memory.sizes_from_tensors("ipadapter", ipa),
             "ipadapter_image_encoder": memory.sizes_from_tensors("ipadapter_image_encoder", vision)}
    assert sizes["ipadapter"].params == 2_645_600_512 and sizes["ipadapter_image_encoder"].params == 428_225_600
    assert sizes["ipadapter_image_encoder"].dims == {"tokens": 729, "hidden": 1152, "d_ff": 4304}
    assert activation_bytes("ipadapter_image_encoder", sizes["ipadapter_image_encoder"], "bfloat16", 1024, 1024) > 50e6
    dit = manifest(manifests_dir, "FLUX.1-dev/flux1-dev.safetensors.json")["tensors"]
    sizes["dit"] = memory.sizes_from_tensors("dit", dit)
    plan = memory.plan(sizes, "cuda", vram_limit_gb=20)
    rows = {c["role"]: c for c in plan.as_dict()["components"]}
    for role in ("ipadapter", "ipadapter_image_encoder"):
        assert rows[role]["label"] == ROLES[role].label and rows[role]["strategy"] in ("resident", "offload")
    assert rows["ipadapter"]["vram_gb"] == pytest.approx(2_645_600_512 * 2 / 2 ** 30, abs=0.01)      # bf16 weights
    assert rows["ipadapter_image_encoder"]["vram_gb"] == pytest.approx(428_225_600 * 2 / 2 ** 30, abs=0.01)


# ------------------------------------------------------------------------------------------------ small files
def random_adapter(seed=0, blocks=BLOCKS, siglip=144, cross=TEXT, inner=HEADS * HEAD_DIM, tokens=128) -> dict:
    """InstantX's nested layout at small widths (BF16, as the real file)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, gain=1.0):
        return (torch.randn(shape, generator=g) * gain / shape[-1] ** 0.5).to(torch.bfloat16)

    proj = {"proj.0.weight": w(2 * siglip, siglip), "proj.0.bias": w(2 * siglip, gain=0.1),
            "proj.2.weight": w(cross * tokens, 2 * siglip), "proj.2.bias": w(cross * tokens, gain=0.1),
            "norm.weight": (1 + 0.1 * torch.randn(cross, generator=g)).to(torch.bfloat16),
            "norm.bias": (0.05 * torch.randn(cross, generator=g)).to(torch.bfloat16)}
    ip = {}
    for i in range(blocks):
        ip[f"{i}.to_k_ip.weight"] = w(inner, cross)
        ip[f"{i}.to_v_ip.weight"] = w(inner, cross, gain=3.0)
    return {"image_proj": proj, "ip_adapter": ip}


@pytest.fixture(scope="session")
def ip_files(tmp_path_factory):
    """A 57-block ip-adapter.bin and the demo's whole SigLIP model.safetensors, side by side."""
    from engine.demo.ipadapter import SIGLIP_FILE, write_ipadapter_demo
    root = tmp_path_factory.mktemp("ipa")
    demo = write_ipadapter_demo(root / "models")
    torch.save(random_adapter(), root / "ip-adapter.bin")
    return root / "ip-adapter.bin", demo / SIGLIP_FILE


@pytest.fixture(scope="session")
def base57(demo_tokenizers):
    """Small FLUX components from the library classes with FLUX.1-dev's block count: 19 double + 38 single."""
    from diffusers import FluxTransformer2DModel
    mods = tiny_flux_modules(demo_tokenizers, text_width=TEXT)
    torch.manual_seed(1)
    dit = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                 attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT,
                                 pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.02)
    mods["dit"] = dit
    return mods


@pytest.fixture(scope="session")
def pipe(ip_files, base57, demo_tokenizers):
    """Our pipeline: the two IP-Adapter files through from_pretrained (the real loaders), the base modules beside."""
    from engine.pipeline import FluxImagePipeline
    p = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=f) for f in ip_files])
    assert type(p.ipadapter).__name__ == "FluxIPAdapter"
    assert type(p.ipadapter_image_encoder).__name__ == "SiglipVisionModel"
    p.set_models(dict(base57))
    p.tokenizer_1, p.tokenizer_2 = demo_tokenizers
    return p


@pytest.fixture(scope="session")
def photos():
    return smooth_photo(300, 200, 3), smooth_photo(160, 240, 4)


# ---------------------------------------------------------------------------- DiffSynth-Studio's math, written out
class Reference:
    """The seed's IP-Adapter (DiffSynth-Studio flux_ipadapter.py / flux_dit.py / FluxImageUnit_IPAdapter) written out
    on the same files: weights read here with torch.load / safetensors, the transformer walked block by block in the
    seed's formulation ((B, H, S, D) heads, its RoPE matrices) on the diffusers modules' weights."""

    def __init__(self, ip_files, dit):
        from safetensors.torch import load_file
        from transformers import SiglipVisionConfig, SiglipVisionModel
        nested = torch.load(ip_files[0], weights_only=True)
        self.proj = {k: v.float() for k, v in nested["image_proj"].items()}
        self.ip = {k: v.float() for k, v in nested["ip_adapter"].items()}
        vision = {k: v for k, v in load_file(str(ip_files[1])).items() if k.startswith("vision_model.")}
        self.siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=144, intermediate_size=288,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           image_size=384, patch_size=14)).eval()
        names = set(self.siglip.state_dict())
        if not any(n.startswith("vision_model.") for n in names):
            vision = {k[len("vision_model."):]: v for k, v in vision.items()}
        self.siglip.load_state_dict(vision, strict=True)
        self.dit = dit

    def kv(self, images=None, zeros=False):
        """Per block {ip_k, ip_v} for the images (FluxIpAdapter.forward); ``zeros``: of a zero encoding."""
        x = torch.cat([torch.tensor(np.array(im.convert("RGB").resize((384, 384), resample=3), dtype=np.float32))
                       .permute(2, 0, 1)[None] * (2 / 255) - 1 for im in images])
        with torch.no_grad():
            enc = self.siglip(x).pooler_output
        if zeros:
            enc = torch.zeros_like(enc)
        p = self.proj
        h = F.linear(F.gelu(F.linear(enc, p["proj.0.weight"], p["proj.0.bias"])), p["proj.2.weight"], p["proj.2.bias"])
        h = F.layer_norm(h.reshape(-1, 128, TEXT), (TEXT,), p["norm.weight"], p["norm.bias"]).view(1, -1, TEXT)
        out = []
        for i in range(BLOCKS):
            k = F.linear(h, self.ip[f"{i}.to_k_ip.weight"]).view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)
            k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + 1e-5)
            v = F.linear(h, self.ip[f"{i}.to_v_ip.weight"]).view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)
            out.append((k, v))
        return out

    @staticmethod
    def rope(ids):
        def one(pos, dim):
            omega = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            out = torch.einsum("n,d->nd", pos.double(), omega)
            m = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
            return m.view(1, -1, dim // 2, 2, 2).float()
        return torch.cat([one(ids[:, i], d) for i, d in enumerate((4, 14, 14))], dim=-3).unsqueeze(1)

    @staticmethod
    def apply_rope(x, freqs):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)

    @staticmethod
    def heads(x):
        return x.view(x.shape[0], -1, HEADS, HEAD_DIM).transpose(1, 2)

    @staticmethod
    def ip_term(x, q, kv, scale):
        o = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return x + scale * o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    def forward(self, latents, text, pooled, sigma, guidance, img_ids, txt_ids, kv=None, scale=1.0, mask=None):
        d, hd = self.dit, self.heads
        temb = d.time_text_embed(sigma * 1000, guidance * 1000, pooled)
        a, b = d.x_embedder(latents), d.context_embedder(text)
        freqs = self.rope(torch.cat([txt_ids, img_ids]))
        for i, blk in enumerate(d.transformer_blocks):
            na, g_a, sh_a, sc_a, gm_a = blk.norm1(a, emb=temb)
            nb, g_b, sh_b, sc_b, gm_b = blk.norm1_context(b, emb=temb)
            at = blk.attn
            q_a, k_a, v_a = at.norm_q(hd(at.to_q(na)).transpose(1, 2)).transpose(1, 2), \
                at.norm_k(hd(at.to_k(na)).transpose(1, 2)).transpose(1, 2), hd(at.to_v(na))
            q_b, k_b, v_b = at.norm_added_q(hd(at.add_q_proj(nb)).transpose(1, 2)).transpose(1, 2), \
                at.norm_added_k(hd(at.add_k_proj(nb)).transpose(1, 2)).transpose(1, 2), hd(at.add_v_proj(nb))
            q, k = self.apply_rope(torch.cat([q_b, q_a], 2), freqs), self.apply_rope(torch.cat([k_b, k_a], 2), freqs)
            o = F.scaled_dot_product_attention(q, k, torch.cat([v_b, v_a], 2), attn_mask=mask)
            o = o.transpose(1, 2).reshape(1, -1, HEADS * HEAD_DIM)
            ob, oa = o[:, :b.shape[1]], o[:, b.shape[1]:]
            if kv is not None:
                oa = self.ip_term(oa, q_a, kv[i], scale)
            a = a + g_a[:, None] * at.to_out[0](oa)
            a = a + gm_a[:, None] * blk.ff(blk.norm2(a) * (1 + sc_a[:, None]) + sh_a[:, None])
            b = b + g_b[:, None] * at.to_add_out(ob)
            b = b + gm_b[:, None] * blk.ff_context(blk.norm2_context(b) * (1 + sc_b[:, None]) + sh_b[:, None])
        x, n_text = torch.cat([b, a], 1), b.shape[1]
        for j, blk in enumerate(d.single_transformer_blocks):
            nx, gate = blk.norm(x, emb=temb)
            at = blk.attn
            q = self.apply_rope(at.norm_q(hd(at.to_q(nx)).transpose(1, 2)).transpose(1, 2), freqs)
            k = self.apply_rope(at.norm_k(hd(at.to_k(nx)).transpose(1, 2)).transpose(1, 2), freqs)
            o = F.scaled_dot_product_attention(q, k, hd(at.to_v(nx)), attn_mask=mask)
            o = o.transpose(1, 2).reshape(1, -1, HEADS * HEAD_DIM)
            if kv is not None:
                o = self.ip_term(o, q, kv[len(d.transformer_blocks) + j], scale)
            x = x + gate[:, None] * blk.proj_out(torch.cat([o, blk.act_mlp(blk.proj_mlp(nx))], 2))
        return d.proj_out(d.norm_out(x[:, n_text:], temb))

    def image(self, pipe, prompt, images, scale, seed, cfg_scale=1.0, negative_prompt=""):
        """The seed's sampling with the IP-Adapter: positive pass with the images at ``scale``; with CFG the negative
        pass reads the IP term of a zero encoding at scale 1.0."""
        sigmas = sched.flux_sigmas(STEPS, 1.0, None, "seed", image_seq_len=(H // 16) * (W // 16))
        tokens = lat.pack(lat.initial_noise(H, W, seed, "cpu")).float()
        pos, neg = pipe.encode_text(prompt, T5_LEN), pipe.encode_text(negative_prompt, T5_LEN)
        kv, kv0 = self.kv(images), (self.kv(images, zeros=True) if cfg_scale != 1.0 else None)
        ids, g = lat.image_ids(H, W), torch.full((1,), 3.5)
        with torch.no_grad():
            for i in range(STEPS):
                s = sigmas[i].expand(1)
                v = self.forward(tokens, pos.embeds, pos.pooled, s, g, ids, pos.ids, kv, scale)
                if cfg_scale != 1.0:
                    vn = self.forward(tokens, neg.embeds, neg.pooled, s, g, ids, neg.ids, kv0, 1.0)
                    v = vn + cfg_scale * (v - vn)
                tokens = sched.euler_step(tokens, v, float(sigmas[i]), float(sigmas[i + 1]))
        return pipe.decode_latents(lat.unpack(tokens, H, W))


@pytest.fixture(scope="session")
def ref(ip_files, base57):
    return Reference(ip_files, base57["dit"])


def ours(pipe, images, scale=1.0, cfg_scale=1.0):
    from engine.conditions.base import ConditionContext
    from engine.conditions.ipadapter import IPAdapterCondition
    ctx = ConditionContext(pipe, H, W, torch.device("cpu"), torch.float32, sched.flux_sigmas(STEPS), None,
                           cfg_scale=cfg_scale)
    return IPAdapterCondition.prepare(ctx, {"ipadapter_images": images, "ipadapter_scale": scale})


def test_keys_and_values_match_the_seeds_math(pipe, ref, photos):
    c = ours(pipe, list(photos), 0.7, cfg_scale=2.0)
    want, want0 = ref.kv(photos), ref.kv(photos, zeros=True)
    assert len(c.positive.keys) == BLOCKS and c.positive.keys[0].shape == (1, HEADS, 2 * 128, HEAD_DIM)
    err = max((a - k).abs().max().item() for a, (k, _) in zip(c.positive.keys, want))
    err = max([err] + [(a - v).abs().max().item() for a, (_, v) in zip(c.positive.values, want)])
    err0 = max((a - k).abs().max().item() for a, (k, _) in zip(c.negative.keys, want0))
    print(f"IP keys/values vs the seed's math: max |diff| {err:.2e} (zero encoding {err0:.2e})")
    assert err < 1e-4 and err0 < 1e-4
    assert c.positive.scale == 0.7 and c.negative.scale == 1.0          # the seed's negative: scale 1.0


def _velocity_inputs(pipe):
    text = pipe.encode_text("a red fox", T5_LEN)
    torch.manual_seed(5)
    return (torch.randn(1, (H // 16) * (W // 16), 64), text.embeds, text.pooled, torch.full((1,), 0.6),
            torch.full((1,), 3.5), lat.image_ids(H, W), text.ids)


def test_one_transformer_call_matches_the_seeds_57_blocks_with_and_without_a_mask(pipe, ref, photos):
    c = ours(pipe, [photos[0]], 0.8)
    x, txt, pooled, s, g, ids, tids = _velocity_inputs(pipe)
    call = dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=s, img_ids=ids,
                txt_ids=tids, guidance=g, return_dict=False)
    n = tids.shape[0] + ids.shape[0]
    mask = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(2)) > 0.3    # EliGen-style boolean mask
    mask |= torch.eye(n, dtype=torch.bool)
    kv = [(k, v) for k, v in zip(c.positive.keys, c.positive.values)]
    with torch.no_grad():
        got = pipe.dit(**call, joint_attention_kwargs={"ipadapter": c.positive})[0]
        want = ref.forward(x, txt, pooled, s, g, ids, tids, kv, 0.8)
        got_m = pipe.dit(**call, joint_attention_kwargs={"ipadapter": c.positive, "attention_mask": mask})[0]
        want_m = ref.forward(x, txt, pooled, s, g, ids, tids, kv, 0.8, mask=mask)
        plain = ref.forward(x, txt, pooled, s, g, ids, tids)
    err, err_m = (got - want).abs().max().item(), (got_m - want_m).abs().max().item()
    print(f"transformer velocity vs the seed's 57 blocks: max |diff| {err:.2e}, with a mask {err_m:.2e}")
    assert err < 1e-4 and err_m < 1e-4
    assert (want - plain).abs().max() > 1e-2 and (want_m - want).abs().max() > 1e-2    # both the IP term and the mask count


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_end_to_end_image_matches_the_seeds_math(pipe, ref, photos, cfg_scale):
    kw = dict(prompt="a red fox", negative_prompt="blurry", height=H, width=W, seed=7, num_inference_steps=STEPS,
              t5_sequence_length=T5_LEN, cfg_scale=cfg_scale, progress_bar_cmd=no_bar)
    got = pipe(ipadapter_images=list(photos), ipadapter_scale=0.7, **kw)
    want = ref.image(pipe, "a red fox", list(photos), 0.7, 7, cfg_scale, "blurry")
    plain = pipe(**kw)
    diff = np.abs(as_array(got) - as_array(want)).max()
    print(f"end-to-end image (cfg {cfg_scale}) vs the seed's math: max {diff} / 255")
    assert diff <= 1
    assert np.abs(as_array(got) - as_array(plain)).max() > 5


def test_inert_without_an_ip_adapter_and_removable(pipe, base57, photos):
    kw = dict(prompt="a fox", height=H, width=W, seed=3, num_inference_steps=2, t5_sequence_length=T5_LEN,
              progress_bar_cmd=no_bar)
    attention.remove(pipe.dit)
    before = as_array(pipe(**kw))
    pipe(ipadapter_images=photos[0], **kw)
    assert attention.installed(pipe.dit)
    assert np.array_equal(as_array(pipe(**kw)), before)                 # installed, no images: the same image
    attention.remove(pipe.dit)
    assert not attention.installed(pipe.dit) and np.array_equal(as_array(pipe(**kw)), before)


def test_eligen_and_the_ip_adapter_together(pipe, photos):
    """EliGen's mask and the IP term reach the same attention call: both change the image, and together they differ
    from either alone."""
    from tests.helpers import box_mask
    kw = dict(prompt="a garden", height=H, width=W, seed=6, num_inference_steps=2, t5_sequence_length=T5_LEN,
              progress_bar_cmd=no_bar)
    eligen = dict(eligen_entity_prompts=["a red ball"], eligen_entity_masks=[box_mask(W, H, (0, 0, 32, 32))])
    plain, only_e = as_array(pipe(**kw)), as_array(pipe(**eligen, **kw))
    only_ip = as_array(pipe(ipadapter_images=photos[0], **kw))
    both = as_array(pipe(ipadapter_images=photos[0], **eligen, **kw))
    assert min(np.abs(both - x).max() for x in (plain, only_e, only_ip)) > 0


def test_loras_keep_working_beside_the_ip_term(pipe, ref, photos):
    """A LoRA hooks the attention's Linear layers; the processor calls them as the original does."""
    dit = pipe.dit
    g = torch.Generator().manual_seed(9)
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.3.attn.to_out.0",
                 "single_transformer_blocks.5.attn.to_k"):
        m = dit.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    c = ours(pipe, [photos[1]], 1.0)
    x, txt, pooled, s, gd, ids, tids = _velocity_inputs(pipe)
    kv = list(zip(c.positive.keys, c.positive.values))
    call = dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=s, img_ids=ids,
                txt_ids=tids, guidance=gd, return_dict=False, joint_attention_kwargs={"ipadapter": c.positive})
    with torch.no_grad():
        without = pipe.dit(**call)[0]
        pipe.load_lora(state_dict=sd, verbose=0, name="t")
        try:
            got = pipe.dit(**call)[0]
            want = ref.forward(x, txt, pooled, s, gd, ids, tids, kv, 1.0)     # calls the same hooked layers
        finally:
            pipe.clear_lora(verbose=0)
    assert (got - without).abs().max() > 1e-3 and (got - want).abs().max() < 1e-4


def test_diffusers_has_no_loader_for_instantx_s_layout(base57):
    """diffusers' FLUX IP-Adapter loader is XLabs': it looks for biased to_k_ip in double blocks only."""
    nested = random_adapter(blocks=BLOCKS)
    with pytest.raises(KeyError, match="to_k_ip.bias"):
        base57["dit"]._convert_ip_adapter_attn_to_diffusers([nested], low_cpu_mem_usage=False)


# ------------------------------------------------------------------------------------------------ bad input
def sdxl_like(path):
    """An SDXL IP-Adapter's layout: image_proj.proj.weight and ip_adapter.1/3/... of 2048-wide keys."""
    torch.save({"image_proj": {"proj.weight": torch.zeros(64, 16), "proj.bias": torch.zeros(64),
                               "norm.weight": torch.ones(16), "norm.bias": torch.zeros(16)},
                "ip_adapter": {f"{i}.to_k_ip.weight": torch.zeros(40, 2048) for i in (1, 3, 5)}}, path)
    return path


class Unpicklable:
    """An arbitrary object in a pickle: weights_only loading refuses it."""


def test_wrong_files_are_named_and_the_engine_stays_usable(pipe, tmp_path, photos):
    from engine.pipeline import FluxImagePipeline
    bad = sdxl_like(tmp_path / "ip-adapter.bin")
    with pytest.raises(ModelFileError, match=r"SDXL IP-Adapter.*InstantX/FLUX.1-dev-IP-Adapter"):
        ipa_load.load_adapter(bad, torch.float32)
    with pytest.raises(EngineError, match="SDXL IP-Adapter"):            # through from_pretrained too
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=bad)])
    torch.save({"ip_adapter": {"x": Unpicklable()}}, tmp_path / "evil.bin")
    with pytest.raises(ModelFileError, match="objects other than tensors"):
        ipa_load.load_adapter(tmp_path / "evil.bin", torch.float32)
    missing = tmp_path / "models" / "google" / "siglip-so400m-patch14-384"
    with pytest.raises(ModelFileError, match=r"SigLIP image encoder .* is missing.*download google/siglip"):
        ipa_load.load_encoder([missing], torch.float32)
    empty = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    empty.set_models({"dit": pipe.dit})
    with pytest.raises(EngineError, match=r'ipadapter_images needs .*google/siglip-so400m-patch14-384'):
        empty(prompt="", height=H, width=W, num_inference_steps=1, ipadapter_images=[photos[0]],
              progress_bar_cmd=no_bar)
    with pytest.raises(EngineError, match=r"ipadapter_images\[1\] is a str, not a PIL image"):
        pipe(prompt="", height=H, width=W, num_inference_steps=1, ipadapter_images=[photos[0], "x.png"],
             t5_sequence_length=T5_LEN, progress_bar_cmd=no_bar)
    with pytest.raises(EngineError, match="ipadapter_scale 'big' is not a number"):
        pipe(prompt="", height=H, width=W, num_inference_steps=1, ipadapter_images=photos[0], ipadapter_scale="big",
             t5_sequence_length=T5_LEN, progress_bar_cmd=no_bar)
    # Still usable: the same image as before the errors.
    kw = dict(prompt="a fox", height=H, width=W, seed=4, num_inference_steps=2, t5_sequence_length=T5_LEN,
              progress_bar_cmd=no_bar)
    first = as_array(pipe(ipadapter_images=photos[0], **kw))
    assert np.array_equal(first, as_array(pipe(ipadapter_images=photos[0], **kw)))


def test_an_adapter_for_another_transformer_is_refused(ip_files, demo_dir, photos):
    from tests.helpers import demo_pipeline
    p = demo_pipeline(demo_dir)                       # the FLUX.1 demo: 2 + 2 blocks, not 57
    p.set_models({"ipadapter": ipa_load.load_adapter(ip_files[0], torch.float32),
                  "ipadapter_image_encoder": ipa_load.load_encoder([ip_files[1]], torch.float32)})
    with pytest.raises(EngineError, match="57 blocks .* transformer has 4 blocks"):
        p(prompt="", height=H, width=W, num_inference_steps=1, ipadapter_images=photos[0], progress_bar_cmd=no_bar)


# ------------------------------------------------------------------------------------------------ the studio
@pytest.fixture(scope="module")
def references(studio):
    folder = pathlib.Path(studio.engine.models_dir) / "ip-references"
    folder.mkdir(exist_ok=True)
    paths = [folder / "cat.png", folder / "dog.png"]
    smooth_photo(300, 200, seed=8).save(paths[0])
    smooth_photo(200, 260, seed=9).save(paths[1])
    (folder / "notes.png").write_text("not an image")
    return paths


def studio_job(**extra) -> dict:
    return {**dict(variant="FLUX.1-dev-random-demo", prompt="a house", width=64, height=64, num_inference_steps=2,
                   seed=11), **extra}


def test_the_studio_runs_reference_images_records_and_restores_them(studio, references):
    from app.recipe_text import recipe_text
    engine = studio.engine
    plain = engine.generate(studio_job())[0]
    [result] = engine.generate(studio_job(ipadapter_images=[str(p) for p in references], ipadapter_scale=0.7))
    pipe = engine.models.pipe
    assert pipe.ipadapter is not None and pipe.ipadapter_image_encoder is not None
    a, b = as_array(Image.open(plain["path"])), as_array(Image.open(result["path"]))
    assert np.abs(a - b).max() > 0, "the reference images changed nothing"
    recipe = result["recipe"]
    entries = recipe["ipadapter_images"]
    assert [e["file"] for e in entries] == ["cat.png", "dog.png"] and recipe["ipadapter_scale"] == 0.7
    assert [e["copy"] for e in entries] == [".ipa0.png", ".ipa1.png"] and all(e.get("fingerprint") for e in entries)
    out = pathlib.Path(result["path"])
    copies = [out.with_name(out.stem + e["copy"]) for e in entries]
    assert [Image.open(c).size for c in copies] == [(300, 200), (200, 260)]
    assert {"ipadapter", "ipadapter_image_encoder"} <= set(recipe["model_files"])
    text = recipe_text(recipe)
    assert "Reference images (IP-Adapter), scale 0.7:" in text and "cat.png" in text and "dog.png" in text
    restored = engine.read_recipe(result["path"])
    assert restored["ipadapter_images"] == [str(c) for c in copies] and restored["ipadapter_scale"] == 0.7
    [again] = engine.generate({k: v for k, v in restored.items() if k != "sigma_shift"})
    assert np.array_equal(as_array(Image.open(again["path"])), b)
    [plain_again] = engine.generate(studio_job())          # the slots are emptied: the plain image again
    assert engine.models.pipe.ipadapter is None and engine.models.pipe.ipadapter_image_encoder is None
    assert np.array_equal(as_array(Image.open(plain_again["path"])), a)


@pytest.mark.parametrize("extra, words", [
    ({"ipadapter_scale": 3}, "scale must be a number from 0 to 2"),
    ({"ipadapter_scale": "much"}, "scale must be a number"),
    ({"variant": "Step1X-Edit-random-demo"}, "is not a FLUX.1 transformer"),
    ({"ipadapter_images": ["{0}"] * 5}, "At most 4 IP-Adapter reference images"),
    ({"ipadapter_images": ["{notes}"]}, "notes.png"),
])
def test_bad_reference_requests_are_refused_by_name(studio, references, extra, words):
    job = studio_job(ipadapter_images=[str(references[0])])
    for k, v in extra.items():
        job[k] = [x.format(str(references[0]), notes=references[0].with_name("notes.png")) for x in v] \
            if k == "ipadapter_images" else v
    with pytest.raises(EngineError, match=words):
        studio.engine.validate(job)


def test_the_hires_fix_follows_reference_images(studio, references):
    """IP-Adapter tokens fit any size, so the hires fix refines with them too (studio.features.img2img)."""
    [result] = studio.engine.generate(studio_job(ipadapter_images=[str(references[0])], ipadapter_scale=0.7,
                                                 hires_scale=2, hires_strength=0.5))
    recipe = result["recipe"]
    assert (result["width"], result["height"]) == (128, 128) and recipe["hires_scale"] == 2
    assert [e["file"] for e in recipe["ipadapter_images"]] == ["cat.png"]
