"""The Train tab's datasets: uploaded images copied into ``<models>/train/datasets/<name>/`` with a same-named
``.txt`` caption each; a folder or a metadata file (CSV / JSON / JSONL) read as rows of ``[file, caption]``; the
caption table written back to the ``.txt`` files.

Every path is checked by the studio's file guard (``guard``: the engine's ``files``, a FileAccess), so only the
folders the person chose are ever listed or read. ``engine.training``'s modules import torch: they are imported
inside the functions that use them, so importing the studio stays light.
"""
from __future__ import annotations

import pathlib
from typing import Optional

from engine import safe_files
from engine.errors import EngineError

from .config import now_stamp, safe_name

DATASETS = "datasets"            # <models>/train/datasets/<name>/: uploaded images + .txt captions


def caption_rows(rows) -> list[tuple[str, str]]:
    """The caption table's rows as (file, caption) pairs; blank rows dropped."""
    out = []
    for row in rows or []:
        if isinstance(row, dict):
            name, caption = row.get("file"), row.get("caption")
        else:
            name, caption = (list(row) + [None, None])[:2]
        name = "" if name is None else str(name).strip()
        if not name or name.lower() == "nan":
            continue
        caption = "" if caption is None or (isinstance(caption, float) and caption != caption) else str(caption)
        out.append((name, caption.strip()))
    return out


def image_problem(path: pathlib.Path) -> Optional[str]:
    """None for an image the trainer may decode; else why not (its header says too large, or not an image)."""
    from PIL import Image  # noqa: PLC0415
    from engine.images import check_image_file  # noqa: PLC0415
    try:
        check_image_file(path)                 # sizes from the header first: a decompression bomb is never opened
        with Image.open(path) as im:
            im.verify()
        return None
    except EngineError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any reader error: not an image we can train on
        return f"{type(exc).__name__}"


