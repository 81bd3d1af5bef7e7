"""engine/demo/: the random-weight demo model must be in exactly the official layouts (checked against the
checkpoint manifests), load with the reference libraries, give sane values, and be written atomically and once."""
import inspect
import json
import pathlib
import re
import time

import pytest
import torch
from safetensors import safe_open

from engine import demo

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ST_DT = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return demo.write_demo_model(tmp_path_factory.mktemp("models"), seed=0)


def manifest(manifests_dir, rel):
    return json.loads((manifests_dir / "FLUX.1-dev" / rel).read_text())


def read_header(paths):
    """{key: (shape, dtype-string)} over one or several safetensors files, without loading data."""
    out = {}
    for p in paths:
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                assert k not in out, f"{k} in two shards"
                out[k] = (list(sl.get_shape()), sl.get_dtype())
    return out


def normalise(keys, patterns):
    """Replace block indices by '*' so key structures compare modulo block counts."""
    out = set()
    for k in keys:
        for pat in patterns:
            m = re.search(pat, k)
            if m:
                k = k[:m.start(1)] + "*" + k[m.end(1):]
        out.add(k)
    return out


def block_indices(keys, pattern):
    return sorted({int(m.group(1)) for k in keys if (m := re.search(pattern, k))})


def check_against_manifest(demo_tensors, man, patterns, dims, scaled=True):
    """Same key structure (modulo block counts), same dtypes, and shapes = the manifest's with each real width
    replaced by the demo's (``dims``), for every demo key whose literal name exists in the manifest."""
    real = man["tensors"]
    assert normalise(demo_tensors, patterns) == normalise(real, patterns)
    for k, (shape, dtype) in demo_tensors.items():
        ref = real.get(k)
        if ref is None:  # only possible for block indices the real file does not have
            continue
        assert dtype == ref["dtype"], (k, dtype, ref["dtype"])
        if scaled:
            assert shape == [dims.get(d, d) for d in ref["shape"]], (k, shape, ref["shape"])


# ---------------------------------------------------------------------------------------------------------------------
# Layouts


def test_files_listed_and_present(demo_path):
    names = {str(p.relative_to(demo_path)) for p in demo_path.rglob("*") if p.is_file()}
    assert names == set(demo.demo_files(True)) | {demo.MARKER_NAME}
    assert demo_path == pathlib.Path(demo_path).parent.parent / demo.DEMO_MODEL_ID
    total = sum((demo_path / f).stat().st_size for f in demo.demo_files(True))
    assert total < 25e6, total
    assert "random weights" in (demo_path / "README.md").read_text().lower()


def test_bfl_transformer_layout(demo_path, manifests_dir):
    t = read_header([demo_path / "flux1-dev.safetensors"])
    c = demo.TRANSFORMER
    h, mlp = c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"])
    dims = {3072: h, 9216: 3 * h, 18432: 6 * h, 6144: 2 * h, 12288: mlp, 21504: 3 * h + mlp, 15360: h + mlp,
            128: c["head_dim"], 4096: c["context_in_dim"], 768: c["vec_in_dim"], 256: 256, 64: 64}
    pats = [r"^double_blocks\.(\d+)\.", r"^single_blocks\.(\d+)\."]
    check_against_manifest(t, manifest(manifests_dir, "flux1-dev.safetensors.json"), pats, dims)
    assert block_indices(t, pats[0]) == list(range(c["depth"]))
    assert block_indices(t, pats[1]) == list(range(c["depth_single_blocks"]))
    assert "guidance_in.in_layer.weight" in t and t["time_in.in_layer.weight"][0] == [h, 256]
    assert {d for _, d in t.values()} == {"BF16"}
    assert c["head_dim"] * c["num_heads"] == h and sum(c["axes_dim"]) == c["head_dim"]


def test_bfl_ae_layout(demo_path, manifests_dir):
    t = read_header([demo_path / "ae.safetensors"])
    ch = demo.AE["ch"]
    dims = {128: ch, 256: ch * demo.AE["ch_mult"][1], 512: ch * demo.AE["ch_mult"][2]}
    pats = [r"^encoder\.down\.\d+\.block\.(\d+)\.", r"^decoder\.up\.\d+\.block\.(\d+)\."]
    check_against_manifest(t, manifest(manifests_dir, "ae.safetensors.json"), pats, dims)
    nrb = demo.AE["num_res_blocks"]
    for lvl in range(len(demo.AE["ch_mult"])):
        assert block_indices(t, rf"^encoder\.down\.{lvl}\.block\.(\d+)\.") == list(range(nrb))
        assert block_indices(t, rf"^decoder\.up\.{lvl}\.block\.(\d+)\.") == list(range(nrb + 1))
    assert t["encoder.conv_out.weight"][0] == [2 * demo.AE["z_channels"], ch * demo.AE["ch_mult"][-1], 3, 3]
    assert {d for _, d in t.values()} == {"F32"}


