"""Step1X-Edit: connector and Qwen2.5-VL layouts against the manifests (meta device), the authors' encoding
rules, and end to end on the tiny random-weight files of engine.demo.step1x."""
import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from engine.step1x.connector import Step1XConnector, build_connector, infer_connector_config, split_connector
from engine.demo import step1x_demo_files, write_step1x_demo
from engine.step1x.encoder import MAX_LENGTH, Step1XEncoder, build_qwen_vl, convert_qwen_vl, qwen_config, split_pieces

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
STEP1X = "adapters/stepfun-ai--Step1X-Edit/step1x-edit-i1258.safetensors.json"
QWEN = "adapters/Qwen--Qwen2.5-VL-7B-Instruct/model.safetensors.json"

# Qwen/Qwen2.5-VL-7B-Instruct config.json (the published flat layout)
QWEN_7B_CONFIG = {
    "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


def manifest(root, rel):
    return json.loads((root / rel).read_text())


def meta_sd(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def assert_one_to_one(tensors, model):
    params = model.state_dict()
    assert tensors.keys() == params.keys(), (sorted(params.keys() - tensors.keys())[:5],
                                             sorted(tensors.keys() - params.keys())[:5])
    for k, t in tensors.items():
        assert tuple(t.shape) == tuple(params[k].shape), k


# ------------------------------------------------------------------------------------------------ layouts (meta)

def test_connector_keys_map_onto_the_connector(manifests_dir):
    sd = split_connector(meta_sd(manifest(manifests_dir, STEP1X)))
    assert len(sd) == 41
    cfg = infer_connector_config(sd)
    assert cfg == dict(in_dim=3584, hidden=4096, pooled_dim=768, depth=2)
    with torch.device("meta"):
        model = build_connector(cfg)
    assert model.config["heads"] == 32                    # the authors' heads_num (head width 128)
    assert_one_to_one(sd, model)


def test_qwen_published_layout_maps_onto_transformers_5(manifests_dir):
    sd = meta_sd(manifest(manifests_dir, QWEN))
    with torch.device("meta"):
        model = build_qwen_vl(qwen_config(QWEN_7B_CONFIG))
    converted = convert_qwen_vl(sd)
    assert len(converted) == len(sd) == 729                 # one to one: no key lost or merged
    assert_one_to_one(converted, model)


def test_step1x_file_dit_part_still_loads_as_schnell_type(manifests_dir):
    from engine.loading import convert_bfl_transformer, infer_transformer_config
    from engine.loading.detect import detect_component
    sd = meta_sd(manifest(manifests_dir, STEP1X))
    role, fmt, desc = detect_component(sd)
    assert (role, fmt) == ("dit", "bfl") and "connector" in desc
    cfg = infer_transformer_config(sd)
    assert cfg["guidance_embeds"] is False and cfg["joint_attention_dim"] == 4096
    assert cfg["pooled_projection_dim"] == 768
    assert not any(k.startswith("connector.") for k in convert_bfl_transformer(
        {k: v for k, v in sd.items() if not k.startswith("connector.")}))


# ------------------------------------------------------------------------------------------------ demo files

@pytest.fixture(scope="module")
def step1x_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_step1x_demo(root)
    return root


def _pattern(k):
    return re.sub(r"\.\d+\.", ".N.", k)


def test_demo_files_use_the_official_key_layouts(step1x_models, manifests_dir):
    from safetensors import safe_open
    files = step1x_demo_files(step1x_models)
    with safe_open(str(files["dit"]), "pt") as f:
        keys = set(f.keys())
    official = set(manifest(manifests_dir, STEP1X)["tensors"])
    assert {_pattern(k) for k in keys} == {_pattern(k) for k in official}
    assert {k for k in keys if k.startswith("connector.")} == {k for k in official if k.startswith("connector.")}
    index = json.loads((files["qwen_vl"] / "model.safetensors.index.json").read_text())
    assert {_pattern(k) for k in index["weight_map"]} == {_pattern(k) for k in manifest(manifests_dir, QWEN)["tensors"]}
    vae = set(manifest(manifests_dir, "adapters/stepfun-ai--Step1X-Edit/vae.safetensors.json")["tensors"])
    with safe_open(str(files["vae"]), "pt") as f:
        assert {_pattern(k) for k in f.keys()} <= {_pattern(k) for k in vae}


def test_demo_is_idempotent(step1x_models):
    files = step1x_demo_files(step1x_models)
    before = files["dit"].stat().st_mtime_ns
    assert write_step1x_demo(step1x_models) == files["dit"].parent
    assert files["dit"].stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def components(step1x_models):
    from engine.step1x.load import load_components
    f = step1x_demo_files(step1x_models)
    return load_components([f["dit"], f["vae"], f["qwen_vl"]], torch.float32)


def test_load_components_gives_every_role(components):
    assert sorted(components) == ["dit", "qwen_vl", "step1x_connector", "vae"]
    assert components["dit"].config.guidance_embeds is False
    assert components["qwen_vl"].flux_studio_processor is not None
    assert isinstance(components["step1x_connector"], Step1XConnector)


# ------------------------------------------------------------------------------------------------ encoder rules

def test_split_pieces_follows_the_authors_quote_rule():
    head = "x" * 200
    assert split_pieces('say "hi" now') == ['say "hi" now']          # quotes before index 155 are left alone
    assert split_pieces(head + 'say "hi" now') == [head + 'say "', "“h”", "“i”", '" now']
    assert split_pieces("it’s “a”")[0] == "it’s \"a\""


def test_encoder_output_shape_mask_and_image_dependence(components):
    q = components["qwen_vl"]
    enc = Step1XEncoder(q, q.flux_studio_processor)
    red, blue = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))
    ids, _, grid, drop = enc.input_ids("make it blue", red)
    h, m = enc.encode("make it blue", red, dtype=torch.float32)
    assert h.shape == (1, MAX_LENGTH, 64) and m.shape == (1, MAX_LENGTH)
    n = ids.shape[1] - drop
    assert int(m.sum()) == n and m[0, :n].all() and not m[0, n:].any() and not h[0, n:].any()
    full = q.model(input_ids=ids, attention_mask=(ids > 0).long(),
                   pixel_values=enc.input_ids("make it blue", red)[1], image_grid_thw=grid).last_hidden_state
    torch.testing.assert_close(h[0, :n], full[0, drop:])            # the last hidden state past the prefix
    assert not torch.equal(h, enc.encode("make it blue", blue, dtype=torch.float32)[0])
    assert not torch.equal(h, enc.encode("make it red", red, dtype=torch.float32)[0])


