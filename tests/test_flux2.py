"""FLUX.2 (issue 16, first step): the official files map exactly; Flux2ImagePipeline matches diffusers'
Flux2KleinPipeline and DiffSynth-Studio's formulas (written out here) on the random-weight klein 4B demo.

Manifests (../shared/checkpoint-manifests, see its README): the klein-4B/9B/base and FLUX.2-dev diffusers
transformer/, vae/ and text_encoder/ manifests are exact (key hash verified or implied by DiffSynth's); the BFL
single files (flux-2-klein-4b, flux-2-klein-9b, flux2-dev .safetensors) are INFERRED (obtained by inverting
diffusers' converter; no hash exists), so those tests say so in their ids.
"""
import json
import math
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine.flux2 import loading as L
from engine.flux2 import schedule as sch

MANIFESTS = pathlib.Path(os.environ.get("FLUX_MANIFESTS", pathlib.Path(__file__).resolve().parents[2] / "shared"
                                        / "checkpoint-manifests"))
DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64}
TRANSFORMERS = [("FLUX.2-klein-4B/transformer/diffusion_pytorch_model.safetensors.json", "exact", (5, 20, False)),
                ("FLUX.2-klein-base-4B/transformer/diffusion_pytorch_model.safetensors.json", "exact", (5, 20, False)),
                ("FLUX.2-klein-9B/transformer/diffusion_pytorch_model.safetensors.json", "exact", (8, 24, False)),
                ("FLUX.2-klein-base-9B/transformer/diffusion_pytorch_model.safetensors.json", "exact", (8, 24, False)),
                ("FLUX.2-dev/transformer/diffusion_pytorch_model.safetensors.json", "exact", (8, 48, True)),
                ("FLUX.2-klein-4B/flux-2-klein-4b.safetensors.json", "inferred", (5, 20, False)),
                ("FLUX.2-klein-9B/flux-2-klein-9b.safetensors.json", "inferred", (8, 24, False)),
                ("FLUX.2-dev/flux2-dev.safetensors.json", "inferred", (8, 48, True))]


def manifest(rel):
    path = MANIFESTS / rel
    if not path.exists():
        pytest.skip("checkpoint manifests not available")
    return json.loads(path.read_text())


def meta_sd(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def on_meta(build, tensors):
    return L.assemble(build, tensors, None, torch.device("meta"))   # raises unless one to one and shape-exact


@pytest.mark.parametrize("rel,confidence,expect", TRANSFORMERS, ids=[f"{r.split('/')[0]}-{r.split('/')[1][:14]}-{c}"
                                                                       for r, c, _ in TRANSFORMERS])
def test_transformer_manifests_map_exactly(rel, confidence, expect):
    m = manifest(rel)
    assert m["confidence"] == confidence          # the BFL single files are inferred layouts
    sd = meta_sd(m)
    role, fmt, _ = L.detect_flux2(sd)
    assert role == "dit" and fmt == ("bfl" if confidence == "inferred" else "diffusers")
    tensors = L.convert_bfl_transformer(sd) if fmt == "bfl" else sd
    cfg = L.infer_transformer_config(tensors)
    model = on_meta(lambda: L.build_transformer(cfg), tensors)
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"]) == expect
    assert sum(p.numel() for p in model.parameters()) == m["param_count"]
    if fmt == "bfl":   # our BFL mapping agrees with diffusers' single-file converter key for key, shape for shape
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
        theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))
        assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in tensors.items()}


def test_flux1_files_are_named_as_such():
    for rel in ("FLUX.1-dev/flux1-dev.safetensors.json",
                "FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors.json"):
        role, _, desc = L.detect_flux2(meta_sd(manifest(rel)))
        assert role == "unknown" and "FLUX.1" in desc
    assert L.detect_flux2(meta_sd(manifest("FLUX.1-dev/ae.safetensors.json")))[0] == "unknown"


