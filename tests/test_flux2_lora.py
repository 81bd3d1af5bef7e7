"""FLUX.2 LoRAs (issue 16): the published formats (diffusers/PEFT, DiffSynth, kohya, ai-toolkit) on diffusers'
``Flux2Transformer2DModel``, against diffusers' own loading of the same files; the BFL names against the weights'
own BFL -> diffusers conversion; which family a file is for, and the other family's LoRA refused naming both; the
seed API's ``load_lora``; the studio generating with a FLUX.2 LoRA and the picker offering the model's family.
"""
from __future__ import annotations

import copy
import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.demo.flux2_loras import FORMATS, write_flux2_demo_loras
from engine.lora import LoraError, attach_lora, detach_loras, read_lora
from engine.lora.family import file_family
from tests.browser import set_number

FLUX2 = "FLUX.2-klein-4B-random-demo"
FORMAT_NAMES = {"diffusers": "diffusers/PEFT", "diffsynth": "DiffSynth", "kohya": "kohya", "ai-toolkit": "ai-toolkit"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_flux2_demo_loras(tmp_path_factory.mktemp("flux2-loras"))


@pytest.fixture(scope="module")
def dit():
    """The klein demo's transformer shape in float32 with random weights."""
    from diffusers import Flux2Transformer2DModel

    from engine.demo.flux2 import transformer_config
    cfg = transformer_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Flux2Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])}).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                      indexing="ij"), -1).reshape(1, 16, 4)
    txt_ids = torch.zeros(1, 8, 4)
    txt_ids[..., 3] = torch.arange(8.0)
    return dict(hidden_states=torch.randn(1, 16, 128, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 96, generator=g), timestep=torch.tensor([0.5]), img_ids=grid, txt_ids=txt_ids, guidance=None, return_dict=False)


def run(model):
    with torch.no_grad():
        return model(**_inputs())[0]


def diffusers_loaded(dit, fmt, path):
    """A copy of ``dit`` with the file loaded by diffusers' FLUX.2 LoRA loader (``Flux2LoraLoaderMixin``'s
    ``lora_state_dict`` + ``load_lora_into_transformer``: what ``Flux2KleinPipeline.load_lora_weights`` does).

    Two files need a word first: DiffSynth's keys are read by DiffSynth's own loader (``.default`` dropped; diffusers
    wants them under ``transformer.``), and diffusers' BFL converter maps ``final_layer.adaLN_modulation.1`` without
    swapping its (shift, scale) halves to diffusers' (scale, shift) -- loading BFL's transformer weights swaps them --
    so the halves are swapped before diffusers reads it."""
    from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
    ref = copy.deepcopy(dit)
    sd = load_file(str(path))
    if fmt == "diffsynth":
        sd = {"transformer." + k.replace(".default.", "."): v for k, v in sd.items()}
    if fmt == "ai-toolkit":
        key = "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"
        shift, scale = sd[key].chunk(2)
        sd[key] = torch.cat([scale, shift])
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    converted = Flux2LoraLoaderMixin.lora_state_dict(sd)
    Flux2LoraLoaderMixin.load_lora_into_transformer(converted, transformer=ref,
                                                    metadata=json.loads(raw) if raw else None)
    return ref


