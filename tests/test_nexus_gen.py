"""Nexus-GenV2 (DiffSynth-Studio/Nexus-GenV2) on transformers 5: the AR model's target embeddings, the adapter and the
embedding merger against the seed's math written out, the decoder's DiT against the usual load, the inferred key
layout on the meta device, and end to end on the tiny random-weight files of engine.demo.nexus_gen."""
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine import FluxImagePipeline, ModelConfig
from engine.conditions.nexus_gen import editing_text_ids
from engine.errors import EngineError
from engine.loading.errors import ModelFileError
from engine.nexus_gen import ar_model as ar
from engine.nexus_gen import decoders as dec
from engine.nexus_gen.load import decoder_from_tensors, load_components, read_bin
from engine.registry import DEMO_ID, NEXUS_GEN_DEMO_ID

DT = {"BF16": torch.bfloat16, "F32": torch.float32}
MANIFEST = pathlib.Path(__file__).parent / "data" / "nexus_gen_manifest.json"


def meta(tensors):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in tensors.items()}


def reference_image(w=90, h=60, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def models_dir(demo_dir):
    from engine.demo import write_nexus_gen_demo
    root = demo_dir.parent.parent                    # beside the FLUX.1 demo, whose encoders and VAE it shares
    write_nexus_gen_demo(root)
    return root


@pytest.fixture(scope="module")
def parts(models_dir):
    folder = models_dir / NEXUS_GEN_DEMO_ID
    files = sorted(folder.glob("model-*.safetensors"))
    gen = load_components(files + [folder / "generation_decoder.bin"], torch.float32)
    edit = load_components([folder / "edit_decoder.bin"], torch.float32)
    return {**gen, **{k: v for k, v in edit.items() if k != "dit"}, "folder": folder}


def _pipe(models_dir, decoder, **kw):
    """The seed's example ModelConfigs, with the demo's ids."""
    n, d = NEXUS_GEN_DEMO_ID, DEMO_ID
    return FluxImagePipeline.from_pretrained(
        torch.float32, "cpu", [ModelConfig(n, "model*.safetensors"), ModelConfig(n, decoder),
                               ModelConfig(d, "text_encoder/model.safetensors"),
                               ModelConfig(d, "text_encoder_2/*.safetensors"), ModelConfig(d, "ae.safetensors")],
        tokenizer_1_config=ModelConfig(d, "tokenizer/"), tokenizer_2_config=ModelConfig(d, "tokenizer_2/"),
        models_dir=models_dir, **kw)


@pytest.fixture(scope="module")
def gen_pipe(models_dir):
    # as the seed's generation example writes it ("processor", no slash); the edit pipe finds processor/ itself
    return _pipe(models_dir, "generation_decoder.bin",
                 nexus_gen_processor_config=ModelConfig(NEXUS_GEN_DEMO_ID, origin_file_pattern="processor"))


@pytest.fixture(scope="module")
def edit_pipe(models_dir):
    return _pipe(models_dir, "edit_decoder.bin")


def run(pipe, **kw):
    """The image and the (text tokens, text ids) of every transformer call."""
    seen = []
    hook = pipe.dit.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["encoder_hidden_states"].clone(), k["txt_ids"].clone())), with_kwargs=True)
    try:
        image = pipe(seed=0, num_inference_steps=2, height=64, width=64, **kw)
    finally:
        hook.remove()
    return np.asarray(image).astype(np.float32), seen


# ------------------------------------------------------------------------------------------------ layouts (meta)

