"""load_models on small random checkpoints written in the official layouts, and on broken files.

The small files go through exactly the code the real ones do (the architecture is read from the shapes), so a
round trip here - file -> load_models -> parameters and a forward pass - checks the real loading path.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.loading import ModelFileError, convert_bfl_transformer, detect_component, load_models, read_state_dict

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


# ------------------------------------------------------------------------------------------------ tiny files

def bfl_transformer_shapes(hidden=64, head_dim=32, in_ch=64, out_ch=64, txt=32, vec=32, depth=2, single=2,
                           guidance=True):
    """Every key and shape of BFL's ``Flux`` state dict (src/flux/model.py), at any width."""
    h, mlp = hidden, 4 * hidden
    s = {"img_in.weight": [h, in_ch], "img_in.bias": [h], "txt_in.weight": [h, txt], "txt_in.bias": [h]}
    embedders = [("time_in", 256), ("vector_in", vec)] + ([("guidance_in", 256)] if guidance else [])
    for name, cols in embedders:
        s |= {f"{name}.in_layer.weight": [h, cols], f"{name}.in_layer.bias": [h],
              f"{name}.out_layer.weight": [h, h], f"{name}.out_layer.bias": [h]}
    for i in range(depth):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            s |= {p + "mod.lin.weight": [6 * h, h], p + "mod.lin.bias": [6 * h],
                  p + "attn.qkv.weight": [3 * h, h], p + "attn.qkv.bias": [3 * h],
                  p + "attn.norm.query_norm.scale": [head_dim], p + "attn.norm.key_norm.scale": [head_dim],
                  p + "attn.proj.weight": [h, h], p + "attn.proj.bias": [h],
                  p + "mlp.0.weight": [mlp, h], p + "mlp.0.bias": [mlp], p + "mlp.2.weight": [h, mlp],
                  p + "mlp.2.bias": [h]}
    for i in range(single):
        p = f"single_blocks.{i}."
        s |= {p + "linear1.weight": [3 * h + mlp, h], p + "linear1.bias": [3 * h + mlp],
              p + "linear2.weight": [h, h + mlp], p + "linear2.bias": [h],
              p + "norm.query_norm.scale": [head_dim], p + "norm.key_norm.scale": [head_dim],
              p + "modulation.lin.weight": [3 * h, h], p + "modulation.lin.bias": [3 * h]}
    s |= {"final_layer.linear.weight": [out_ch, h], "final_layer.linear.bias": [out_ch],
          "final_layer.adaLN_modulation.1.weight": [2 * h, h], "final_layer.adaLN_modulation.1.bias": [2 * h]}
    return s


