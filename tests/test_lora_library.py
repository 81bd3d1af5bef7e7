"""The LoRA folder and keeping a transformer's LoRAs in step with requests (applied once, re-weighted, dropped)."""
import pytest
import torch
from safetensors.torch import save_file

from engine import EngineError
from engine.loading import load_models
from engine.lora import active_loras
from engine.lora import library


def peft_lora(dit, seed, layers=("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp"), rank=4):
    g = torch.Generator().manual_seed(seed)
    mods = dict(dit.named_modules())
    sd = {}
    for name in layers:
        m = mods[name]
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


@pytest.fixture
def setup(demo_dir, tmp_path):
    dit = load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]
    folder = tmp_path / "models" / "loras"
    (folder / "styles").mkdir(parents=True)
    save_file(peft_lora(dit, 1), str(folder / "one.safetensors"))
    save_file(peft_lora(dit, 2), str(folder / "styles" / "two.safetensors"))
    (folder / "notes.txt").write_text("not a lora")
    return dit, tmp_path / "models"


def layer_out(dit, name="transformer_blocks.0.attn.to_q"):
    m = dict(dit.named_modules())[name]
    x = torch.randn(1, 3, m.in_features, generator=torch.Generator().manual_seed(0))
    return m(x)


def test_listing_and_resolving(setup):
    dit, models = setup
    names = [item["name"] for item in library.list_loras(models)]
    assert names == ["one.safetensors", "styles/two.safetensors"]
    with pytest.raises(EngineError, match="outside the LoRA folder"):
        library.resolve(models, "../../etc/passwd")
    with pytest.raises(EngineError, match="was not found"):
        library.resolve(models, "missing.safetensors")
    assert library.list_loras(models.parent / "nothing") == []


def test_sync_attaches_reweights_and_drops(setup, monkeypatch):
    dit, models = setup
    base = layer_out(dit)
    recipe = library.sync(dit, models, [{"name": "one.safetensors", "weight": 1.0}, ("styles/two.safetensors", 0.5)])
    assert [(r["file"], r["weight"], r["format"]) for r in recipe] == [
        ("one.safetensors", 1.0, "diffusers/PEFT"), ("styles/two.safetensors", 0.5, "diffusers/PEFT")]
    both = layer_out(dit)
    assert not torch.equal(base, both)
    # A new weight for an attached LoRA does not read the file again.
    from engine.lora import attach as attach_mod
    real_read = attach_mod.read
    monkeypatch.setattr(attach_mod, "read", lambda *a, **k: pytest.fail("re-read an unchanged LoRA"))
    library.sync(dit, models, [{"name": "one.safetensors", "weight": 1.0}, {"name": "styles/two.safetensors", "weight": 0.0}])
    monkeypatch.setattr(attach_mod, "read", real_read)
    only_one = layer_out(dit)
    library.sync(dit, models, [{"name": "one.safetensors", "weight": 1.0}])
    assert [a["name"] for a in active_loras(dit)] == ["one.safetensors"]
    assert torch.allclose(layer_out(dit), only_one, atol=1e-6)
    library.sync(dit, models, [])
    assert active_loras(dit) == [] and torch.equal(layer_out(dit), base)


def test_bad_weight_and_unusable_file_are_clear(setup):
    dit, models = setup
    with pytest.raises(EngineError, match="must be a number"):
        library.sync(dit, models, [{"name": "one.safetensors", "weight": "heavy"}])
    (models / "loras" / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(EngineError, match="broken.safetensors"):
        library.sync(dit, models, [{"name": "broken.safetensors"}])
    assert library.sync(dit, models, ["one.safetensors"])[0]["weight"] == 1.0


def test_engine_requests_with_loras(setup, demo_dir, tmp_path):
    """Through the studio's engine: a LoRA changes the image, is kept between jobs, is recorded and restorable."""
    import numpy as np
    from PIL import Image
    from studio.engine import Engine
    _, models = setup
    import shutil
    shutil.copytree(demo_dir.parent.parent, models, dirs_exist_ok=True)
    eng = Engine(models_dir=models, demo=True, outputs_dir=tmp_path / "out", allow_dirs=[tmp_path])
    assert [x["name"] for x in eng.loras()] == ["one.safetensors", "styles/two.safetensors"]
    small = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 3, "prompt": "x"}
    plain = eng.generate(small)[0]
    with_lora = eng.generate({**small, "loras": [{"name": "styles/two.safetensors", "weight": 2.0}]})[0]
    px = lambda r: np.asarray(Image.open(r["path"]), dtype=np.int16)
    assert np.abs(px(plain) - px(with_lora)).max() > 0
    assert with_lora["recipe"]["loras"][0]["file"] == "styles/two.safetensors"
    assert "two:2" in with_lora["info"]
    restored = eng.read_recipe(with_lora["path"])
    assert restored["loras"] == [{"name": "styles/two.safetensors", "weight": 2.0}]
    again = eng.generate(restored)[0]
    assert np.array_equal(px(again), px(with_lora))
    assert np.array_equal(px(eng.generate(small)[0]), px(plain))            # dropped again: back to the base model
    with pytest.raises(EngineError, match="was not found"):
        eng.generate({**small, "loras": [{"name": "nope.safetensors"}]})


def test_seed_style_load_lora_and_clear_lora(setup, demo_dir):
    import numpy as np
    from engine import FluxImagePipeline, ModelConfig
    _, models = setup
    d = demo_dir
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=d / "flux1-dev.safetensors"), ModelConfig(path=d / "ae.safetensors"),
                       ModelConfig(path=d / "text_encoder" / "model.safetensors"), ModelConfig(path=d / "text_encoder_2")],
        tokenizer_1_config=ModelConfig(path=d / "tokenizer"), tokenizer_2_config=ModelConfig(path=d / "tokenizer_2"))
    kw = dict(prompt="a", height=64, width=64, seed=1, num_inference_steps=2, progress_bar_cmd=lambda x: x)
    base = np.asarray(pipe(**kw))
    report = pipe.load_lora(pipe.dit, str(models / "loras" / "one.safetensors"), alpha=3.0)
    assert report["format"] == "diffusers/PEFT" and report["bound"] == 2
    assert not np.array_equal(np.asarray(pipe(**kw)), base)
    pipe.clear_lora()
    assert np.array_equal(np.asarray(pipe(**kw)), base)
    with pytest.raises(EngineError, match="pipe.dit"):
        pipe.load_lora(pipe.vae, str(models / "loras" / "one.safetensors"))
