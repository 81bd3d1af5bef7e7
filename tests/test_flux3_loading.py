"""FLUX 3 Image Klein: loading the official files exactly, the registry rows, the random-weight demo.

Manifests (../shared/checkpoint-manifests, see its README): flux-3-image-klein/model.safetensors (BFL, ref_time_in),
its transformer/ (diffusers) and flux-3-image-klein-base/'s two (no ref_time_in) are exact with verified key hashes;
text_encoder/ (Qwen3-VL-4B-Instruct) is exact with a key hash implied by DiffSynth's. Each maps one to one and
shape-exact onto the model inferred from it on the meta device, with the config diffusers published for these
models (the manifests' ``source``: Flux3Transformer2DModel(in_channels 128, cond_in_channels 128, num_layers 5,
num_single_layers 28, 128 x 24 heads, joint_attention_dim 20480, mlp_ratio 3, axes (32,)*4, rope_theta 10000),
flow_map for the distilled one). The demo: its BFL file and its diffusers folder load to the same tensors, which
diffusers' own ``from_pretrained`` reads too; its text encoder gives transformers' own hidden states; its files have
the manifests' key layouts (block numbers aside).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import time

import pytest
import torch

from engine import registry
from engine.flux3 import loading
from engine.loading.errors import ModelFileError
from engine.loading.load import assemble

MANIFESTS = pathlib.Path(os.environ.get("FLUX_MANIFESTS", pathlib.Path(__file__).resolve().parents[2] / "shared"
                                        / "checkpoint-manifests"))
DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}
PUBLISHED = {"in_channels": 128, "cond_in_channels": 128, "num_layers": 5, "num_single_layers": 28,
             "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 20480, "mlp_ratio": 3.0,
             "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 10000, "timestep_channels": 256, "eps": 1e-6}
TRANSFORMERS = [("flux-3-image-klein/model.safetensors.json", "bfl", True),
                ("flux-3-image-klein/transformer/diffusion_pytorch_model.safetensors.json", "diffusers", True),
                ("flux-3-image-klein-base/model.safetensors.json", "bfl", False),
                ("flux-3-image-klein-base/transformer/diffusion_pytorch_model.safetensors.json", "diffusers", False)]
TEXT_ENCODER = "flux-3-image-klein/text_encoder/model.safetensors.json"


def manifest(rel):
    path = MANIFESTS / rel
    if not path.exists():
        pytest.skip("checkpoint manifests not available")
    return json.loads(path.read_text())


def meta_state_dict(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def layout(keys) -> set:
    """Key names with block numbers replaced: what an official layout is, at any depth."""
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


# ---------------------------------------------------------------------------------------------------- manifests

@pytest.mark.parametrize("rel,fmt,flow_map", TRANSFORMERS, ids=[t[0].split("/")[0] + ":" + t[1] for t in TRANSFORMERS])
def test_transformer_manifest_maps_exactly(rel, fmt, flow_map):
    sd = meta_state_dict(manifest(rel))
    role, found, _desc = loading.detect_flux3(sd)
    assert (role, found) == ("dit", fmt)
    tensors = loading.convert_bfl_transformer(sd) if fmt == "bfl" else sd
    assert len(tensors) == len(sd)                       # one to one: nothing dropped, nothing merged
    cfg = loading.infer_transformer_config(tensors)
    assert cfg == {**PUBLISHED, "flow_map": flow_map}
    model = assemble(lambda: loading.build_transformer(cfg), tensors, None, torch.device("meta"))
    assert set(model.state_dict()) == set(tensors)       # assemble checked the shapes one by one
    assert (model.target_timestep_embedder is not None) == flow_map


def test_bfl_and_diffusers_manifests_agree():
    """diffusers' converter maps BFL's file onto the diffusers folder's keys and shapes exactly (both models)."""
    for model in ("flux-3-image-klein", "flux-3-image-klein-base"):
        bfl = loading.convert_bfl_transformer(meta_state_dict(manifest(f"{model}/model.safetensors.json")))
        dif = meta_state_dict(manifest(f"{model}/transformer/diffusion_pytorch_model.safetensors.json"))
        assert {k: tuple(t.shape) for k, t in bfl.items()} == {k: tuple(t.shape) for k, t in dif.items()}


