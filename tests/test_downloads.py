"""Model files: found locally without network, downloaded from ModelScope or Hugging Face, clear when missing."""
import pathlib

import pytest

from engine import ModelConfig, ModelNotFoundError

DEV = "black-forest-labs/FLUX.1-dev"


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD", raising=False)
    monkeypatch.delenv("DIFFSYNTH_DOWNLOAD_SOURCE", raising=False)
    return tmp_path / "models"


def fail_if_called(*args, **kwargs):
    raise AssertionError("no network access expected")


def test_present_file_is_used_without_network(models, monkeypatch):
    import huggingface_hub
    import modelscope
    monkeypatch.setattr(modelscope, "snapshot_download", fail_if_called)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail_if_called)
    (models / DEV / "text_encoder_2").mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (models / DEV / "text_encoder_2" / name).write_bytes(b"x")
    files = ModelConfig(model_id=DEV, origin_file_pattern="text_encoder_2/*.safetensors").resolve()
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_missing_file_with_downloads_off_names_file_model_and_folder(models, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    with pytest.raises(ModelNotFoundError) as err:
        ModelConfig(model_id=DEV, origin_file_pattern="flux1-dev.safetensors").resolve()
    message = str(err.value)
    assert "flux1-dev.safetensors" in message and DEV in message and str(models / DEV) in message


def test_unreachable_hub_fails_fast_with_the_message(models, monkeypatch):
    import time
    import modelscope
    from engine import downloads
    monkeypatch.setattr(modelscope, "snapshot_download", fail_if_called)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "unreachable.invalid")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        ModelConfig(model_id=DEV, origin_file_pattern="flux1-dev.safetensors").resolve()
    assert "unreachable.invalid cannot be reached" in str(err.value) and str(models / DEV) in str(err.value)
    assert time.monotonic() - start < 10
    assert downloads.hub_host("HuggingFace") == "huggingface.co"


def test_offline_modelscope_failure_becomes_a_clear_message(models, monkeypatch):
    import modelscope
    from engine import downloads
    monkeypatch.setattr(downloads, "reachable", lambda host, timeout=3.0: True)

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.modelscope.cn'")
    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError) as err:
        ModelConfig(model_id=DEV, origin_file_pattern="ae.safetensors").resolve()
    message = str(err.value)
    assert "ModelScope" in message and "ae.safetensors" in message and str(models / DEV) in message


def test_offline_hugging_face_is_refused_at_once(models, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="ae.safetensors"):
        ModelConfig(model_id=DEV, origin_file_pattern="ae.safetensors").resolve()


@pytest.mark.parametrize("source", ["ModelScope", "HuggingFace"])
def test_download_goes_into_the_models_folder(models, monkeypatch, source):
    import huggingface_hub
    import modelscope
    seen = {}

    def fake_download(model_id, local_dir=None, allow_file_pattern=None, allow_patterns=None, **kwargs):
        seen.update(model_id=model_id, local_dir=local_dir, patterns=allow_file_pattern or allow_patterns)
        target = pathlib.Path(local_dir) / "tokenizer"
        target.mkdir(parents=True, exist_ok=True)
        (target / "vocab.json").write_text("{}")
        return local_dir

    from engine import downloads
    monkeypatch.setattr(downloads, "reachable", lambda host, timeout=3.0: True)
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(modelscope if source == "ModelScope" else huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub if source == "ModelScope" else modelscope, "snapshot_download", fail_if_called)
    files = ModelConfig(model_id=DEV, origin_file_pattern="tokenizer/").resolve()
    assert files == [models / DEV / "tokenizer"]
    assert seen == {"model_id": DEV, "local_dir": str(models / DEV), "patterns": ["tokenizer/*"]}


def test_explicit_paths(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert ModelConfig(path=str(f)).resolve() == [f]
    assert ModelConfig(path=[str(f), str(f)]).resolve() == [f, f]
    with pytest.raises(ModelNotFoundError, match="nothere"):
        ModelConfig(path=str(tmp_path / "nothere.safetensors")).resolve()