def test_inferred_manifest_maps_exactly_on_meta(manifests_dir):
    """INFERRED key list (tests/data/nexus_gen_manifest.json, from the seed's code: no published manifest exists):
    the AR keys, both decoders' adapter / merger keys and the pipe.dit.* DiT map one to one, shape-exact, at full
    size."""
    m = json.loads(MANIFEST.read_text())
    assert m["confidence"] == "inferred"
    ar_entry = m["files"]["model*.safetensors"]
    sd = meta(json.loads((manifests_dir / ar_entry["base_manifest"]).read_text())["tensors"])
    sd.update(meta(ar_entry["extra_tensors"]))
    converted = ar.convert_keys(sd)
    with torch.device("meta"):
        model = ar.build(ar.config_of(pathlib.Path("/nonexistent")))      # no config.json: the published config
    want = model.state_dict()
    assert len(converted) == len(sd) == 731 and converted.keys() == want.keys()
    assert all(tuple(converted[k].shape) == tuple(want[k].shape) for k in want)
    dit = meta(m["pipe.dit.*"]["tensors"])
    for name, role in (("generation_decoder.bin", dec.GENERATION_ROLE), ("edit_decoder.bin", dec.EDITING_ROLE)):
        out = decoder_from_tensors({**dit, **meta(m["files"][name]["tensors"])}, device="meta")   # assemble: exact
        assert set(out) == {"dit", role}
        cfg = out["dit"].config
        assert (cfg.num_layers, cfg.num_single_layers, cfg.joint_attention_dim, cfg.guidance_embeds) == (19, 38, 4096,
                                                                                                           True)
    merger = dec.merger_config({k[len("embedding_merger."):]: v for k, v in meta(
        m["files"]["edit_decoder.bin"]["tensors"]).items()})
    assert merger == dict(hidden=3584, intermediate=18944, kv_heads=4, layers=1, out_channel=4096, expand=4)