def test_text_encoder_manifest_maps_exactly():
    sd = meta_state_dict(manifest(TEXT_ENCODER))
    assert loading.detect_flux3(sd)[:2] == ("text_encoder", "qwen3_vl")
    conf = loading.infer_text_config(sd)
    assert (conf.vocab_size, conf.hidden_size, conf.num_hidden_layers, conf.num_attention_heads,
            conf.num_key_value_heads, conf.head_dim, conf.intermediate_size) == (151936, 2560, 36, 32, 8, 128, 9728)
    assert conf.rope_parameters["rope_theta"] == 5000000
    tensors, unused = loading.convert_text_encoder(sd)
    assert len(tensors) + len(unused) == len(sd) == 713
    assert all(k.startswith("model.visual.") for k in unused) and "lm_head.weight" not in sd   # tied
    model = assemble(lambda: loading.build_text_encoder(conf), tensors, None, torch.device("meta"))
    loading.trim_text_encoder(model, loading.TEXT_LAYERS)
    assert len(model.layers) == 33 and model.flux_studio_layers == (4, 8, 12, 16, 20, 24, 28, 32)
    assert len(loading.TEXT_LAYERS) * conf.hidden_size == PUBLISHED["joint_attention_dim"]


# ---------------------------------------------------------------------------------------------------- the demo

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import diffusers  # noqa: F401 - imported before the clock starts: the write is what is timed
    import transformers  # noqa: F401

    from engine.demo.flux3 import flux3_demo_files, write_flux3_demo
    root = tmp_path_factory.mktemp("models")
    start = time.perf_counter()
    write_flux3_demo(root)
    seconds = time.perf_counter() - start
    print(f"FLUX 3 demo written in {seconds:.2f} s")
    assert seconds < 10                                  # ~0.7 s on a free core; the suite shares two
    return root, flux3_demo_files(root), flux3_demo_files(root, base=True)


@pytest.fixture(scope="module")
def demo_models(demo):
    _root, klein, _base = demo
    return loading.load_flux3_models([klein["dit"], klein["text_encoder"], klein["vae"]], torch.float32)


def test_demo_has_the_official_layouts(demo):
    from engine.loading.files import read_state_dict, resolve_group
    _root, klein, base = demo
    for files, name in ((klein, "flux-3-image-klein"), (base, "flux-3-image-klein-base")):
        bfl = read_state_dict(resolve_group(files["dit"]), device="meta")
        dif = read_state_dict(resolve_group(files["dit_diffusers"]), device="meta")
        assert layout(bfl) == layout(manifest(f"{name}/model.safetensors.json")["tensors"])
        assert layout(dif) == layout(manifest(f"{name}/transformer/diffusion_pytorch_model.safetensors.json")
                                     ["tensors"])
    text = read_state_dict(resolve_group(klein["text_encoder"]), device="meta")
    assert layout(text) == layout(manifest(TEXT_ENCODER)["tensors"])


def _public(config) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")}


def test_demo_bfl_file_and_diffusers_folder_load_the_same(demo, demo_models):
    from diffusers import Flux3Transformer2DModel
    _root, klein, base = demo
    for files, flow_map in ((klein, True), (base, False)):
        bfl = demo_models["dit"] if flow_map else loading.load_flux3_models(files["dit"], torch.float32)["dit"]
        dif = loading.load_flux3_models(files["dit_diffusers"], torch.float32)["dit"]
        own = Flux3Transformer2DModel.from_pretrained(str(files["dit_diffusers"]), torch_dtype=torch.float32)
        assert bfl.config.flow_map is flow_map and _public(dif.config) == _public(bfl.config) == _public(own.config)
        a, b, c = bfl.state_dict(), dif.state_dict(), own.state_dict()
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]) for k in a)
        assert bfl.flux_studio_format == "bfl" and dif.flux_studio_format == "diffusers"


def test_demo_bf16_keeps_diffusers_fp32_modules(demo):
    """In bf16 the QK norms stay float32 as diffusers' from_pretrained keeps them (``_keep_in_fp32_modules``): the
    same dtypes per tensor and the same prediction as diffusers' own loading."""
    from diffusers import Flux3Transformer2DModel
    _root, klein, _base = demo
    ours = loading.load_flux3_models(klein["dit"], torch.bfloat16)["dit"]
    own = Flux3Transformer2DModel.from_pretrained(str(klein["dit_diffusers"]), torch_dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in own.named_parameters()}
    assert ours.single_transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.zeros(16), torch.arange(16) // 4 * 0.5, torch.arange(16) % 4 * 0.5, torch.zeros(16)], 1)
    txt_ids = torch.stack([torch.zeros(8)] * 3 + [torch.arange(8.0)], 1)
    kwargs = dict(hidden_states=torch.randn(1, 16, 128, generator=g).bfloat16(), img_ids=ids, txt_ids=txt_ids,
                  encoder_hidden_states=torch.randn(1, 8, 256, generator=g).bfloat16(), timestep=torch.tensor([0.7]),
                  target_timestep=torch.tensor([0.5]))
    with torch.no_grad():
        assert torch.equal(ours(**kwargs).sample, own(**kwargs).sample)