def bfl_ae_shapes(ch=32, mult=(1, 2, 2, 2), res=1, z=16, io=3):
    """Every key and shape of BFL's ``AutoEncoder`` (src/flux/modules/autoencoder.py)."""
    s = {}

    def resnet(p, cin, cout):
        s.update({p + "norm1.weight": [cin], p + "norm1.bias": [cin], p + "conv1.weight": [cout, cin, 3, 3],
                  p + "conv1.bias": [cout], p + "norm2.weight": [cout], p + "norm2.bias": [cout],
                  p + "conv2.weight": [cout, cout, 3, 3], p + "conv2.bias": [cout]})
        if cin != cout:
            s.update({p + "nin_shortcut.weight": [cout, cin, 1, 1], p + "nin_shortcut.bias": [cout]})

    def mid(p, c):
        resnet(p + "block_1.", c, c)
        s.update({p + "attn_1.norm.weight": [c], p + "attn_1.norm.bias": [c]})
        for n in ("q", "k", "v", "proj_out"):
            s.update({f"{p}attn_1.{n}.weight": [c, c, 1, 1], f"{p}attn_1.{n}.bias": [c]})
        resnet(p + "block_2.", c, c)

    s.update({"encoder.conv_in.weight": [ch, io, 3, 3], "encoder.conv_in.bias": [ch]})
    cin = ch
    for i, m in enumerate(mult):
        for j in range(res):
            resnet(f"encoder.down.{i}.block.{j}.", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            s.update({f"encoder.down.{i}.downsample.conv.weight": [cin, cin, 3, 3],
                      f"encoder.down.{i}.downsample.conv.bias": [cin]})
    mid("encoder.mid.", cin)
    s.update({"encoder.norm_out.weight": [cin], "encoder.norm_out.bias": [cin],
              "encoder.conv_out.weight": [2 * z, cin, 3, 3], "encoder.conv_out.bias": [2 * z]})
    s.update({"decoder.conv_in.weight": [cin, z, 3, 3], "decoder.conv_in.bias": [cin]})
    mid("decoder.mid.", cin)
    for i in reversed(range(len(mult))):  # BFL: up.{i} is level i; built from the lowest resolution up
        for j in range(res + 1):
            resnet(f"decoder.up.{i}.block.{j}.", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            s.update({f"decoder.up.{i}.upsample.conv.weight": [cin, cin, 3, 3],
                      f"decoder.up.{i}.upsample.conv.bias": [cin]})
    s.update({"decoder.norm_out.weight": [cin], "decoder.norm_out.bias": [cin],
              "decoder.conv_out.weight": [io, cin, 3, 3], "decoder.conv_out.bias": [io]})
    return s


def clip_shapes(hidden=64, layers=2, inter=128, vocab=100, positions=16):
    s = {"text_model.embeddings.token_embedding.weight": [vocab, hidden],
         "text_model.embeddings.position_embedding.weight": [positions, hidden],
         "text_model.final_layer_norm.weight": [hidden], "text_model.final_layer_norm.bias": [hidden]}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s |= {f"{p}self_attn.{n}.weight": [hidden, hidden], f"{p}self_attn.{n}.bias": [hidden]}
        s |= {p + "layer_norm1.weight": [hidden], p + "layer_norm1.bias": [hidden], p + "layer_norm2.weight": [hidden],
              p + "layer_norm2.bias": [hidden], p + "mlp.fc1.weight": [inter, hidden], p + "mlp.fc1.bias": [inter],
              p + "mlp.fc2.weight": [hidden, inter], p + "mlp.fc2.bias": [hidden]}
    return s


def t5_shapes(d=64, ff=128, heads=4, d_kv=16, layers=2, vocab=100, buckets=32):
    inner = heads * d_kv
    s = {"shared.weight": [vocab, d], "encoder.final_layer_norm.weight": [d],
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": [buckets, heads]}
    for i in range(layers):
        p = f"encoder.block.{i}.layer."
        s |= {p + "0.SelfAttention.q.weight": [inner, d], p + "0.SelfAttention.k.weight": [inner, d],
              p + "0.SelfAttention.v.weight": [inner, d], p + "0.SelfAttention.o.weight": [d, inner],
              p + "0.layer_norm.weight": [d], p + "1.DenseReluDense.wi_0.weight": [ff, d],
              p + "1.DenseReluDense.wi_1.weight": [ff, d], p + "1.DenseReluDense.wo.weight": [d, ff],
              p + "1.layer_norm.weight": [d]}
    return s


def random_sd(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v, generator=g) * 0.2).to(dtype) for k, v in sorted(shapes.items())}


def test_shape_helpers_match_the_official_key_sets(manifests_dir):
    """The tiny files below are honest stand-ins: at full size their key sets and shapes equal the manifests'."""
    def shapes(rel):
        return {k: v["shape"] for k, v in json.loads((manifests_dir / rel).read_text())["tensors"].items()}
    assert bfl_transformer_shapes(3072, 128, 64, 64, 4096, 768, 19, 38) == shapes("FLUX.1-dev/flux1-dev.safetensors.json")
    assert bfl_ae_shapes(128, (1, 2, 4, 4), 2) == shapes("FLUX.1-dev/ae.safetensors.json")
    assert clip_shapes(768, 12, 3072, 49408, 77) == shapes("FLUX.1-dev/text_encoder/model.safetensors.json")
    assert t5_shapes(4096, 10240, 64, 64, 24, 32128) == shapes("FLUX.1-dev/text_encoder_2/model.safetensors.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny official-layout files: BFL DiT and ae in each dtype, CLIP-L folder, T5 folder with 2 shards + index."""
    root = tmp_path_factory.mktemp("tiny")
    files = {}
    for name, dt in DTYPES.items():
        files[f"dit_{name}"] = root / f"dit_{name}.safetensors"
        save_file(random_sd(bfl_transformer_shapes(), dt, 1), files[f"dit_{name}"])
        files[f"ae_{name}"] = root / f"ae_{name}.safetensors"
        save_file(random_sd(bfl_ae_shapes(), dt, 2), files[f"ae_{name}"])
    (root / "text_encoder").mkdir()
    save_file(random_sd(clip_shapes(), torch.bfloat16, 3), root / "text_encoder" / "model.safetensors")
    te2 = root / "text_encoder_2"
    te2.mkdir()
    sd = random_sd(t5_shapes(), torch.bfloat16, 4)
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[1::2], keys[0::2])):  # shard membership by the index only
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, te2 / name)
        weight_map |= {k: name for k in part}
    (te2 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files["text_encoder"], files["text_encoder_2"], files["root"] = root / "text_encoder", te2, root
    return files


# ------------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("stored", list(DTYPES))
def test_tiny_transformer_round_trip(tiny, stored):
    path = tiny[f"dit_{stored}"]
    file_sd = read_state_dict(path)
    assert file_sd["img_in.weight"].dtype == DTYPES[stored]
    dit = load_models([path], torch_dtype=torch.float32)["dit"]
    assert type(dit).__name__ == "FluxTransformer2DModel"
    assert (dit.flux_studio_format, dit.flux_studio_files) == ("bfl", [str(path)])
    assert dit.config.num_attention_heads == 2 and dit.config.attention_head_dim == 32
    assert tuple(dit.config.axes_dims_rope) == (4, 14, 14)
    assert not dit.training and all(not p.requires_grad and p.dtype == torch.float32 for p in dit.parameters())

    f = {k: v.float() for k, v in file_sd.items()}  # the file's values; loading to float32 is exact
    b0, s1 = dit.transformer_blocks[0], dit.single_transformer_blocks[1]
    qkv = f["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(b0.attn.to_q.weight, qkv[:64]) and torch.equal(b0.attn.to_v.weight, qkv[128:])
    assert torch.equal(b0.attn.add_k_proj.bias, f["double_blocks.0.txt_attn.qkv.bias"][64:128])
    assert torch.equal(b0.attn.norm_added_q.weight, f["double_blocks.0.txt_attn.norm.query_norm.scale"])
    assert torch.equal(b0.ff_context.net[2].weight, f["double_blocks.0.txt_mlp.2.weight"])
    lin1 = f["single_blocks.1.linear1.weight"]
    assert torch.equal(s1.attn.to_k.weight, lin1[64:128]) and torch.equal(s1.proj_mlp.weight, lin1[192:])
    mod = f["final_layer.adaLN_modulation.1.bias"]  # BFL (shift, scale) -> diffusers (scale, shift)
    assert torch.equal(dit.norm_out.linear.bias, torch.cat([mod[64:], mod[:64]]))
    assert torch.equal(dit.time_text_embed.guidance_embedder.linear_1.weight, f["guidance_in.in_layer.weight"])
    # every parameter is its file tensor through the mapping
    expected = convert_bfl_transformer(f)
    assert all(torch.equal(p, expected[k]) for k, p in dit.state_dict().items())

    g = torch.Generator().manual_seed(0)
    out = dit(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
              return_dict=False)[0]
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_transformer_loads_in_the_requested_dtype_and_matches_across_stored_dtypes(tiny):
    a = load_models([tiny["dit_F32"]])["dit"]  # default bfloat16
    assert a.dtype == torch.bfloat16 and a.x_embedder.weight.dtype == torch.bfloat16
    b = load_models([tiny["dit_BF16"]], torch_dtype=torch.float16)["dit"]
    assert b.x_embedder.weight.dtype == torch.float16
    file_bf16 = read_state_dict(tiny["dit_BF16"])
    assert torch.equal(b.x_embedder.weight, file_bf16["img_in.weight"].to(torch.float16))


def test_diffusers_save_loads_back_identically(tiny, tmp_path):
    """The diffusers-layout path against diffusers' own loader: save_pretrained -> load_models == from_pretrained."""
    from diffusers import FluxTransformer2DModel

    dit = load_models([tiny["dit_F32"]], torch_dtype=torch.float32)["dit"]
    dit.save_pretrained(tmp_path / "transformer", max_shard_size="300KB")  # sharded, with an index
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_models([tmp_path / "transformer"], torch_dtype=torch.float32)["dit"]
    ref = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.float32)
    assert ours.flux_studio_format == "diffusers" and len(ours.flux_studio_files) > 1
    def public(cfg):
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items() if not k.startswith("_")}
    assert public(ours.config) == public(ref.config)
    rs = ref.state_dict()
    assert all(torch.equal(p, rs[k]) for k, p in ours.state_dict().items())


