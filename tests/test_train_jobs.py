"""The Train tab's service (studio.training) on the demo model, on the CPU, with real training processes.

- uploads become a new dataset folder with same-named .txt captions (never written over); edited captions are saved
- bad input is refused with a message that names the fix
- a short run reaches "finished", its LoRA is published and listed by engine.loras() (and generates); image jobs are
  refused while it trains, and a second start too
- stop then resume continues the same run folder at the saved step, to the same total
"""
from __future__ import annotations

import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from tests.helpers import linked_models

pytestmark = pytest.mark.filterwarnings("ignore")

DEMO = "FLUX.1-dev-random-demo"
TINY = {"base_model": DEMO, "resolution": 64, "lora_rank": 4, "learning_rate": 1e-3, "sample_size": 64,
        "sample_steps": 2}


def photo(path, seed: int, size=(80, 64)) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR).save(path)
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("train-studio")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs",
                  allow_dirs=[tmp_path_factory.getbasetemp()])  # the tests' input folders


@pytest.fixture(scope="module")
def dataset(engine, tmp_path_factory):
    up = tmp_path_factory.mktemp("uploads")
    files = [photo(up / "dog 1.png", 1), photo(up / "dog 2.png", 2)]
    return engine.training.prepare_dataset(files, {"dog 1.png": "a photo of sks dog"})


def wait_until(jobs, done, timeout=120.0, every=0.2) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = jobs.poll()
        if done(p):
            return p
        time.sleep(every)
    raise AssertionError(f"timed out; last poll: {p['status']} {p['text']}\n" + "\n".join(p["log"][-15:]))


# ----------------------------------------------------------------------------------------------------- datasets
def test_upload_makes_a_new_captioned_dataset(engine, tmp_path):
    jobs = engine.training
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    files = [photo(a / "cat.png", 1), photo(b / "cat.png", 2), photo(a / "my photo!.jpg", 3)]
    (a / "cat.txt").write_text("caption from an uploaded .txt\n")
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (a / "notes.pdf").write_bytes(b"%PDF-1.4")
    uploads = files + [a / "cat.txt", a / "broken.png", a / "notes.pdf"]
    ds = jobs.prepare_dataset(uploads, {"my photo!.jpg": "  typed in the table  "}, name="cats")
    folder = pathlib.Path(ds["folder"])
    assert folder == jobs.datasets_root / "cats" and folder.is_relative_to(engine.models_dir / "train")
    # Same-named uploads both kept; names made safe; a .txt is a caption, never an image.
    assert ds["rows"] == [["cat.png", "caption from an uploaded .txt"], ["cat_2.png", ""],
                          ["my-photo.jpg", "typed in the table"]]
    assert ds["originals"] == {"cat.png": "cat.png", "cat_2.png": "cat.png", "my-photo.jpg": "my photo!.jpg"}
    assert (folder / "cat.txt").read_text() == "caption from an uploaded .txt"
    assert (folder / "cat_2.txt").read_text() == "" and (folder / "my-photo.txt").read_text() == "typed in the table"
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".txt") == ["cat.png", "cat_2.png", "my-photo.jpg"]
    notes = " ".join(ds["notes"])
    assert "broken.png skipped" in notes and "notes.pdf skipped" in notes and "1 of 3 images have no caption" in notes
    # A second upload under the same name is a new folder: nothing is written over.
    again = jobs.prepare_dataset(files[:1], name="cats")
    assert pathlib.Path(again["folder"]).name == "cats_2" and (folder / "cat.txt").read_text().startswith("caption")
    # Edited captions are saved to the .txt files (only those that changed), and read back.
    assert jobs.save_captions(folder, [["cat.png", "caption from an uploaded .txt"], ["cat_2.png", "second cat"]]) == 1
    assert (folder / "cat_2.txt").read_text() == "second cat"
    assert jobs.read_dataset(folder)["rows"][1] == ["cat_2.png", "second cat"]
    with pytest.raises(EngineError, match="outside the dataset folder"):
        jobs.save_captions(folder, [["../../escape.png", "x"]])
    with pytest.raises(EngineError, match="not in the dataset folder"):
        jobs.save_captions(folder, [["gone.png", "x"]])
    with pytest.raises(EngineError, match="No files uploaded"):
        jobs.prepare_dataset([])
    with pytest.raises(EngineError, match="None of the uploaded files is a readable image"):
        jobs.prepare_dataset([a / "broken.png", a / "notes.pdf"])