def test_clip_layout(demo_path, manifests_dir):
    t = read_header([demo_path / "text_encoder" / "model.safetensors"])
    cfg = json.loads((demo_path / "text_encoder" / "config.json").read_text())
    c = demo.CLIP
    dims = {768: c["hidden_size"], 3072: c["intermediate_size"], 49408: cfg["vocab_size"]}
    pats = [r"^text_model\.encoder\.layers\.(\d+)\."]
    check_against_manifest(t, manifest(manifests_dir, "text_encoder/model.safetensors.json"), pats, dims)
    assert all(k.startswith("text_model.") for k in t)
    assert not any("position_ids" in k or "text_projection" in k for k in t)
    assert block_indices(t, pats[0]) == list(range(cfg["num_hidden_layers"]))
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # the loader's heads = hidden / 64 rule holds
    assert cfg["hidden_size"] == demo.TRANSFORMER["vec_in_dim"]    # pooled CLIP output feeds vector_in


def test_t5_layout(demo_path, manifests_dir):
    folder = demo_path / "text_encoder_2"
    man = manifest(manifests_dir, "text_encoder_2/model.safetensors.json")
    shards = sorted(folder.glob("*.safetensors"))
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    t = read_header(shards)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    for p in shards:
        assert {k for k, v in index["weight_map"].items() if v == p.name} == set(read_header([p]))
    assert index["metadata"]["total_size"] == sum(
        torch.Size(s).numel() * DT[d].itemsize for s, d in t.values())
    cfg = json.loads((folder / "config.json").read_text())
    c = demo.T5
    dims = {4096: c["d_model"], 10240: c["d_ff"], 32128: cfg["vocab_size"], 64: c["num_heads"]}
    pats = [r"^encoder\.block\.(\d+)\."]
    check_against_manifest(t, man, pats, dims)
    assert "shared.weight" in t and "encoder.embed_tokens.weight" not in t
    assert [k for k in t if "relative_attention_bias" in k] == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert c["d_model"] == demo.TRANSFORMER["context_in_dim"]  # T5 output feeds txt_in
    assert cfg["feed_forward_proj"] == "gated-gelu" and cfg["vocab_size"] % 128 == 0