def layer_delta(module, n_in):
    """What a layer adds to its base output, as a weight matrix [out, in] (the identity fed through)."""
    eye = torch.eye(n_in)
    with torch.no_grad():
        return (module(eye) - torch.nn.functional.linear(eye, module.weight, module.bias)).T


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_matches_diffusers_loading_of_the_same_file(dit, files, fmt):
    base = run(dit)
    report = attach_lora(dit, files[fmt], weight=1.0)
    try:
        assert report["format"] == FORMAT_NAMES[fmt] and report["bound"] == report["total"] > 0
        ours = run(dit)
        layers = dict(dit.named_modules())
        ours_delta = {name: layer_delta(layers[name], layers[name].in_features)
                      for name in read_lora(files[fmt], family="FLUX.2").targets}
    finally:
        detach_loras(dit)
    assert torch.equal(run(dit), base)                      # detached: exactly as before
    ref = diffusers_loaded(dit, fmt, files[fmt])
    theirs = run(ref)
    diff = (ours - theirs).abs().max().item()
    print(f"\n{fmt}: max |ours - diffusers| = {diff:.3g} (LoRA's effect {(ours - base).abs().max().item():.3g})")
    assert diff <= 1e-5 and (ours - base).abs().max().item() > 1e-2
    # Layer by layer: our applied change equals PEFT's delta weight (= scale * B @ A) on the same layer.
    ref_layers = dict(ref.named_modules())
    assert set(ours_delta) == {n for n, m in ref_layers.items() if hasattr(m, "lora_A")}
    for name, delta in ours_delta.items():
        peft = ref_layers[name]
        adapter = next(iter(peft.lora_A))
        assert torch.allclose(delta, peft.get_delta_weight(adapter), atol=1e-5), name


def test_scale_is_alpha_over_rank_and_the_weight(dit, files):
    """kohya: alpha 2 over rank 4 (0.5) times the weight; the block-diagonal qkv keeps each part's own rank."""
    lf = read_lora(files["kohya"], family="FLUX.2")
    sd = load_file(str(files["kohya"]))
    layers = dict(dit.named_modules())
    key = "lora_unet_double_blocks_1_img_mlp_0"
    A, B = sd[f"{key}.lora_down.weight"].float(), sd[f"{key}.lora_up.weight"].float()
    attach_lora(dit, lf, weight=0.6)
    try:
        got = layer_delta(layers["transformer_blocks.1.ff.linear_in"], 64)
        assert torch.allclose(got, 0.6 * 0.5 * B @ A, atol=1e-6)
        A, B = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].float(), \
            sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].float()
        k = layer_delta(layers["transformer_blocks.0.attn.to_k"], 64)
        assert torch.allclose(k, 0.6 * (3.0 / 6) * B[64:128] @ A, atol=1e-6)
        assert lf.targets["transformer_blocks.0.attn.to_k"][0].shape[0] == 2       # its own rank-2 part
    finally:
        detach_loras(dit)


@pytest.mark.parametrize("fmt", ["ai-toolkit", "kohya"])
def test_bfl_names_follow_the_bfl_weight_conversion(files, fmt):
    """Each pair's change made in BFL's layout (fused qkv, linear1 = q|k|v|mlp, the final modulation's (shift,
    scale)) and converted like BFL's transformer file equals the change we put on diffusers' layers."""
    from engine.flux2.loading import convert_bfl_transformer
    sd = load_file(str(files[fmt]))
    down = ".lora_A.weight" if fmt == "ai-toolkit" else ".lora_down.weight"
    up = ".lora_B.weight" if fmt == "ai-toolkit" else ".lora_up.weight"
    bfl = {}
    for key in sd:
        if key.endswith(down):
            module = key[: -len(down)]
            A, B = sd[key].float(), sd[module + up].float()
            scale = float(sd[module + ".alpha"]) / A.shape[0] if module + ".alpha" in sd else 1.0
            name = module.removeprefix("diffusion_model.")
            if fmt == "kohya":
                name = name.removeprefix("lora_unet_")
                for part in ("double_blocks", "single_blocks"):
                    if name.startswith(part):
                        i, rest = name[len(part) + 1:].split("_", 1)
                        name = f"{part}.{i}.{rest.replace('_attn_', '_attn.').replace('_mlp_', '_mlp.')}"
                name = {"img_in": "img_in", "txt_in": "txt_in"}.get(name, name)
            bfl[name + ".weight"] = scale * B @ A
    expected = convert_bfl_transformer(bfl)
    lf = read_lora(files[fmt], family="FLUX.2")
    ours = {t + ".weight": s * B.float() @ A.float() for t, (A, B, s) in lf.targets.items()}
    assert set(ours) == set(expected)
    if fmt == "ai-toolkit":
        assert "norm_out.linear.weight" in ours and "single_stream_modulation.linear.weight" in ours
    for key, value in expected.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key