@pytest.mark.parametrize("stored", list(DTYPES))
def test_tiny_ae_round_trip(tiny, stored):
    path = tiny[f"ae_{stored}"]
    f = {k: v.float() for k, v in read_state_dict(path).items()}
    vae = load_models([path], torch_dtype=torch.float32)["vae"]
    assert type(vae).__name__ == "AutoencoderKL" and vae.flux_studio_format == "bfl"
    assert tuple(vae.config.block_out_channels) == (32, 64, 64, 64) and vae.config.layers_per_block == 1
    assert (vae.config.scaling_factor, vae.config.shift_factor, vae.config.latent_channels) == (0.3611, 0.1159, 16)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    # decoder levels reversed: BFL up.3 (first to run) is diffusers up_blocks[0]
    assert torch.equal(vae.decoder.up_blocks[0].resnets[1].conv2.weight, f["decoder.up.3.block.1.conv2.weight"])
    assert torch.equal(vae.decoder.up_blocks[3].resnets[0].conv_shortcut.weight, f["decoder.up.0.block.0.nin_shortcut.weight"])
    assert torch.equal(vae.decoder.up_blocks[2].upsamplers[0].conv.bias, f["decoder.up.1.upsample.conv.bias"])
    assert torch.equal(vae.encoder.down_blocks[1].resnets[0].conv_shortcut.bias, f["encoder.down.1.block.0.nin_shortcut.bias"])
    attn = vae.encoder.mid_block.attentions[0]  # 1x1 conv -> Linear
    assert torch.equal(attn.to_q.weight, f["encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(attn.to_out[0].weight, f["encoder.mid.attn_1.proj_out.weight"][:, :, 0, 0])
    assert torch.equal(vae.decoder.conv_norm_out.weight, f["decoder.norm_out.weight"])

    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = vae.encode(img).latent_dist.mean
    assert latent.shape == (1, 16, 4, 4)
    out = vae.decode(latent).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_vae_attention_matches_bfl_formula(tiny):
    """The mid attention computed from the file's 1x1 convs by hand (as BFL's AttnBlock does) equals the loaded one."""
    f = {k: v.float() for k, v in read_state_dict(tiny["ae_F32"]).items()}
    vae = load_models([tiny["ae_F32"]], torch_dtype=torch.float32)["vae"]
    x = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(1))
    p = "encoder.mid.attn_1."
    h = torch.nn.functional.group_norm(x, 32, f[p + "norm.weight"], f[p + "norm.bias"], eps=1e-6)
    q, k, v = (torch.nn.functional.conv2d(h, f[p + n + ".weight"], f[p + n + ".bias"]) for n in "qkv")
    q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))  # b, hw, c
    a = torch.softmax(q @ k.transpose(1, 2) / 64 ** 0.5, dim=-1) @ v
    a = a.transpose(1, 2).reshape(1, 64, 4, 4)
    ref = x + torch.nn.functional.conv2d(a, f[p + "proj_out.weight"], f[p + "proj_out.bias"])
    ours = vae.encoder.mid_block.attentions[0](x)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_text_encoders_round_trip_against_transformers_from_pretrained(tiny, tmp_path):
    from transformers import CLIPTextModel, T5EncoderModel

    out = load_models([tiny["text_encoder"], tiny["text_encoder_2"]], torch_dtype=torch.float32)
    clip, t5 = out["text_encoder_1"], out["text_encoder_2"]
    assert clip.flux_studio_format == t5.flux_studio_format == "transformers"
    assert clip.config.eos_token_id == 2 and clip.config.hidden_act == "quick_gelu"
    assert t5.encoder.embed_tokens.weight is t5.shared.weight  # re-tied
    assert len(t5.flux_studio_files) == 2

    # reference: transformers' own loader on the same files (with the config we inferred written beside them)
    for model, src, cls in ((clip, tiny["text_encoder"], CLIPTextModel), (t5, tiny["text_encoder_2"], T5EncoderModel)):
        ref_dir = tmp_path / src.name
        ref_dir.mkdir()
        for p in src.iterdir():
            (ref_dir / p.name).symlink_to(p)
        model.config.save_pretrained(ref_dir)
        ref = cls.from_pretrained(ref_dir, dtype=torch.float32).eval()
        ids = torch.tensor([[0, 5, 17, 42, 99, 2, 1, 1]])  # CLIP: eos id 99 = largest -> pooled there
        with torch.no_grad():
            ours_out, ref_out = model(input_ids=ids), ref(input_ids=ids)
        assert torch.allclose(ours_out.last_hidden_state, ref_out.last_hidden_state, atol=1e-6)
        if cls is CLIPTextModel:
            assert torch.equal(ours_out.pooler_output, ours_out.last_hidden_state[:, 4])
            assert torch.allclose(ours_out.pooler_output, ref_out.pooler_output, atol=1e-6)