def test_decoder_with_foreign_keys_is_refused_by_name():
    sd = {"pipe.dit.x_embedder.weight": torch.zeros(2, 2), "adapter.0.weight": torch.zeros(2, 2),
          "optimizer.step": torch.zeros(1)}
    with pytest.raises(ModelFileError, match=r"optimizer\.step.*not a Nexus-GenV2 decoder"):
        dec.split_decoder(sd)
    with pytest.raises(ModelFileError, match="either adapter"):
        dec.split_decoder({"pipe.dit.x_embedder.weight": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------------------------ the AR model

def rope_index_449(ids, grids, image_token, tokens_per_second=2, merge=2):
    """transformers 4.49's Qwen2.5-VL get_rope_index (the seed's copy) for images, written out."""
    ids, out, st = ids[0].tolist(), [], 0
    for t, h, w in grids.tolist():
        ed = ids.index(image_token, st)
        gh, gw = h // merge, w // merge
        st_idx = out[-1].max() + 1 if out else 0
        out.append(torch.arange(ed - st).view(1, -1).expand(3, -1) + st_idx)
        t_index = (torch.arange(t).view(-1, 1).expand(-1, gh * gw) * 0 * tokens_per_second).long().flatten()
        h_index = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten()
        w_index = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten()
        out.append(torch.stack([t_index, h_index, w_index]) + (ed - st) + st_idx)
        st = ed + t * gh * gw
    if st < len(ids):
        st_idx = out[-1].max() + 1 if out else 0
        out.append(torch.arange(len(ids) - st).view(1, -1).expand(3, -1) + st_idx)
    return torch.cat(out, dim=1).unsqueeze(1)


def seed_target_embeddings(model, processor, instruction, reference):
    """The seed's get_target_embeddings with transformers' plain modules: embeddings, the vision tower, the
    reference tokens then the prefill rows written into the image positions one by one, 4.49's rope index, the
    language model, vision_head, and the output one position before each placeholder token."""
    inputs = ar.processor_inputs(processor, instruction, reference)
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    qwen = model.model
    embeds = qwen.language_model.embed_tokens(ids)
    vis = qwen.visual(inputs["pixel_values"], grid_thw=grid).pooler_output
    positions = (ids[0] == model.config.image_token_id).nonzero().flatten().tolist()
    n_in = vis.shape[0] - 81
    for k, p in enumerate(positions):
        embeds[0, p] = vis[k] if k < n_in else model.image_prefill_embeds.weight[k - n_in]
    pos = rope_index_449(ids, grid, model.config.image_token_id)
    port, _ = qwen.get_rope_index(ids, (ids == model.config.image_token_id).int(), image_grid_thw=grid,
                                  attention_mask=inputs["attention_mask"])
    assert torch.equal(port, pos)                # transformers 5's rope index gives 4.49's positions
    hidden = qwen.language_model(inputs_embeds=embeds, position_ids=pos, attention_mask=inputs["attention_mask"],
                                 use_cache=False).last_hidden_state
    out = hidden @ model.vision_head.weight.T
    return torch.stack([out[0, p - 1] for p in positions[n_in:]]), vis[:n_in], grid


@pytest.mark.parametrize("editing", [False, True])
def test_target_embeddings_match_the_seed_math(parts, editing):
    model, processor = parts["nexus_gen"], parts["nexus_gen"].flux_studio_processor
    reference = reference_image() if editing else None
    with torch.no_grad():
        want, want_ref, want_grid = seed_target_embeddings(model, processor, "a red hat", reference)
    got, ref, grid = ar.target_embeddings(model, processor, "a red hat", reference)
    assert got.shape == (81, 128) and torch.equal(grid, want_grid)
    assert (got - want).abs().max().item() < 1e-5
    assert ref.shape[0] == (6 if editing else 0) and torch.equal(ref, want_ref)   # 60x90 -> 56x84: 2x3 merged
    if editing:
        assert grid.tolist() == [[1, 4, 6], [1, 18, 18]]
        other, _, _ = ar.target_embeddings(model, processor, "a red hat", reference_image(seed=1))
        assert (other - got).abs().max() > 1e-3      # the reference is read


def test_bound_image_keeps_to_the_seed_bound():
    assert ar.bound_image(Image.new("RGB", (1024, 1024))).size == (504, 504)     # 504*504 <= 262640 < 532*532
    assert ar.bound_image(Image.new("RGB", (90, 60))).size == (84, 56)


# ------------------------------------------------------------------------------------------------ the decoders

def seed_merger(sd, embeds, grid, ref, ref_grid):
    """NexusGenImageEmbeddingMerger.forward written out (one layer; head 128; mrope (16, 24, 24); 72x72 base)."""
    def positions(g):
        t, h, w = g[0].tolist()
        gh, gw = h // 2, w // 2
        t_index = (torch.arange(t).view(-1, 1).expand(-1, gh * gw) * 2).long().flatten()
        h_index = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten() * (72 / h)
        w_index = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten() * (72 / w)
        return torch.stack([t_index, h_index, w_index]).unsqueeze(0).permute(1, 0, 2)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    pos = torch.cat([positions(grid), positions(ref_grid)], dim=-1)
    x = torch.cat([embeds, ref], dim=1)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    freqs = (inv[None, None, :, None].expand(3, 1, -1, 1) @ pos[:, :, None, :].float()).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    sec = [16, 24, 24] * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(emb.cos().split(sec, dim=-1))], dim=-1).unsqueeze(1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(emb.sin().split(sec, dim=-1))], dim=-1).unsqueeze(1)
    p = "layers.0."
    b, n, _ = x.shape
    h = rms(x, sd[p + "input_layernorm.weight"])

    def proj(name):
        y = h @ sd[f"{p}self_attn.{name}.weight"].T + sd[f"{p}self_attn.{name}.bias"]
        return y.view(b, n, -1, 128).transpose(1, 2)
    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    rep = q.shape[1] // k.shape[1]
    k = k[:, :, None].expand(b, k.shape[1], rep, n, 128).reshape(b, -1, n, 128)
    v = v[:, :, None].expand(b, v.shape[1], rep, n, 128).reshape(b, -1, n, 128)
    attn = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(128), dim=-1) @ v
    x = x + attn.transpose(1, 2).reshape(b, n, -1) @ sd[p + "self_attn.o_proj.weight"].T
    h = rms(x, sd[p + "post_attention_layernorm.weight"])
    mlp = (torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T))
    x = x + mlp @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["projector.0.weight"]) @ sd["projector.1.weight"].T + sd["projector.1.bias"]
    x = torch.nn.functional.silu(rms(x, sd["projector.2.weight"]))
    return rms(x @ sd["projector.4.weight"].T + sd["projector.4.bias"], sd["projector.5.weight"])


