"""BFL's FLUX 3 prompt upsampler (engine.flux3.upsampler) on the random-weight Qwen3.5 twin (engine.demo.flux3_pup):
the same text as diffusers' own prompt-upsampler block (run through its modular pipeline on the same model and
processor) for text-to-image and for an edit with one reference; greedy whatever the folder's generation config says;
diffusers' cleanup of the generated text; the message when files are missing."""
import shutil

import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from engine.errors import EngineError  # noqa: E402
from engine.flux3 import upsampler as up_mod  # noqa: E402

TOKENS = 12


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from engine.demo.flux3_pup import write_flux3_pup_demo
    root = tmp_path_factory.mktemp("pup_models")
    write_flux3_pup_demo(root)
    return root


@pytest.fixture(scope="module")
def upsampler(models_dir):
    return up_mod.PromptUpsampler.from_models_dir(models_dir, demo=True, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def diffusers_block(upsampler):
    """diffusers' FLUX 3 prompt-upsampler step (text-to-image or image-conditioned by its inputs) with our model."""
    from diffusers.modular_pipelines.flux3.prompt_upsampler import Flux3AutoPromptUpsampleStep
    pipe = Flux3AutoPromptUpsampleStep().init_pipeline()
    pipe.update_components(prompt_upsampler=upsampler.model, prompt_upsampler_processor=upsampler.processor)
    return pipe


def _reference():
    """A non-square, half-transparent reference (composited over white, resized, JPEG'd by the upsampler)."""
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(40, 72, 4, generator=g) * 255).to(torch.uint8).numpy()
    return PIL.fromarray(pixels, "RGBA")


def _recording(model, monkeypatch) -> list:
    """Record what ``model.generate`` receives (and still run it)."""
    calls, generate = [], model.generate

    def spy(**kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def _same_inputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_text_to_image_matches_diffusers_block(upsampler, diffusers_block, monkeypatch):
    prompt = "a red fox asleep in fresh snow"
    calls = _recording(upsampler.model, monkeypatch)
    torch.manual_seed(0)
    ours = upsampler.upsample(prompt, width=1360, height=768, seed=7, max_new_tokens=TOKENS)
    torch.manual_seed(1)     # another RNG state: greedy decoding (the folder's config samples) does not read it
    theirs = diffusers_block(prompt=prompt, max_new_tokens=TOKENS, output="prompt")
    assert ours == theirs and ours
    _same_inputs(calls[0], calls[1])
    assert calls[0]["do_sample"] is False and "pixel_values" not in calls[0]
    text = upsampler.processor.tokenizer.decode(calls[0]["input_ids"][0])
    assert text.startswith("<|im_start|>system\n" + _system_prompt("t2i"))
    assert text.endswith(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the canvas line (not in diffusers' block) opens the request and changes the caption
    canvas = upsampler.upsample(prompt, width=1360, height=768, canvas=True, max_new_tokens=TOKENS)
    assert "user\nTARGET CANVAS: 85:48\na red fox" in upsampler.processor.tokenizer.decode(calls[2]["input_ids"][0])
    assert canvas != ours


def _system_prompt(mode: str) -> str:
    from diffusers.modular_pipelines.flux3.prompt_upsampler import SYSTEM_PROMPTS
    return SYSTEM_PROMPTS[mode]


def test_edit_with_a_reference_matches_diffusers_block(upsampler, diffusers_block, monkeypatch, tmp_path):
    ref = _reference()
    calls = _recording(upsampler.model, monkeypatch)
    ours = up_mod.upsample_prompt(upsampler, "make the sky green", references=[ref], max_new_tokens=TOKENS)
    theirs = diffusers_block(prompt="make the sky green", image=ref, max_new_tokens=TOKENS, output="prompt")
    assert ours == theirs and ours
    _same_inputs(calls[0], calls[1])
    # the i2i system prompt, the reference (72 x 40 -> 64 x 32 by BFL's sizing, then the processor's patches), the
    # scaffold around the instruction
    text = upsampler.processor.tokenizer.decode(calls[0]["input_ids"][0])
    assert text.startswith("<|im_start|>system\n" + _system_prompt("i2i"))
    assert "<|vision_start|><|image_pad|>" in text and "User request: make the sky green\nOutput the caption." in text
    assert calls[0]["pixel_values"].shape[0] > 0 and calls[0]["image_grid_thw"].shape == (1, 3)
    ref.save(tmp_path / "ref.png")                                    # a path works as the image does
    assert upsampler.upsample("make the sky green", references=str(tmp_path / "ref.png"),
                              max_new_tokens=TOKENS) == ours
    _same_inputs(calls[0], calls[2])


def test_output_cleaned_as_diffusers(upsampler, monkeypatch):
    tok = upsampler.processor.tokenizer
    seen = {}

    def fake_generate(input_ids=None, **kwargs):
        seen.update(kwargs, n=input_ids.shape[1])
        tail = tok.convert_tokens_to_ids(["<think>", "</think>"]) + tok(" \n A fox. \n").input_ids + \
            tok.convert_tokens_to_ids(["<|im_end|>"])
        return torch.cat([input_ids, torch.tensor([tail])], dim=1)

    monkeypatch.setattr(upsampler.model, "generate", fake_generate)
    assert upsampler.upsample("fox", max_new_tokens=5) == "A fox."       # special tokens dropped, stripped
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 5
    monkeypatch.setattr(upsampler.model, "generate", lambda input_ids=None, **kw: torch.cat(
        [input_ids, torch.tensor([tok.convert_tokens_to_ids(["<|im_end|>"])])], dim=1))
    with pytest.raises(EngineError, match="empty caption"):
        upsampler.upsample("fox", max_new_tokens=5)


def test_missing_files_name_the_download(models_dir, tmp_path):
    with pytest.raises(EngineError) as e:
        up_mod.PromptUpsampler.from_models_dir(tmp_path)
    text = str(e.value)
    assert "black-forest-labs/flux-3-image-klein-pup" in text and "models/black-forest-labs/flux-3-image-klein-pup/" \
        in text and "turn the prompt upsampler off" in text
    assert not up_mod.is_available(tmp_path) and up_mod.is_available(models_dir, demo=True)
    partial = tmp_path / "pup"
    shutil.copytree(up_mod.pup_folder(models_dir, demo=True), partial)
    (partial / "preprocessor_config.json").unlink()
    (partial / "model.safetensors").unlink()
    with pytest.raises(EngineError, match=r"missing: preprocessor_config.json, the weights \(\*.safetensors\)"):
        up_mod.upsample_prompt(str(partial), "fox")


def test_bad_inputs_are_refused(upsampler):
    with pytest.raises(EngineError, match="needs a prompt"):
        upsampler.upsample("  ")
    with pytest.raises(EngineError, match="at most 10 reference images"):
        upsampler.upsample("fox", references=[_reference()] * 11)
    with pytest.raises(EngineError, match="carries none"):
        up_mod.upsample_prompt(object(), "fox")


def test_registry_row_matches_module():
    from engine import registry
    spec = next((a for a in registry.ADAPTERS if a.name == up_mod.MODEL_NAME), None)
    if spec is None:
        pytest.skip("the registry row for the prompt upsampler is not in engine/registry.py yet")
    assert {f.model_id for f in spec.files} == {up_mod.MODEL_ID}
    assert tuple(f.pattern for f in spec.files) == up_mod.PATTERNS
    assert registry.adapter_demo_id(spec.name) == "FLUX-Studio/FLUX.3-Image-Klein-pup-random-demo"
