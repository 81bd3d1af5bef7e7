"""Split (two-stage) training and the training-task seam (engine/training/tasks.py, cache.py), on the tiny demo model.

- ``--task`` names: the seed's six, anything else refused naming them; ``--help`` lists them
- stage 1 (``sft:data_process``) with the DiT left out of the model list, as the seed's docs say: only the encoders
  load, one safetensors + JSON sample per record and a manifest (no pickles)
- stage 2 (``sft:train``, ``--dataset_base_path <cache>``): only the DiT loads, even with the whole model list, and
  the loss curve (loss.csv) and the final LoRA equal one-stage training's bit for bit (same seed and repeats)
- a cache for other sizes, captions, trigger word, family or DiT widths is refused naming what differs and the fix;
  an incomplete cache or none at all too; stage 1 resumed skips the samples already written
- direct_distill through the seam: the per-step draw is the record's seeded noise and settings, cached or not
- Kontext references cached as tokens (split equals one-stage); the seed's FLUX.2 split script runs verbatim and
  equals one-stage training
- split in one command (``--cache_dir``): the same loss curve and LoRA as both of the above, the encoders released
  before the DiT loads, "cache" progress events (no zero-loss steps), a second run reuses the cache (no encoder
  loads), a cache for other settings is refused and kept, a run stopped while encoding resumes; ``cache_key`` and
  ``list_caches``
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
from tests.test_training import demo_args, folder_data, kontext_data  # noqa: F401 - module fixtures reused

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
                        dataset_repeat=1, lora_target_modules=TrainConfig().lora_target_modules)   # (trains none)
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
    events, _ = ck.read_events(cache)   # the encoding's own progress events, no training steps
    assert [(e["done"], e["total"], e["encoded"]) for e in events if e["event"] == "cache"] == [(1, 2, True),
                                                                                              (2, 2, True)]
    assert not [e for e in events if e["event"] == "step"]
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
    assert len(cache_mod.CachedDataset(stage2.replace(dataset_metadata_path=str(meta)))) == 4   # the same captions
    _refused(stage2.replace(validate_prompts=["a photo"]), "loads only the DiT.*--validate_prompt")
    _refused(stage2.replace(dataset_base_path=str(folder_data)), "holds none.*run stage 1 first")
    _refused(stage2.replace(task="sft"), "is a split-training cache.*--task sft:train")


def test_other_model_is_refused(split, tmp_path):
    """A cache whose tensors another DiT's widths would take (here: the manifest says so) is refused by the run
    once the DiT is loaded; one made for FLUX.2 is refused for a FLUX.1 DiT (before it loads)."""
    folder = tmp_path / "cache"
    shutil.copytree(split["cache"], folder)
    manifest = cache_mod.read_manifest(folder)
    manifest["dims"]["joint_attention_dim"] = 999
    cache_mod.write_manifest(folder, manifest)
    _refused(split["configs"][2].replace(dataset_base_path=str(folder), output_path=str(tmp_path / "r")),
             r"does not fit this transformer: joint_attention_dim 999 \(cache\) vs \d+ \(this DiT\).*re-run stage 1")
    manifest.update(family="FLUX.2", dims=cache_mod.read_manifest(split["cache"])["dims"])
    cache_mod.write_manifest(folder, manifest)
    _refused(split["configs"][2].replace(dataset_base_path=str(folder), output_path=str(tmp_path / "r")),
             r"made for FLUX.2 \(encoders .*ae.safetensors.*transformer is FLUX.1.*re-run stage 1")


# ----------------------------------------------------------------------------- one command (--cache_dir)
def spied_run(config, run_dir=None, stop_at_cache=None):
    """A run with ``tasks.load_encoders`` watched: ``(trainer, result, events, loaded)``, ``loaded``: weak references
    to every encoder module loaded and, per DiT load, how many of them were still alive then (after a collection);
    ``stop_at_cache``: stop after that many samples were encoded."""
    import gc
    import weakref

    from engine.training import model as model_mod
    from engine.training import tasks as tasks_mod
    real, real_dit, loaded, events = tasks_mod.load_encoders, model_mod.load_pipeline, [], []
    loaded_alive = []
    stop = __import__("threading").Event()

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        loaded.extend(weakref.ref(m) for m in pipe.installed_models().values())
        return pipe

    def dit_spy(*args, **kwargs):
        gc.collect()
        loaded_alive.append(sum(ref() is not None for ref in loaded))
        return real_dit(*args, **kwargs)

    def progress(event):
        events.append(event)
        if event["event"] == "cache" and event.get("done") == stop_at_cache:
            stop.set()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks_mod, "load_encoders", spy)
        mp.setattr(model_mod, "load_pipeline", dit_spy)
        trainer = Trainer(config, run_dir or ck.new_run_dir(config.output_path), on_progress=progress,
                          stop_event=stop, log=lambda m: None)
        result = trainer.run()
    return trainer, result, events, {"encoders": loaded, "alive_at_dit_load": loaded_alive}


@pytest.fixture(scope="module")
def one_command(split, folder_data, demo_args):   # noqa: F811
    """``--cache_dir`` (named by cache_key) with the one-stage run's settings; then a second run on the same DIR."""
    root = split["root"]
    config = config_for(demo_args, folder_data, root / "oc")
    config = config.replace(cache_dir=str(root / "caches" / cache_mod.cache_key(config)))
    first = spied_run(config)
    second = spied_run(config.replace(max_steps=3))
    return {"config": config, "first": first, "second": second}