def test_merger_and_adapter_match_the_seed_formulas(parts):
    """Against the seed's formulas written out (DiffSynth's nexus_gen_projector.py itself does not import on
    transformers 5: it reads transformers.modeling_rope_utils._compute_default_rope_parameters, gone in 5)."""
    g = torch.Generator().manual_seed(0)
    target, ref = torch.randn(1, 81, 128, generator=g), torch.randn(1, 6, 128, generator=g)
    grid, ref_grid = torch.tensor([[1, 18, 18]]), torch.tensor([[1, 4, 6]])
    sd = {k[len("embedding_merger."):]: v.float() for k, v in read_bin(parts["folder"] / "edit_decoder.bin").items()
          if k.startswith("embedding_merger.")}
    with torch.no_grad():
        got = parts["nexus_gen_editing_adapter"](target, grid, ref, ref_grid)
        want = seed_merger(sd, target, grid, ref, ref_grid)
        assert got.shape == (1, 87, 32) and (got - want).abs().max().item() < 1e-5
        a = {k: v.float() for k, v in read_bin(parts["folder"] / "generation_decoder.bin").items()
             if k.startswith("adapter.")}
        ln = torch.nn.functional.layer_norm
        x = target @ a["adapter.0.weight"].T + a["adapter.0.bias"]
        x = ln(x, (32,), a["adapter.1.weight"], a["adapter.1.bias"])
        x = torch.relu(x) @ a["adapter.3.weight"].T + a["adapter.3.bias"]
        want = ln(x, (32,), a["adapter.4.weight"], a["adapter.4.bias"])
        assert (parts["nexus_gen_generation_adapter"](target) - want).abs().max().item() < 1e-5


def test_merger_groups_key_value_heads_as_the_seed():
    """4 query heads over 2 key/value heads (the real file: 28 over 4): each key/value head serves consecutive query
    heads, as the seed's repeat_kv."""
    torch.manual_seed(0)
    merger = dec.NexusGenEmbeddingMerger(hidden=512, intermediate=64, kv_heads=2, out_channel=16, expand=2)
    for prm in merger.parameters():
        prm.data.normal_(0, 1 / math.sqrt(prm.shape[-1])) if prm.ndim == 2 else prm.data.normal_(1, 0.1)
    x, ref = torch.randn(1, 81, 512), torch.randn(1, 4, 512)
    grid, ref_grid = torch.tensor([[1, 18, 18]]), torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        got = merger(x, grid, ref, ref_grid)
        want = seed_merger(merger.state_dict(), x, grid, ref, ref_grid)
    assert (got - want).abs().max().item() < 1e-4