def test_read_folder_and_metadata(engine, tmp_path):
    jobs = engine.training
    photo(tmp_path / "x.png", 1)
    photo(tmp_path / "y.png", 2)
    (tmp_path / "x.txt").write_text("an x")
    folder = jobs.read_dataset(tmp_path)
    assert folder["metadata"] is None and folder["rows"] == [["x.png", "an x"], ["y.png", ""]]
    assert "1 of 2 images have no caption" in folder["notes"][0]
    (tmp_path / "meta.csv").write_text("image,prompt\nx.png,first\nmissing.png,second\n")
    meta = jobs.read_dataset(tmp_path / "meta.csv")
    assert meta["metadata"] == str(tmp_path / "meta.csv") and meta["folder"] == str(tmp_path)
    assert meta["rows"] == [["x.png", "first"], ["missing.png", "second"]] and "missing.png" in meta["notes"][0]
    with pytest.raises(EngineError, match="does not exist"):
        jobs.read_dataset(tmp_path / "nowhere")
    with pytest.raises(EngineError, match="not a metadata file"):
        jobs.read_dataset(tmp_path / "x.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "only.txt").write_text("a caption alone")
    with pytest.raises(EngineError, match="holds no images"):
        jobs.read_dataset(empty)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    ({"dataset": None}, "No training images: upload images"),
    ({"lora_rank": 0}, "LoRA rank must be a positive whole number"),
    ({"lora_rank": "lots"}, "LoRA rank must be a number"),
    ({"lora_rank": 2.5}, "LoRA rank must be a whole number"),
    ({"learning_rate": 0}, "Learning rate must be above 0"),
    ({"steps": 0, "epochs": None}, "how long to train: a number of steps or epochs"),
    ({"base_model": "SDXL"}, "cannot be trained here. Choose one of: FLUX.1-dev-random-demo"),
    ({"base_model": "FLUX.1-dev"}, "Not in the models folder yet"),
    ({"base_model": "FLUX.1-Kontext-dev-random-demo"}, "metadata file with image, prompt and kontext_images"),
    ({"train": "full", "fp8_base": True}, "fp8 storage is for the frozen base of a LoRA run"),
    ({"resolution": 16}, "Resolution must be at least 64"),
    ({"train": "dreambooth"}, "What to train must be one of lora, full, differential"),
    ({"train": "differential"}, "choose that LoRA"),
    ({"train": "differential", "preset_lora": "gone.safetensors"}, "not in the LoRA folder any more"),
    ({"method": "distill"}, "metadata file .CSV / JSON. with image, prompt and seed columns"),
    ({"method": "fast"}, "training method must be one of standard, split, distill"),
    ({"vram_limit": 0.5}, "Train within .GB. must be between 1 and 1024"),
    ({"trigger_word": "two\nlines"}, "The trigger word must be one short line"),
])
def test_bad_input_is_refused_with_the_fix(engine, dataset, change, message):
    form = {**TINY, "dataset": dataset["folder"], "steps": 4, **change}
    with pytest.raises(EngineError, match=message):
        engine.training.start(form)
    assert not engine.training.running()