def test_bfl_final_layer_halves_are_swapped_and_qkv_split():
    d = 8
    sd = {"final_layer.adaLN_modulation.1.weight": torch.arange(2 * d * 3.).view(2 * d, 3),
          "double_blocks.0.img_attn.qkv.weight": torch.arange(3 * d * 2.).view(3 * d, 2)}
    out = L.convert_bfl_transformer(sd)
    shift, scale = sd["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(out["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert torch.equal(out["transformer_blocks.0.attn.to_k.weight"], sd["double_blocks.0.img_attn.qkv.weight"][d:2 * d])


def test_vae_manifests_map_exactly():
    for rel in ("FLUX.2-klein-4B/vae/diffusion_pytorch_model.safetensors.json",
                "FLUX.2-klein-9B/vae/diffusion_pytorch_model.safetensors.json",
                "FLUX.2-dev/vae/diffusion_pytorch_model.safetensors.json"):
        m = manifest(rel)
        sd = meta_sd(m)
        assert L.detect_flux2(sd)[:2] == ("vae", "diffusers")
        cfg = L.infer_vae_config(sd)
        assert cfg["latent_channels"] == 32 and cfg["patch_size"] == (2, 2)
        assert cfg["block_out_channels"] == (128, 256, 512, 512)
        on_meta(lambda: L.build_vae(cfg), sd)      # incl. bn.running_mean/var [128] and bn.num_batches_tracked


@pytest.mark.parametrize("rel,hidden,tied", [("FLUX.2-klein-4B/text_encoder/model.safetensors.json", 2560, True),
                                             ("FLUX.2-klein-9B/text_encoder/model.safetensors.json", 4096, False)])
def test_qwen3_manifests_map_exactly(rel, hidden, tied):
    from transformers import Qwen3ForCausalLM
    sd = meta_sd(manifest(rel))
    assert L.detect_flux2(sd)[:2] == ("text_encoder", "qwen3")
    conf = L.infer_qwen3_config(sd)
    assert (conf.hidden_size, conf.num_hidden_layers, conf.tie_word_embeddings) == (hidden, 36, tied)
    tensors, unused = L.convert_qwen3(sd)
    on_meta(lambda: L.build_qwen3(conf), tensors)
    assert unused == ([] if tied else ["lm_head.weight"])
    with torch.device("meta"):   # the file is exactly transformers' Qwen3ForCausalLM (a tied lm_head is not stored)
        full = Qwen3ForCausalLM(conf).state_dict()
    assert set(sd) == set(full) - ({"lm_head.weight"} if tied else set())
    assert all(tuple(sd[k].shape) == tuple(full[k].shape) for k in sd)
    assert 3 * hidden == L.infer_transformer_config(meta_sd(manifest(rel.replace("text_encoder/model",
                                                                                  "transformer/diffusion_pytorch_model"))
                                                            ))["joint_attention_dim"]


def test_mistral_manifest_maps_the_language_model_exactly():
    m = manifest("FLUX.2-dev/text_encoder/model.safetensors.json")
    sd = meta_sd(m)
    assert L.detect_flux2(sd)[:2] == ("text_encoder", "mistral3")
    conf = L.infer_mistral_config(sd)
    assert (conf.hidden_size, conf.num_hidden_layers, conf.num_attention_heads, conf.num_key_value_heads) == \
        (5120, 40, 32, 8)
    tensors, unused = L.convert_mistral(sd)
    on_meta(lambda: L.build_mistral(conf), tensors)
    # what text encoding never reads: the vision tower, the projector, the lm_head
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.lm_head.")) for k in unused)
    assert len(tensors) + len(unused) == m["num_tensors"]
    dit = L.infer_transformer_config(
        meta_sd(manifest("FLUX.2-dev/transformer/diffusion_pytorch_model.safetensors.json")))
    assert dit["joint_attention_dim"] == 3 * conf.hidden_size          # layers 10/20/30 side by side


# ------------------------------------------------------------------------------------------- the demo, end to end

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from engine import Flux2ImagePipeline
    from engine.demo.flux2 import write_flux2_demo
    from engine.flux2.variants import model_configs
    models = tmp_path_factory.mktemp("flux2-models")
    root = write_flux2_demo(models)
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", models_dir=models,
                                              **model_configs("FLUX.2-klein-4B-random-demo"))
    return root, pipe