def _reference_connector(c: Step1XConnector, x, sigma, mask):
    """The authors' formulas written out plainly (explicit softmax attention), to check the module's math."""
    sd = {k: v.double() for k, v in c.state_dict().items()}
    x, m = x.double(), mask.double()
    lin = lambda p, v: v @ sd[p + ".weight"].T + sd[p + ".bias"]
    silu = torch.nn.functional.silu
    mean = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    pooled = lin("global_proj_out", mean * (1 + sd["scale_factor"]))
    t = sigma.double() * 1000
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    c_vec = lin("S.t_embedder.mlp.2", silu(lin("S.t_embedder.mlp.0", temb)))
    c_vec = c_vec + lin("S.c_embedder.linear_2", silu(lin("S.c_embedder.linear_1", mean)))
    h = lin("S.input_embedder", x)
    heads, L = c.config["heads"], x.shape[1]
    allowed = (m[0][:, None] * m[0][None, :]).bool()
    allowed[:, 0] = True
    for i in range(c.config["depth"]):
        p = f"S.individual_token_refiner.blocks.{i}."
        gate_msa, gate_mlp = lin(p + "adaLN_modulation.1", silu(c_vec)).chunk(2, -1)
        ln = lambda v, n: torch.nn.functional.layer_norm(v, v.shape[-1:], sd[p + n + ".weight"], sd[p + n + ".bias"], 1e-6)
        q, k, v = lin(p + "self_attn_qkv", ln(h, "norm1")).view(1, L, 3, heads, -1).unbind(2)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(1, L, -1)
        h = h + lin(p + "self_attn_proj", att) * gate_msa[:, None]
        h = h + lin(p + "mlp.fc2", silu(lin(p + "mlp.fc1", ln(h, "norm2")))) * gate_mlp[:, None]
    return h, pooled


