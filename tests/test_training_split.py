"""Split (two-stage) training and the training-task seam (engine/training/tasks.py, cache.py), on the tiny demo model.

- ``--task`` names: the seed's six, anything else refused naming them; ``--help`` lists them
- stage 1 (``sft:data_process``) with the DiT left out of the model list, as the seed's docs say: only the encoders
  load, one safetensors + JSON sample per record and a manifest (no pickles)
- stage 2 (``sft:train``, ``--dataset_base_path <cache>``): only the DiT loads, even with the whole model list, and
  the loss curve (loss.csv) and the final LoRA equal one-stage training's bit for bit (same seed and repeats)
- a cache for other sizes, captions, trigger word, family or DiT widths is refused naming what differs and the fix;
  an incomplete cache or none at all too; stage 1 resumed skips the samples already written
- direct_distill through the seam: the per-step draw is the record's seeded noise and settings, cached or not
"""
import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import EngineError
from engine.training import cache as cache_mod
from engine.training import checkpoints as ck
from engine.training.args import TrainConfig, build_parser
from engine.training.data import TrainingDataset
from engine.training.lora_targets import DIFFSYNTH_FLUX_TARGETS
from engine.training.runner import Trainer
from engine.training.tasks import TASKS, TrainingTask, parse_task
from tests.test_training import demo_args, folder_data, photo  # noqa: F401 - module fixtures reused

pytestmark = pytest.mark.filterwarnings("ignore")


def config_for(demo_args, data, out, **kw) -> TrainConfig:   # noqa: F811
    base = dict(dataset_base_path=str(data), lora_base_model="dit", lora_target_modules=DIFFSYNTH_FLUX_TARGETS,
                lora_rank=4, learning_rate=1e-3, num_epochs=2, dataset_repeat=2, seed=7, output_path=str(out),
                **demo_args)
    base.update(kw)
    return TrainConfig(**base)


def without_dit(demo_args):   # noqa: F811
    paths = json.loads(demo_args["model_paths"])
    return dict(demo_args, model_paths=json.dumps([p for p in paths if not str(p).endswith("flux1-dev.safetensors")]))


def train(config):
    run_dir = ck.new_run_dir(config.output_path)
    trainer = Trainer(config, run_dir, log=lambda m: None)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def split(folder_data, demo_args, tmp_path_factory):   # noqa: F811
    """One-stage training, stage 1 into a cache (DiT left out), stage 2 from it (whole model list given)."""
    root = tmp_path_factory.mktemp("split")
    one = config_for(demo_args, folder_data, root / "one")
    stage1 = config_for(without_dit(demo_args), folder_data, root / "cache", task="sft:data_process",
                        dataset_repeat=1)
    t1, r1 = train(stage1)
    stage2 = config_for(demo_args, r1["run_dir"], root / "two", task="sft:train")
    whole = train(one)
    t2, r2 = train(stage2)
    return {"one": whole, "stage1": (t1, r1), "stage2": (t2, r2), "cache": pathlib.Path(r1["run_dir"]),
            "configs": (one, stage1, stage2), "root": root}


# ---------------------------------------------------------------------------------------------- task names
def test_task_names_and_help():
    assert TASKS == ("sft", "sft:data_process", "sft:train", "direct_distill", "direct_distill:data_process",
                     "direct_distill:train")
    assert [parse_task(t) for t in ("sft", "sft:train", "direct_distill:data_process")] == [
        ("sft", "all"), ("sft", "train"), ("direct_distill", "data_process")]
    for bad in ("dpo", "sft:prepare", "sft:", "sft:all", "direct_distill:train:x"):
        with pytest.raises(EngineError, match="sft:data_process.*direct_distill:train"):
            parse_task(bad)
    help_text = " ".join(build_parser().format_help().split())
    assert all(t in help_text for t in TASKS)
    assert build_parser().parse_args(["--task", "sft:data_process"]).task == "sft:data_process"


def test_unknown_task_is_refused_before_loading(folder_data, demo_args, tmp_path):   # noqa: F811
    with pytest.raises(EngineError, match="--task sft:bogus.*use one of sft, sft:data_process"):
        train(config_for(demo_args, folder_data, tmp_path / "x", task="sft:bogus"))