def test_one_command_equals_two_stages_and_one_stage(split, one_command):
    trainer, result, events, loaded = one_command["first"]
    assert result["status"] == "finished" and result["step"] == 8
    curve = (pathlib.Path(result["run_dir"]) / ck.LOSS_FILE).read_text()
    assert curve == (pathlib.Path(split["one"][1]["run_dir"]) / ck.LOSS_FILE).read_text()
    assert curve == (pathlib.Path(split["stage2"][1]["run_dir"]) / ck.LOSS_FILE).read_text()
    a, b = load_file(split["one"][1]["final"]), load_file(result["final"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the encoding reported as such (no zero-loss steps), then 8 training steps
    kinds = [e["event"] for e in events if e["event"] in ("cache", "start", "step")]
    assert kinds == ["cache", "cache", "start"] + ["step"] * 8
    assert [(e["done"], e["total"]) for e in events if e["event"] == "cache"] == [(1, 2), (2, 2)]
    # one run folder; the cache in DIR; the encoders released before the DiT trained
    folder = pathlib.Path(one_command["config"].cache_dir)
    assert cache_mod.read_manifest(folder)["complete"] and not (pathlib.Path(result["run_dir"]) / "samples").exists()
    assert len(loaded["encoders"]) == 3 and loaded["alive_at_dit_load"] == [0]
    assert set(trainer.pipe.installed_models()) == {"dit"}
    assert ck.read_run(result["run_dir"])["kind"] == "lora"


def test_second_run_reuses_the_cache(split, one_command):
    _trainer, result, events, loaded = one_command["second"]
    assert result["status"] == "finished" and loaded["encoders"] == []       # no encoder loaded
    assert [e for e in events if e["event"] == "cache"][0]["reused"]
    curve = (pathlib.Path(result["run_dir"]) / ck.LOSS_FILE).read_text().splitlines()
    assert curve == (pathlib.Path(split["one"][1]["run_dir"]) / ck.LOSS_FILE).read_text().splitlines()[:3]


def test_one_command_refuses_another_cache_and_keeps_it(one_command, split, tmp_path):
    config = one_command["config"].replace(output_path=str(tmp_path / "r"))
    manifest = (pathlib.Path(config.cache_dir) / cache_mod.MANIFEST).read_text()
    for change, match in ((dict(max_pixels=512 * 512), r"--max_pixels 1048576 \(cache\) vs 262144 \(this run\)"),
                          (dict(trigger_word="sks"), r"--trigger_word None \(cache\) vs sks.*the captions differ"),
                          (dict(task="direct_distill"), r"--task sft \(cache\) vs direct_distill"),
                          (dict(torch_dtype="bfloat16"), r"dtype float32 \(cache\) vs bfloat16")):
        with pytest.raises(EngineError, match="holds a cache made for other settings: " + match + ".*kept as it is"):
            train(config.replace(**change))
    assert (pathlib.Path(config.cache_dir) / cache_mod.MANIFEST).read_text() == manifest
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _refused(config.replace(cache_dir=str(tmp_path / "busy")), r"holds other files \(notes.txt\).*empty or new")
    _refused(config.replace(task="sft:train"), "--cache_dir runs both stages in one command: use it with --task sft")
    _refused(config.replace(validate_prompts=["a photo"]), r"--cache_dir\) loads only the DiT")


def test_one_command_stopped_while_encoding_resumes(split, folder_data, demo_args, tmp_path):   # noqa: F811
    from engine.training.api import resume_training
    config = config_for(demo_args, folder_data, tmp_path / "runs", cache_dir=str(tmp_path / "caches" / "c"))
    _t, stopped, events, _l = spied_run(config, stop_at_cache=1)
    assert stopped["status"] == "stopped" and ck.read_run(stopped["run_dir"])["status"] == "stopped"
    assert not [e for e in events if e["event"] == "step"]
    manifest = cache_mod.read_manifest(config.cache_dir)
    assert not manifest["complete"] and cache_mod.sample_done(config.cache_dir, 0)
    assert not cache_mod.sample_done(config.cache_dir, 1)
    # the listing: a complete cache and this one, half done
    listed = {c["folder"]: c for c in cache_mod.list_caches(tmp_path / "caches")}
    assert listed[config.cache_dir]["samples"] == 1 and listed[config.cache_dir]["total"] == 2
    assert not listed[config.cache_dir]["complete"]
    resumed = resume_training(stopped["run_dir"]).wait(timeout=120)   # (run.json's config: the same --cache_dir)
    assert resumed["status"] == "finished" and resumed["step"] == 8
    assert cache_mod.read_manifest(config.cache_dir)["created"] == manifest["created"]
    curve = (pathlib.Path(stopped["run_dir"]) / ck.LOSS_FILE).read_text()
    assert curve == (pathlib.Path(split["one"][1]["run_dir"]) / ck.LOSS_FILE).read_text()
    a, b = load_file(split["one"][1]["final"]), load_file(resumed["final"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_key_and_listing(one_command, split, folder_data, tmp_path):   # noqa: F811
    config = one_command["config"]
    key = cache_mod.cache_key(config)
    assert pathlib.Path(config.cache_dir).name == key and key.startswith(f"{folder_data.name}-max1024-")
    # what does not change the encodings shares the cache; what does gets another
    same = dict(lora_rank=8, learning_rate=5e-4, num_epochs=9, output_path=str(tmp_path), seed=3, dataset_repeat=5,
                model_paths=json.dumps(json.loads(config.model_paths)[::-1]), cache_dir=None)   # (another order)
    paths = json.loads(config.model_paths)
    assert cache_mod.cache_key(config.replace(**same)) == key
    assert cache_mod.cache_key(config.replace(model_paths=json.dumps(paths[1:]))) == key      # no DiT: stage 1's
    for change in (dict(max_pixels=512 * 512), dict(height=64, width=64), dict(trigger_word="sks"),
                   dict(task="direct_distill"), dict(extra_inputs="kontext_images"),
                   dict(model_paths=json.dumps(paths[:2] + paths[3:]))):                     # another encoder set
        assert cache_mod.cache_key(config.replace(**change)) != key, change
    assert cache_mod.cache_key(config.replace(height=64, width=64)).split("-")[-2] == "64x64"
    captions = tmp_path / "data"
    shutil.copytree(folder_data, captions)
    (captions / "img1.txt").write_text("another caption")
    assert cache_mod.cache_key(config.replace(dataset_base_path=str(captions))) != key
    (listed,) = [c for c in cache_mod.list_caches(pathlib.Path(config.cache_dir).parent) if c["name"] == key]
    assert listed["folder"] == config.cache_dir and listed["complete"] and listed["samples"] == listed["total"] == 2
    assert listed["family"] == "FLUX.1" and listed["dataset"] == str(folder_data) and listed["size_mb"] > 0
    assert listed["size_settings"] == {"height": None, "width": None, "max_pixels": 1024 * 1024}
    assert listed["created"] and "ae.safetensors" in listed["encoders"]
    assert cache_mod.list_caches(tmp_path / "none") == [] and cache_mod.list_caches(folder_data) == []


# ------------------------------------------------------------------------------------------- direct distill
SEED_COLUMNS = "seed,rand_device,num_inference_steps,cfg_scale"   # the seed's direct_distill --extra_inputs


def test_direct_distill_through_the_seam(split, folder_data, demo_args, tmp_path):   # noqa: F811
    """direct_distill whole, split and split in one command (--cache_dir): the draw is the record's seeded noise
    (cached or not), the loop calls H2's module with it, and the split runs' loss curves and LoRAs equal the whole
    run's. The split runs pass the seed's --extra_inputs (its metadata columns), accepted for direct_distill."""
    from engine.training.distill import DistillTrainingModule, distill_noise
    (tmp_path / "d").mkdir()
    for i in range(2):
        shutil.copy(folder_data / f"img{i}.png", tmp_path / "d" / f"img{i}.png")
    meta = tmp_path / "d" / "metadata.csv"
    meta.write_text("image,prompt,seed,rand_device,num_inference_steps,cfg_scale\n"
                    "img0.png,a photo number 0,11,cpu,2,1\nimg1.png,a photo number 1,12,cpu,2,1\n")
    kw = dict(task="direct_distill", dataset_metadata_path=str(meta), num_epochs=1, dataset_repeat=1)
    whole_t, whole = train(config_for(demo_args, tmp_path / "d", tmp_path / "whole", **kw))
    assert isinstance(whole_t.dit, torch.nn.Module) and whole["status"] == "finished" and whole["step"] == 2
    _t, cached = train(config_for(without_dit(demo_args), tmp_path / "d", tmp_path / "cache",
                                  **dict(kw, task="direct_distill:data_process", extra_inputs=SEED_COLUMNS)))
    sample = json.loads((pathlib.Path(cached["run_dir"]) / "samples" / "000001.json").read_text())
    assert sample["distill"] == {"seed": 12, "rand_device": "cpu", "num_inference_steps": 2, "cfg_scale": 1.0}
    split_t, two = train(config_for(demo_args, cached["run_dir"], tmp_path / "two",
                                    **dict(kw, task="direct_distill:train", dataset_metadata_path=None,
                                           extra_inputs=SEED_COLUMNS)))
    _t, one_command = train(config_for(demo_args, tmp_path / "d", tmp_path / "oc", cache_dir=str(tmp_path / "c"),
                                       extra_inputs=SEED_COLUMNS, **kw))
    assert isinstance(split_t.result, dict) and set(split_t.pipe.installed_models()) == {"dit"}
    curve = (pathlib.Path(whole["run_dir"]) / ck.LOSS_FILE).read_text()
    assert len(curve.splitlines()) == 2 and curve == (pathlib.Path(two["run_dir"]) / ck.LOSS_FILE).read_text()
    assert curve == (pathlib.Path(one_command["run_dir"]) / ck.LOSS_FILE).read_text()
    a, b = load_file(whole["final"]), load_file(two["final"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the draw: exactly the pipeline's noise for the record's seed, and the module is H2's
    task = TrainingTask("direct_distill", "train")
    ds = cache_mod.CachedDataset(TrainConfig(dataset_base_path=cached["run_dir"]), "direct_distill")
    inputs, m = task.inputs(None, ds[1], "cpu")
    draw = task.draw(None, None, inputs, m)
    assert draw["num_inference_steps"] == 2 and draw["cfg_scale"] == 1.0
    assert torch.equal(draw["noise"], distill_noise({"seed": 12, "rand_device": "cpu"}, inputs.latents.shape))
    from engine.training.families import FLUX1
    assert isinstance(FLUX1.training_module(split_t.pipe, task.kind), DistillTrainingModule)
    # an sft cache without the metadata columns cannot train direct_distill
    with pytest.raises(EngineError, match="no direct-distill settings"):
        cache_mod.CachedDataset(TrainConfig(dataset_base_path=str(split["cache"])), "direct_distill")


def test_kontext_split_equals_one_stage(demo_args, tmp_path):   # noqa: F811
    """Kontext training split: the references from the metadata are encoded in stage 1 and cached as tokens."""
    data = kontext_data(tmp_path).parent
    kw = dict(dataset_metadata_path=str(data / "metadata.csv"), data_file_keys="image,kontext_images",
              extra_inputs="kontext_images", num_epochs=1, dataset_repeat=1)
    _t, one = train(config_for(demo_args, data, tmp_path / "one", **kw))
    _t, cached = train(config_for(without_dit(demo_args), data, tmp_path / "cache", task="sft:data_process", **kw))
    tensors = load_file(str(pathlib.Path(cached["run_dir"]) / "samples" / "000000.safetensors"))
    assert tensors["kontext.tokens"].shape == (1, 4, 64) and tensors["latents"].shape == (1, 16, 6, 8)
    _t, two = train(config_for(demo_args, cached["run_dir"], tmp_path / "two", task="sft:train",
                               **dict(kw, dataset_metadata_path=None)))
    curve = (pathlib.Path(one["run_dir"]) / ck.LOSS_FILE).read_text()
    assert len(curve.splitlines()) == 2 and curve == (pathlib.Path(two["run_dir"]) / ck.LOSS_FILE).read_text()
    _refused(config_for(demo_args, cached["run_dir"], tmp_path / "x", task="sft:train", num_epochs=1),
             r"--extra_inputs kontext_images \(cache\) vs \(none\)")


def test_cache_round_trips_kontext_and_negative(tmp_path):
    """Kontext reference tokens and direct distill's negative encoding are stored as tensors + JSON and read back
    equal (no pickles)."""
    from engine.conditions.kontext import KontextTokens
    from engine.training.objective import TrainingInputs
    g = torch.Generator().manual_seed(0)
    kontext = KontextTokens(tokens=torch.randn(1, 4, 64, generator=g), ids=torch.zeros(4, 3), sizes=[(32, 32)])
    inputs = TrainingInputs(latents=torch.randn(1, 16, 6, 8, generator=g), prompt_emb=torch.randn(1, 5, 32),
                            pooled=torch.randn(1, 8).to(torch.bfloat16), height=48, width=64, kontext=kontext)
    negative = TrainingInputs(latents=inputs.latents, prompt_emb=torch.zeros(1, 5, 32), pooled=torch.ones(1, 8),
                              height=48, width=64)
    cache_mod.write_sample(tmp_path, 3, inputs, "p", {"negative": negative, "columns": {"seed": "4"}})
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000003.json", "000003.safetensors"]
    back, meta = cache_mod.read_sample(tmp_path, 3)
    assert back.kontext.sizes == [(32, 32)] and (back.height, back.width) == (48, 64) and meta["prompt"] == "p"
    for a, b in ((inputs.latents, back.latents), (inputs.pooled, back.pooled), (kontext.tokens, back.kontext.tokens),
                 (negative.prompt_emb, meta["negative"].prompt_emb)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert meta["columns"] == {"seed": "4"} and meta["negative"].kontext is None


# ------------------------------------------------------------------------------------------------- FLUX.2
TARGETS = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,"
           + ",".join(f"single_transformer_blocks.{i}.attn.to_out" for i in range(20)))
# The seed's FLUX.2 split-training script (examples/flux2/model_training/special/split_training/
# FLUX.2-klein-base-4B_lora.sh), its two commands verbatim but for the long target list (the same names, built above).
SEED_SPLIT_STAGE1 = f"""accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 1 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,black-forest-labs/FLUX.2-klein-4B:vae/diffusion_pytorch_model.safetensors" \
  --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-base-4B_lora_cache" \
  --lora_base_model "dit" \
  --lora_target_modules "{TARGETS}" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --task "sft:data_process"
"""
SEED_SPLIT_STAGE2 = f"""accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path "./models/train/FLUX.2-klein-base-4B_lora_cache" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-base-4B:transformer/*.safetensors" \
  --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-base-4B_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "{TARGETS}" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --task "sft:train"
"""


@pytest.fixture(scope="module")
def klein_split(folder_data, tmp_path_factory):   # noqa: F811
    """The seed's FLUX.2 split script on the random [klein] demo (linked under both repositories' names), data,
    repeats, epochs and output changed; one-stage training with the same settings (stage 2's command on the
    records, the encoders added); and that command with --cache_dir (split in one command)."""
    import os

    from engine.demo.flux2 import write_flux2_demo
    from engine.training.cli import main
    from tests.test_training import script_argv, with_args
    root = tmp_path_factory.mktemp("klein-split")
    demo = write_flux2_demo(root / "models")
    for repo in ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"):
        shutil.copytree(demo, root / "models" / repo, copy_function=os.link)
    data = root / "data"
    shutil.copytree(folder_data, data)
    (data / "metadata.csv").write_text("image,prompt\nimg0.png,a photo number 0\nimg1.png,a photo number 1\n")
    old = {k: os.environ.get(k) for k in ("DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_SKIP_DOWNLOAD")}
    os.environ.update(DIFFSYNTH_MODEL_BASE_PATH=str(root / "models"), DIFFSYNTH_SKIP_DOWNLOAD="true")
    try:
        small = dict(dataset_repeat=2, num_epochs=1, lora_rank=4)
        stage1 = with_args(script_argv(SEED_SPLIT_STAGE1), dataset_base_path=data,
                           dataset_metadata_path=data / "metadata.csv", output_path=root / "cache", num_epochs=1)
        stage2 = with_args(script_argv(SEED_SPLIT_STAGE2), dataset_base_path=root / "cache",
                           output_path=root / "two", **small)
        encoders = "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,black-forest-labs/FLUX.2-klein-4B:" \
                   "vae/diffusion_pytorch_model.safetensors,black-forest-labs/FLUX.2-klein-base-4B:transformer/" \
                   "*.safetensors"
        one = with_args(script_argv(SEED_SPLIT_STAGE2), dataset_base_path=data, output_path=root / "one", task="sft",
                        dataset_metadata_path=data / "metadata.csv", model_id_with_origin_paths=encoders, **small)
        one_command = with_args(one, output_path=root / "oc", cache_dir=root / "caches" / "klein")   # --cache_dir
        codes = [main(argv) for argv in (stage1, stage2, one, one_command)]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return codes, root


def test_seed_flux2_split_script_equals_one_stage(klein_split):
    codes, root = klein_split
    assert codes == [0, 0, 0, 0]
    m = cache_mod.read_manifest(root / "cache")
    assert m["family"] == "FLUX.2" and m["count"] == 2 and "dit" not in m["encoders"]
    assert set(load_file(str(root / "cache" / "samples" / "000000.safetensors"))) == {
        "latents", "prompt_emb", "text_ids", "img_ids"}
    assert set(ck.read_run(root / "two")["base_model"]) == {"dit"}            # stage 2 loaded the DiT only
    assert m["dims"]["in_channels"] == 128
    curve = (root / "one" / ck.LOSS_FILE).read_text()
    assert len(curve.splitlines()) == 4 and curve == (root / "two" / ck.LOSS_FILE).read_text()
    assert curve == (root / "oc" / ck.LOSS_FILE).read_text()                   # split in one command too
    assert cache_mod.read_manifest(root / "caches" / "klein")["family"] == "FLUX.2"
    a, b = load_file(str(root / "one" / "epoch-0.safetensors")), load_file(str(root / "two" / "epoch-0.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
