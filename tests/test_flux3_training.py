"""FLUX 3 LoRA training (issue 20, item 4): ``train.py`` on the random-weight FLUX 3 Image Klein base demo, on the CPU.

- the run's family is read from the files (a FLUX 3 transformer or its Qwen3-VL encoder); target names are checked
  against FLUX 3's layers before anything loads; the step-distilled model is refused with the advice to use the base
- the schedule is FLUX 3's sampler formula at 1000 steps; the training loss is the squared error of exactly the
  velocity the sampler runs (``Flux3ImagePipeline.velocity``), references included
- a LoRA overfits two images; its file has DiffSynth-Studio's keys over BFL's module names, which the engine's FLUX 3
  LoRA reader maps back onto the trained layers (a fresh base model with it has the trained model's loss); diffusers'
  keys on request
- an edit LoRA feeds each record's references as their own stream (index -1, -2 ...), and they change the loss
- split training (--cache_dir) caches FLUX 3 inputs and trains to the same LoRA as the direct run
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.errors import EngineError
from engine.training import checkpoints as ck
from engine.training import flux3 as f3
from engine.training.args import TrainConfig
from engine.training.runner import Trainer

pytestmark = pytest.mark.filterwarnings("ignore")


def photo(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """{role: path} of the FLUX 3 demos (base transformer, klein's text encoder and VAE), DIFFSYNTH_MODEL_BASE_PATH
    pointing at their models folder while this module runs."""
    from engine.demo.flux3 import flux3_demo_files, write_flux3_demo
    models = tmp_path_factory.mktemp("flux3-train-models")
    write_flux3_demo(models)
    files = flux3_demo_files(models, base=True)
    files["distilled"] = flux3_demo_files(models)["dit"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(models))
        mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
        yield files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux3-data")
    for i in range(2):
        photo(i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo number {i}")
    return root


def config_for(demo, data, out, dit=None, **kw) -> TrainConfig:
    paths = [str(dit or demo["dit"]), str(demo["text_encoder"]), str(demo["vae"])]
    base = dict(dataset_base_path=str(data), model_paths=json.dumps(paths), lora_base_model="dit",
                lora_target_modules=f3.DEFAULT_TARGETS, lora_rank=4, learning_rate=1e-3, num_epochs=1,
                output_path=str(out), remove_prefix_in_ckpt="pipe.dit.")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def pipe(demo):
    """The base demo as a training run loads it (float32, on the CPU)."""
    return f3.load_pipeline(config_for(demo, None, None), "cpu", torch.float32, log=lambda m: None)


# ------------------------------------------------------------------------------------------- before loading
def test_the_family_comes_from_the_files_and_names_are_checked_first(demo, data, tmp_path):
    from engine.training.families import FLUX2, FLUX3, family_of
    from engine.training.lora_targets import check_target_names
    assert family_of(config_for(demo, data, tmp_path)) is FLUX3
    assert family_of(TrainConfig(model_paths=json.dumps([str(demo["text_encoder"])]))) is FLUX3   # stage 1 alone
    assert family_of(TrainConfig(model_paths=json.dumps([str(demo["vae"])]))) is FLUX2   # the shared VAE alone
    check_target_names(f3.DEFAULT_TARGETS + ",mode_blocks.image_cond.1.attn.to_q", "FLUX 3")
    with pytest.raises(EngineError, match="'to_qq' \\(did you mean to_q.*matches no layer of the FLUX 3"):
        check_target_names("to_k,to_qq", "FLUX 3")
    with pytest.raises(EngineError, match="training FLUX 3 with these inputs is not supported"):
        Trainer(config_for(demo, data, tmp_path, extra_inputs="kontext_images"), tmp_path, log=lambda m: None).run()
    with pytest.raises(EngineError, match="FLUX 3 LoRAs are written in DiffSynth-Studio's keys"):
        Trainer(config_for(demo, data, tmp_path, align_to_opensource_format=True), tmp_path, log=lambda m: None).run()


def test_the_distilled_model_is_refused_with_the_base_named(demo, data, tmp_path):
    config = config_for(demo, data, tmp_path, dit=demo["distilled"])
    with pytest.raises(EngineError, match="step-distilled FLUX 3 Image Klein.*flux-3-image-klein-base"):
        f3.load_pipeline(config, "cpu", torch.float32, log=lambda m: None)


# ------------------------------------------------------------------------------------------------ objective
def test_schedule_is_the_samplers_formula_at_1000_steps():
    from engine.flux3.schedule import flux3_sigmas
    s = f3.Flux3TrainingSchedule()
    assert torch.equal(s.sigmas, flux3_sigmas(1000)[:-1])          # sigma = a u / (1 + (a - 1) u), a = 6.93
    assert abs(float(s.weights.mean()) - 1.0) < 1e-4 and all(s.lookup(i) == i for i in range(0, 1000, 7))
    b = f3.Flux3TrainingSchedule(torch.bfloat16)                     # the DiT sees the sampler's bf16 timestep
    for i in range(0, 1000, 13):
        assert b.timesteps[b.lookup(i)].to(torch.bfloat16) == b.timesteps[i].to(torch.bfloat16)


def test_the_loss_is_the_error_of_the_samplers_velocity(pipe):
    """The training loss at sigma is mse(velocity - (noise - x0)), where velocity is what Flux3ImagePipeline's sampler
    computes for the noised tokens at that sigma -- with two references in their own stream."""
    from engine.flux3 import schedule as sch
    config = TrainConfig(extra_inputs="edit_image")
    x = f3.encode(pipe, {"image": photo(0), "prompt": "a red cube", "edit_image": [photo(1, (32, 32)), photo(2)]},
                  config, "cpu")
    assert x.references.shape == (1, 4 + 12, 128) and sorted(set(x.reference_ids[:, 3].tolist())) == [-2.0, -1.0]
    noise = torch.randn(x.latents.shape, generator=torch.Generator().manual_seed(3))
    sigma = 0.37
    loss = f3.flow_matching_loss(pipe.dit, x, sigma, 1.0, noise, torch.float32)
    velocity = pipe.velocity((1 - sigma) * x.latents + sigma * noise, torch.tensor(sigma), None, x.prompt_emb,
                             x.text_ids, x.img_ids, x.references, x.reference_ids)
    expected = torch.mean((velocity - (noise - x.latents)) ** 2)
    print(f"loss {float(loss):.6f} vs sampler {float(expected):.6f}")
    assert abs(float(loss) - float(expected)) < 1e-6
    plain = f3.Flux3TrainingInputs(x.latents, x.prompt_emb, x.text_ids, x.img_ids, x.height, x.width)
    assert abs(float(loss) - float(f3.flow_matching_loss(pipe.dit, plain, sigma, 1.0, noise, torch.float32))) > 1e-4
    assert x.img_ids.shape == (12, 4) and x.latents.shape == (1, 12, 128) and sch.CELL == 16


# ------------------------------------------------------------------------------------------------- training
def test_lora_overfits_and_its_diffsynth_keys_read_back(demo, data, tmp_path):
    """Rank 8 on every block linear memorises 2 images (the fixed-noise loss falls by a quarter in 20 steps); the file holds DiffSynth's keys over BFL's module names
    (no alpha), and engine.lora reads them back onto the same layers: a fresh base transformer with the file has the
    trained model's loss."""
    from engine.lora import read_lora
    config = config_for(demo, data, tmp_path / "runs", lora_rank=8, learning_rate=3e-2, num_epochs=10)
    run_dir = ck.new_run_dir(config.output_path)
    measured = {}
    trainer = Trainer(config, run_dir, log=lambda m: None)

    def progress(event):
        if event["event"] == "start":
            measured["inputs"] = [trainer.encode(trainer.pipe, {"image": Image.open(data / f"img{i}.png"),
                                                                "prompt": f"a photo number {i}"}, "cpu")
                                  for i in range(2)]
            measured["before"] = f3.fixed_loss(trainer.dit, measured["inputs"], torch.float32)

    trainer.on_progress = progress
    result = trainer.run()
    after = f3.fixed_loss(trainer.dit, measured["inputs"], torch.float32)
    print(f"FLUX 3 LoRA: fixed-noise loss {measured['before']:.4f} -> {after:.4f} in {result['step']} steps")
    assert trainer.family.name == "FLUX 3" and result["status"] == "finished" and result["step"] == 20
    assert measured["before"] / after > 1.2          # measured on this CPU: 2.474 -> 1.939 (x1.28)
    saved = load_file(result["final"])
    assert "content_mode_blocks.image.0.q_proj.lora_A.default.weight" in saved
    assert "single_blocks.1.mlp_out.lora_B.default.weight" in saved
    assert "txt_mode_blocks.1.attn_out.lora_A.default.weight" in saved and len(saved) == 2 * 6 * (3 * 2 + 2)
    lora = read_lora(result["final"], family="FLUX 3")
    assert lora.format == "DiffSynth"
    from engine.training.export import peft_pairs
    trained = peft_pairs(trainer.dit)
    assert set(lora.targets) == set(trained)
    fresh = f3.load_pipeline(config_for(demo, data, tmp_path), "cpu", torch.float32, log=lambda m: None)
    f3.fuse_lora(fresh.dit, result["final"])
    assert abs(f3.fixed_loss(fresh.dit, measured["inputs"], torch.float32) - after) < 1e-4
    # diffusers' keys on request, read back the same
    out = f3.save_lora(trainer.dit, tmp_path / "diffusers.safetensors", "diffusers", torch.float32)
    assert "transformer.mode_blocks.image.0.attn.to_q.lora_A.weight" in load_file(out)
    assert set(read_lora(out, family="FLUX 3").targets) == set(trained)


def test_edit_lora_feeds_the_references_as_their_own_stream(demo, tmp_path):
    from engine.flux3 import references as refs
    edit = tmp_path / "edit"
    edit.mkdir()
    for i in range(2):
        photo(i).save(edit / f"after{i}.png")
        photo(10 + i, (32, 32)).save(edit / f"before{i}.png")
    (edit / "metadata.json").write_text(json.dumps([
        {"image": "after0.png", "prompt": "make it red", "edit_image": "before0.png"},
        {"image": "after1.png", "prompt": "put them together", "edit_image": ["before0.png", "before1.png"]}]))
    seen, original = [], f3.encode

    def spy(pipe, item, config, device):
        seen.append(original(pipe, item, config, device))
        return seen[-1]

    f3.encode = spy
    try:
        config = config_for(demo, edit, tmp_path / "out", dataset_metadata_path=str(edit / "metadata.json"),
                            data_file_keys="image,edit_image", extra_inputs="edit_image")
        result = Trainer(config, ck.new_run_dir(config.output_path), log=lambda m: None).run()
    finally:
        f3.encode = original
    assert result["status"] == "finished" and len(seen) == 2
    by_refs = {x.references.shape[1]: x for x in seen}
    # sized as the pipeline sizes them (engine.flux3.references): one reference alone on its canvas (this 32x32 one
    # becomes 64x64: 16 tokens), several each fitted (32x32: 4 tokens each), reference i at index -(i + 1)
    assert sorted(by_refs) == [8, 16] and [tuple(s) for s in refs.sizes([photo(11, (32, 32))])] == [(64, 64)]
    assert by_refs[16].reference_ids[:, 3].tolist() == [-1.0] * 16
    assert by_refs[8].reference_ids[:, 3].tolist() == [-1.0] * 4 + [-2.0] * 4
    assert all(x.latents.shape == (1, 12, 128) for x in seen)    # the 64x48 target: 4x3 tokens


def test_split_training_caches_flux3_inputs_and_trains_the_same(demo, data, tmp_path):
    direct = config_for(demo, data, tmp_path / "direct", num_epochs=2)
    a = Trainer(direct, ck.new_run_dir(direct.output_path), log=lambda m: None).run()
    split = config_for(demo, data, tmp_path / "split", num_epochs=2, cache_dir=str(tmp_path / "cache"))
    b = Trainer(split, ck.new_run_dir(split.output_path), log=lambda m: None).run()
    assert a["status"] == b["status"] == "finished"
    manifest = json.loads((tmp_path / "cache" / "cache_manifest.json").read_text())
    assert manifest["family"] == "FLUX 3"
    x, y = load_file(a["final"]), load_file(b["final"])
    assert set(x) == set(y) and max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-6
    shutil.rmtree(tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ the studio
def test_the_train_service_offers_the_base_trains_and_publishes(demo, demo_dir, tmp_path_factory):
    """The Train tab's service offers the FLUX 3 base demo (not the step-distilled one) with FLUX 3's targets and the
    base's CFG for its samples; an edit dataset makes an edit LoRA; a run reports its steps and samples, and its LoRA
    goes into the library as a FLUX 3 LoRA."""
    import time

    from studio.engine import Engine
    from studio.training.runs import TrainingJobs
    from tests.helpers import linked_models
    root = tmp_path_factory.mktemp("flux3-train-studio")
    models = linked_models(root / "models", demo_dir)
    for key in ("dit", "text_encoder"):        # both FLUX 3 demo folders (base; klein's encoder and VAE), linked
        folder = demo[key].parent
        shutil.copytree(folder, models / "FLUX-Studio" / folder.name, copy_function=os.link, dirs_exist_ok=True)
    engine = Engine(models_dir=models, demo=True, outputs_dir=root / "outputs",
                    allow_dirs=[tmp_path_factory.getbasetemp()])
    jobs = TrainingJobs(engine, mode="thread")
    offered = {b["name"]: b for b in jobs.base_models() if b["family"] == "FLUX 3"}
    # the base models only (the step-distilled ones are not trainable); the real one listed, not installed here
    assert sorted(offered) == ["FLUX.3-Image-Klein-base", "FLUX.3-Image-Klein-base-random-demo"]
    assert not offered["FLUX.3-Image-Klein-base"]["available"]
    entry = offered["FLUX.3-Image-Klein-base-random-demo"]
    assert entry["available"] and "BFL's module names" in entry["note"]
    up = tmp_path_factory.mktemp("flux3-uploads")
    files = [up / "a.png", up / "b.png"]
    for i, f in enumerate(files):
        photo(i, (64, 64)).save(f)
    ds = jobs.prepare_dataset(files, {"a.png": "a photo of sks cube", "b.png": "sks cube on grass"})
    form = {"base_model": entry["name"], "dataset": ds["folder"], "captions": ds["rows"], "steps": 4, "save_every": 2,
            "resolution": 64, "lora_rank": 4, "learning_rate": 1e-3, "sample_prompts": "a photo of sks cube",
            "sample_every": 4, "sample_size": 64, "run_name": "klein3-cube"}
    config, _, total = jobs.build_config(form)
    assert config.lora_target_modules == f3.DEFAULT_TARGETS and total == 4
    assert config.validate_cfg_scale == 3.5 and config.tokenizer_path.endswith("text_encoder")
    assert jobs.build_config({**form, "targets": "attention"})[0].lora_target_modules == "to_q,to_k,to_v,to_out.0"
    pairs = tmp_path_factory.mktemp("flux3-pairs")
    for i in range(2):
        photo(i).save(pairs / f"after{i}.png")
        photo(5 + i, (32, 32)).save(pairs / f"before{i}.png")
    (pairs / "metadata.csv").write_text("image,prompt,edit_image\nafter0.png,make it red,before0.png\n"
                                        "after1.png,make it blue,before1.png\n")
    edit, _, _ = jobs.build_config({**form, "dataset": None, "captions": None,
                                    "metadata": str(pairs / "metadata.csv")})
    assert (edit.extra_inputs, edit.data_file_keys) == ("edit_image", "image,edit_image")
    started = jobs.start({**form, "sample_steps": 2})
    assert started["total"] == 4
    end = time.monotonic() + 120
    while jobs.poll()["active"] and time.monotonic() < end:
        time.sleep(0.2)
    p = jobs.poll()
    assert p["status"] == "finished", p["text"] + "\n" + "\n".join(p["log"][-10:])
    assert [x["step"] for x in p["loss"]] == [1, 2, 3, 4] and [s["step"] for s in p["samples"]] == [4]
    from engine.lora.family import file_family
    assert p["lora_name"] == "trained/klein3-cube.safetensors" and file_family(p["published"]) == "FLUX 3"
    published = load_file(p["published"])
    assert "content_mode_blocks.image.0.q_proj.lora_A.default.weight" in published


def test_train_py_runs_a_flux3_command_and_validate_lora_samples_it(demo, data, tmp_path, capsys):
    """``train.py`` with DiffSynth-style FLUX 3 flags (its FLUX.2 scripts' form over klein base's files by model id,
    the tokenizer from text_encoder/), in bf16 over an fp8 base with gradient checkpointing and a sample; then the
    seed's validate_lora as a function on the klein files."""
    from engine import ModelConfig
    from engine.training.cli import main
    from engine.training.validate import validate_lora
    models = demo["dit"].parents[2]                 # the models folder DIFFSYNTH_MODEL_BASE_PATH names
    for repo, folder in (("flux-3-image-klein-base", demo["dit"].parent), ("flux-3-image-klein", demo["vae"].parent),
                         ("FLUX.2-klein-4B", demo["vae"].parent)):
        shutil.copytree(folder, models / "black-forest-labs" / repo, copy_function=os.link, dirs_exist_ok=True)
    base, klein = "black-forest-labs/flux-3-image-klein-base", "black-forest-labs/flux-3-image-klein"
    out = tmp_path / "train" / "flux-3-image-klein-base_lora"
    argv = ["--dataset_base_path", str(data), "--model_id_with_origin_paths",
            f"{klein}:text_encoder/*.safetensors,{base}:model.safetensors,"
            f"black-forest-labs/FLUX.2-klein-4B:vae/diffusion_pytorch_model.safetensors",
            "--tokenizer_path", f"{klein}:text_encoder/", "--learning_rate", "1e-4", "--num_epochs", "1",
            "--remove_prefix_in_ckpt", "pipe.dit.", "--output_path", str(out), "--lora_base_model", "dit",
            "--lora_target_modules", f3.DEFAULT_TARGETS, "--lora_rank", "4", "--use_gradient_checkpointing",
            "--fp8_models", f"{base}:model.safetensors", "--torch_dtype", "bfloat16",
            "--validate_prompt", "a photo number 0", "--validate_height", "32", "--validate_width", "32",
            "--validate_num_inference_steps", "2", "--validate_cfg_scale", "3.5"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Stored in fp8: dit." in capsys.readouterr().out
    run = ck.read_run(out)
    assert run["status"] == "finished" and run["step"] == 2 and np.isfinite(run["loss"])
    saved = load_file(out / "epoch-0.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in saved.values()) and len(saved) == 2 * 6 * 8
    assert len(list((out / "samples").glob("*.png"))) == 1
    configs = [ModelConfig(model_id=klein, origin_file_pattern="text_encoder/*.safetensors"),
               ModelConfig(model_id=base, origin_file_pattern="model.safetensors"),
               ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B",
                           origin_file_pattern="vae/diffusion_pytorch_model.safetensors")]
    made = validate_lora(configs, out / "epoch-0.safetensors", ["a cube"], tmp_path / "validate", device="cpu",
                         torch_dtype=torch.float32, height=32, width=48, num_inference_steps=2, cfg_scale=3.5)
    assert Image.open(made[0]).size == (48, 32)


def test_the_train_tab_offers_the_flux3_base_with_its_settings(page, shots):
    """In the browser: the Train tab offers the FLUX 3 base demo (not the step-distilled one); choosing it says how
    its LoRAs are saved and edit LoRAs are given, sets its sample steps and FLUX 3's module names as the custom
    targets' hint."""
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-base input").click()
    listed = page.locator("ul[role='listbox'] li")
    listed.first.wait_for()
    names = listed.all_inner_texts()
    assert any("FLUX 3 Image Klein base random-weight demo" in n for n in names)
    assert not any(n.startswith("FLUX 3 Image Klein random-weight demo") for n in names)
    from tests.test_flux2_training import choose_and_check_base
    choose_and_check_base(page, "FLUX 3 Image Klein base random-weight demo", ("FLUX 3 format", "up to ten"), 8,
                          "mode_blocks.image_cond")
    page.screenshot(path=str(shots / "flux3-train.png"), full_page=True)