@pytest.fixture(scope="module")
def reference(demo):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    root, _ = demo
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential",
                                                base_shift=0.5, max_shift=1.15, shift=3.0)
    return dict(scheduler=scheduler,
                vae=AutoencoderKLFlux2.from_pretrained(root / "vae", torch_dtype=torch.float32),
                text_encoder=Qwen3ForCausalLM.from_pretrained(root / "text_encoder", dtype=torch.float32),
                tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
                transformer=Flux2Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float32))


def diffusers_klein(reference, distilled):
    from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline(is_distilled=distilled, **reference)


def image_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_demo_loads_as_klein_4b(demo):
    _, pipe = demo
    assert type(pipe.dit).__name__ == "Flux2Transformer2DModel" and not pipe.dit.config.guidance_embeds
    assert type(pipe.vae).__name__ == "AutoencoderKLFlux2" and pipe.vae.config.latent_channels == 32
    assert type(pipe.text_encoder).__name__ == "Qwen3Model" and pipe.text_encoder_qwen3 is pipe.text_encoder
    assert len(pipe.text_encoder.layers) == 28        # of 30: hidden state 27 needs layers 0..26 (+1, see trim)
    assert pipe.dit.config.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size


def test_text_encoder_hidden_states_equal_transformers(demo, reference):
    from diffusers import Flux2KleinPipeline
    _, pipe = demo
    prompt = "a red sports car parked on a wet street at night"
    ours = pipe.prompt_encoder.encode(prompt)
    ids, mask = pipe.prompt_encoder.ids(prompt)
    out = reference["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == 31
    theirs = torch.cat([out.hidden_states[k] for k in (9, 18, 27)], dim=-1)   # side by side per token
    diffusers_emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(reference["text_encoder"], reference["tokenizer"],
                                                                 prompt, dtype=torch.float32, device="cpu")
    d1, d2 = (ours - theirs).abs().max().item(), (ours - diffusers_emb).abs().max().item()
    print(f"\nQwen3 hidden states 9/18/27: max |ours - transformers| = {d1:.3g}, |ours - diffusers| = {d2:.3g}")
    assert ours.shape == (1, 512, 96) and d1 == 0 and d2 == 0
    assert int(mask.sum()) < 512 and ours[0, 0].abs().sum() > 0


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["distilled", "base-cfg4"])
def test_text_to_image_matches_diffusers_klein(demo, reference, cfg):
    _, pipe = demo
    h, w, steps = 64, 96, 4
    noise = torch.randn((1, 128, h // 16, w // 16), generator=torch.Generator().manual_seed(3))
    prompt = "a bowl of fresh fruit on a wooden table"
    ours = pipe(prompt, cfg_scale=cfg, height=h, width=w, initial_noise=noise, num_inference_steps=steps,
                schedule="diffusers", progress_bar_cmd=lambda x: x)
    ref = diffusers_klein(reference, distilled=cfg == 1.0)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=cfg, latents=noise,
                 output_type="pil").images[0]
    seed_sched = pipe(prompt, cfg_scale=cfg, height=h, width=w, initial_noise=noise, num_inference_steps=steps,
                      progress_bar_cmd=lambda x: x)
    d, d_seed = image_diff(ours, theirs), image_diff(seed_sched, theirs)
    print(f"\ntext to image {w}x{h}, {steps} steps, cfg {cfg}: max |ours - diffusers Flux2KleinPipeline| = {d}/255 "
          f"(seed schedule: {d_seed}/255)")
    assert ours.size == (w, h) and d <= 1 and d_seed <= 1
    other = pipe("a dog running on the beach", cfg_scale=cfg, height=h, width=w, initial_noise=noise,
                 num_inference_steps=steps, schedule="diffusers", progress_bar_cmd=lambda x: x)
    assert np.abs(np.asarray(other, dtype=np.int16) - np.asarray(ours, dtype=np.int16)).mean() > 2   # prompt counts


def test_seed_schedule_and_noise_written_out():
    n, strength, seq = 30, 0.6, 64 * 64
    # DiffSynth-Studio FlowMatchScheduler("FLUX.2").set_timesteps(n, denoising_strength, dynamic_shift_len)
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    m200, m10 = a2 * seq + b2, a1 * seq + b1
    mu = (m200 - m10) / 190.0 * n + (m200 - 200.0 * (m200 - m10) / 190.0)
    base = torch.linspace(1 / n + (1 - 1 / n) * strength, 1 / n, n)
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    got = sch.flux2_sigmas(n, strength, seq)
    print(f"\nseed sigmas (30 steps, strength 0.6, 4096 tokens): max diff {(got[:-1] - expected).abs().max():.3g}; "
          f"mu {mu:.4f}, first {float(got[0]):.4f}, last {float(got[-2]):.4f}")
    assert torch.equal(got[:-1], expected) and got[-1] == 0
    assert len(sch.flux2_sigmas(n, strength, seq, "diffusers")) == int(n * strength) + 1
    seeded = torch.randn((1, 128, 4, 6), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.bfloat16)
    assert torch.equal(sch.initial_noise(64, 96, 7, "cpu", torch.bfloat16), seeded)


def bn_stats(vae):
    return vae.bn.running_mean.view(1, -1, 1, 1), torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)


