"""The loader against the official FLUX.1 files, described by their manifests (every key, shape and dtype).

Nothing here holds real weights: models are built on the meta device, and the file-reading path is exercised
through header-exact sparse files (a 23.8 GB flux1-dev takes ~100 KB of disk).
"""
import json
import time

import psutil
import pytest
import torch

from tests.helpers import write_sparse_safetensors
from engine.loading import (ModelFileError, build_transformer, build_vae, convert_bfl_transformer, convert_bfl_vae,
                            detect_component, infer_transformer_config, infer_vae_config, load_models,
                            read_state_dict)
from engine.loading.text_encoders import (build_clip, build_t5, convert_clip, convert_t5, infer_clip_config,
                                          infer_t5_config)

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

# FLUX.1-dev's transformer config (diffusers' transformer/config.json, axes_dims_rope as FluxTransformer2DModel's)
DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
           attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
           guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# FLUX.1-dev's vae/config.json (diffusers AutoencoderKL)
DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
               shift_factor=0.1159, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
               mid_block_add_attention=True)

BFL_DITS = {  # manifest -> how its config differs from FLUX.1-dev's
    "FLUX.1-dev/flux1-dev.safetensors.json": {},
    "FLUX.1-Krea-dev/flux1-krea-dev.safetensors.json": {},
    "FLUX.1-Kontext-dev/flux1-kontext-dev.safetensors.json": {},
    "FLUX.1-schnell/flux1-schnell.safetensors.json": {"guidance_embeds": False},
    "FLUX.1-Fill-dev/flux1-fill-dev.safetensors.json": {"in_channels": 384, "out_channels": 64},
    "adapters/ostris--Flex.2-preview/Flex.2-preview.safetensors.json": {"in_channels": 196, "out_channels": 64,
                                                                         "num_layers": 8},
    "adapters/stepfun-ai--Step1X-Edit/step1x-edit-i1258.safetensors.json": {"guidance_embeds": False},
}


def manifest(root, rel):
    path = root / rel
    assert path.is_file(), f"manifest {rel} missing from {root}"
    return json.loads(path.read_text())