def test_config_from_the_form(engine, dataset, tmp_path):
    config, notes, total = engine.training.build_config(
        {**TINY, "dataset": dataset["folder"], "captions": dataset["rows"], "steps": 5, "repeat": 2,
         "sample_prompts": "a dog\n\n  a cat  ", "sample_every": 0, "targets": "attention", "fp8_base": True,
         "run_name": "my run/1"})
    assert total == 5 and config.max_steps == 5 and config.num_epochs == 2 and config.dataset_repeat == 2
    assert config.lora_base_model == "dit" and config.lora_rank == 4 and "add_q_proj" in config.lora_target_modules
    assert config.max_pixels == 64 * 64 and config.height is None       # a pixel budget, aspect kept
    assert config.validate_prompts == ["a dog", "a cat"] and config.validate_steps is None   # samples at the end
    assert config.run_name == "my-run-1" and config.publish_to == str(engine.models_dir)
    assert config.fp8_models.endswith("flux1-dev.safetensors") and config.save_steps is None
    assert any("empty caption" in n for n in notes) and any("every epoch" in n for n in notes)
    assert config.trigger_word is None
    # The trigger word is saved in the run's config and shown in the equivalent train.py command.
    from studio.training.commands import command_line
    sks, _, _ = engine.training.build_config({**TINY, "dataset": dataset["folder"], "steps": 2,
                                              "trigger_word": "  sks  "})
    assert sks.trigger_word == "sks" and "--trigger_word sks" in command_line(sks)
    # Samples and saves at different steps: the checkpoint grid would miss saves, and the note says so.
    _, notes, _ = engine.training.build_config({**TINY, "dataset": dataset["folder"], "steps": 8, "save_every": 4,
                                                "sample_prompts": "a dog", "sample_every": 3})
    assert any("Set both to the same number" in n for n in notes)
    _, notes, _ = engine.training.build_config({**TINY, "dataset": dataset["folder"], "steps": 8, "save_every": 4,
                                                "sample_prompts": "a dog", "sample_every": 2})
    assert not any("Set both" in n for n in notes)
    full, _, total = engine.training.build_config({**TINY, "dataset": dataset["folder"], "train": "full",
                                                   "epochs": 3, "learning_rate": None})
    assert full.trainable_models == "dit" and full.lora_base_model is None and full.publish_to is None
    assert full.learning_rate == 1e-5 and total == 6 and full.max_steps is None
    # A metadata dataset's captions are its prompt column: an edit in the table is refused, not ignored.
    photo(tmp_path / "m.png", 5)
    (tmp_path / "meta.json").write_text('[{"image": "m.png", "prompt": "from the file"}]')
    with pytest.raises(EngineError, match="edit meta.json"):
        engine.training.build_config({**TINY, "metadata": str(tmp_path / "meta.json"), "steps": 2,
                                      "captions": [["m.png", "changed in the table"]]})


def test_vram_presets_set_the_plan(engine, dataset):
    jobs = engine.training
    plans = {p["key"]: p for p in jobs.vram_presets()}
    assert list(plans) == ["12 GB", "16 GB", "20 GB", "24 GB"]
    small, large = plans["12 GB"]["settings"], plans["24 GB"]["settings"]
    assert small["gradient_checkpointing_offload"] and small["fp8_base"] and small["batch"] == 1
    assert small["lora_rank"] < large["lora_rank"] and small["resolution"] < large["resolution"]
    assert not large["gradient_checkpointing_offload"]
    assert plans["12 GB"]["text"].startswith("12 GB: LoRA rank 4 · 512 px · gradient checkpointing, activations "
                                             "offloaded to CPU memory · fp8 base · batch 1")
    # Full weights: never fp8 (it trains the base itself), and the line says a LoRA is what fits these cards.
    full = {p["key"]: p for p in jobs.vram_presets("full")}["24 GB"]
    assert not full["settings"]["fp8_base"] and "a LoRA fits" in full["text"]
    # The plan goes into the run's config as the form's values.
    config, _, _ = jobs.build_config({**TINY, "dataset": dataset["folder"], "steps": 2, **small})
    assert config.use_gradient_checkpointing and config.use_gradient_checkpointing_offload
    assert config.lora_rank == 4 and config.max_pixels == 512 * 512 and config.fp8_models