def seed_loop(dit, vae, text, lat, sigmas, h, w, guidance):
    """DiffSynth-Studio's model_fn_flux2 + FlowMatchScheduler.step + Flux2VAE.decode, written out (float32)."""
    txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(float(text.shape[1])))
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h // 16.), torch.arange(w // 16.), torch.zeros(1))
    for i in range(len(sigmas) - 1):
        v = dit(hidden_states=lat, encoder_hidden_states=text, timestep=(sigmas[i] * 1000).view(1) / 1000,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        lat = lat + v * (sigmas[i + 1] - sigmas[i])
    mean, std = bn_stats(vae)
    grid = lat.transpose(1, 2).reshape(1, 128, h // 16, w // 16) * std + mean
    z = grid.reshape(1, 32, 2, 2, h // 16, w // 16).permute(0, 1, 4, 2, 5, 3).reshape(1, 32, h // 8, w // 8)
    pixels = vae.decode(z).sample
    return Image.fromarray(((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_image_to_image_follows_the_seed_formulas(demo):
    """DiffSynth-Studio's FLUX.2 img2img written out: VAE mean -> 2x2 patches -> bn-normalised tokens, noised to the
    first sigma, Euler steps with timestep bf16-free (float32 run) sigma*1000/1000, bn undone, decoded."""
    _, pipe = demo
    h, w, steps, strength = 64, 64, 5, 0.7
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    ours = pipe("a cat", input_image=image, denoising_strength=strength, height=h, width=w, seed=11,
                num_inference_steps=steps, progress_bar_cmd=lambda x: x)
    dit, vae = pipe.dit, pipe.vae
    mean, std = bn_stats(vae)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    z = vae.encode(x).latent_dist.mean                                       # (1, 32, 8, 8)
    z = z.reshape(1, 32, h // 16, 2, w // 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 128, h // 16, w // 16)
    clean = ((z - mean) / std).flatten(2).transpose(1, 2)
    noise = torch.randn((1, 128, h // 16, w // 16), generator=torch.Generator("cpu").manual_seed(11))
    sigmas = sch.flux2_sigmas(steps, strength, (h // 16) * (w // 16))
    lat = (1 - sigmas[0]) * clean + sigmas[0] * noise.flatten(2).transpose(1, 2)
    expected = seed_loop(dit, vae, pipe.prompt_encoder.encode("a cat"), lat, sigmas, h, w, None)
    d = image_diff(ours, expected)
    untouched = image_diff(ours, image)
    print(f"\nimage to image (strength {strength}, {steps} steps): max |ours - seed formulas| = {d}/255")
    assert d <= 1 and untouched > 8


def test_unsupported_inputs_are_named(demo):
    from engine.errors import EngineError
    _, pipe = demo
    with pytest.raises(EngineError, match="inpaint_mask"):
        pipe("x", inpaint_mask=Image.new("L", (64, 64)), height=64, width=64)


def test_embedded_guidance_reaches_a_dev_type_transformer(demo):
    """[dev]'s transformer has a guidance embedder: embedded_guidance goes in as the seed passes it (the model
    scales it by 1000); a klein transformer has none and ignores it."""
    from diffusers import Flux2Transformer2DModel

    from engine import Flux2ImagePipeline
    from engine.demo.flux2 import _randomise, transformer_config
    _, pipe = demo
    with torch.random.fork_rng():
        torch.manual_seed(1)
        guided = Flux2Transformer2DModel(**{**transformer_config(), "guidance_embeds": True,
                                            "axes_dims_rope": (8, 8, 8, 8)}).eval()
        _randomise(guided)
    dev = Flux2ImagePipeline(device="cpu", torch_dtype=torch.float32)
    dev.tokenizer = pipe.tokenizer
    dev.set_models({"text_encoder": pipe.text_encoder, "vae": pipe.vae, "dit": guided})
    h, w, steps = 64, 64, 3
    run = lambda g: dev("a castle on a hill", embedded_guidance=g, height=h, width=w, seed=5,  # noqa: E731
                        num_inference_steps=steps, progress_bar_cmd=lambda x: x)
    a, b = run(4.0), run(1.5)
    noise = sch.initial_noise(h, w, 5, "cpu", torch.float32).flatten(2).transpose(1, 2)
    expected = seed_loop(guided, pipe.vae, pipe.prompt_encoder.encode("a castle on a hill"), noise,
                         sch.flux2_sigmas(steps, 1.0, (h // 16) * (w // 16)), h, w, torch.tensor([4.0]))
    d = image_diff(a, expected)
    print(f"\n[dev]-type guidance 4.0: max |ours - seed formulas| = {d}/255; guidance 4.0 vs 1.5 differ by "
          f"{image_diff(a, b)}/255")
    assert d <= 1 and image_diff(a, b) > 8
    same = [pipe("x", embedded_guidance=g, height=h, width=w, seed=5, num_inference_steps=1,
                 progress_bar_cmd=lambda x: x) for g in (4.0, 1.0)]
    assert image_diff(*same) == 0


def test_bf16_pipeline_runs_close_to_float32(demo):
    from engine import Flux2ImagePipeline
    from engine.flux2.variants import model_configs
    root, pipe = demo
    p16 = Flux2ImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu",
                                             models_dir=root.parent.parent,
                                             **model_configs("FLUX.2-klein-4B-random-demo"))
    assert p16.dit.dtype == p16.text_encoder.dtype == torch.bfloat16
    kw = dict(height=64, width=96, seed=3, num_inference_steps=4, progress_bar_cmd=lambda x: x)
    a = np.asarray(pipe("a bowl of fruit", **kw), dtype=np.int16)
    b = np.asarray(p16("a bowl of fruit", **kw), dtype=np.int16)
    print(f"\nbf16 vs float32 (same seed): mean |diff| {np.abs(a - b).mean():.2f}/255")
    assert np.abs(a - b).mean() < 6


def write_sparse_safetensors(m, path):
    """A header-exact file whose data is a hole (tensors read as zeros): the real file's layout, no disk."""
    import struct
    size = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    hdr, off = {}, 0
    for k, v in sorted(m["tensors"].items()):
        n = math.prod(v["shape"]) * size[v["dtype"]]
        hdr[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)


def test_official_file_layouts_load_through_the_file_reader(tmp_path):
    """Sparse files with the manifests' headers through load_flux2_models on meta: detection, grouping, mapping."""
    files = {"klein9b/transformer/diffusion_pytorch_model.safetensors":
             "FLUX.2-klein-9B/transformer/diffusion_pytorch_model.safetensors.json",
             "klein4b/flux-2-klein-4b.safetensors": "FLUX.2-klein-4B/flux-2-klein-4b.safetensors.json",   # inferred
             "klein9b/text_encoder/model.safetensors": "FLUX.2-klein-9B/text_encoder/model.safetensors.json",
             "klein9b/vae/diffusion_pytorch_model.safetensors":
             "FLUX.2-klein-9B/vae/diffusion_pytorch_model.safetensors.json"}
    for rel, m in files.items():
        write_sparse_safetensors(manifest(m), tmp_path / rel)
    nine = L.load_flux2_models([tmp_path / r for r in files if r.startswith("klein9b")], device="meta")
    assert set(nine) == {"dit", "text_encoder", "vae"}
    assert nine["dit"].config.num_layers == 8 and nine["dit"].config.joint_attention_dim == 12288
    te = nine["text_encoder"]
    assert te.flux_studio_unused == ["lm_head.weight"] and len(te.layers) == 28 and te.config.hidden_size == 4096
    bfl = L.load_flux2_models(tmp_path / "klein4b/flux-2-klein-4b.safetensors", device="meta")["dit"]
    assert bfl.flux_studio_format == "bfl" and bfl.config.num_single_layers == 20
    from engine.loading.errors import ModelFileError
    with pytest.raises(ModelFileError, match="both hold"):
        L.load_flux2_models([tmp_path / "klein9b/transformer", tmp_path / "klein4b/flux-2-klein-4b.safetensors"],
                            device="meta")


MISTRAL_TEMPLATE = ("{%- for m in messages %}{%- if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
                    "[/SYSTEM_PROMPT]{%- else %}[INST]{{ m['content'][0]['text'] }}[/INST]{%- endif %}{%- endfor %}")


def test_mistral_text_encoder_hidden_states_equal_transformers(demo, tmp_path):
    """[dev]'s text encoder in the official (pre-4.52) Mistral3 layout, tiny: our MistralModel (trimmed to 31 of 32
    layers, vision tower / projector / lm_head left out) gives transformers' Mistral3 hidden states 10/20/30."""
    import shutil

    from transformers import AutoTokenizer, Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig
    from transformers import PixtralVisionConfig

    from engine.demo.files import save_safetensors
    from engine.demo.flux2 import _randomise
    from engine.flux2.text import Flux2PromptEncoder, stacked_hidden_states
    text = MistralConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e9, sliding_window=None)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=14, head_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                                tie_word_embeddings=False)).eval()
        _randomise(model.model.language_model)
    renames = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))

    def published(k):
        return next((new + k[len(old):] for old, new in renames if k.startswith(old)), k)
    save_safetensors({published(k): v.clone() for k, v in model.state_dict().items()},
                     tmp_path / "te/model.safetensors")
    (tmp_path / "te/config.json").write_text(model.config.to_json_string())
    te = L.load_flux2_models(tmp_path / "te/model.safetensors", torch_dtype=torch.float32)["text_encoder"]
    assert type(te).__name__ == "MistralModel" and len(te.layers) == 31 and te.flux_studio_text_kind == "mistral3"
    assert te.config.rope_parameters["rope_theta"] == 1e9            # from config.json's text_config
    shutil.copytree(demo[0] / "tokenizer", tmp_path / "tok")
    (tmp_path / "tok/chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    encoder = Flux2PromptEncoder(AutoTokenizer.from_pretrained(tmp_path / "tok"), te, kind="mistral3")
    ids, mask = encoder.ids("a red car")
    assert ids.shape == (1, 512) and 20 < int(mask.sum()) < 512
    ours = encoder.encode("a red car")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    theirs = torch.cat([out.hidden_states[k] for k in (10, 20, 30)], dim=-1)
    d = (ours - theirs).abs().max().item()
    print(f"\nMistral3 hidden states 10/20/30: max |ours - transformers| = {d:.3g} (scale {theirs.abs().mean():.3g})")
    assert ours.shape == (1, 512, 96) and d == 0
    assert torch.equal(ours, stacked_hidden_states(te, ids, mask, (10, 20, 30)))


def test_bfl_single_file_loads_to_the_same_weights(demo, tmp_path):
    """The demo transformer written in BFL's single-file layout (the inverse written out here: fused qkv, (shift,
    scale) final adaLN, BFL names) loads back to exactly the diffusers weights, as diffusers' own converter reads it."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from engine.demo.files import save_safetensors
    root, pipe = demo
    sd = {k: v.to(torch.bfloat16) for k, v in pipe.dit.state_dict().items()}
    names = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin"}
    double = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
              "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
              "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
              "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
              "attn.to_out.0.weight": "img_attn.proj.weight",
              "attn.to_add_out.weight": "txt_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
              "ff.linear_out.weight": "img_mlp.2.weight", "ff_context.linear_in.weight": "txt_mlp.0.weight",
              "ff_context.linear_out.weight": "txt_mlp.2.weight"}
    single = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
              "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
    bfl = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k == "norm_out.linear.weight":
            scale, shift = v.chunk(2)
            bfl["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        elif parts[0] == "transformer_blocks":
            rest = ".".join(parts[2:])
            if rest in double:
                bfl[f"double_blocks.{parts[1]}.{double[rest]}"] = v
        elif parts[0] == "single_transformer_blocks":
            bfl[f"single_blocks.{parts[1]}.{single['.'.join(parts[2:])]}"] = v
        else:
            bfl[names[k.rsplit(".", 1)[0]] + ".weight"] = v
    for i in range(len(pipe.dit.transformer_blocks)):
        p = f"transformer_blocks.{i}.attn."
        bfl[f"double_blocks.{i}.img_attn.qkv.weight"] = torch.cat([sd[p + n + ".weight"]
                                                                   for n in ("to_q", "to_k", "to_v")])
        bfl[f"double_blocks.{i}.txt_attn.qkv.weight"] = torch.cat([sd[p + n + ".weight"]
                                                                   for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
    save_safetensors(bfl, tmp_path / "flux-2-klein-4b.safetensors")
    loaded = L.load_flux2_models(tmp_path / "flux-2-klein-4b.safetensors", torch_dtype=torch.bfloat16)["dit"]
    assert loaded.flux_studio_format == "bfl" and loaded.config.axes_dims_rope == (8, 8, 8, 8)
    ours = loaded.state_dict()
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == sd.keys() == theirs.keys()
    assert all(torch.equal(ours[k], sd[k]) and torch.equal(theirs[k], sd[k]) for k in sd)


def _references():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((64, 80), (96, 64))]


@pytest.mark.parametrize("count", [1, 2])
def test_reference_editing_matches_diffusers_klein(demo, reference, count):
    """edit_image: references as extra tokens (t = 10, 20) vs Flux2KleinPipeline(image=[...]), same noise."""
    _, pipe = demo
    h, w, steps, prompt = 64, 64, 3, "put the cat on the sofa"
    refs = _references()[:count]
    noise = torch.randn((1, 128, h // 16, w // 16), generator=torch.Generator().manual_seed(8))
    kw = dict(height=h, width=w, initial_noise=noise, num_inference_steps=steps, progress_bar_cmd=lambda x: x)
    ours = pipe(prompt, edit_image=refs, edit_image_auto_resize=False, schedule="diffusers", **kw)
    ref = diffusers_klein(reference, distilled=True)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(image=refs, prompt=prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=1.0,
                 latents=noise, output_type="pil").images[0]
    plain = pipe(prompt, schedule="diffusers", **kw)
    d, moved = image_diff(ours, theirs), np.abs(np.asarray(ours, np.int16) - np.asarray(plain, np.int16)).mean()
    print(f"\nedit with {count} reference(s) {w}x{h}, {steps} steps: max |ours - diffusers Flux2KleinPipeline| = "
          f"{d}/255; mean change vs no reference {moved:.2f}/255")
    assert ours.size == (w, h) and d <= 1 and moved > 0.5          # the references count
    ids = pipe.encode_references(refs, auto_resize=False)[1]
    assert sorted(set(ids[:, 0].tolist())) == [10 * (k + 1) for k in range(count)]


def test_reference_auto_resize_is_the_seeds():
    from engine.flux2.pipeline import reference_size
    assert reference_size(Image.new("RGB", (800, 600))).size == (1184, 896)    # ~1 MP, multiples of 32
    assert reference_size(Image.new("RGB", (70, 50)), auto_resize=False).size == (64, 48)