def test_decoder_dit_equals_the_flux_demo_dit(parts, demo_dir):
    """The demo decoder's pipe.dit.* holds the FLUX.1 demo's transformer in DiffSynth's names: loaded from it, the
    diffusers model equals the usual load of flux1-dev.safetensors, parameter for parameter and in its output."""
    from engine.loading import load_models
    usual = load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]
    mine = parts["dit"]
    a, b = usual.state_dict(), mine.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 64, generator=g),
              encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
              pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.rand(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        assert torch.equal(usual(**kw)[0], mine(**kw)[0])


# ------------------------------------------------------------------------------------------------ end to end

def test_editing_text_ids_are_the_seeds():
    latents = torch.zeros(1, 16, 8, 12)                 # a 64x96 image's latents (H/8, W/8)
    target, ref = torch.tensor([1, 18, 18]), torch.tensor([1, 4, 6])
    want = []
    for index, (h, w) in ((0.0, (18, 18)), (1.0, (4, 6))):     # get_editing_text_ids, written out
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 0] += index
        ids[..., 1] += torch.arange(h // 2)[:, None] * (latents.shape[-2] / h)
        ids[..., 2] += torch.arange(w // 2)[None, :] * (latents.shape[-1] / w)
        want.append(ids[None].reshape(1, -1, 3))
    assert torch.equal(editing_text_ids(8, 12, target, ref), torch.cat(want, dim=1)[0])


def test_generation_replaces_only_the_positive_prompt(gen_pipe, parts):
    image, seen = run(gen_pipe, prompt="a cat", negative_prompt="blurry", cfg_scale=3.0)
    assert np.isfinite(image).all() and image.std() > 0
    pos = [s for s in seen if s[0].shape[1] == 81]
    neg = [s for s in seen if s[0].shape[1] != 81]
    assert len(pos) == len(neg) == 2 and neg[0][0].shape[1] == 512          # the negative prompt: T5's 512 tokens
    target, _, _ = ar.target_embeddings(gen_pipe.nexus_gen, gen_pipe.nexus_gen.flux_studio_processor, "a cat")
    with torch.no_grad():
        want = gen_pipe.nexus_gen_generation_adapter(target[None])
    assert (pos[0][0] - want).abs().max().item() < 1e-5 and not pos[0][1].any()   # adapter output, zero ids
    other, seen2 = run(gen_pipe, prompt="a dog", negative_prompt="blurry", cfg_scale=3.0)
    assert torch.equal(seen2[1][0] if seen2[1][0].shape[1] == 512 else seen2[0][0], neg[0][0])   # same negative
    hook = gen_pipe.nexus_gen_generation_adapter.register_forward_hook(lambda m, a, out: out * 0.5)
    try:
        changed, _ = run(gen_pipe, prompt="a cat", negative_prompt="blurry", cfg_scale=3.0)
    finally:
        hook.remove()
    assert np.abs(changed - image).max() > 1 and np.abs(other - image).max() > 1


def test_editing_with_a_reference(edit_pipe):
    reference = reference_image()
    image, seen = run(edit_pipe, prompt="add a hat", nexus_gen_reference_image=reference)
    assert np.isfinite(image).all() and len(seen) == 2
    embeds, ids = seen[0]
    assert embeds.shape[1] == 81 + 6
    assert torch.equal(ids, editing_text_ids(8, 8, torch.tensor([1, 18, 18]), torch.tensor([1, 4, 6])))
    other, _ = run(edit_pipe, prompt="add a hat", nexus_gen_reference_image=reference_image(seed=1))
    assert np.abs(other - image).max() > 1


def test_bad_inputs_are_named(gen_pipe, edit_pipe, demo_dir):
    with pytest.raises(EngineError, match="not a PIL image"):
        run(edit_pipe, prompt="x", nexus_gen_reference_image=np.zeros((8, 8, 3)))
    with pytest.raises(EngineError, match="needs Nexus-GenV2's edit_decoder.bin"):
        run(gen_pipe, prompt="x", nexus_gen_reference_image=reference_image())
    with pytest.raises(EngineError, match="needs generation_decoder.bin"):
        run(edit_pipe, prompt="x")
    processor = gen_pipe.nexus_gen.flux_studio_processor
    gen_pipe.nexus_gen.flux_studio_processor = None
    try:
        with pytest.raises(EngineError, match="processor is not loaded.*processor/"):
            run(gen_pipe, prompt="x")
    finally:
        gen_pipe.nexus_gen.flux_studio_processor = processor
    plain = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    plain.set_models({"dit": gen_pipe.dit, "vae": gen_pipe.vae, "text_encoder_1": gen_pipe.text_encoder_1,
                      "text_encoder_2": gen_pipe.text_encoder_2}, {})
    plain.tokenizer_1, plain.tokenizer_2 = gen_pipe.tokenizer_1, gen_pipe.tokenizer_2
    with pytest.raises(EngineError, match="needs Nexus-GenV2"):
        run(plain, prompt="x", nexus_gen_reference_image=reference_image())


def test_registry_rows_name_the_demo_files(models_dir):
    from engine.model_config import local_dir_for, match_local_files
    from engine.registry import get_variant
    for name, decoder, adapter, cfg in (("Nexus-GenV2", "generation_decoder.bin", dec.GENERATION_ROLE, 3.0),
                                        ("Nexus-GenV2-Edit", "edit_decoder.bin", dec.EDITING_ROLE, 2.0)):
        real, demo = get_variant(name), get_variant(name + "-random-demo")
        assert (real.default_steps, real.default_cfg, demo.demo) == (50, cfg, True)
        assert real.file("dit").pattern == real.file(adapter).pattern == decoder
        assert real.extra_inputs == (("nexus_gen_reference_image",) if adapter == dec.EDITING_ROLE else ())
        for f in demo.files:                      # every file the demo row names is written
            assert match_local_files(local_dir_for(models_dir, f.model_id), [f.pattern]), f