def test_methods_differential_distill_split_and_the_memory_plan(engine, dataset, tmp_path):
    """The tab's other ways to train, as the seed's flags: a differential LoRA fuses a library LoRA first
    (--preset_lora_path), direct distillation is the seed's task on a metadata file with seeds, cache-first training
    names a cache folder shared by runs on the same data, model and size, and a VRAM limit is planned (shown; on
    this CPU not applied)."""
    from tests.test_app_client import write_demo_lora
    jobs = engine.training
    lora = write_demo_lora(pathlib.Path(engine.models_dir) / "loras" / "style.safetensors")
    assert "style.safetensors" in jobs.loras()
    form = {**TINY, "dataset": dataset["folder"], "steps": 2}
    diff, _, _ = jobs.build_config({**form, "train": "differential", "preset_lora": "style.safetensors"})
    assert diff.preset_lora_path == str(lora) and diff.preset_lora_model == "dit" and diff.lora_base_model == "dit"
    photo(tmp_path / "t.png", 3)
    (tmp_path / "teacher.csv").write_text("image,prompt,seed,rand_device,num_inference_steps,cfg_scale\n"
                                          "t.png,a teacher image,7,cpu,2,1\n")
    distill, _, _ = jobs.build_config({**form, "dataset": None, "metadata": str(tmp_path / "teacher.csv"),
                                       "method": "distill"})
    assert distill.task == "direct_distill" and distill.dataset_metadata_path == str(tmp_path / "teacher.csv")
    split, notes, _ = jobs.build_config({**form, "method": "split"})
    again, _, _ = jobs.build_config({**form, "method": "split", "steps": 9, "learning_rate": 5e-4})
    other, _, _ = jobs.build_config({**form, "method": "split", "resolution": 128})
    assert split.task == "sft" and pathlib.Path(split.cache_dir).parent == jobs.caches_root
    assert split.cache_dir == again.cache_dir != other.cache_dir      # same data, model and size: one cache
    assert any("Cache first" in n for n in notes)
    assert jobs.build_config({**form, "run_name": "caches"})[0].run_name == "caches-run"
    # The memory plan from the files' headers, before anything loads; on the CPU it is shown, not applied.
    planned, notes, _ = jobs.build_config({**form, "vram_limit": 12})
    assert planned.vram_limit is None and any("training plan for 12 GB" in n for n in notes)
    shown = jobs.plan({**form, "vram_limit": 12})
    assert shown["fits"] and "training plan for 12 GB" in shown["text"] and "CUDA card" in shown["text"]


def test_draft_captions_fill_only_the_empty_ones(engine, tmp_path, monkeypatch):
    jobs = engine.training
    ds = jobs.prepare_dataset([photo(tmp_path / "a.png", 1), photo(tmp_path / "b.png", 2)],
                              {"a.png": "written by me"}, name="to-caption")
    made = jobs.draft_captions(ds["folder"], ds["rows"])
    assert made["drafted"] == 1 and made["rows"][0] == ["a.png", "written by me"]
    assert made["rows"][1][0] == "b.png" and made["rows"][1][1].strip()      # the demo's words: gibberish, not empty
    assert "Drafted 1 caption" in made["note"] and "gibberish" in made["note"]
    assert (pathlib.Path(ds["folder"]) / "b.txt").read_text() == ""          # the table only: the run writes it
    again = jobs.draft_captions(ds["folder"], made["rows"])
    assert again["drafted"] == 0 and again["rows"] == made["rows"] and "Redo written captions" in again["note"]
    redone = jobs.draft_captions(ds["folder"], made["rows"], overwrite=True)
    assert redone["drafted"] == 2 and redone["rows"][0][1] != "written by me"
    with pytest.raises(EngineError, match="upload images"):
        jobs.draft_captions(None, [])
    with pytest.raises(EngineError, match="prompt column of meta.json"):
        jobs.draft_captions(ds["folder"], ds["rows"], metadata=str(tmp_path / "meta.json"))
    # Without the Qwen2.5-VL files (a studio on real models that lacks them) it says where they go.
    from studio.training import captions
    monkeypatch.setattr(captions, "qwen_folder", lambda models_dir, demo: (None, False))
    with pytest.raises(EngineError, match=r"needs Qwen2.5-VL-7B-Instruct .* Qwen/Qwen2.5-VL-7B-Instruct"):
        jobs.draft_captions(ds["folder"], ds["rows"])


