"""Training data: the seed's metadata file (CSV / JSON / JSONL) or a folder of images with same-named .txt captions.

Metadata rows are the seed's: an ``image`` column (a path relative to ``--dataset_base_path``), a ``prompt`` column
and extra-input columns (``kontext_images``, ``controlnet_image`` ...); the columns named by ``--data_file_keys`` are
loaded as images (a JSON list of paths gives a list of images). The folder form: every image under the folder
(``.png .jpg .jpeg .webp .bmp``, sub-folders too) whose caption is the ``.txt`` beside it with the same stem; a
``.txt`` is never an image, and an image without a caption trains with an empty prompt (logged).

Sizes, as the seed's ``ImageCropAndResize``: fixed ``height`` x ``width`` (rounded up to multiples of 16, the
engine's rule), or dynamic when either is empty: an image over ``max_pixels`` is scaled down to that area, then
both sides are floored to multiples of 16 (the seed floors here: the crop never invents pixels). The image is
scaled to cover the target and centre-cropped.

Captions are read when the dataset is built, i.e. fresh for every run (and every resume); ``--trigger_word`` (ours)
is put in front of each (``with_trigger``). A file that cannot be read as an image is skipped with its name logged --
when the dataset is built (``Image.verify``) or, if it only fails when decoded, when it is loaded (the next record is
used in its place, so the step count is unchanged).
"""
from __future__ import annotations

import csv
import json
import pathlib
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from ..errors import EngineError
from ..sizes import MULTIPLE, normalize_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"


