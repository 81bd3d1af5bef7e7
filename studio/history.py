"""History: every image in the outputs folder, newest first, searchable and filterable, and boards.

Plain Python and Pillow (no torch, no gradio). The History tab asks ``History`` for a page of results; nothing here
writes, moves or renames an image (only its thumbnail, in a folder of its own).

* What counts as a result: ``<outputs>/<YYYY-MM-DD>/<NNNNN>-<seed>.png`` (``recipes.save_image``'s names). The input
  copies saved beside a result (``<name>.ref0.png``, ``.ctl0.png``, ``.red0.png``, ``.ent0.png``, ``.input.png``)
  have a second dot in their names and are skipped; so are other folders (``.work``, scratch files).
* The index: one ``Entry`` per result (prompt, model, LoRAs, the tab that made it, size, seed), read from the recipe
  in the PNG's text chunks without decoding the pixels. It is kept per file by (mtime, size) and per day folder by
  the folder's mtime, so a refresh of 5,000 images re-reads only what changed; it is saved (atomically, through
  ``engine.safe_files``) as ``<outputs>/.history-index.json`` so a restarted studio does not read every PNG again.
* Boards: named lists of results in ``<outputs>/boards.json`` (paths relative to the outputs folder). A board never
  copies or moves an image; removing an image from a board, or deleting a board, leaves the image where it is.
* Thumbnails: the gallery shows ``<outputs>/.thumbs/<day>/<name>.jpg`` (JPEG, 256 px on the long side), made on
  first view and again when the image is newer; restore and "send to" use the image itself.
* Reading stays inside the outputs folder: a name handed in (a board item, a page request) is resolved and refused
  unless it is a result inside that folder.
* ``viewer``: every method that lists or changes what a person sees takes the asking person (a login name). It
  filters nothing: in a shared studio each person has a ``History`` of their own part of the outputs folder
  (``Histories``; ``studio.sharing`` says where), with their own index, thumbnails and boards. Boards record their
  ``owner``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable, Optional

from PIL import Image

from engine import safe_files

from .recipes import PARAMETERS_KEY, RECIPE_KEY, parse_a1111_parameters

DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
RESULT_RE = re.compile(r"^(\d{5,})-[^.]+\.png$")   # one dot only: the input copies beside a result have two
INDEX_FILE = ".history-index.json"
THUMBS = ".thumbs"          # <outputs>/.thumbs/<day>/<NNNNN>-<seed>.jpg: what the History gallery shows
THUMB_SIDE = 256            # px, the long side
THUMB_QUALITY = 85
BOARDS_FILE = "boards.json"
INDEX_VERSION = 1
# A folder changed this recently may change again within its mtime's granularity: list it again next time.
SETTLED_NS = 2_000_000_000
MAX_BOARD_NAME = 60
# Which tab made an image, from its recipe: the first tab whose keys it has (else Generate).
TAB_LABELS = {"generate": "Generate", "edit": "Edit", "inpaint": "Inpaint & Control", "eligen": "EliGen"}
TAB_KEYS = (
    ("edit", ("kontext_images", "step1x_reference_image", "edit_images", "nexus_gen_reference_image")),
    ("inpaint", ("inpaint_image", "inpaint_mask", "controls")),
    ("eligen", ("eligen_entity_prompts",)),
)


class HistoryError(ValueError):
    """A request History refuses (a name outside the outputs folder, a bad board name); the message says why."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One result in the index. ``path`` is relative to the outputs folder, with "/" (``2026-12-06/00001-7.png``)."""

    path: str
    day: str
    number: int
    mtime_ns: int
    size: int
    prompt: str = ""
    text: str = ""             # what a search looks in: the prompt, the negative prompt, EliGen's entity prompts
    variant: str = ""
    loras: tuple = ()
    tab: str = "generate"
    seed: Any = None
    width: int = 0
    height: int = 0

    def caption(self) -> str:
        return f"seed {self.seed} · {self.width}×{self.height}"