def _text(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _empty_note(rows: list, what: str) -> list[str]:
    """["<n> of <all> images have <what>"] when some captions are empty, else []."""
    empty = sum(1 for _, c in rows if not c)
    return [f"{empty} of {len(rows)} images have {what}"] if empty else []


# ------------------------------------------------------------------------------------------------- uploads
def _captions_from_txt(images: list[pathlib.Path], uploads: list[pathlib.Path]) -> dict:
    """image -> its uploaded .txt: the same stem, in the same folder if several images share it."""
    from engine.training.data import CAPTION_SUFFIX  # noqa: PLC0415 - imports torch
    out = {}
    for txt in (p for p in uploads if p.suffix.lower() == CAPTION_SUFFIX):
        same = [p for p in images if p.stem == txt.stem and p not in out]
        pick = next((p for p in same if p.parent == txt.parent), same[0] if same else None)
        if pick is not None:
            out[pick] = txt
    return out


def _readable(images: list[pathlib.Path]) -> tuple[list[pathlib.Path], list[str]]:
    """(the images the trainer can read, a note for each one skipped)."""
    from engine.training.data import IMAGE_SUFFIXES  # noqa: PLC0415 - imports torch
    kept, notes = [], []
    for p in images:
        if not p.is_file():
            notes.append(f"{p.name}: the upload is gone; upload it again.")
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            notes.append(f"{p.name} skipped: not an image type the trainer reads ({', '.join(IMAGE_SUFFIXES)}).")
        elif (why := image_problem(p)) is not None:
            notes.append(f"{p.name} skipped: it cannot be read as an image ({why}).")
        else:
            kept.append(p)
    if not kept:
        raise EngineError("None of the uploaded files is a readable image (PNG, JPEG, WebP, BMP). " + " ".join(notes))
    return kept, notes


def prepare_dataset(guard, root: pathlib.Path, files, captions=None, name: Optional[str] = None) -> dict:
    """Copy uploaded images into a new folder ``<root>/<name>/`` with a same-named ``.txt`` caption each (never
    writing over anything). ``captions``: {file name: caption} or a list in the images' order; an uploaded ``.txt``
    whose name matches an image is its caption. Files that are not images are skipped and named in ``notes``.
    Returns ``{"folder", "metadata": None, "rows": [[file, caption]], "notes", "originals" (copy name -> uploaded
    name)}``."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    from engine.training.data import CAPTION_SUFFIX  # noqa: PLC0415
    files = [pathlib.Path(str(f)) for f in (files or []) if f]
    if not files:
        raise EngineError("No files uploaded: add the training images (PNG, JPEG, WebP), with .txt captions of "
                          "the same names if you have them.")
    for f in files:
        guard.check(f, "an uploaded training file")
    images = [p for p in files if p.suffix.lower() != CAPTION_SUFFIX]
    from_txt = _captions_from_txt(images, files)
    if isinstance(captions, (list, tuple)):
        captions = {images[i].name: c for i, c in enumerate(captions) if i < len(images)}
    captions = dict(captions or {})
    kept, notes = _readable(images)
    root.mkdir(parents=True, exist_ok=True)
    folder = ck.unique_path(root / safe_name(name, f"dataset-{now_stamp()}"))
    folder.mkdir(parents=True)
    rows, originals = [], {}
    for p in kept:
        target = ck.unique_path(folder / (safe_name(p.stem, "image") + p.suffix.lower()))
        safe_files.copy_file(p, target)
        caption = captions.get(p.name)
        if caption is None and p in from_txt:
            caption = _text(from_txt[p])
        caption = str(caption or "").strip()
        safe_files.write_text(target.with_suffix(CAPTION_SUFFIX), caption)
        rows.append([target.name, caption])
        originals[target.name] = p.name
    notes += _empty_note(rows, "no caption yet: write them in the table (an empty caption trains with an empty "
                               "prompt).")
    return {"folder": str(folder), "metadata": None, "rows": rows, "notes": notes, "originals": originals}


# ------------------------------------------------------------------------------------------------- reading
def _read_folder(folder: pathlib.Path) -> dict:
    from engine.training.data import CAPTION_SUFFIX, IMAGE_SUFFIXES  # noqa: PLC0415 - imports torch
    rows = []
    for image in sorted(q for q in folder.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(CAPTION_SUFFIX)
        rows.append([image.relative_to(folder).as_posix(), _text(caption).strip() if caption.is_file() else ""])
    if not rows:
        raise EngineError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); a .txt is a caption, never an "
                          f"image.")
    notes = _empty_note(rows, "no caption (.txt): they train with an empty prompt unless you write one in the "
                              "table.")
    return {"folder": str(folder), "metadata": None, "rows": rows, "notes": notes}


def _check_metadata_files(guard, records: list, folder: pathlib.Path, name: str) -> None:
    """The files a metadata file names (image, kontext_images, edit_image) must lie in the folders the person chose
    too."""
    for r in records:
        for key in ("image", "kontext_images", "edit_image"):
            value = r.get(key)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v and not v.startswith("[") and not guard.contains(folder / v):
                    raise guard.refusal(f"{v!r} (named in {name})")


def _read_metadata_file(guard, path: pathlib.Path, base) -> dict:
    from engine.training.data import read_metadata  # noqa: PLC0415 - imports torch
    if path.suffix.lower() not in (".csv", ".json", ".jsonl"):
        raise EngineError(f"{path.name} is not a metadata file: give a .csv, .json or .jsonl file (image, prompt "
                          f"columns) or a folder of images.")
    records = read_metadata(path)
    if not records:
        raise EngineError(f"{path} has no records.")
    if not any("image" in r for r in records):
        raise EngineError(f"{path} has no 'image' column (columns: {', '.join(records[0])}).")
    folder = pathlib.Path(str(base)).expanduser() if base else path.parent
    _check_metadata_files(guard, records, folder, path.name)
    rows = [[str(r.get("image", "")), str(r.get("prompt") or "")] for r in records]
    notes = []
    missing = [f for f, _ in rows if f and not f.startswith("[") and not (folder / f).exists()]
    if missing:
        notes.append(f"{len(missing)} image(s) named in {path.name} are not in {folder} and will be skipped: "
                     f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.")
    columns = sorted({k for r in records for k in r} - {"image", "prompt"})    # shown by the tab, not a warning
    return {"folder": str(folder), "metadata": str(path), "rows": rows, "notes": notes, "columns": columns}


def read_dataset(guard, path, base=None) -> dict:
    """A folder of images with ``.txt`` captions, or a metadata file (CSV / JSON / JSONL: image, prompt, extra
    columns; its paths relative to ``base``, by default its own folder): ``{"folder", "metadata" (None for a
    folder), "rows": [[file, caption]], "notes"}`` (and ``"columns"``, the extra ones, for a metadata file)."""
    text = str(path or "").strip()
    if not text:
        raise EngineError("No dataset path: give a folder of images with .txt captions, or a metadata file "
                          "(.csv, .json, .jsonl).")
    p = pathlib.Path(text).expanduser()
    # Only folders the person chose (models, outputs, --allow-dir) are listed: never any folder of the server.
    guard.check(p, "the dataset folder")
    if base:
        guard.check(base, "the dataset folder")
    if not p.exists():
        raise EngineError(f"{p} does not exist: give a folder of images or a metadata file.")
    return _read_folder(p) if p.is_dir() else _read_metadata_file(guard, p, base)


# ------------------------------------------------------------------------------------------------- captions
def caption_changes(guard, folder, rows) -> list[tuple[pathlib.Path, str]]:
    """The ``.txt`` files the table's captions would change: [(file, caption)], nothing written. Names outside
    the dataset folder, or images no longer there, are refused."""
    from engine.training.data import CAPTION_SUFFIX  # noqa: PLC0415 - imports torch
    folder = guard.check(pathlib.Path(str(folder)).expanduser(), "the dataset folder")
    changes = []
    for name, caption in caption_rows(rows):
        image = (folder / name).resolve()
        if not image.is_relative_to(folder):
            raise EngineError(f"{name!r} is outside the dataset folder {folder}.")
        if not image.is_file():
            raise EngineError(f"{name} is not in the dataset folder {folder} (was it renamed or deleted?). "
                              f"Load the folder again.")
        txt = image.with_suffix(CAPTION_SUFFIX)
        old = _text(txt).strip() if txt.is_file() else None
        if old != caption:
            changes.append((txt, caption))
    return changes


def write_captions(changes: list[tuple[pathlib.Path, str]]) -> int:
    for txt, caption in changes:
        safe_files.write_text(txt, caption)
    return len(changes)


def dataset_for_run(guard, form: dict, base: dict) -> tuple[dict, list, list[str]]:
    """The dataset a run form names (``dataset`` folder and/or ``metadata`` file, ``captions`` table) for a run on
    ``base``: ``(read_dataset's answer with the table's captions, caption files to write, notes)``."""
    folder = str(form.get("dataset") or "").strip()
    metadata = str(form.get("metadata") or "").strip() or None
    if not folder and not metadata:
        raise EngineError("No training images: upload images (or give a folder / metadata file) first.")
    if metadata and not folder:
        folder = str(pathlib.Path(metadata).expanduser().parent)
    data = read_dataset(guard, metadata or folder, base=folder if metadata else None)
    rows, captions, notes = caption_rows(form.get("captions")), [], []
    if rows and data["metadata"] is None:
        captions = caption_changes(guard, data["folder"], rows)
        if captions:
            notes.append(f"{len(captions)} caption(s) saved to the dataset's .txt files.")
        table = dict(rows)
        data["rows"] = [[f, table.get(f, c)] for f, c in data["rows"]]
    elif rows:
        given = dict(rows)
        differ = [f for f, c in data["rows"] if f in given and given[f] != c]
        if differ:
            raise EngineError(f"Captions of a metadata dataset are its prompt column: edit "
                              f"{pathlib.Path(data['metadata']).name} ({', '.join(differ[:3])} changed in the "
                              f"table), or use a folder of images with .txt captions.")
    notes += _empty_note(data["rows"], "an empty caption: they train with an empty prompt.")
    if "kontext_images" in base["extra_inputs"] and "kontext_images" not in (data.get("columns") or []):
        raise EngineError(f"{base['name']} trains on image pairs: give a metadata file with image, prompt and "
                          f"kontext_images columns (the reference image of each edit).")
    return data, captions, notes