def test_connector_math_matches_the_written_out_formulas(components):
    c = components["step1x_connector"].double()
    try:
        x = torch.randn(1, 12, c.config["in_dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        mask = torch.tensor([[1] * 7 + [0] * 5])
        sigma = torch.tensor([0.37], dtype=torch.float64)
        tokens, pooled = c(x, sigma, mask)
        ref_tokens, ref_pooled = _reference_connector(c, x, sigma, mask)
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-6, atol=1e-5)  # sinusoid in float32, as the authors
        torch.testing.assert_close(pooled, ref_pooled, rtol=1e-9, atol=1e-9)
    finally:
        c.float()


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def pipe(step1x_models):
    """The seed's way: from_pretrained on the Step1X files (DiT + connector file, its VAE, the Qwen2.5-VL folder)."""
    from engine import FluxImagePipeline, ModelConfig
    f = step1x_demo_files(step1x_models)
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=f["dit"]), ModelConfig(path=f["vae"]), ModelConfig(path=f["qwen_vl"])])


def _img(seed, size=(56, 40)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def test_edit_end_to_end(pipe):
    assert pipe.step1x_connector is not None and pipe.qwen_vl is not None and pipe.text_encoder_1 is None
    kw = dict(prompt="make it blue", negative_prompt="", cfg_scale=6.0, height=64, width=80, seed=3,
              num_inference_steps=2, progress_bar_cmd=lambda x: x)
    a = pipe(step1x_reference_image=_img(0), **kw)
    assert a.size == (80, 64)
    b = pipe(step1x_reference_image=_img(0), **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b))                       # deterministic for a seed
    c = pipe(step1x_reference_image=_img(1), **kw)
    assert not np.array_equal(np.asarray(a), np.asarray(c))                   # follows the reference image
    d = pipe(step1x_reference_image=_img(0), **{**kw, "prompt": "make it red"})
    assert not np.array_equal(np.asarray(a), np.asarray(d))                   # follows the instruction
    e = pipe(step1x_reference_image=_img(0), **{**kw, "cfg_scale": 1.0})
    assert not np.array_equal(np.asarray(a), np.asarray(e))                   # true CFG acts


def test_sampling_matches_the_authors_loop_written_out(pipe):
    """The authors' inference loop, written plainly on the pipeline's modules: Qwen on the reference at the output
    size, the connector at every step's sigma, the DiT on [generated | reference] tokens with shared position ids,
    true CFG, Euler; only the generated tokens are stepped and decoded."""
    from engine import latents as lat
    from engine.scheduler import flux_sigmas
    ref, h_, w_, steps, cfg = _img(5, (80, 64)), 64, 80, 3, 4.0
    got = pipe(step1x_reference_image=ref, prompt="make it blue", negative_prompt="blurry", cfg_scale=cfg, height=h_,
               width=w_, seed=7, num_inference_steps=steps, progress_bar_cmd=lambda x: x)
    enc = Step1XEncoder(pipe.qwen_vl, pipe.qwen_vl.flux_studio_processor)
    pos, neg = enc.encode("make it blue", ref, dtype=torch.float32), enc.encode("blurry", ref, dtype=torch.float32)
    sigmas = flux_sigmas(steps, 1.0, None, "seed", image_seq_len=(h_ // 16) * (w_ // 16))
    ref_tokens = lat.pack(pipe.encode_image(ref))
    x = lat.pack(lat.initial_noise(h_, w_, 7, "cpu"))
    ids = torch.cat([lat.image_ids(h_, w_)] * 2)
    txt_ids = lat.text_ids(MAX_LENGTH)
    with torch.no_grad():
        for i in range(steps):
            t = sigmas[i:i + 1].float()

            def v(cond):
                txt, pooled = pipe.step1x_connector(cond[0], t, cond[1])
                out = pipe.dit(hidden_states=torch.cat([x, ref_tokens], 1), encoder_hidden_states=txt,
                               pooled_projections=pooled, timestep=t, img_ids=ids, txt_ids=txt_ids, guidance=None,
                               return_dict=False)[0]
                return out[:, :x.shape[1]]
            v_pos, v_neg = v(pos), v(neg)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_neg + cfg * (v_pos - v_neg))
    want = pipe.decode_latents(lat.unpack(x, h_, w_))
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int))
    assert diff.max() <= 1, diff.max()