def test_comfyui_saves_read_as_the_same_lora(files):
    """ComfyUI's own saves: the BFL names under ``diffusion_model.`` with lora_down/lora_up and ``.alpha`` (here
    alpha = rank, so the same change as the ai-toolkit file they are made from)."""
    sd = load_file(str(files["ai-toolkit"]))
    comfy = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in sd.items()}
    comfy.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(float(v.shape[0]))
                  for k, v in sd.items() if k.endswith(".lora_A.weight")})
    a, b = read_lora(sd, family="FLUX.2"), read_lora(comfy, family="FLUX.2")
    assert b.format == "ComfyUI" and set(a.targets) == set(b.targets)
    for name, (A, B, scale) in a.targets.items():
        A2, B2, scale2 = b.targets[name]
        assert torch.equal(A, A2) and torch.equal(B, B2) and scale == scale2 == 1.0


def _flux1_dit():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def test_families_are_told_apart_and_the_other_one_refused_naming_both(dit, files, tmp_path):
    from tests.test_app_client import write_demo_lora
    flux1 = write_demo_lora(tmp_path / "flux1.safetensors")
    assert {file_family(p) for p in files.values()} == {"FLUX.2"} and file_family(flux1) == "FLUX.1"
    with pytest.raises(LoraError) as err:
        attach_lora(dit, flux1)
    assert "is a FLUX.1 LoRA" in str(err.value) and "is FLUX.2" in str(err.value)
    assert "Use a FLUX.2 LoRA, or choose a FLUX.1 model" in str(err.value)
    old = _flux1_dit()
    with pytest.raises(LoraError) as err:
        attach_lora(old, files["kohya"])       # BFL names both families use: told apart by the MLP widths
    assert "is a FLUX.2 LoRA" in str(err.value) and "is FLUX.1" in str(err.value)
    assert not [n for n, _ in dit.named_children() if n.startswith("flux_studio_lora_")]


def test_seed_api_load_lora_and_clear(dit, files):
    from engine import EngineError, Flux2ImagePipeline
    pipe = Flux2ImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.set_models({"dit": dit})
    base = run(dit)
    report = pipe.load_lora(pipe.dit, str(files["diffsynth"]), alpha=0.5, verbose=0)
    assert report["format"] == "DiffSynth" and report["weight"] == 0.5
    assert not torch.equal(run(dit), base)
    assert pipe.clear_lora(verbose=0) == ["flux2-diffsynth"] and torch.equal(run(dit), base)
    with pytest.raises(EngineError, match="pipe.dit"):
        pipe.load_lora(torch.nn.Linear(2, 2), str(files["diffsynth"]))


def test_the_picker_offers_the_models_family(files):
    from app.lora_picker import family_note, lora_choices, model_family
    items = [{"name": "a.safetensors", "family": "FLUX.1", "size_mb": 1}, {"name": "b.safetensors", "family": "FLUX.2",
             "size_mb": 1}, {"name": "c.safetensors", "family": None, "size_mb": 1}]
    assert model_family(FLUX2) == "FLUX.2" and model_family("FLUX.1-dev") == "FLUX.1"
    assert [n for _, n in lora_choices(items, "FLUX.2")] == ["b.safetensors", "c.safetensors"]
    assert [n for _, n in lora_choices(items, "FLUX.1")] == ["a.safetensors", "c.safetensors"]
    note = family_note(items, "FLUX.2", set_aside=["a.safetensors"])
    assert "1 FLUX.1 LoRA is not offered" in note and "Set aside: a" in note


@pytest.fixture(scope="module")
def in_studio(studio, files):
    """The demo FLUX.2 LoRAs in the session studio's LoRA folder (``loras/flux2/<format>.safetensors``)."""
    import shutil
    folder = pathlib.Path(studio.engine.models_dir) / "loras" / "flux2"
    folder.mkdir(parents=True, exist_ok=True)
    for fmt, path in files.items():
        shutil.copy(path, folder / f"{fmt}.safetensors")
    return studio