def test_diffusers_transformer_layout(demo_path, manifests_dir):
    folder = demo_path / "transformer"
    shards = sorted(folder.glob("*.safetensors"))
    assert [p.name for p in shards] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    t = read_header(shards)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t) and set(index["weight_map"].values()) == {p.name for p in shards}
    c = demo.TRANSFORMER
    h, mlp = c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"])
    dims = {3072: h, 18432: 6 * h, 9216: 3 * h, 6144: 2 * h, 12288: mlp, 15360: h + mlp, 128: c["head_dim"],
            4096: c["context_in_dim"], 768: c["vec_in_dim"]}
    pats = [r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\."]
    check_against_manifest(t, manifest(manifests_dir, "transformer/diffusion_pytorch_model.safetensors.json"),
                           pats, dims)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "FluxTransformer2DModel" and cfg["guidance_embeds"] is True


def test_diffusers_vae_layout(demo_path, manifests_dir):
    t = read_header([demo_path / "vae" / "diffusion_pytorch_model.safetensors"])
    ch = demo.AE["ch"]
    dims = {128: ch, 256: ch * demo.AE["ch_mult"][1], 512: ch * demo.AE["ch_mult"][2]}
    pats = [r"\.resnets\.(\d+)\."]
    check_against_manifest(t, manifest(manifests_dir, "vae/diffusion_pytorch_model.safetensors.json"), pats, dims)
    cfg = json.loads((demo_path / "vae" / "config.json").read_text())
    assert cfg["latent_channels"] == 16 and cfg["scaling_factor"] == 0.3611 and cfg["shift_factor"] == 0.1159
    assert cfg["use_quant_conv"] is False and cfg["use_post_quant_conv"] is False


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers (offline: conftest sets HF_HUB_OFFLINE=1)


def test_clip_tokenizer(demo_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = demo_path / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(str(folder))
    auto = AutoTokenizer.from_pretrained(str(folder))
    cfg = json.loads((demo_path / "text_encoder" / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"] == len(json.loads((folder / "vocab.json").read_text()))
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2  # eos highest: argmax pooling
    assert tok.model_max_length == 77
    ids = tok("a cat on a mat").input_ids
    assert auto("a cat on a mat").input_ids == ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    words = ids[1:-1]
    assert len(words) == 5 and len(set(words)) == 4 and words[0] == words[3]  # a / cat / on / a / mat
    assert tok.decode(ids, skip_special_tokens=True) == "a cat on a mat"
    padded = tok("a cat on a mat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[len(ids):] == [tok.eos_token_id] * (77 - len(ids))
    # byte-level BPE: anything tokenises without unk (unk is eos here)
    odd = tok("Zebra-42 ñ 🐱").input_ids
    assert tok.eos_token_id not in odd[1:-1]


def test_t5_tokenizer(demo_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    folder = demo_path / "tokenizer_2"
    tok = T5TokenizerFast.from_pretrained(str(folder))
    auto = AutoTokenizer.from_pretrained(str(folder))
    cfg = json.loads((demo_path / "text_encoder_2" / "config.json").read_text())
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 1)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 2)
    assert tok.model_max_length == 512
    assert len(tok) <= cfg["vocab_size"] < len(tok) + 128
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # sentinels at the end, reversed, as real T5
    ids = tok("a cat on a mat").input_ids
    assert auto("a cat on a mat").input_ids == ids
    assert ids[-1] == 1 and 2 not in ids and len(set(ids[:-1])) >= 4
    assert tok.decode(ids, skip_special_tokens=True) == "a cat on a mat"
    assert 2 not in tok("A Photo of New York, 1999!").input_ids


# ---------------------------------------------------------------------------------------------------------------------
# The files load with the reference libraries and give sane values


def test_text_encoders_load_with_transformers(demo_path):
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    clip, info = CLIPTextModel.from_pretrained(str(demo_path / "text_encoder"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert clip.dtype == torch.bfloat16
    tok = CLIPTokenizer.from_pretrained(str(demo_path / "tokenizer"))
    ids = tok(["a cat on a mat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = clip(ids)
    eos_pos = int((ids[0] == tok.eos_token_id).nonzero()[0])
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos_pos])  # pooled at the first eos
    assert torch.isfinite(out.last_hidden_state).all() and 0.3 < out.pooler_output.float().std() < 3

    t5, info = T5EncoderModel.from_pretrained(str(demo_path / "text_encoder_2"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    tok2 = T5TokenizerFast.from_pretrained(str(demo_path / "tokenizer_2"))
    ids = tok2(["a cat on a mat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        h = t5(ids).last_hidden_state
    assert h.shape == (1, 16, demo.T5["d_model"]) and torch.isfinite(h).all() and 0.3 < h.float().std() < 3


def _patched_diffusers_flux_converter(width):
    """diffusers' own BFL->diffusers transformer converter with its hard-coded width (3072) replaced."""
    import diffusers.loaders.single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        pytest.skip("diffusers' flux converter changed; update this test")
    ns = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {width}"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


def test_diffusers_folders_hold_the_bfl_weights(demo_path):
    """transformer/ and vae/ are the BFL files converted; the conversion equals diffusers' reference converters."""
    import diffusers.loaders.single_file_utils as sfu
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import load_file

    bfl = load_file(str(demo_path / "flux1-dev.safetensors"))
    ref = _patched_diffusers_flux_converter(demo.TRANSFORMER["hidden_size"])(dict(bfl))
    dit = FluxTransformer2DModel.from_pretrained(str(demo_path / "transformer"), torch_dtype=torch.bfloat16)
    sd = dit.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k

    ae = load_file(str(demo_path / "ae.safetensors"))
    ref = sfu.convert_ldm_vae_checkpoint(dict(ae), demo.diffusers_vae_config())
    vae = AutoencoderKL.from_pretrained(str(demo_path / "vae"), torch_dtype=torch.bfloat16)
    sd = vae.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k].reshape(sd[k].shape).to(torch.bfloat16)), k


def test_forward_values_are_sane(demo_path):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    g = torch.Generator().manual_seed(0)
    dit = FluxTransformer2DModel.from_pretrained(str(demo_path / "transformer"), torch_dtype=torch.bfloat16)
    n_img, n_txt = 8 * 8, 16
    ids = torch.zeros(8, 8, 3)
    ids[..., 1], ids[..., 2] = torch.arange(8)[:, None], torch.arange(8)[None]
    with torch.no_grad():
        v = dit(hidden_states=torch.randn(1, n_img, 64, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g).bfloat16(),
                pooled_projections=torch.randn(1, 64, generator=g).bfloat16(),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3)).sample
    assert v.shape == (1, n_img, 64) and torch.isfinite(v).all()
    assert 0.01 < v.float().std() < 2

    vae = AutoencoderKL.from_pretrained(str(demo_path / "vae"), torch_dtype=torch.float32)
    with torch.no_grad():
        img = vae.decode(torch.randn(1, 16, 8, 8, generator=g)).sample
        post = vae.encode(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1).latent_dist
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all() and 0.05 < img.std() < 3
    assert post.mean.shape == (1, 16, 8, 8) and torch.isfinite(post.mean).all() and post.logvar.abs().mean() < 5


# ---------------------------------------------------------------------------------------------------------------------
# Writing: deterministic, idempotent, atomic


def _digest(root, files):
    import hashlib

    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}


def test_deterministic_and_seeded(demo_path, tmp_path):
    files = demo.demo_files(True)
    again = demo.write_demo_model(tmp_path / "a", seed=0)
    assert _digest(again, files) == _digest(demo_path, files)
    other = demo.write_demo_model(tmp_path / "b", seed=1, diffusers_layout=False)
    d0, d1 = _digest(demo_path, demo.DEMO_FILES), _digest(other, demo.DEMO_FILES)
    assert d0["flux1-dev.safetensors"] != d1["flux1-dev.safetensors"]
    assert d0["tokenizer/vocab.json"] == d1["tokenizer/vocab.json"]  # tokenizers do not depend on the seed
    assert not (other / "transformer").exists()


def test_idempotent(tmp_path):
    p = demo.write_demo_model(tmp_path, seed=3, diffusers_layout=False)
    stamp = {f: (p / f).stat().st_mtime_ns for f in demo.DEMO_FILES}
    t0 = time.perf_counter()
    assert demo.write_demo_model(tmp_path, seed=3, diffusers_layout=False) == p
    assert time.perf_counter() - t0 < 0.5
    assert {f: (p / f).stat().st_mtime_ns for f in demo.DEMO_FILES} == stamp
    # a tree with the diffusers folders satisfies a request without them, not the reverse
    demo.write_demo_model(tmp_path, seed=3, diffusers_layout=True)
    assert all((p / f).is_file() for f in demo.demo_files(True))
    stamp = {f: (p / f).stat().st_mtime_ns for f in demo.demo_files(True)}
    demo.write_demo_model(tmp_path, seed=3, diffusers_layout=False)
    assert {f: (p / f).stat().st_mtime_ns for f in demo.demo_files(True)} == stamp
    # another seed replaces the tree
    before = (p / "ae.safetensors").read_bytes()
    demo.write_demo_model(tmp_path, seed=4, diffusers_layout=False)
    assert (p / "ae.safetensors").read_bytes() != before
    assert json.loads((p / demo.MARKER_NAME).read_text())["seed"] == 4


def test_incomplete_trees_do_not_count(tmp_path):
    p = demo.write_demo_model(tmp_path, diffusers_layout=False)
    # no marker (e.g. copied by hand, or an old partial write) -> rewritten
    (p / demo.MARKER_NAME).unlink()
    (p / "ae.safetensors").write_bytes(b"truncated")
    assert demo.write_demo_model(tmp_path, diffusers_layout=False) == p
    assert (p / demo.MARKER_NAME).is_file() and (p / "ae.safetensors").stat().st_size > 1000
    # a missing file -> rewritten
    (p / "text_encoder_2" / "model-00002-of-00002.safetensors").unlink()
    demo.write_demo_model(tmp_path, diffusers_layout=False)
    assert (p / "text_encoder_2" / "model-00002-of-00002.safetensors").is_file()
    # a marker from another demo version -> rewritten
    m = json.loads((p / demo.MARKER_NAME).read_text())
    (p / demo.MARKER_NAME).write_text(json.dumps({**m, "demo_version": -1}))
    demo.write_demo_model(tmp_path, diffusers_layout=False)
    assert json.loads((p / demo.MARKER_NAME).read_text())["demo_version"] == demo.DEMO_VERSION


def test_interrupted_write_leaves_no_model(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(demo.convert, "write_diffusers", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.write_demo_model(tmp_path)
    parent = tmp_path / "FLUX-Studio"
    assert not (parent / "FLUX.1-dev-random-demo").exists()
    assert not list(parent.glob(".FLUX.1-dev-random-demo.tmp-*"))  # cleaned up on the way out
    monkeypatch.undo()

    # a hard kill leaves a complete-looking temp tree behind: it is not the model and is swept on the next write
    leftover = parent / ".FLUX.1-dev-random-demo.tmp-99999-deadbeef"
    leftover.mkdir()
    (leftover / demo.MARKER_NAME).write_text(json.dumps(demo.demo_marker(0, True)))
    assert not demo.is_demo_complete(parent / "FLUX.1-dev-random-demo", 0, True)
    p = demo.write_demo_model(tmp_path)
    assert demo.is_demo_complete(p, 0, True)
    assert not leftover.exists()


def test_demo_is_independent_of_the_loader_and_gradio():
    src = "".join(f.read_text() for f in sorted(pathlib.Path(demo.__file__).parent.glob("*.py")))  # every module
    assert "engine.loading" not in src.replace("``engine.loading``", "") and not re.search(r"from \.+loading", src)
    assert "gradio" not in src