# ------------------------------------------------------------------------------------------------- stage 1
def test_stage1_loads_no_dit_and_writes_safetensors_and_json(split):
    trainer, result = split["stage1"]
    assert result["status"] == "finished" and result["step"] == 2
    roles = set(trainer.pipe.installed_models())
    assert "dit" not in roles and {"vae", "text_encoder_1", "text_encoder_2"} <= roles
    cache = split["cache"]
    files = sorted(p.name for p in (cache / "samples").iterdir())
    assert files == ["000000.json", "000000.safetensors", "000001.json", "000001.safetensors"]
    assert not [p for p in cache.rglob("*") if p.suffix in (".pth", ".pt", ".pkl", ".bin")]
    m = json.loads((cache / cache_mod.MANIFEST).read_text())
    assert m["family"] == "FLUX.1" and m["count"] == 2 and m["complete"] and m["task"] == "sft"
    assert (m["height"], m["width"], m["max_pixels"]) == (None, None, 1024 * 1024)
    assert m["dims"] == {"in_channels": 64, "joint_attention_dim": trainer.pipe.text_encoder_2.config.d_model,
                         "pooled_projection_dim": m["dims"]["pooled_projection_dim"]}
    assert "ae.safetensors" in m["encoders"]["vae"] and "dit" not in m["encoders"]
    sample = json.loads((cache / "samples" / "000001.json").read_text())
    assert sample["prompt"] == "a photo number 1" and sample["inputs"]["height"] == 64
    tensors = load_file(str(cache / "samples" / "000001.safetensors"))
    assert set(tensors) == {"latents", "prompt_emb", "pooled"} and tensors["latents"].shape == (1, 16, 8, 8)
    # the cached tensors are the one-stage encoding, bit for bit
    ds = TrainingDataset(split["configs"][0].dataset_base_path)
    fresh = trainer.encode(trainer.pipe, ds.load_record(1), "cpu")
    assert torch.equal(fresh.latents, tensors["latents"]) and torch.equal(fresh.prompt_emb, tensors["prompt_emb"])


