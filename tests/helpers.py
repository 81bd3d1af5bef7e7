"""Helpers shared by tests: models folders laid out like the real repositories, made from the demo files."""
import os
import pathlib
import shutil

OFFICIAL_FILES = ("flux1-dev.safetensors", "ae.safetensors", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def official_models_dir(root, demo_dir, variants=("black-forest-labs/FLUX.1-dev",), dit_names=None) -> pathlib.Path:
    """A models folder where the demo's files sit under the real repositories' names.

    ``dit_names`` maps a model id to the transformer file name it should hold (default flux1-dev.safetensors).
    Files are linked, not copied, so this is cheap.
    """
    root = pathlib.Path(root)
    dit_names = dit_names or {}
    for model_id in variants:
        target = root / model_id
        target.mkdir(parents=True, exist_ok=True)
        for name in OFFICIAL_FILES:
            src = pathlib.Path(demo_dir) / name
            dst = target / (dit_names.get(model_id, name) if name == "flux1-dev.safetensors" else name)
            if dst.exists() or dst.is_symlink():
                continue
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=os.link)
            else:
                os.link(src, dst)
    return root