def test_studio_generates_with_a_flux2_lora_and_records_it(in_studio):
    from engine.errors import EngineError
    engine = in_studio.engine
    listed = {item["name"]: item["family"] for item in engine.loras()}
    assert listed["flux2/kohya.safetensors"] == "FLUX.2" and listed["demo-style.safetensors"] == "FLUX.1"
    job = {"variant": FLUX2, "prompt": "a lora boat", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}
    plain = engine.generate(dict(job))[0]
    out = engine.generate(dict(job, loras=[{"name": "flux2/kohya.safetensors", "weight": 0.7}]))[0]
    entry = out["recipe"]["loras"][0]
    assert (entry["name"], entry["weight"], entry["format"]) == ("flux2/kohya.safetensors", 0.7, "kohya")
    from PIL import Image, ImageChops
    assert ImageChops.difference(Image.open(plain["path"]).convert("RGB"),
                                 Image.open(out["path"]).convert("RGB")).getbbox() is not None
    # The Edit tab's jobs (FLUX.2 references) take the same LoRAs.
    edited = engine.generate(dict(job, edit_images=[plain["path"]], loras=[["flux2/diffsynth.safetensors", 1.0]]))[0]
    assert [(e["name"], e["format"]) for e in edited["recipe"]["loras"]] == [("flux2/diffsynth.safetensors",
                                                                               "DiffSynth")]
    with pytest.raises(EngineError) as err:
        engine.generate(dict(job, loras=[{"name": "demo-style.safetensors", "weight": 1.0}]))
    assert "is a FLUX.1 LoRA" in str(err.value) and "FLUX.2" in str(err.value)
    # ... refused when the request is checked (header only), before any model is loaded for it.
    with pytest.raises(EngineError, match="is a FLUX.1 LoRA"):
        engine.validate(dict(job, loras=[{"name": "demo-style.safetensors", "weight": 1.0}]))


def test_generate_tab_offers_and_applies_a_flux2_lora(page, in_studio, shots):
    try:
        page.locator("#gen-model input").click()
        page.locator("ul[role='listbox'] li", has_text="FLUX.2 [klein] 4B random-weight demo").click()
        # FLUX.2 chosen: the FLUX.1 demo LoRA is no longer offered, and the hint says why. (While the model was
        # FLUX.1 the hint already said the FLUX.2 LoRAs were "not offered": wait for the new hint, not that one.)
        page.wait_for_function("document.querySelector('#lora-hint')?.innerText?.includes('FLUX.1 LoRA')")
        assert "not offered" in page.locator("#lora-hint").inner_text()
        page.locator("#lora-choose input").click()
        page.wait_for_selector("ul[role='listbox'] li:has-text('flux2/ai-toolkit')")
        offered = page.locator("ul[role='listbox'] li").all_inner_texts()
        assert not [o for o in offered if "demo-style" in o] and len([o for o in offered if "flux2/" in o]) == 4
        page.locator("ul[role='listbox'] li", has_text="flux2/ai-toolkit").first.click()
        page.locator("#gen-prompt textarea").click()
        page.wait_for_selector("#lora-weight-0", state="visible")
        page.locator("#gen-prompt textarea").fill("a klein lighthouse with a LoRA")
        set_number(page, "gen-width", 64)
        set_number(page, "gen-height", 64)
        set_number(page, "gen-steps", 2)
        set_number(page, "gen-seed", 4343)
        page.locator("#gen-generate").click()
        page.wait_for_function("document.querySelector('#selected-info textarea')?.value?.includes('Seed: 4343,')")
        info = page.locator("#selected-info textarea").input_value()
        assert f"Variant: {FLUX2}" in info and "LoRAs:" in info and "flux2/ai-toolkit.safetensors" in info
        page.screenshot(path=str(shots / "flux2-lora-generate.png"), full_page=True)
    finally:
        in_studio.engine.release_models()      # the other browser tests start from the FLUX.1 demo again