def test_start_waits_for_a_generation_then_refuses(engine, dataset, monkeypatch):
    from studio.training import runs as training_runs
    monkeypatch.setattr(training_runs, "GENERATION_WAIT_S", 0.2)
    with engine._lock:            # an image job holds the engine
        with pytest.raises(EngineError, match="An image job is running"):
            engine.training.start({**TINY, "dataset": dataset["folder"], "steps": 2})
    assert not engine.training.running() and engine.training.busy_message() == ""


# ------------------------------------------------------------------------------------------------- real runs
def test_run_finishes_publishes_and_blocks_generation(engine, dataset):
    jobs = engine.training
    rows = [[dataset["rows"][0][0], "a photo of sks dog"], [dataset["rows"][1][0], "sks dog on grass"]]
    started = jobs.start({**TINY, "dataset": dataset["folder"], "captions": rows, "steps": 6, "save_every": 3,
                          "sample_prompts": "a photo of sks dog", "sample_every": 3, "run_name": "dog"})
    assert started["total"] == 6 and started["name"] == "dog" and "python train.py" in started["command"]
    assert (pathlib.Path(dataset["folder"]) / rows[1][0]).with_suffix(".txt").read_text() == "sks dog on grass"
    assert jobs.running()
    # While it trains: image jobs are refused with the reason, and so is a second run.
    with pytest.raises(EngineError, match=r"Training run 'dog' is using the CPU.*stop it in the Train tab"):
        engine.generate({"variant": DEMO, "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1})
    with pytest.raises(EngineError, match="already going on"):
        jobs.start({**TINY, "dataset": dataset["folder"], "steps": 2})
    p = wait_until(jobs, lambda p: not p["active"])
    assert p["status"] == "finished", p["text"]
    assert p["step"] == p["total"] == 6 and [x["step"] for x in p["loss"]] == [1, 2, 3, 4, 5, 6]
    assert all(x["loss"] > 0 and x["loss_avg"] > 0 for x in p["loss"])
    assert [s["step"] for s in p["samples"]] == [3, 6] and all(pathlib.Path(s["path"]).is_file() for s in p["samples"])
    assert "Finished 'dog': 6 steps" in p["text"] and p["lora_name"] == "trained/dog.safetensors"
    assert pathlib.Path(p["published"]) == engine.models_dir / "loras" / "trained" / "dog.safetensors"
    assert pathlib.Path(p["final"]).name == "step-6.safetensors" and pathlib.Path(p["final"]).is_file()
    assert any("Dataset: 2 images" in line for line in p["log"])
    # Each saved checkpoint comes with the samples drawn at its step (the tab's grid per checkpoint) ...
    assert [(c["step"], c["name"]) for c in p["checkpoints"]] == [(3, "step-3.safetensors"), (6, "step-6.safetensors")]
    assert [[pathlib.Path(s).name for s in c["samples"]] for c in p["checkpoints"]] == [["step-000003-0.png"],
                                                                                          ["step-000006-0.png"]]
    # ... and "try" puts an earlier one in the LoRA list (once, however often it is pressed) next to the final LoRA,
    # which is the run's last checkpoint.
    tried = jobs.try_checkpoint(p["checkpoints"][0]["path"])
    assert tried["lora_name"] == "trained/dog-step-3.safetensors" and pathlib.Path(tried["path"]).is_file()
    assert jobs.try_checkpoint(p["checkpoints"][0]["path"]) == tried
    assert jobs.try_checkpoint(p["checkpoints"][1]["path"])["lora_name"] == "trained/dog.safetensors"
    for bad, message in [("", "Choose a checkpoint"), (str(dataset["folder"]) + "/x.safetensors", "not one of this"),
                         (str(pathlib.Path(p["run_dir"]) / "gone.safetensors"), "not a saved checkpoint")]:
        with pytest.raises(EngineError, match=message):
            jobs.try_checkpoint(bad)
    # Done: the device is free again, the LoRA is in the library and generates.
    assert jobs.busy_message() == "" and not jobs.running()
    assert "trained/dog.safetensors" in [item["name"] for item in engine.loras()]
    made = engine.generate({"variant": DEMO, "prompt": "a photo of sks dog", "width": 64, "height": 64, "seed": 1,
                            "num_inference_steps": 2, "loras": [{"name": "trained/dog.safetensors", "weight": 1.0}]})
    assert made[0]["recipe"]["loras"][0]["file"].endswith("trained/dog.safetensors")
    made = engine.generate({"variant": DEMO, "prompt": "a photo of sks dog", "width": 64, "height": 64, "seed": 1,
                            "num_inference_steps": 1, "loras": [{"name": tried["lora_name"], "weight": 1.0}]})
    assert made[0]["recipe"]["loras"][0]["file"].endswith("trained/dog-step-3.safetensors")
    run = next(r for r in jobs.runs() if r["name"] == "dog")
    assert run["status"] == "finished" and run["step"] == 6 and not run["resumable"]
    with pytest.raises(EngineError, match="has finished"):
        jobs.resume(run["run_dir"])


def test_stop_then_resume_continues_the_step_count(engine, dataset):
    from studio.training import TrainingJobs
    jobs = engine.training
    jobs.start({**TINY, "dataset": dataset["folder"], "steps": 20, "save_every": 100, "run_name": "long"})
    p = wait_until(jobs, lambda p: p["step"] >= 2, every=0.05)
    # A studio restarted meanwhile finds the run still training, refuses image jobs and can stop it.
    other = TrainingJobs(engine)
    assert "Training run 'long'" in other.busy_message() and other.running()
    assert "Stopping 'long'" in other.stop()
    p = wait_until(jobs, lambda p: not p["active"])
    stopped_at = p["step"]
    assert p["status"] == "stopped" and 2 <= stopped_at < 20, p["text"]
    assert f"Resume continues from step {stopped_at}" in p["text"]
    run = next(r for r in jobs.runs() if r["name"] == "long")
    assert run["resumable"] and run["last_saved_step"] == stopped_at
    with pytest.raises(EngineError, match="Choose a run"):
        jobs.resume("")
    resumed = jobs.resume(run["run_dir"])
    assert resumed["step"] == stopped_at and resumed["total"] == 20
    first = jobs.poll()      # the trainer is still starting: no stale step, loss or ETA from before the stop
    assert first["status"] == "starting" and first["text"].startswith("Starting 'long'"), first["text"]
    p = wait_until(jobs, lambda p: not p["active"])
    assert p["status"] == "finished" and p["step"] == 20 and p["run_dir"] == run["run_dir"]
    assert [x["step"] for x in p["loss"]] == list(range(1, 21))        # one curve across the stop
    assert any(line.startswith(f"Resumed at step {stopped_at} of 20") for line in p["log"])
    assert [r["name"] for r in jobs.runs()].count("long") == 1          # the same folder, not a new run
    assert (engine.models_dir / "loras" / "trained" / "long.safetensors").is_file()


def test_a_cache_first_run_stopped_while_encoding_can_resume(tmp_path):
    """Stopped before its first training save, a cache-first run still resumes (its cache so far is reused); a plain
    run stopped there is told to start again."""
    from engine.training import checkpoints as ck
    from studio.training import process
    for name, config in (("cached", {"cache_dir": str(tmp_path / "cache")}), ("plain", {"cache_dir": None})):
        run = tmp_path / name
        run.mkdir()
        ck.write_run(run, status="stopped", step=0, total_steps=4, config=config)
        if name == "cached":
            assert process.resumable(run)["last_saved_step"] == 0
        else:
            with pytest.raises(EngineError, match="stopped before its first save"):
                process.resumable(run)