def meta_sd(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def assert_maps_onto(converted, model, tied=()):
    params = model.state_dict()
    want = set(params) - set(tied)
    assert converted.keys() == want, (sorted(want - converted.keys())[:5], sorted(converted.keys() - want)[:5])
    bad = [k for k, t in converted.items() if t.shape != params[k].shape]
    assert not bad, bad[:5]


def numel(sd):
    return sum(t.numel() for t in sd.values())


# ------------------------------------------------------------------------------------------------ transformer

@pytest.mark.parametrize("rel", list(BFL_DITS))
def test_bfl_transformer_manifest_maps_exactly(manifests_dir, rel):
    m = manifest(manifests_dir, rel)
    sd = meta_sd(m)
    role, fmt, desc = detect_component(sd)
    assert (role, fmt) == ("dit", "bfl"), desc
    cfg = infer_transformer_config(sd)
    assert cfg == {**DEV, **BFL_DITS[rel]}
    dit_sd = {k: v for k, v in sd.items() if not k.startswith("connector.")}  # Step1X's connector shares the file
    with torch.device("meta"):
        model = build_transformer(cfg)
    converted = convert_bfl_transformer(dit_sd)
    assert_maps_onto(converted, model)
    # one-to-one: the fused tensors are partitioned, nothing duplicated or dropped
    assert numel(converted) == numel(dit_sd) == sum(p.numel() for p in model.parameters())
    if "step1x" not in rel:
        assert numel(dit_sd) == m["param_count"]


def test_variants_are_told_apart_by_shapes(manifests_dir):
    fill = meta_sd(manifest(manifests_dir, "FLUX.1-Fill-dev/flux1-fill-dev.safetensors.json"))
    schnell = meta_sd(manifest(manifests_dir, "FLUX.1-schnell/flux1-schnell.safetensors.json"))
    assert "Fill" in detect_component(fill)[2] and "schnell" in detect_component(schnell)[2]
    assert infer_transformer_config(fill)["in_channels"] == 384
    assert infer_transformer_config(schnell)["guidance_embeds"] is False
    with torch.device("meta"):
        model = build_transformer(infer_transformer_config(schnell))
    assert not any("guidance" in k for k in model.state_dict())


def test_bfl_conversion_equals_the_diffusers_transformer_manifest(manifests_dir):
    bfl = convert_bfl_transformer(meta_sd(manifest(manifests_dir, "FLUX.1-dev/flux1-dev.safetensors.json")))
    diff = meta_sd(manifest(manifests_dir, "FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors.json"))
    assert bfl.keys() == diff.keys()
    assert all(bfl[k].shape == diff[k].shape for k in bfl)


def test_diffusers_transformer_manifest(manifests_dir):
    sd = meta_sd(manifest(manifests_dir, "FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors.json"))
    assert detect_component(sd)[:2] == ("dit", "diffusers")
    cfg = infer_transformer_config(sd)
    assert cfg == DEV
    with torch.device("meta"):
        assert_maps_onto(sd, build_transformer(cfg))


def _row_distinct(shape, offset, dtype=torch.int16):
    """A tensor whose rows all differ (and differ from other keys'), O(rows) memory until something copies it."""
    rows = (torch.arange(shape[0], dtype=torch.int32) + offset) % 32768
    return rows.to(dtype).reshape(-1, *([1] * (len(shape) - 1))).expand(*shape)


def test_transformer_values_match_diffusers_converter_at_full_width(manifests_dir):
    """Value parity with diffusers' own BFL converter at the real width 3072, on blocks 0-1 and all other keys."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as reference

    m = manifest(manifests_dir, "FLUX.1-dev/flux1-dev.safetensors.json")
    keep = [k for k in sorted(m["tensors"]) if not k.startswith(("double_blocks.", "single_blocks."))
            or k.split(".")[1] in ("0", "1")]
    sd = {k: _row_distinct(m["tensors"][k]["shape"], 1009 * i) for i, k in enumerate(keep)}
    theirs = reference(dict(sd))  # it pops from its argument
    mine = convert_bfl_transformer(sd)
    assert mine.keys() == theirs.keys()
    assert len([k for k in mine if k.startswith("transformer_blocks.1.")]) == 32
    for k in theirs:
        assert mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]), k
    # the fused projections really are split (not just renamed) and the final modulation halves swapped
    assert not torch.equal(mine["transformer_blocks.0.attn.to_q.weight"], mine["transformer_blocks.0.attn.to_k.weight"])
    w = sd["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(mine["norm_out.linear.weight"][:3072], w[3072:])


# ------------------------------------------------------------------------------------------------ VAE

@pytest.mark.parametrize("rel", ["FLUX.1-dev/ae.safetensors.json", "adapters/stepfun-ai--Step1X-Edit/vae.safetensors.json"])
def test_bfl_ae_manifest_maps_exactly(manifests_dir, rel):
    sd = meta_sd(manifest(manifests_dir, rel))
    assert detect_component(sd)[:2] == ("vae", "bfl")
    cfg = infer_vae_config(sd)
    assert cfg == DEV_VAE
    with torch.device("meta"):
        model = build_vae(cfg)
    converted = convert_bfl_vae(sd)
    assert_maps_onto(converted, model)
    diff = meta_sd(manifest(manifests_dir, "FLUX.1-dev/vae/diffusion_pytorch_model.safetensors.json"))
    assert converted.keys() == diff.keys() and all(converted[k].shape == diff[k].shape for k in diff)
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)  # 1x1 conv -> Linear


def test_diffusers_vae_manifest(manifests_dir):
    sd = meta_sd(manifest(manifests_dir, "FLUX.1-dev/vae/diffusion_pytorch_model.safetensors.json"))
    assert detect_component(sd)[:2] == ("vae", "diffusers")
    cfg = infer_vae_config(sd)
    assert cfg == DEV_VAE
    with torch.device("meta"):
        assert_maps_onto(sd, build_vae(cfg))


def test_vae_values_match_diffusers_converter(manifests_dir):
    """Value parity with diffusers' convert_ldm_vae_checkpoint on the whole ae.safetensors layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint as reference

    m = manifest(manifests_dir, "FLUX.1-dev/ae.safetensors.json")
    sd = {k: _row_distinct(v["shape"], 997 * i, torch.float32) for i, (k, v) in enumerate(sorted(m["tensors"].items()))}
    theirs = reference(dict(sd), {"down_block_types": DEV_VAE["down_block_types"],
                                  "up_block_types": DEV_VAE["up_block_types"]})
    mine = convert_bfl_vae(sd)
    assert mine.keys() == theirs.keys()
    for k in theirs:
        assert mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]), k
    # the decoder levels are reversed: BFL up.3 (lowest resolution) is diffusers up_blocks.0
    assert torch.equal(mine["decoder.up_blocks.0.resnets.0.conv1.weight"], sd["decoder.up.3.block.0.conv1.weight"])


