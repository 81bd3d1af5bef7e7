"""The seed's training details (issue 18, item 5), on the tiny demo model:

- ``training_args.json`` in the run folder as the seed's ``save_training_args`` writes it: ``vars(args)`` of the parsed
  command line, indent 4, non-ASCII kept, ``default=str``
- a Kontext run's validation samples use the dataset's first reference image when no --validate_kontext_image is given
- a typo in ``--lora_target_modules`` is refused before any model loads, naming the closest valid names (FLUX.1's
  DiffSynth and diffusers names, FLUX.2's), and the early check accepts exactly what the loaded model resolves
"""
import json

import pytest
import torch

from engine.errors import EngineError
from engine.training import model as training_model
from engine.training import validate
from engine.training.cli import TRAINING_ARGS_FILE, command_line_args, main
from engine.training.lora_targets import DIFFSYNTH_FLUX_TARGETS, check_target_names, resolve_targets
from tests.test_training import (SEED_LORA_DEV, SEED_LORA_KONTEXT, kontext_data, official_models, photo,  # noqa: F401
                                 script_argv, with_args)

pytestmark = pytest.mark.filterwarnings("ignore")


def test_kontext_run_writes_the_seeds_training_args_and_samples_with_the_first_reference(official_models, tmp_path,
                                                                                          monkeypatch):
    data = kontext_data(tmp_path, (32, 32)).parent
    seen = []
    real_sample = validate.sample

    def spy(pipe, prompts, folder, step, **kwargs):
        seen.append(kwargs["kontext_images"])
        return real_sample(pipe, prompts, folder, step, **kwargs)

    monkeypatch.setattr(validate, "sample", spy)
    argv = with_args(script_argv(SEED_LORA_KONTEXT), dataset_base_path=data,
                     dataset_metadata_path=data / "metadata.csv", dataset_repeat=1, num_epochs=1, lora_rank=4,
                     output_path=tmp_path / "out",
                     trigger_word="猫 sks", validate_prompt="make it green", validate_num_inference_steps=1,
                     validate_height=64, validate_width=64)
    assert main(argv) == 0
    assert seen == [[str(data / "src0.png")]]                   # the first record's reference, at the end
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1
    text = (tmp_path / "out" / TRAINING_ARGS_FILE).read_text(encoding="utf-8")
    assert text == json.dumps(command_line_args(argv), indent=4, ensure_ascii=False, default=str)
    saved = json.loads(text)
    assert "猫 sks" in text and saved["extra_inputs"] == "kontext_images" and saved["lora_rank"] == 4
    assert saved["dataset_metadata_path"] == str(data / "metadata.csv") and saved["enable_csv_log"] is False


def test_target_typo_is_refused_before_any_model_loads(official_models, tmp_path, monkeypatch, capsys):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the target names were checked")

    monkeypatch.setattr(training_model, "load_pipeline", loaded)
    data = tmp_path / "data"
    data.mkdir()
    photo(0).save(data / "a.png")
    argv = with_args(script_argv(SEED_LORA_DEV), dataset_base_path=data, dataset_metadata_path=None,
                     output_path=tmp_path / "out", lora_target_modules="a_to_qvk,b_to_qkv,ff_a.0,proj_mpl")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "'a_to_qvk' (did you mean a_to_qkv" in err and "'proj_mpl' (did you mean proj_mlp" in err
    assert "b_to_qkv" not in err.split("match")[0]              # only the wrong names are named


def test_early_check_agrees_with_the_loaded_model(demo_dir):
    from engine.loading import load_models
    dit = load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]
    names = DIFFSYNTH_FLUX_TARGETS.split(",") + [
        "to_q", "attn.to_out.0", "proj_mlp", "ff.net.0.proj", "final_proj_out", "x_embedder", "norm1_context.linear",
        "transformer_blocks.1.attn.to_q", "single_blocks.0.to_qkv_mlp", "blocks.1.attn.a_to_qkv",
        "q", "a_to_qvk", "to_qq", "ffn.0", "attn.to_out.1", "single_blocks.proj_out", "linear_3"]
    for name in names:
        try:
            resolve_targets(dit, name)
            resolvable = True
        except EngineError:
            resolvable = False
        try:
            check_target_names(name)
            accepted = True
        except EngineError:
            accepted = False
        assert accepted == resolvable, name


def test_flux2_names_are_checked_too():
    from engine.training.flux2 import DIFFSYNTH_FLUX2_TARGETS
    check_target_names(DIFFSYNTH_FLUX2_TARGETS, family="FLUX.2")
    check_target_names("single_transformer_blocks.3.attn.to_out", family="FLUX.2")
    with pytest.raises(EngineError, match=r"'to_qkv_mlp_prj' \(did you mean to_qkv_mlp_proj"):
        check_target_names("to_q,to_qkv_mlp_prj", family="FLUX.2")
    with pytest.raises(EngineError, match="no layer of the FLUX.2 transformer"):
        check_target_names("a_to_qkv", family="FLUX.2")                # FLUX.1's DiffSynth name
    with pytest.raises(EngineError, match="'q'; 'k'"):
        check_target_names("q,k,v,o,ffn.0,ffn.2")                  # the seed's generic default (Wan's names)


def test_edit_runs_sample_with_the_first_records_references(tmp_path):
    """The reference column of the first record, paths under the dataset folder; a JSON list gives every image; a run
    without that extra input, or without metadata, gets none (and an explicit --validate_*_image wins, above)."""
    from engine.training.args import TrainConfig
    from engine.training.validate import metadata_references
    (tmp_path / "m.jsonl").write_text('{"image": "t.png", "prompt": "x", "edit_image": ["a.png", "b.png"]}\n'
                                      '{"image": "u.png", "prompt": "y", "edit_image": ["c.png"]}\n')
    config = TrainConfig(dataset_base_path=str(tmp_path), dataset_metadata_path=str(tmp_path / "m.jsonl"),
                         extra_inputs="edit_image")
    assert metadata_references(config, "edit_image") == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert metadata_references(config, "kontext_images") == []
    assert metadata_references(config.replace(dataset_metadata_path=None), "edit_image") == []


def test_a_run_prepared_without_a_command_line_gets_its_training_args(official_models, tmp_path, monkeypatch):
    """The studio prepares a run folder and starts ``python -m engine.training --resume <run>``: its
    training_args.json is the command line that run would have had (every flag's default, then the run's values);
    the target typo is refused there too before a model loads."""
    from engine.training.api import prepare_run
    from engine.training.args import TrainConfig
    from engine.training.cli import seed_args

    monkeypatch.setattr(training_model, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    config = TrainConfig(dataset_base_path=str(tmp_path), lora_base_model="dit", lora_target_modules="a_to_qvk",
                         model_id_with_origin_paths="black-forest-labs/FLUX.1-dev:flux1-dev.safetensors",
                         output_path=str(tmp_path / "runs"), run_name="mine", validate_prompts=["a cat"])
    run_dir = prepare_run(config)
    assert main(["--resume", str(run_dir)]) == 1
    saved = json.loads((run_dir / TRAINING_ARGS_FILE).read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(seed_args(config), default=str))
    assert saved["run_name"] == "mine" and saved["validate_prompts"] == ["a cat"] and saved["resume"] is None
    assert saved["enable_model_cpu_offload"] is False           # a seed flag the dataclass does not keep