def tab_of(recipe: Optional[dict]) -> str:
    """The tab that made an image: edit references -> edit, an inpaint image/mask or controls -> inpaint, EliGen
    entities -> eligen, anything else (plain prompts, an image prompt, other tools' PNGs) -> generate."""
    recipe = recipe or {}
    for tab, keys in TAB_KEYS:
        if any(recipe.get(k) for k in keys):
            return tab
    return "generate"


def lora_names(recipe: Optional[dict]) -> tuple:
    """The person's LoRAs of a recipe (a feature's own LoRA, EliGen's, is not one they chose)."""
    names = []
    for item in (recipe or {}).get("loras") or []:
        if isinstance(item, dict) and not item.get("feature"):
            name = item.get("name") or item.get("file")
            if name:
                names.append(str(name))
    return tuple(names)


def read_png_recipe(path: Any) -> tuple[Optional[dict], tuple[int, int]]:
    """(recipe, (width, height)) from the PNG's text chunks, without decoding the pixels (Pillow reads the chunks
    before the image data on open; ``recipes.save_image`` writes its text there). (None, size) without a recipe."""
    try:
        with Image.open(os.fspath(path)) as image:
            size = image.size
            info = dict(image.info or {})
    except (OSError, ValueError, SyntaxError):
        return None, (0, 0)
    raw = info.get(RECIPE_KEY)
    if isinstance(raw, str):
        try:
            recipe = json.loads(raw)
        except ValueError:
            recipe = None
        if isinstance(recipe, dict):
            return recipe, size
    if isinstance(info.get(PARAMETERS_KEY), str):
        return parse_a1111_parameters(info[PARAMETERS_KEY]), size
    return None, size