def target_size(width: int, height: int, fixed_height: Optional[int], fixed_width: Optional[int],
                max_pixels: int) -> tuple[int, int]:
    """(width, height) an image of this size is trained at."""
    if fixed_height and fixed_width:
        w, h, _ = normalize_size(fixed_width, fixed_height)
        return w, h
    if width * height > max_pixels:
        scale = (width * height / max_pixels) ** 0.5
        height, width = int(height / scale), int(width / scale)
    return max(MULTIPLE, width // MULTIPLE * MULTIPLE), max(MULTIPLE, height // MULTIPLE * MULTIPLE)


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover ``width`` x ``height`` (bilinear) and crop the centre."""
    w, h = image.size
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), Image.BILINEAR)
    left, top = int(round((rw - width) / 2.0)), int(round((rh - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


def with_trigger(prompt: str, trigger: Optional[str]) -> str:
    """``prompt`` with the trigger word in front (``"sks, a dog"``); unchanged when there is no trigger word or the
    prompt already starts with it, the trigger alone for an empty prompt."""
    trigger = (trigger or "").strip()
    prompt = (prompt or "").strip()
    if not trigger or prompt.lower().startswith(trigger.lower()):
        return prompt
    return f"{trigger}, {prompt}" if prompt else trigger


def _is_image_key(key: str) -> bool:
    return key not in ("prompt", "text", "caption")


def _check_image(path: pathlib.Path) -> Optional[str]:
    """None when ``path`` opens as an image, else why not."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # noqa: BLE001 - any reader error means the file is unusable
        return f"{type(exc).__name__}: {exc}"


def read_metadata(path: pathlib.Path) -> list[dict]:
    """Rows of a CSV, JSON (a list of objects) or JSONL metadata file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise EngineError(f"{path}: a JSON metadata file must hold a list of records.")
            return rows
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [dict(row) for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise EngineError(f"The metadata file {path} does not exist (--dataset_metadata_path).") from None
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise EngineError(f"The metadata file {path} cannot be read: {exc}.") from None


def cell_paths(value) -> Optional[list]:
    """A metadata cell naming files -> list of path strings (a JSON list in a CSV cell too), or None when empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    return [text]


class TrainingDataset(torch.utils.data.Dataset):
    """Records of ``{"prompt": str, <file key>: image or [images], <other column>: value}``; index ``i`` is record
    ``i % len(records)`` (``repeat`` times the records per epoch, as the seed's ``dataset_repeat``)."""

    def __init__(self, base_path, metadata_path=None, repeat: int = 1, data_file_keys: Sequence[str] = ("image",),
                 height: Optional[int] = None, width: Optional[int] = None, max_pixels: int = 1024 * 1024,
                 log: Callable[[str], None] = print, trigger_word: Optional[str] = None):
        self.base = pathlib.Path(base_path or ".").expanduser()
        self.repeat = max(1, int(repeat))
        self.keys = [k for k in data_file_keys if _is_image_key(k)] or ["image"]
        self.height, self.width, self.max_pixels = height, width, int(max_pixels)
        self.log = log
        self.skipped: list[str] = []
        if metadata_path:
            self.source = str(metadata_path)
            records = self._from_metadata(pathlib.Path(metadata_path).expanduser())
        else:
            self.source = str(base_path or "")
            records = self._from_folder()
        self.records = self._keep_readable(records)
        self.trigger_word = (trigger_word or "").strip() or None
        for record in self.records:
            record["prompt"] = with_trigger(record["prompt"], self.trigger_word)
        if not self.records:
            raise EngineError(f"No usable training images in {self.source}"
                              + (f" ({len(self.skipped)} skipped: {', '.join(self.skipped[:3])})" if self.skipped
                                 else "") + ".")

    # ------------------------------------------------------------------------------------------------ scanning
    def _from_metadata(self, path: pathlib.Path) -> list[dict]:
        rows = read_metadata(path)
        if rows and "image" in self.keys and not any("image" in r for r in rows):
            raise EngineError(f"{path} has no 'image' column (columns: {', '.join(rows[0])}).")
        out = []
        for row in rows:
            record = dict(row)
            for key in self.keys:
                if key in record:
                    paths = cell_paths(record[key])
                    record[key] = None if paths is None else [str(self.base / p) for p in paths]
                    record[f"_{key}_list"] = isinstance(row[key], list) or str(row[key]).strip().startswith("[")
            prompt = record.get("prompt")
            record["prompt"] = "" if prompt is None or (isinstance(prompt, float) and prompt != prompt) else str(prompt)
            out.append(record)
        return out

    def _from_folder(self) -> list[dict]:
        if not str(self.source).strip() or str(self.source) == ".":
            raise EngineError("No dataset: pass --dataset_base_path (a folder of images with .txt captions) and/or "
                              "--dataset_metadata_path.")
        if not self.base.is_dir():
            raise EngineError(f"The dataset folder {self.base} does not exist (--dataset_base_path).")
        out, uncaptioned = [], []
        for path in sorted(p for p in self.base.rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue   # captions (.txt), metadata and anything else are never images
            caption = path.with_suffix(CAPTION_SUFFIX)
            prompt = caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else ""
            if not caption.is_file():
                uncaptioned.append(path.name)
            out.append({"image": [str(path)], "prompt": prompt, "_image_list": False})
        if uncaptioned:
            self.log(f"{len(uncaptioned)} image(s) have no caption .txt and train with an empty prompt: "
                     f"{', '.join(uncaptioned[:5])}{' ...' if len(uncaptioned) > 5 else ''}")
        return out

    def _keep_readable(self, records: list[dict]) -> list[dict]:
        kept = []
        for record in records:
            bad = None
            for key in self.keys:
                for p in record.get(key) or []:
                    why = _check_image(pathlib.Path(p))
                    if why:
                        bad = f"{p} ({why})"
                        break
                if bad:
                    break
            if bad:
                self.skipped.append(bad)
                self.log(f"Skipping a record: {bad}")
            else:
                kept.append(record)
        return kept

    # ------------------------------------------------------------------------------------------------- loading
    def __len__(self) -> int:
        return len(self.records) * self.repeat

    @property
    def num_records(self) -> int:
        return len(self.records)

    def load_image(self, path: str) -> Image.Image:
        with Image.open(path) as im:
            image = im.convert("RGB")
        w, h = target_size(image.width, image.height, self.height, self.width, self.max_pixels)
        return crop_and_resize(image, w, h)

    def load_record(self, index: int) -> dict:
        record = self.records[index]
        out = {k: v for k, v in record.items() if not k.startswith("_")}
        for key in self.keys:
            paths = record.get(key)
            if paths is None:
                continue
            images = [self.load_image(p) for p in paths]
            out[key] = images if record.get(f"_{key}_list") else images[0]
        return out

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return self.load_record(i)
            except Exception as exc:  # noqa: BLE001 - a file that fails to decode is skipped, not fatal
                self.log(f"Skipping {self.records[i].get(self.keys[0])}: {type(exc).__name__}: {exc}")
        raise EngineError(f"None of the {n} training images in {self.source} could be loaded.")

    def describe(self) -> str:
        s = f"{self.num_records} images from {self.source}"
        if self.repeat > 1:
            s += f", repeated {self.repeat}x"
        if self.skipped:
            s += f" ({len(self.skipped)} skipped)"
        if self.trigger_word:
            s += f", every caption starting with '{self.trigger_word}'"
        return s


def epoch_order(num_items: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This process's indices for one epoch: a shuffle seeded by (seed, epoch), dealt round-robin to the processes
    and padded by wrapping so every process takes the same number of steps (DDP needs equal step counts)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2 ** 63))
    order = torch.randperm(num_items, generator=g).tolist()
    per_rank = -(-num_items // world)
    order = (order * (per_rank * world // max(1, num_items) + 1))[: per_rank * world]
    return order[rank::world]


def order_position(pos: int, rank: int = 0, world: int = 1) -> int:
    """Where this process's ``pos``-th item of an epoch stands in the epoch's whole order (``epoch_order`` deals
    round-robin): the key of that sample's randomness, the same on any number of processes."""
    return int(pos) * int(world) + int(rank)


def steps_per_epoch(num_items: int, world: int = 1) -> int:
    return -(-num_items // world)