def test_planner_sizes_step1x_from_the_manifests(manifests_dir):
    """Qwen2.5-VL and the connector are planned with the DiT: the connector's tensors count once (not in the DiT),
    and from 20 GB up every plan fits, faster as the limit rises, with Qwen only resident or offloaded (its blocks
    cannot stream, nor can it be stored in fp8: its vision tower reads the model's dtype)."""
    from engine import memory as vram
    step1x = str(manifests_dir / STEP1X)
    sizes = vram.sizes_from_manifests({"dit": step1x, "step1x_connector": step1x, "vae": str(
        manifests_dir / "adapters/stepfun-ai--Step1X-Edit/vae.safetensors.json"), "qwen_vl": str(manifests_dir / QWEN)})
    assert 8.25e9 < sizes["qwen_vl"].params < 8.35e9
    assert 0.53e9 < sizes["step1x_connector"].params < 0.54e9
    assert 11.8e9 < sizes["dit"].params < 11.95e9               # the DiT without connector.*
    free = vram.plan(sizes, "cuda", None, None)
    assert set(free.strategies().values()) == {"resident"}
    assert 40 < free.predicted_peak_vram_gb < 45
    seconds = []
    for limit in (40, 32, 24, 20):
        p = vram.plan(sizes, "cuda", limit, 120)
        assert p.fits and p.predicted_peak_vram_gb <= limit, (limit, p.strategies())
        assert p.entries["qwen_vl"].strategy in ("resident", "offload")
        seconds.append(p.as_dict()["predicted_seconds"])
    assert seconds == sorted(seconds) and free.as_dict()["predicted_seconds"] <= seconds[0]
    tight = vram.plan(sizes, "cuda", 12, 120)
    assert not tight.fits and "Nothing fits" in " ".join(tight.notes)    # Qwen alone is 15.4 GB in bf16


def test_studio_edits_with_the_step1x_demo_as_the_api_does(demo_dir, tmp_path, pipe):
    """The studio's engine loads Step1X's roles one by one (DiT and connector from one file, the Qwen folder with its
    processor files) and gives the image the seed API gives; the recipe names every file and the reference."""
    from studio.engine import Engine
    eng = Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path / "out", allow_dirs=[tmp_path])
    names = [v["name"] for v in eng.variants()]
    assert "Step1X-Edit" in names and "Step1X-Edit-random-demo" in names
    path = tmp_path / "in.png"
    _img(2, (80, 64)).save(path)
    steps = []
    [res] = eng.generate({"variant": "Step1X-Edit-random-demo", "prompt": "make it blue", "negative_prompt": "",
                          "step1x_reference_image": str(path), "num_inference_steps": 2, "seed": 11, "cfg_scale": 6.0,
                          "embedded_guidance": 0.0, "width": 80, "height": 64}, progress=lambda d, t, m: steps.append(m))
    assert (res["width"], res["height"]) == (80, 64)
    assert set(res["recipe"]["model_files"]) == {"dit", "step1x_connector", "vae", "qwen_vl"}
    assert res["recipe"]["model_files"]["qwen_vl"][0]["file"].endswith("model-00001-of-00002.safetensors")
    assert res["recipe"]["step1x_reference_image"]["file"] == "in.png"
    assert pathlib.Path(res["path"]).with_name(pathlib.Path(res["path"]).stem + ".ref0.png").is_file()
    want = pipe(step1x_reference_image=Image.open(path).convert("RGB"), prompt="make it blue", negative_prompt="",
                cfg_scale=6.0, height=64, width=80, seed=11, num_inference_steps=2, progress_bar_cmd=lambda x: x)
    assert np.array_equal(np.asarray(Image.open(res["path"]).convert("RGB")), np.asarray(want))
    plan = eng.memory_plan()
    assert plan["variant"] == "Step1X-Edit-random-demo"
    assert {c["role"] for c in plan["components"]} == {"dit", "step1x_connector", "vae", "qwen_vl"}
    restored = eng.read_recipe(res["path"])
    assert restored["variant"] == "Step1X-Edit-random-demo" and restored["step1x_reference_image"].endswith(".ref0.png")