def make_entry(rel: str, mtime_ns: int, size: int, recipe: Optional[dict], image_size: tuple[int, int]) -> Entry:
    recipe = recipe or {}
    day, name = rel.split("/", 1)
    match = RESULT_RE.match(name)
    entities = [str(p) for p in recipe.get("eligen_entity_prompts") or [] if p]
    prompt = str(recipe.get("prompt") or "")
    text = "\n".join([prompt, str(recipe.get("negative_prompt") or ""), *entities]).casefold()
    return Entry(path=rel, day=day, number=int(match.group(1)) if match else 0, mtime_ns=mtime_ns, size=size,
                 prompt=prompt, text=text, variant=str(recipe.get("variant") or recipe.get("model") or ""),
                 loras=lora_names(recipe), tab=tab_of(recipe), seed=recipe.get("seed"),
                 width=int(recipe.get("width") or image_size[0] or 0),
                 height=int(recipe.get("height") or image_size[1] or 0))


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a search: its entries, the page number (1-based), how many pages and matches there are."""

    entries: list
    number: int
    pages: int
    total: int


class History:
    """The outputs folder as a browsable history. Thread-safe: the studio builds one and every session shares it."""

    def __init__(self, outputs_dir: Any):
        self.root = pathlib.Path(outputs_dir)
        self._lock = threading.RLock()
        self._days: dict[str, tuple[int, dict[str, Entry]]] = {}   # day -> (folder mtime, {name: Entry})
        self._loaded = False

    # ------------------------------------------------------------------------------------------------ the index
    def _load_saved(self) -> None:
        """The index a previous run saved (entries are checked against their files' mtimes before use)."""
        self._loaded = True
        try:
            data = json.loads((self.root / INDEX_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            return
        fields = {f.name for f in dataclasses.fields(Entry)}
        for day, names in (data.get("days") or {}).items():
            kept = {}
            for name, row in (names or {}).items():
                if isinstance(row, dict) and set(row) <= fields:
                    try:
                        kept[name] = Entry(**{**row, "loras": tuple(row.get("loras") or ())})
                    except TypeError:
                        continue
            # Folder mtime -1: the folder is listed again, but unchanged files are not re-read.
            self._days[str(day)] = (-1, kept)

    def _save(self) -> None:
        data = {"version": INDEX_VERSION,
                "days": {day: {name: dataclasses.asdict(e) for name, e in entries.items()}
                         for day, (_, entries) in self._days.items()}}
        try:
            safe_files.write_text(self.root / INDEX_FILE, json.dumps(data, separators=(",", ":")))
        except OSError:
            pass   # a read-only outputs folder: the index lives in memory only

    def _scan_day(self, day: str, folder: pathlib.Path, known: dict[str, Entry]) -> tuple[dict[str, Entry], bool]:
        """The day's results; a file whose mtime and size are unchanged keeps its entry. (entries, changed)."""
        entries, changed = {}, False
        try:
            listing = list(os.scandir(folder))
        except OSError:
            return {}, bool(known)
        for item in listing:
            if not RESULT_RE.match(item.name) or not item.is_file(follow_symlinks=False):
                continue
            try:
                stat = item.stat(follow_symlinks=False)
            except OSError:
                continue
            old = known.get(item.name)
            if old is not None and old.mtime_ns == stat.st_mtime_ns and old.size == stat.st_size:
                entries[item.name] = old
                continue
            recipe, image_size = read_png_recipe(item.path)
            entries[item.name] = make_entry(f"{day}/{item.name}", stat.st_mtime_ns, stat.st_size, recipe, image_size)
            changed = True
        return entries, changed or len(entries) != len(known)

    def refresh(self) -> list[Entry]:
        """Every result, newest first (day, then number). Re-reads only new or changed files."""
        with self._lock:
            if not self._loaded:
                self._load_saved()
            changed = False
            seen = set()
            try:
                days = [d for d in os.scandir(self.root) if DAY_RE.match(d.name) and d.is_dir(follow_symlinks=False)]
            except OSError:
                days = []
            for folder in days:
                seen.add(folder.name)
                try:
                    mtime = folder.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                cached = self._days.get(folder.name)
                if cached is not None and cached[0] == mtime:
                    continue
                entries, day_changed = self._scan_day(folder.name, pathlib.Path(folder.path),
                                                      cached[1] if cached else {})
                settled = time.time_ns() - mtime > SETTLED_NS
                self._days[folder.name] = (mtime if settled else -1, entries)
                changed = changed or day_changed
            for day in set(self._days) - seen:
                del self._days[day]
                changed = True
            if changed:
                self._save()
            everything = [e for _, entries in self._days.values() for e in entries.values()]
        everything.sort(key=lambda e: (e.day, e.number, e.path), reverse=True)
        return everything

    # ------------------------------------------------------------------------------------------- search, pages
    def search(self, query: str = "", variant: Optional[str] = None, lora: Optional[str] = None,
               tab: Optional[str] = None, day: Optional[str] = None, board: Optional[str] = None,
               viewer: Optional[str] = None) -> list[Entry]:
        """The results matching every given filter, newest first. ``query``: words that must all appear in the
        prompt (or negative or entity prompts), any case; ``day``: "YYYY-MM-DD"; ``board``: only its images.
        ``viewer`` is unused for now (see the module's docstring)."""
        words = str(query or "").casefold().split()
        members = set(self.board_items(board, viewer=viewer)) if board else None
        out = []
        for entry in self.refresh():
            if words and not all(w in entry.text for w in words):
                continue
            if variant and entry.variant != variant:
                continue
            if lora and lora not in entry.loras:
                continue
            if tab and entry.tab != tab:
                continue
            if day and entry.day != day:
                continue
            if members is not None and entry.path not in members:
                continue
            out.append(entry)
        return out

    @staticmethod
    def page(entries: list, number: int = 1, per_page: int = 40) -> Page:
        """Page ``number`` (1-based, clamped to the pages there are) of ``entries``."""
        per_page = max(1, int(per_page))
        pages = max(1, -(-len(entries) // per_page))
        number = min(max(1, int(number or 1)), pages)
        start = (number - 1) * per_page
        return Page(entries=entries[start:start + per_page], number=number, pages=pages, total=len(entries))

    def facets(self, viewer: Optional[str] = None) -> dict:
        """What the filters can offer: {"variants", "loras", "tabs", "days"} (days newest first)."""
        entries = self.refresh()
        return {"variants": sorted({e.variant for e in entries if e.variant}),
                "loras": sorted({name for e in entries for name in e.loras}),
                "tabs": [t for t in TAB_LABELS if any(e.tab == t for e in entries)],
                "days": sorted({e.day for e in entries}, reverse=True)}

    # ------------------------------------------------------------------------------------- files of the folder
    def resolve(self, rel: Any) -> pathlib.Path:
        """The absolute path of a result named relative to the outputs folder (or absolutely, inside it). Anything
        else, a missing file, or an input copy is a HistoryError with one message for all."""
        refusal = HistoryError(f"{rel} is not an image in the outputs folder ({self.root}).")
        try:
            root = self.root.resolve()
            path = pathlib.Path(str(rel))
            path = (path if path.is_absolute() else root / path).resolve()
            inside = path.relative_to(root)
        except (OSError, ValueError, RuntimeError):
            raise refusal from None
        parts = inside.parts
        if len(parts) != 2 or not DAY_RE.match(parts[0]) or not RESULT_RE.match(parts[1]) or not path.is_file():
            raise refusal
        return path

    def relative(self, path: Any) -> str:
        """A result's name relative to the outputs folder ("2026-12-06/00001-7.png"); HistoryError outside it."""
        return self.resolve(path).relative_to(self.root.resolve()).as_posix()

    def result(self, rel: Any) -> dict:
        """A result as the tabs hold one: {"path" (absolute), "seed", "width", "height", "recipe" (the full
        recipe, or None)}, for the tabs' restore and "send to"."""
        path = self.resolve(rel)
        recipe, size = read_png_recipe(path)
        recipe = recipe or None
        return {"path": str(path), "seed": (recipe or {}).get("seed"), "width": size[0], "height": size[1],
                "recipe": recipe}

    def thumbnail(self, rel: Any) -> pathlib.Path:
        """A small JPEG of a result (at most ``THUMB_SIDE`` px on its long side) for the gallery:
        ``<outputs>/.thumbs/<day>/<name>.jpg``, made when missing or older than the image, and never written outside
        the outputs folder. The image itself when no thumbnail can be written (a read-only folder). HistoryError as
        ``resolve`` for anything that is not a result of the folder."""
        path = self.resolve(rel)
        root = self.root.resolve()
        thumb = self.root / THUMBS / path.parent.name / f"{path.stem}.jpg"
        try:
            if not thumb.is_symlink() and thumb.stat().st_mtime_ns >= path.stat().st_mtime_ns:
                return thumb
        except OSError:
            pass
        try:
            thumb.parent.resolve().relative_to(root)       # .thumbs (or its day folder) is no link out of the folder
            thumb.parent.mkdir(parents=True, exist_ok=True)
            thumb.parent.resolve().relative_to(root)
            with Image.open(path) as image:
                small = image.convert("RGB")
            small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
            safe_files.save_image(small, thumb, format="JPEG", quality=THUMB_QUALITY)
        except (OSError, ValueError, Image.DecompressionBombError):
            return path
        return thumb

    # --------------------------------------------------------------------------------------------------- boards
    def _read_boards(self) -> dict:
        try:
            data = json.loads((self.root / BOARDS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise HistoryError(f"The boards file {self.root / BOARDS_FILE} cannot be read ({exc}); fix or remove "
                               "it (the images themselves are not in it).") from None
        boards = data.get("boards") if isinstance(data, dict) else None
        return boards if isinstance(boards, dict) else {}

    def _write_boards(self, boards: dict) -> None:
        text = json.dumps({"version": 1, "boards": boards}, indent=1, ensure_ascii=False)
        safe_files.write_text(self.root / BOARDS_FILE, text)

    @staticmethod
    def check_board_name(name: Any) -> str:
        name = " ".join(str(name or "").split())
        if not name:
            raise HistoryError("Type a name for the board first.")
        if len(name) > MAX_BOARD_NAME:
            raise HistoryError(f"A board name is at most {MAX_BOARD_NAME} characters; this one has {len(name)}.")
        return name

    def boards(self, viewer: Optional[str] = None) -> list[str]:
        """The boards' names, in the order they were made."""
        with self._lock:
            return list(self._read_boards())

    def make_board(self, name: Any, viewer: Optional[str] = None) -> str:
        """Make an empty board (a name already taken is kept as it is); returns the tidied name."""
        name = self.check_board_name(name)
        with self._lock:
            boards = self._read_boards()
            if name not in boards:
                boards[name] = {"items": [], "owner": viewer}
                self._write_boards(boards)
        return name

    def add_to_board(self, name: Any, items: Iterable[Any], viewer: Optional[str] = None) -> int:
        """Add results (names relative to the outputs folder, or absolute paths inside it) to a board, making it
        when new; returns how many were new on it."""
        name = self.check_board_name(name)
        rels = [self.relative(item) for item in items]
        with self._lock:
            boards = self._read_boards()
            board = boards.setdefault(name, {"items": [], "owner": viewer})
            listed = board.setdefault("items", [])
            added = [rel for rel in dict.fromkeys(rels) if rel not in listed]
            listed.extend(added)
            self._write_boards(boards)
        return len(added)

    def remove_from_board(self, name: Any, items: Iterable[Any], viewer: Optional[str] = None) -> int:
        """Take results off a board (the images stay in the outputs folder); returns how many were removed."""
        name = self.check_board_name(name)
        gone = {str(item).replace("\\", "/") for item in items}
        for item in list(gone):
            try:
                gone.add(self.relative(item))
            except HistoryError:
                pass
        with self._lock:
            boards = self._read_boards()
            if name not in boards:
                raise HistoryError(f"There is no board named {name!r}.")
            before = boards[name].get("items") or []
            boards[name]["items"] = [rel for rel in before if rel not in gone]
            self._write_boards(boards)
        return len(before) - len(boards[name]["items"])

    def delete_board(self, name: Any, viewer: Optional[str] = None) -> None:
        """Delete a board (its list only: the images stay where they are)."""
        name = self.check_board_name(name)
        with self._lock:
            boards = self._read_boards()
            if boards.pop(name, None) is None:
                raise HistoryError(f"There is no board named {name!r}.")
            self._write_boards(boards)

    def board_items(self, name: Any, viewer: Optional[str] = None) -> list[str]:
        """A board's results (relative names) as listed, skipping names that are no results of the folder."""
        name = self.check_board_name(name)
        with self._lock:
            board = self._read_boards().get(name)
        if board is None:
            raise HistoryError(f"There is no board named {name!r}.")
        out = []
        for rel in board.get("items") or []:
            parts = str(rel).split("/")
            if len(parts) == 2 and DAY_RE.match(parts[0]) and RESULT_RE.match(parts[1]):
                out.append(str(rel))
        return out


class Histories:
    """One ``History`` per folder (a shared studio's people), the most recently used ``keep`` of them kept."""

    def __init__(self, keep: int = 64):
        self._keep = max(1, int(keep))
        self._lock = threading.Lock()
        self._open: OrderedDict[str, History] = OrderedDict()

    def get(self, folder: Any) -> History:
        key = os.fspath(folder)
        with self._lock:
            history = self._open.get(key)
            if history is None:
                history = self._open[key] = History(folder)
            self._open.move_to_end(key)
            while len(self._open) > self._keep:
                self._open.popitem(last=False)
            return history