def test_config_json_beside_the_weights_is_preferred(tiny, tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny["text_encoder"] / "model.safetensors")
    cfg = {"model_type": "clip_text_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 16, "hidden_act": "gelu",
           "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    clip = load_models([folder / "model.safetensors"])["text_encoder_1"]
    assert clip.config.num_attention_heads == 4 and clip.config.hidden_act == "gelu"  # inference alone gives 1, quick_gelu


def test_config_json_that_does_not_fit_is_named(tiny, tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny["text_encoder"] / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "hidden_size": 128,
                                                    "num_attention_heads": 2, "num_hidden_layers": 2}))
    with pytest.raises(ModelFileError) as e:
        load_models([folder])
    assert str(folder / "config.json") in str(e.value) and "wrong shape" in str(e.value)


def test_all_four_at_once_with_expect(tiny):
    files = [tiny["dit_BF16"], tiny["ae_F32"], tiny["text_encoder"], tiny["text_encoder_2"] / "model-00002-of-00002.safetensors"]
    expect = {str(tiny["dit_BF16"]): "dit", str(tiny["ae_F32"]): "vae", str(tiny["text_encoder"]): "text_encoder_1",
              str(tiny["text_encoder_2"] / "model-00002-of-00002.safetensors"): "text_encoder_2"}
    out = load_models(files, expect=expect)
    assert sorted(out) == ["dit", "text_encoder_1", "text_encoder_2", "vae"]
    assert len(out["text_encoder_2"].flux_studio_files) == 2  # one shard named: its whole set, through the index
    assert all(m.dtype == torch.bfloat16 for m in out.values())