# ------------------------------------------------------------------------------------------------ text encoders

def test_clip_manifest(manifests_dir):
    sd = meta_sd(manifest(manifests_dir, "FLUX.1-dev/text_encoder/model.safetensors.json"))
    assert detect_component(sd)[:2] == ("text_encoder_1", "transformers")
    cfg = infer_clip_config(sd)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size,
            cfg.max_position_embeddings, cfg.hidden_act, cfg.eos_token_id) == (
        768, 12, 12, 3072, 49408, 77, "quick_gelu", 2)
    with torch.device("meta"):
        model = build_clip(cfg)
    assert not any(k.startswith("text_model.") for k in model.state_dict())  # transformers 5 layout
    assert_maps_onto(convert_clip(sd), model)


def test_t5_manifest(manifests_dir):
    sd = meta_sd(manifest(manifests_dir, "FLUX.1-dev/text_encoder_2/model.safetensors.json"))
    assert detect_component(sd)[:2] == ("text_encoder_2", "transformers")
    assert "encoder.embed_tokens.weight" not in sd
    cfg = infer_t5_config(sd)
    assert (cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers, cfg.vocab_size, cfg.feed_forward_proj,
            cfg.relative_attention_num_buckets) == (4096, 10240, 64, 64, 24, 32128, "gated-gelu", 32)
    with torch.device("meta"):
        model = build_t5(cfg)
    assert_maps_onto(convert_t5(sd), model, tied=["encoder.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------------ other files

@pytest.mark.parametrize("rel,role", [
    ("loras/kohya-flux1-dev-r16.safetensors.json", "lora"),
    ("loras/diffusers-peft-flux1-dev-r16.safetensors.json", "lora"),
    ("adapters/InstantX--FLUX.1-dev-Controlnet-Union-alpha/diffusion_pytorch_model.safetensors.json", "controlnet"),
    ("adapters/alimama-creative--FLUX.1-dev-Controlnet-Inpainting-Beta/diffusion_pytorch_model.safetensors.json",
     "controlnet"),
    ("adapters/InstantX--FLUX.1-dev-IP-Adapter/ip-adapter.bin.json", "ip_adapter"),
    ("adapters/google--siglip-so400m-patch14-384/model.safetensors.json", "image_encoder"),
    ("adapters/black-forest-labs--FLUX.1-Redux-dev/image_embedder/diffusion_pytorch_model.safetensors.json",
     "flux_redux_image_embedder"),
    ("adapters/Qwen--Qwen2.5-VL-7B-Instruct/model.safetensors.json", "unknown"),
])
def test_non_base_files_are_not_mistaken_for_components(manifests_dir, rel, role):
    assert detect_component(list(manifest(manifests_dir, rel)["tensors"]))[0] == role


# ------------------------------------------------------------------------------------------------ sparse files

def write_sparse_shards(tensors, folder, stem, n):
    """``n`` sparse shards plus ``<stem>.safetensors.index.json``, keys dealt round-robin (not by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        write_sparse_safetensors(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def sparse_dev(manifests_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("FLUX.1-dev")
    t = lambda rel: manifest(manifests_dir, rel)["tensors"]  # noqa: E731
    write_sparse_safetensors(t("FLUX.1-dev/flux1-dev.safetensors.json"), root / "flux1-dev.safetensors")
    write_sparse_safetensors(t("FLUX.1-dev/ae.safetensors.json"), root / "ae.safetensors")
    (root / "text_encoder").mkdir()
    write_sparse_safetensors(t("FLUX.1-dev/text_encoder/model.safetensors.json"), root / "text_encoder" / "model.safetensors")
    write_sparse_shards(t("FLUX.1-dev/text_encoder_2/model.safetensors.json"), root / "text_encoder_2", "model", 2)
    write_sparse_shards(t("FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors.json"), root / "transformer",
                        "diffusion_pytorch_model", 3)
    (root / "vae").mkdir()
    write_sparse_safetensors(t("FLUX.1-dev/vae/diffusion_pytorch_model.safetensors.json"),
                 root / "vae" / "diffusion_pytorch_model.safetensors")
    return root


def _rss():
    return psutil.Process().memory_info().rss


def test_full_size_files_load_through_the_real_reading_path(sparse_dev):
    root = sparse_dev
    assert (root / "flux1-dev.safetensors").stat().st_size > 23e9  # the real size...
    rss, t0 = _rss(), time.perf_counter()
    out = load_models([root / "flux1-dev.safetensors", root / "ae.safetensors", root / "text_encoder",
                       root / "text_encoder_2"], device="meta")
    elapsed, grown = time.perf_counter() - t0, _rss() - rss
    assert elapsed < 30 and grown < 1.5e9, (elapsed, grown)  # ...of which nothing was read
    assert sorted(out) == ["dit", "text_encoder_1", "text_encoder_2", "vae"]
    dit, vae, te1, te2 = out["dit"], out["vae"], out["text_encoder_1"], out["text_encoder_2"]
    assert type(dit).__name__ == "FluxTransformer2DModel" and dit.flux_studio_format == "bfl"
    assert {k: dit.config[k] for k in DEV if k != "axes_dims_rope"} == {k: v for k, v in DEV.items()
                                                                       if k != "axes_dims_rope"}
    assert sum(p.numel() for p in dit.parameters()) == 11_901_408_320
    assert vae.config.block_out_channels == (128, 256, 512, 512) or list(vae.config.block_out_channels) == [128, 256,
                                                                                                           512, 512]
    assert vae.flux_studio_format == "bfl" and vae.dtype == torch.bfloat16  # F32 file, cast to the requested dtype
    assert te1.config.num_hidden_layers == 12 and te2.config.num_layers == 24
    assert te2.encoder.embed_tokens.weight is te2.shared.weight
    assert len(te2.flux_studio_files) == 2
    for module in out.values():
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        assert all(p.device.type == "meta" for p in module.parameters())


def test_diffusers_folders_load_through_their_index(sparse_dev):
    out = load_models([sparse_dev / "transformer", sparse_dev / "vae"], device="meta", torch_dtype=torch.float16)
    assert out["dit"].flux_studio_format == "diffusers" and len(out["dit"].flux_studio_files) == 3
    assert out["dit"].config.num_single_layers == 38 and out["dit"].dtype == torch.float16
    assert out["vae"].flux_studio_format == "diffusers" and out["vae"].config.latent_channels == 16


def test_sparse_file_reads_lazily_as_zeros(sparse_dev):
    rss = _rss()
    sd = read_state_dict(sparse_dev / "ae.safetensors")  # memory-mapped: 335 MB of F32 tensors
    assert len(sd) == 244 and sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.conv_in.weight"].dtype == torch.float32
    assert _rss() - rss < 150e6
    assert not sd["decoder.conv_out.bias"].any()
    meta = read_state_dict(sparse_dev / "flux1-dev.safetensors", device="meta")  # headers only
    assert meta["img_in.weight"].shape == (3072, 64) and meta["img_in.weight"].is_meta


def test_two_transformers_at_once_is_an_error_naming_both(sparse_dev):
    with pytest.raises(ModelFileError) as e:
        load_models([sparse_dev / "flux1-dev.safetensors", sparse_dev / "transformer"], device="meta")
    assert "flux1-dev.safetensors" in str(e.value) and "transformer" in str(e.value)