def test_stage1_resumed_skips_written_samples(split, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(split["cache"], folder)
    (folder / "samples" / "000001.json").unlink()   # a sample cut off before its JSON: written again
    ds = TrainingDataset(split["configs"][1].dataset_base_path)
    encoded = []

    def prepare(item):
        encoded.append(item["prompt"])
        return cache_mod.read_sample(split["cache"], 1)

    manifest = {k: v for k, v in cache_mod.read_manifest(split["cache"]).items() if k != "dims"}
    assert cache_mod.write_cache(folder, ds, prepare, manifest) == (1, False)
    assert encoded == ["a photo number 1"]
    assert not cache_mod.read_manifest(folder)["complete"]
    with pytest.raises(EngineError, match="incomplete.*--resume"):
        cache_mod.CachedDataset(TrainConfig(dataset_base_path=str(folder)))
    assert cache_mod.finish_cache(folder)["complete"]
    assert len(cache_mod.CachedDataset(TrainConfig(dataset_base_path=str(folder), dataset_repeat=3))) == 6


# ------------------------------------------------------------------------------------------------- stage 2
def test_stage2_loads_only_the_dit(split):
    trainer, result = split["stage2"]
    assert result["status"] == "finished" and result["step"] == 8      # 2 records x 2 repeats x 2 epochs
    assert set(trainer.pipe.installed_models()) == {"dit"}
    assert trainer.pipe.text_encoder_1 is None and trainer.pipe.vae is None


def test_stage2_equals_one_stage_bit_for_bit(split):
    (_t, one), (_t2, two) = split["one"], split["stage2"]
    curve_one = (pathlib.Path(one["run_dir"]) / ck.LOSS_FILE).read_text()
    curve_two = (pathlib.Path(two["run_dir"]) / ck.LOSS_FILE).read_text()
    assert len(curve_one.splitlines()) == 8 and curve_one == curve_two
    a, b = load_file(one["final"]), load_file(two["final"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _refused(config, match):
    with pytest.raises(EngineError, match=match):
        train(config)


def test_other_settings_are_refused(split, folder_data, tmp_path):   # noqa: F811
    stage2 = split["configs"][2].replace(output_path=str(tmp_path / "r"))
    _refused(stage2.replace(max_pixels=512 * 512), r"--max_pixels 1048576 \(cache\) vs 262144.*re-run stage 1")
    _refused(stage2.replace(height=32, width=32), r"--height None \(cache\) vs 32")
    _refused(stage2.replace(trigger_word="sks"), r"--trigger_word None \(cache\) vs 'sks'")
    meta = tmp_path / "metadata.csv"
    meta.write_text("image,prompt\nimg0.png,a photo number 0\nimg1.png,another caption\n")
    _refused(stage2.replace(dataset_metadata_path=str(meta)), "captions of .*metadata.csv differ")
    meta.write_text("image,prompt\nimg0.png,a photo number 0\nimg1.png,a photo number 1\n")
    assert train(stage2.replace(dataset_metadata_path=str(meta), num_epochs=1, dataset_repeat=1))[1]["step"] == 2
    _refused(stage2.replace(validate_prompts=["a photo"]), "loads only the DiT.*--validate_prompt")
    _refused(stage2.replace(dataset_base_path=str(folder_data)), "holds none.*run stage 1 first")


def test_other_model_is_refused(split, tmp_path):
    stage2 = split["configs"][2]
    for change, match in (({"family": "FLUX.2"}, r"made for FLUX.2 .*this run's transformer is FLUX.1.*re-run"),
                          ({"dims": {"in_channels": 64, "joint_attention_dim": 999, "pooled_projection_dim": 32}},
                           r"joint_attention_dim 999 \(cache\) vs \d+ \(this DiT\).*re-run stage 1")):
        folder = tmp_path / f"cache-{len(change)}-{next(iter(change))}"
        shutil.copytree(split["cache"], folder)
        manifest = cache_mod.read_manifest(folder)
        manifest.update(change)
        cache_mod.write_manifest(folder, manifest)
        _refused(stage2.replace(dataset_base_path=str(folder), output_path=str(tmp_path / "r")), match)


# ------------------------------------------------------------------------------------------- direct distill
def test_direct_distill_draw_from_record_and_cache(split):
    pytest.importorskip("engine.training.distill")
    from engine.training.distill import DistillTrainingModule, distill_noise
    task = TrainingTask("direct_distill", "all")
    item = {"prompt": "p", "seed": "3", "num_inference_steps": "2", "rand_device": "cpu", "cfg_scale": "1"}
    inputs, _ = cache_mod.read_sample(split["cache"], 0)
    got, meta = task.inputs(lambda record: inputs, item, "cpu")
    draw = task.draw(torch.Generator().manual_seed(0), None, got, meta)
    assert set(draw) == {"noise", "num_inference_steps", "cfg_scale"} and draw["num_inference_steps"] == 2
    assert torch.equal(draw["noise"], distill_noise(meta["distill"], inputs.latents.shape))
    # the same settings through a cache written with them (sft's columns serve direct_distill:train)
    folder = split["root"] / "distill-cache"
    if not folder.exists():
        shutil.copytree(split["cache"], folder)
        for i in range(2):
            sample, _ = cache_mod.read_sample(folder, i)
            cache_mod.write_sample(folder, i, sample, "p", {"columns": {"seed": 3, "num_inference_steps": 2}})
        cache_mod.finish_cache(folder)
    ds = cache_mod.CachedDataset(TrainConfig(dataset_base_path=str(folder)), "direct_distill")
    cached, cmeta = TrainingTask("direct_distill", "train").inputs(None, ds[0], "cpu")
    assert cmeta["distill"]["seed"] == 3 and torch.equal(task.draw(None, None, cached, cmeta)["noise"], draw["noise"])
    trainer, _ = split["stage2"]
    module = TrainingTask("direct_distill", "train").module(trainer.pipe, False)
    assert isinstance(module, DistillTrainingModule)
    with torch.no_grad():
        assert torch.isfinite(module(cached, **task.draw(None, None, cached, cmeta)))
    with pytest.raises(EngineError, match="no direct-distill settings"):
        cache_mod.CachedDataset(TrainConfig(dataset_base_path=str(split["cache"])), "direct_distill")