def test_demo_text_encoder_gives_transformers_hidden_states(demo, demo_models):
    """The trimmed Qwen3VLTextModel's hidden states at the layers read = Qwen3VLForConditionalGeneration's own
    (transformers' from_pretrained on the same folder, the vision tower and tied lm_head included), float32, with a
    padded chat-formatted prompt and diffusers' explicit position ids."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
    _root, klein, _base = demo
    te = demo_models["text_encoder"]
    assert te.flux_studio_layers == (1, 2, 3, 4, 5, 6, 7, 8) and len(te.layers) == 9           # 9 of 10 kept
    assert len(te.flux_studio_unused) > 0 and all(k.startswith("model.visual.") for k in te.flux_studio_unused)
    ref = Qwen3VLForConditionalGeneration.from_pretrained(str(klein["text_encoder"]), dtype=torch.float32).eval()
    assert ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()   # tied
    tok = AutoTokenizer.from_pretrained(str(klein["tokenizer"]))
    text = tok.apply_chat_template([{"role": "user", "content": "a red fox in the snow"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\na red fox in the snow<|im_end|>\n<|im_start|>assistant\n"
    enc = tok(text, return_tensors="pt", padding="max_length", max_length=40)
    mask = enc["attention_mask"]
    assert int(mask.sum()) < 40                                                            # padding is read too
    pos = torch.arange(40)[None].masked_fill(mask == 0, 1)
    with torch.no_grad():
        want = ref(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, output_hidden_states=True,
                   use_cache=False).hidden_states
        got = te(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, output_hidden_states=True,
                 use_cache=False).hidden_states
    diff = max((want[k] - got[k]).abs().max().item() for k in te.flux_studio_layers)
    print(f"Qwen3-VL hidden states 1..8 vs transformers: max |diff| {diff:.2e}")
    assert diff <= 1e-6
    stacked = torch.cat([got[k] for k in te.flux_studio_layers], dim=-1)
    assert stacked.shape[-1] == demo_models["dit"].config.joint_attention_dim              # 8 x 32 = 256


def test_demo_vae_is_flux2s(demo_models):
    from diffusers import AutoencoderKLFlux2
    vae = demo_models["vae"]
    assert isinstance(vae, AutoencoderKLFlux2)
    assert vae.config.latent_channels * 4 == demo_models["dit"].config.in_channels       # 2x2-patchified latent


# ---------------------------------------------------------------------------------------------------- registry

def test_registry_rows_and_model_configs(demo):
    from engine.flux2.variants import is_flux2
    from engine.flux3 import variants
    root, klein, base = demo
    rows = {v.name: v for v in registry.FLUX3_VARIANTS}
    assert set(rows) == {"FLUX.3-Image-Klein", "FLUX.3-Image-Klein-base", "FLUX.3-Image-Klein-random-demo",
                         "FLUX.3-Image-Klein-base-random-demo"}
    distilled, undistilled = rows["FLUX.3-Image-Klein"], rows["FLUX.3-Image-Klein-base"]
    assert (distilled.default_steps, distilled.default_cfg, undistilled.default_steps, undistilled.default_cfg) == \
        (16, 1.0, 50, 3.5)
    assert all(variants.is_flux3(v) and not is_flux2(v) for v in rows.values())
    assert is_flux2(registry.get_variant("FLUX.2-klein-4B")) and not variants.is_flux3("FLUX.2-klein-4B")
    cfgs = variants.model_configs("FLUX.3-Image-Klein")
    assert [(c.model_id, c.origin_file_pattern) for c in cfgs["model_configs"]] == [
        ("black-forest-labs/flux-3-image-klein", "model.safetensors"),
        ("black-forest-labs/flux-3-image-klein", "text_encoder/*.safetensors"),
        ("black-forest-labs/FLUX.2-klein-4B", "vae/diffusion_pytorch_model.safetensors")]
    assert (cfgs["tokenizer_config"].model_id, cfgs["tokenizer_config"].origin_file_pattern) == \
        ("black-forest-labs/flux-3-image-klein", "text_encoder/")
    with pytest.raises(Exception, match="not a FLUX 3 variant"):
        variants.model_configs("FLUX.2-klein-4B")
    for name, flow_map in (("FLUX.3-Image-Klein-random-demo", True), ("FLUX.3-Image-Klein-base-random-demo", False)):
        demo_cfgs = variants.model_configs(name)
        files = [f for c in demo_cfgs["model_configs"] for f in c.resolve(root, allow_download=False)]
        models = loading.load_flux3_models(files, torch.float32)
        assert set(models) == {"dit", "text_encoder", "vae"} and models["dit"].config.flow_map is flow_map
        assert demo_cfgs["tokenizer_config"].resolve(root, allow_download=False)[0] == klein["tokenizer"]


# ---------------------------------------------------------------------------------------------------- refusals

def _tiny_file(path, keys):
    from engine.demo.files import save_safetensors
    save_safetensors({k: torch.zeros(2, 2) for k in keys}, path)
    return path


def test_wrong_files_are_refused_by_name(tmp_path, demo):
    _root, klein, base = demo
    flux2 = _tiny_file(tmp_path / "flux-2-klein-4b.safetensors",
                       ["img_in.weight", "single_stream_modulation.lin.weight"])
    with pytest.raises(ModelFileError, match=r"flux-2-klein-4b\.safetensors.*FLUX\.2 transformer.*Flux2ImagePipeline"):
        loading.load_flux3_models(flux2)
    qwen3 = _tiny_file(tmp_path / "qwen3.safetensors", ["model.embed_tokens.weight",
                                                       "model.layers.0.self_attn.q_norm.weight"])
    with pytest.raises(ModelFileError, match=r"qwen3\.safetensors.*FLUX 3 reads Qwen3-VL-4B-Instruct"):
        loading.load_flux3_models(qwen3)
    other = _tiny_file(tmp_path / "lora.safetensors", ["lora_unet_x.lora_down.weight"])
    with pytest.raises(ModelFileError, match=r"lora\.safetensors.*no FLUX 3 component.*expected the FLUX 3 "):
        loading.load_flux3_models(other)
    with pytest.raises(ModelFileError, match="both hold the FLUX 3 transformer"):
        loading.load_flux3_models([klein["dit"], base["dit_diffusers"]])


def test_an_incomplete_transformer_is_refused(tmp_path, demo):
    from safetensors.torch import load_file

    from engine.demo.files import save_safetensors
    _root, klein, _base = demo
    sd = load_file(str(klein["dit"]))
    del sd["single_blocks.1.mlp_out.weight"]
    broken = tmp_path / "model.safetensors"
    save_safetensors(sd, broken)
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*missing.*single_transformer_blocks\.1\.ff"):
        loading.load_flux3_models(broken)
    sd = {k: v for k, v in load_file(str(klein["dit"])).items() if not k.startswith("txt_mode_blocks.1.")}
    save_safetensors(sd, broken)
    with pytest.raises(ModelFileError, match="per-mode block stacks differ"):
        loading.load_flux3_models(broken)


def test_variants_and_roles_import_no_torch():
    """The studio reads the rows and ``is_flux3`` without loading torch."""
    import subprocess
    import sys
    code = ("import sys, engine.flux3, engine.flux3.variants as v, engine.roles as r\n"
            "assert v.is_flux3('FLUX.3-Image-Klein') and r.FLUX3_ROLE_NAMES == ('text_encoder', 'dit', 'vae')\n"
            "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    repo = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


def write_sparse_safetensors(tensors: dict, path):
    """A header-exact file whose data is a hole (tensors read as zeros): the real file's layout, no disk."""
    import math
    import struct
    size = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    hdr, off = {}, 0
    for k, v in sorted(tensors.items()):
        n = math.prod(v["shape"]) * size[v["dtype"]]
        hdr[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)


def test_official_files_load_through_the_file_reader(tmp_path):
    """Sparse files with the manifests' headers (BFL's model.safetensors; text_encoder/ as two shards and their
    index) through load_flux3_models on meta: detection, shard grouping, mapping, trimming."""
    root = tmp_path / "black-forest-labs" / "flux-3-image-klein"
    write_sparse_safetensors(manifest("flux-3-image-klein/model.safetensors.json")["tensors"],
                             root / "model.safetensors")
    text = manifest(TEXT_ENCODER)["tensors"]
    keys, weight_map = sorted(text), {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        write_sparse_safetensors({k: text[k] for k in keys[i::2]}, root / "text_encoder" / name)
        weight_map.update({k: name for k in keys[i::2]})
    (root / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    models = loading.load_flux3_models([root / "model.safetensors", root / "text_encoder"], device="meta")
    dit, te = models["dit"], models["text_encoder"]
    assert dit.flux_studio_format == "bfl" and dit.config.flow_map and dit.config.num_single_layers == 28
    assert te.config.hidden_size == 2560 and len(te.layers) == 33 and len(te.flux_studio_unused) == 315
    assert len(te.flux_studio_files) == 2
