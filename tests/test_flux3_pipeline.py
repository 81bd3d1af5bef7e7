"""FLUX 3 Image Klein (issue 20): Flux3ImagePipeline against diffusers' Flux3Transformer2DModel per step and its modular
FLUX 3 pipelines end to end (distilled and base, with and without references), and against the seed's formulas
written out (schedule, (tokens, 128) noise, text padding positions, image to image). Tiny random float32 models built
here directly: diffusers' Flux3Transformer2DModel (1 block per stream + 1 joint block), transformers' Qwen3-VL (5
text layers, hidden states 1..4 side by side), FLUX.2's AutoencoderKLFlux2, the FLUX.2 demo's byte-level tokenizer.

diffusers' modular pipelines run offline with these: the only stand-in is the "processor" (torchvision, which
Qwen3-VL's image processor needs, is not installed): an object with the tokenizer's chat template and ``.tokenizer``,
all that the text step reads. The prompt upsampler step is popped (it needs its own model).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import EngineError
from engine.flux3 import schedule as sch
from engine.flux3 import text as txt

LAYERS = (1, 2, 3, 4)
HIDDEN = 32
QUIET = dict(progress_bar_cmd=lambda x: x)


class Processor:
    """What diffusers' Flux3TextEncoderStep reads of Qwen3-VL's processor: the chat template and the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chat_template = tokenizer, tokenizer.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def tiny_dit(flow_map: bool, seed: int):
    from diffusers import Flux3Transformer2DModel

    from engine.demo.flux2 import _randomise
    torch.manual_seed(seed)
    dit = Flux3Transformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=HIDDEN * len(LAYERS), axes_dims_rope=(4, 4, 4, 4),
                                  flow_map=flow_map).eval()
    _randomise(dit)
    return dit


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from diffusers import AutoencoderKLFlux2
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from engine.demo.flux2 import _randomise, _write_tokenizer, vae_config
    folder = tmp_path_factory.mktemp("flux3-tok") / "tokenizer"
    _write_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    conf = Qwen3VLConfig(
        text_config=dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           deepstack_visual_indexes=[0], num_position_embeddings=16))
    te = Qwen3VLForConditionalGeneration(conf).eval()
    _randomise(te.model.language_model)
    te.model.language_model.embed_tokens.weight.data.normal_(0, 1.0)
    vae = AutoencoderKLFlux2(**{k: tuple(v) if isinstance(v, list) else v for k, v in vae_config().items()}).eval()
    _randomise(vae)
    return dict(tokenizer=tokenizer, te=te, vae=vae, distilled=tiny_dit(True, 1), base=tiny_dit(False, 2))


def ours(parts, kind):
    from engine.flux3.pipeline import Flux3ImagePipeline
    return Flux3ImagePipeline.from_modules(dit=parts[kind], vae=parts["vae"], text_encoder=parts["te"],
                                           tokenizer=parts["tokenizer"], device="cpu", torch_dtype=torch.float32,
                                           text_layers=LAYERS)


def theirs(parts, kind, cfg=None):
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.flux3 import Flux3AutoBlocks, Flux3DistilledAutoBlocks
    blocks = Flux3DistilledAutoBlocks() if kind == "distilled" else Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline()
    extra = {} if cfg is None else {"guider": ClassifierFreeGuidance(guidance_scale=cfg)}
    pipe.update_components(transformer=parts[kind], vae=parts["vae"], text_encoder=parts["te"],
                           tokenizer=Processor(parts["tokenizer"]), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def picture(seed, w, h):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


# ------------------------------------------------------------------------------------------------ schedule, noise

def test_schedule_is_the_seed_formula_and_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    n, a = 16, 6.93
    u = torch.linspace(1, 0, n + 1)[:-1]                          # the seed: sigma = a*u / (1 + (a-1)*u), no mu
    expected = a * u / (1 + (a - 1) * u)
    seed = sch.flux3_sigmas(n)
    assert seed[-1] == 0 and len(seed) == n + 1
    d_formula = (seed[:-1] - expected).abs().max().item()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=a)           # diffusers' Flux3SetTimestepsStep
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    diff = sch.flux3_sigmas(n, schedule="diffusers")
    d_seed_diffusers = (seed - scheduler.sigmas).abs().max().item()
    print(f"\nsigmas (16 steps, alpha 6.93): seed vs formula {d_formula:.3g}, diffusers vs its scheduler "
          f"{(diff - scheduler.sigmas).abs().max().item():.3g}, seed vs diffusers {d_seed_diffusers:.3g}; "
          f"first {float(seed[0]):.4f} second {float(seed[1]):.4f} last {float(seed[-2]):.4f}")
    assert d_formula < 1e-6 and torch.equal(diff, scheduler.sigmas) and d_seed_diffusers < 1e-6
    assert torch.equal(scheduler.timesteps / 1000, sch.model_timestep(diff[:-1], torch.float32, "diffusers"))
    low = 1 / 8                                                     # image to image: u starts at 1/N + (1-1/N)*s
    u = torch.linspace(low + (1 - low) * 0.6, low, 8)
    assert torch.allclose(sch.flux3_sigmas(8, 0.6)[:-1], a * u / (1 + (a - 1) * u), atol=1e-7, rtol=0)
    assert sch.flux3_sigmas(4, alpha=1.0)[:-1].tolist() == pytest.approx([1, 0.75, 0.5, 0.25])   # alpha 1: no shift