def test_step1x_style_file_loads_its_dit_and_leaves_the_connector(tiny, tmp_path):
    sd = random_sd(bfl_transformer_shapes(guidance=False), torch.bfloat16, 5)
    sd |= {"connector.global_proj_out.weight": torch.zeros(32, 48), "connector.scale_factor": torch.ones(1)}
    save_file(sd, tmp_path / "step1x.safetensors")
    role, fmt, desc = detect_component(sd)
    assert (role, fmt) == ("dit", "bfl") and "connector" in desc
    dit = load_models([tmp_path / "step1x.safetensors"])["dit"]
    assert dit.config.guidance_embeds is False


# ------------------------------------------------------------------------------------------------ bad files

def _expect_error(path, role="dit", *words):
    with pytest.raises(ModelFileError) as e:
        load_models([path], expect={str(path): role})
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_file(tiny, tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    data = tiny["dit_BF16"].read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _expect_error(path, "dit", "is truncated", "Download it again", "FLUX transformer (DiT)")


def test_truncated_inside_the_header(tiny, tmp_path):
    path = tmp_path / "ae.safetensors"
    path.write_bytes(tiny["ae_F32"].read_bytes()[:100])
    _expect_error(path, "vae", "not a valid .safetensors", "the FLUX VAE")


def test_garbage_bytes(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(bytes(range(256)) * 40)
    _expect_error(path, "dit", "not a valid .safetensors", "FLUX transformer (DiT)")


def test_empty_file(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(b"")
    _expect_error(path, "dit", "empty", "FLUX transformer (DiT)")


def test_json_file(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    path.write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "in_channels": 64}))
    _expect_error(path, "dit", "JSON", "FLUX transformer (DiT)")
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    _expect_error(cfg, "vae", "JSON", "the FLUX VAE")
    index = tmp_path / "model_index.json"  # a diffusers repository's root file
    index.write_text(json.dumps({"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    _expect_error(index, "vae", "is a JSON file", "the FLUX VAE")


def test_lfs_pointer(tmp_path):
    path = tmp_path / "ae.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 335304388\n")
    _expect_error(path, "vae", "Git LFS pointer")


def test_wrong_component_in_a_slot(tiny):
    msg = _expect_error(tiny["ae_F32"], "dit")
    assert f"{tiny['ae_F32']} holds a FLUX VAE (BFL ae layout), but this slot expects the FLUX transformer (DiT)" in msg
    msg = _expect_error(tiny["text_encoder_2"], "text_encoder_1", "T5 encoder", "CLIP-L")


def test_unrecognised_keys(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError) as e:
        load_models([path])
    assert str(path) in str(e.value) and "does not recognise" in str(e.value) and "foo.weight" in str(e.value)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    sd = random_sd(bfl_transformer_shapes(), torch.bfloat16)
    del sd["double_blocks.1.txt_mlp.2.bias"]
    save_file(sd, tmp_path / "incomplete.safetensors")
    with pytest.raises(ModelFileError) as e:
        load_models([tmp_path / "incomplete.safetensors"])
    assert "incomplete.safetensors" in str(e.value) and "double_blocks.1.txt_mlp.2.bias" in str(e.value)

    sd = random_sd(bfl_transformer_shapes(), torch.bfloat16)
    sd["single_blocks.0.linear2.weight"] = torch.zeros(64, 100)
    save_file(sd, tmp_path / "misshapen.safetensors")
    with pytest.raises(ModelFileError) as e:
        load_models([tmp_path / "misshapen.safetensors"])
    assert "misshapen.safetensors" in str(e.value) and "single_transformer_blocks.0.proj_out.weight" in str(e.value)

    sd = random_sd(bfl_transformer_shapes(), torch.bfloat16)
    sd["double_blocks.0.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(ModelFileError) as e:
        load_models([tmp_path / "extra.safetensors"])
    assert "double_blocks.0.extra.weight" in str(e.value)


def test_missing_shard(tiny, tmp_path):
    folder = tmp_path / "text_encoder_2"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").symlink_to(tiny["text_encoder_2"] / "model-00001-of-00002.safetensors")
    with pytest.raises(ModelFileError) as e:  # no index: the shard set is known from the names
        load_models([folder / "model-00001-of-00002.safetensors"])
    assert "model-00002-of-00002.safetensors" in str(e.value) and "missing" in str(e.value)
    (folder / "model.safetensors.index.json").symlink_to(tiny["text_encoder_2"] / "model.safetensors.index.json")
    with pytest.raises(ModelFileError) as e:  # with the index
        load_models([folder], expect={str(folder): "text_encoder_2"})
    assert "model-00002-of-00002.safetensors" in str(e.value) and "T5-XXL" in str(e.value)


def test_two_files_with_the_same_role(tiny):
    with pytest.raises(ModelFileError) as e:
        load_models([tiny["ae_F32"], tiny["ae_F16"]])
    assert str(tiny["ae_F32"]) in str(e.value) and str(tiny["ae_F16"]) in str(e.value)


def test_a_lora_is_named_as_such(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}, path)
    with pytest.raises(ModelFileError) as e:
        load_models([path], expect={str(path): "dit"})
    assert "LoRA" in str(e.value) and str(path) in str(e.value)


def test_loading_works_after_errors(tiny, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 7)
    for _ in range(2):
        with pytest.raises(ModelFileError):
            load_models([bad])
        with pytest.raises(ModelFileError):
            load_models([tiny["ae_F32"]], expect={str(tiny["ae_F32"]): "dit"})
    out = load_models([tiny["dit_F16"]], torch_dtype=torch.float32)
    assert out["dit"].x_embedder.weight.device.type == "cpu" and not out["dit"].x_embedder.weight.is_meta
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the meta-device build did not leak


def test_a_file_that_does_not_fit_names_what_is_missing_extra_and_misshapen():
    """The one check both assemblers (plain and quantized files) run before assigning anything."""
    import torch

    from engine.loading.errors import ModelFileError, check_fits
    want = {"a.weight": torch.empty(4, 2), "b.weight": torch.empty(3), "c.bias": torch.empty(5)}
    check_fits({"a.weight": torch.empty(4, 2), "b.weight": torch.empty(3)}, want, left_out={"c.bias"})
    with pytest.raises(ModelFileError) as err:
        check_fits({"a.weight": torch.empty(2, 4), "d.weight": torch.empty(1)}, want)
    text = str(err.value)
    assert "2 tensor(s) the model needs are missing (b.weight, c.bias)" in text
    assert "1 tensor(s) have no place in the model (d.weight)" in text
    assert "a.weight [2, 4] (model: [4, 2])" in text