def test_noise_is_drawn_as_tokens_by_the_seed_and_as_a_grid_by_diffusers():
    seed_noise = sch.initial_noise(64, 96, 7, "cpu", torch.float32)
    assert torch.equal(seed_noise, torch.randn((1, 24, 128), generator=torch.Generator("cpu").manual_seed(7)))
    grid = torch.randn((1, 128, 4, 6), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(sch.initial_noise(64, 96, 7, "cpu", torch.float32, "diffusers"), grid.flatten(2).transpose(1, 2))
    assert torch.equal(sch.from_tokens(sch.to_tokens(grid), 64, 96), grid)
    ids = sch.image_ids(2, 3, index=-2)
    assert ids.tolist()[:4] == [[0, 0, 0, -2], [0, 0, 0.5, -2], [0, 0, 1.0, -2], [0, 0.5, 0, -2]]


def test_reference_sizes():
    """One reference kept whole (reflect-padded to the 16-pixel grid), several fitted under 1 megapixel and
    centre-cropped (diffusers' Flux3ImageProcessor, BFL's sizing); auto_resize=False: own pixels, cropped to 16."""
    from engine.flux3 import references as R
    one = picture(3, 72, 56)
    assert R.sizes(one) == [(80, 64)] and R.sizes(picture(3, 40, 24)) == [(64, 64)]   # canvas sides >= 64
    padded = R.pixels([one])[0]
    x = torch.from_numpy(np.asarray(one, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1
    assert torch.allclose(padded[0, :, 4:60, 4:76], x, atol=1e-6)           # centred, nothing cut
    big = Image.new("RGB", (1500, 1000))
    assert R.sizes([one, big]) == [(64, 48), (1248, 832)]                    # cropped; 1.5 MP -> under 1 MP
    own = R.pixels([picture(5, 50, 70)], auto_resize=False)[0]
    assert own.shape == (1, 3, 64, 48)
    assert R.sizes(None) == [] and R.sizes([]) == []


# ---------------------------------------------------------------------------------------------------------- text

def test_text_encoding_matches_diffusers_and_the_seed_positions(parts):
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
    enc = txt.Flux3PromptEncoder(parts["tokenizer"], parts["te"], LAYERS)
    prompt = "a red sports car parked on a wet street at night"
    d_emb = enc.encode(prompt, convention="diffusers")
    reference = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        parts["te"], Processor(parts["tokenizer"]), prompt, device=torch.device("cpu"), hidden_states_layers=LAYERS)
    ids, mask, positions = enc.inputs(prompt)
    real = int(mask.sum())
    out = parts["te"](input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(-1) - 1,
                      output_hidden_states=True, use_cache=False)
    written = torch.cat([out.hidden_states[k] for k in LAYERS], dim=-1)
    s_emb = enc.encode(prompt)
    d_ref, d_seed = (d_emb - reference).abs().max().item(), (s_emb - written).abs().max().item()
    gap = (s_emb - d_emb)[0, real:].abs().max().item()
    print(f"\nQwen3-VL hidden states {LAYERS}: |diffusers convention - diffusers| = {d_ref:.3g}, |seed - written out| "
          f"= {d_seed:.3g}; window {ids.shape[1]} for {real} tokens; the padding's positions change it by {gap:.3g}")
    assert d_emb.shape == (1, 80, HIDDEN * len(LAYERS)) and d_ref == 0 and d_seed == 0
    assert positions[0, real:].eq(real - 1).all() and gap > 1e-3
    assert torch.equal(s_emb[0, :real], d_emb[0, :real])      # the real tokens never see the padding
    long = enc.inputs(" ".join(["cat"] * 100), convention="diffusers")[0]
    assert long.shape[1] % txt.PAD_MULTIPLE == 0 and long.shape[1] > 80


# ------------------------------------------------------------------------------------------------- per step

@pytest.mark.parametrize("kind", ["distilled", "base"])
def test_transformer_call_equals_diffusers_inputs(parts, kind):
    """One step of ours = Flux3Transformer2DModel on the inputs diffusers' modular steps build (ids, timesteps)."""
    from diffusers.modular_pipelines.flux3.before_denoise import _prepare_image_ids
    pipe, dit = ours(parts, kind), parts[kind]
    refs = [picture(1, 64, 48), picture(2, 32, 32)]
    references, ref_ids = pipe.encode_references(refs)
    grids = [pipe.encode_pixels(x) for x in __import__("engine.flux3.references", fromlist=["x"]).pixels(refs)]
    cond_ids = torch.cat([_prepare_image_ids(g.shape[-2], g.shape[-1], 0.5, -(i + 1)) for i, g in enumerate(grids)])
    assert torch.equal(ref_ids, cond_ids)
    text = pipe.encode_prompt("a cat", schedule="diffusers")
    tokens = torch.randn(1, 12, 128)
    sigmas = sch.flux3_sigmas(4, schedule="diffusers")
    v = pipe.velocity(tokens, sigmas[1], sigmas[2], text, sch.text_ids(text.shape[1]), sch.image_ids(3, 4),
                      references, ref_ids, "diffusers")
    t = (sigmas[1] * 1000 / 1000).view(1)
    extra = {"target_timestep": (sigmas[2] * 1000 / 1000).view(1)} if kind == "distilled" else {}
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep
    expected = dit(hidden_states=tokens, encoder_hidden_states=text, timestep=t, img_ids=_prepare_image_ids(3, 4, 0.5),
                   txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(text), image_cond_hidden_states=references,
                   image_cond_ids=cond_ids, return_dict=False, **extra)[0]
    print(f"\n{kind} step with 2 references: max |ours - Flux3Transformer2DModel| = {(v - expected).abs().max():.3g}")
    assert torch.equal(v, expected)


# ---------------------------------------------------------------------------------------------- end to end

CASES = [("distilled", 1.0, 0), ("distilled", 1.0, 2), ("base", 4.0, 0), ("base", 4.0, 1)]


@pytest.mark.parametrize("kind,cfg,n_refs", CASES, ids=[f"{k}-cfg{c:g}-{n}refs" for k, c, n in CASES])
def test_end_to_end_matches_diffusers_modular_flux3(parts, kind, cfg, n_refs):
    h, w, steps = 64, 48, 3
    noise = torch.randn((1, 128, h // 16, w // 16), generator=torch.Generator().manual_seed(3))
    refs = [picture(10 + i, 40 + 16 * i, 56) for i in range(n_refs)]
    prompt = "a bowl of fresh fruit on a wooden table"
    args = dict(height=h, width=w, num_inference_steps=steps)
    mine = ours(parts, kind)(prompt, negative_prompt="blurry", cfg_scale=cfg, initial_noise=noise,
                             edit_image=refs or None, schedule="diffusers", **args, **QUIET)
    ref = theirs(parts, kind, None if kind == "distilled" else cfg)
    extra = {} if kind == "distilled" else {"negative_prompt": "blurry"}
    image = ref(prompt=prompt, latents=noise, image=refs or None, text_encoder_out_layers=LAYERS, output="images",
                **args, **extra)[0]
    seed_conv = ours(parts, kind)(prompt, negative_prompt="blurry", cfg_scale=cfg, initial_noise=noise,
                                  edit_image=refs or None, **args, **QUIET)
    d = image_diff(mine, image)
    print(f"\n{kind} cfg {cfg:g}, {n_refs} references, {w}x{h}, {steps} steps: max |ours - diffusers modular| = "
          f"{d}/255 (seed conventions, same noise grid: {image_diff(seed_conv, image)}/255)")
    assert mine.size == image.size == (w, h) and d <= 1
    if n_refs:   # the references count
        plain = ours(parts, kind)(prompt, negative_prompt="blurry", cfg_scale=cfg, initial_noise=noise,
                                  schedule="diffusers", **args, **QUIET)
        assert image_diff(plain, mine) > 2


# ------------------------------------------------------------------------------------------- the seed, written out

def seed_loop(dit, vae, text, tokens, sigmas, h, w, references=None, ref_ids=None):
    """The seed's sampling written out (float32): Euler over the sigmas, timestep sigma*1000/1000, the flow map's
    target timestep the next sigma, references at ids (0, r/2, c/2, -(i+1)); bn undone, unpatchified, decoded."""
    txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(float(text.shape[1])))
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(h // 16.) / 2, torch.arange(w // 16.) / 2,
                                   torch.zeros(1))
    for i in range(len(sigmas) - 1):
        extra = {"target_timestep": (sigmas[i + 1] * 1000).view(1) / 1000} if dit.config.flow_map else {}
        if references is not None:
            extra.update(image_cond_hidden_states=references, image_cond_ids=ref_ids)
        v = dit(hidden_states=tokens, encoder_hidden_states=text, timestep=(sigmas[i] * 1000).view(1) / 1000,
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **extra)[0]
        tokens = tokens + v * (sigmas[i + 1] - sigmas[i])
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    grid = tokens.transpose(1, 2).reshape(1, 128, h // 16, w // 16) * std + mean
    z = grid.reshape(1, 32, 2, 2, h // 16, w // 16).permute(0, 1, 4, 2, 5, 3).reshape(1, 32, h // 8, w // 8)
    pixels = vae.decode(z).sample
    return Image.fromarray(((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_seed_text_to_image_and_image_to_image_written_out(parts):
    pipe = ours(parts, "distilled")
    h, w, steps = 48, 64, 4
    prompt = "a castle on a hill"
    text = pipe.prompt_encoder.encode(prompt)
    a = 6.93
    u = torch.linspace(1, 1 / steps, steps)
    sigmas = torch.cat([a * u / (1 + (a - 1) * u), torch.zeros(1)])
    noise = torch.randn((1, (h // 16) * (w // 16), 128), generator=torch.Generator("cpu").manual_seed(5))
    image = pipe(prompt, height=h, width=w, seed=5, num_inference_steps=steps, **QUIET)
    d_t2i = image_diff(image, seed_loop(pipe.dit, pipe.vae, text, noise, sigmas, h, w))
    source, strength = picture(4, w, h), 0.6
    edited = pipe(prompt, input_image=source, denoising_strength=strength, height=h, width=w, seed=5,
                  num_inference_steps=steps, **QUIET)
    x = torch.from_numpy(np.asarray(source, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    z = pipe.vae.encode(x).latent_dist.mode()
    z = z.reshape(1, 32, h // 16, 2, w // 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 128, h // 16, w // 16)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    clean = ((z - mean) / std).flatten(2).transpose(1, 2)
    u = torch.linspace(1 / steps + (1 - 1 / steps) * strength, 1 / steps, steps)
    sigmas = torch.cat([a * u / (1 + (a - 1) * u), torch.zeros(1)])
    start = (1 - sigmas[0]) * clean + sigmas[0] * noise
    d_i2i = image_diff(edited, seed_loop(pipe.dit, pipe.vae, text, start, sigmas, h, w))
    print(f"\nseed formulas written out: text to image {d_t2i}/255, image to image (strength {strength}) {d_i2i}/255")
    assert d_t2i <= 1 and d_i2i <= 1 and image_diff(edited, image) > 2


# ------------------------------------------------------------------------------------------------ bad inputs

def test_bad_inputs_are_named(parts):
    pipe = ours(parts, "distilled")
    small = Image.new("RGB", (32, 32))
    with pytest.raises(EngineError, match="at most 10 reference images"):
        pipe("x", edit_image=[small] * 11, height=32, width=32, num_inference_steps=1, **QUIET)
    with pytest.raises(EngineError, match=r"edit_image\[1\] is a ndarray, not a PIL image"):
        pipe("x", edit_image=[small, np.zeros((32, 32, 3))], height=32, width=32, num_inference_steps=1, **QUIET)
    with pytest.raises(EngineError, match="cfg_scale must be 1"):
        pipe("x", cfg_scale=4.0, height=32, width=32, num_inference_steps=1, **QUIET)
    with pytest.raises(EngineError, match="initial_noise has shape"):
        pipe("x", initial_noise=torch.zeros(1, 5, 128), height=32, width=32, num_inference_steps=1, **QUIET)
    steps = []
    pipe("x", edit_image=[small] * 10, height=32, width=32, num_inference_steps=2,
         step_callback=lambda i, n: steps.append((i, n)), **QUIET)
    assert steps == [(1, 2), (2, 2)] and math.isfinite(1.0)
    # Without its VAE (FLUX.2's, shared through engine.flux2.vae) the message names what to add, FLUX 3's words.
    from engine.flux3.pipeline import Flux3ImagePipeline
    no_vae = Flux3ImagePipeline.from_modules(dit=parts["distilled"], text_encoder=parts["te"],
                                             tokenizer=parts["tokenizer"], device="cpu", torch_dtype=torch.float32,
                                             text_layers=LAYERS)
    with pytest.raises(EngineError, match=r"No FLUX 3 VAE is loaded: add the ModelConfig of the FLUX\.2 VAE"):
        no_vae("x", height=32, width=32, num_inference_steps=1, **QUIET)


# ------------------------------------------------------------------------------------------------ from_pretrained

def test_from_pretrained_calls_the_loader_and_finds_the_tokenizer(parts, tmp_path, monkeypatch):
    """``from_pretrained`` hands each ModelConfig's files to ``engine.flux3.loading.load_flux3_models`` (stubbed here
    with the tiny modules) and reads the tokenizer from the text encoder's own folder (klein's layout), its chat
    template from the processor's chat_template.json when tokenizer_config.json has none."""
    import json

    from engine.flux3 import pipeline as P
    from engine.model_config import ModelConfig
    te_dir = tmp_path / "text_encoder"
    parts["tokenizer"].save_pretrained(te_dir)
    template = parts["tokenizer"].chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        (te_dir / name).unlink(missing_ok=True)
    cfg = json.loads((te_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (te_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (te_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    files = {"dit": tmp_path / "model.safetensors", "text_encoder": te_dir / "model.safetensors",
             "vae": tmp_path / "vae.safetensors"}
    for f in files.values():
        f.write_bytes(b"")
    modules = {"dit": parts["distilled"], "text_encoder": parts["te"], "vae": parts["vae"]}
    calls = []

    def fake_loader(paths, torch_dtype, device):
        calls.append((tuple(str(p) for p in paths), torch_dtype, device))
        role = next(r for r, f in files.items() if str(f) == str(paths[0]))
        modules[role].flux_studio_files = [str(p) for p in paths]
        return {role: modules[role]}

    monkeypatch.setattr(P, "load_models", fake_loader)
    pipe = P.Flux3ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                                model_configs=[ModelConfig(path=str(f)) for f in files.values()])
    assert [c[0][0] for c in calls] == [str(f) for f in files.values()] and calls[0][1:] == (torch.float32, "cpu")
    assert pipe.tokenizer.chat_template == template and pipe.is_distilled
    pipe.text_layers = LAYERS
    mine = pipe("a cat", height=32, width=48, seed=2, num_inference_steps=2, **QUIET)
    again = ours(parts, "distilled")("a cat", height=32, width=48, seed=2, num_inference_steps=2, **QUIET)
    other = ours(parts, "distilled")("a dog running", height=32, width=48, seed=2, num_inference_steps=2, **QUIET)
    assert image_diff(mine, again) == 0 and image_diff(other, again) > 2      # the prompt counts
    with pytest.raises(EngineError, match="Two model files both hold the FLUX 3 dit"):
        P.Flux3ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(files["dit"])), ModelConfig(path=str(files["dit"]))])
