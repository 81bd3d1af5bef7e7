"""The model manager: every variant, ControlNet and adapter the registry knows, with its files, sizes, licence and
whether it is in the models folder; downloads (ModelScope or Hugging Face, resumable, with a token for gated
repositories), verification and deletion, and the disk space used and free.

Downloads and checks run in the manager's own thread, one at a time, and never take the engine's job lock: image
jobs go on while a model arrives. The catalogue looks at the models folder each time it is asked
(``Catalogue.available``), so a model is offered as downloaded as soon as its last file is in place.

After a download the sizes (and sha256, where the hub publishes it) are recorded beside the files, in
``<models>/<model_id>/.flux-studio-files.json``, so that a check without the internet compares against them. The
token is handed to the hub call and kept nowhere: not in that record, not in the state the page reads, not in a log.

No torch, no gradio.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from engine import hub_files, registry, safe_files
from engine.errors import EngineError
from engine.hub_files import DownloadCancelled, RemoteFile

from . import model_facts

RECORD = ".flux-studio-files.json"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str            # "model" | "demo model" | "ControlNet" | "adapter"
    files: tuple         # ((model_id, pattern), ...) in the catalogue's order, without repeats
    description: str = ""

    @property
    def demo(self) -> bool:
        return self.kind == "demo model"

    @property
    def repos(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.files))


def entries() -> list[Entry]:
    """Every variant, ControlNet and adapter the registry knows."""
    out = []
    for v in registry.VARIANTS:
        files = tuple(dict.fromkeys((f.model_id, f.pattern) for f in v.files))
        out.append(Entry(v.name, "demo model" if v.demo else "model", files, v.description))
    for c in registry.CONTROLNETS:
        out.append(Entry(f"ControlNet {c.name}", "ControlNet", ((c.model_id, c.pattern),), c.description))
    for a in registry.ADAPTERS:
        out.append(Entry(a.name, "adapter", tuple(dict.fromkeys((f.model_id, f.pattern) for f in a.files)),
                         a.description))
    return out


def size_text(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    n = float(n)
    for unit, scale in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def licence_text(entry: Entry) -> tuple[str, bool]:
    """The entry's licence (the first repository's, then any other that differs) and whether a token is needed."""
    seen, gated = [], False
    for repo in entry.repos:
        text, is_gated = model_facts.licence(repo)
        gated = gated or is_gated
        if text not in seen:
            seen.append(text)
    return (seen[0] + "".join(f"; shared files: {t}" for t in seen[1:])), gated


class ModelManager:
    """``writable=False`` (a shared studio: a link, a login, a Space) lists and verifies but never downloads or
    deletes: those are for the studio's owner."""

    def __init__(self, models_dir, writable: bool = True):
        self.models_dir = pathlib.Path(models_dir)
        self.writable = bool(writable)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._cancel = threading.Event()
        self._remote: dict = {}        # (model_id, pattern) -> [RemoteFile] from the last hub listing (sizes)
        self._state = {"task": "", "name": "", "phase": "idle", "done": 0, "total": None, "file": "",
                       "message": "", "problems": [], "started": 0.0, "source": ""}

    # ---------------------------------------------------------------------------------------------- listing
    def entry(self, name: str) -> Entry:
        for e in entries():
            if e.name == name:
                return e
        raise EngineError(f"Unknown model {name!r}: choose one from the model manager's list.")

    def local_files(self, model_id: str, pattern: str) -> list[pathlib.Path]:
        """The whole files of one pattern in the models folder (a folder pattern: every file in it)."""
        folder = self.models_dir / model_id
        if pattern.endswith("/"):
            target = folder / pattern.rstrip("/")
            return sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else []
        return [p for p in sorted(folder.glob(pattern))
                if p.is_file() and not p.name.endswith((hub_files.PARTIAL_SUFFIX, ".part", ".tmp"))]

    def partial_files(self, entry: Entry) -> list[pathlib.Path]:
        out = []
        for model_id in entry.repos:
            folder = self.models_dir / model_id
            patterns = [p for m, p in entry.files if m == model_id]
            for part in sorted(folder.rglob("*" + hub_files.PARTIAL_SUFFIX)) if folder.is_dir() else []:
                path = _rel(folder, part)[:-len(hub_files.PARTIAL_SUFFIX)]
                if part.is_file() and any(hub_files.matches(path, p) for p in patterns):
                    out.append(part)
        return out

    def entry_files(self, entry: Entry) -> list[pathlib.Path]:
        return list(dict.fromkeys(p for m, pat in entry.files for p in self.local_files(m, pat)))

    def installed(self, entry: Entry) -> bool:
        return all(self.local_files(m, p) for m, p in entry.files)

    def expected_size(self, entry: Entry) -> tuple[Optional[int], bool]:
        """(bytes, exact): from the last hub listing where there is one (exact), else the manifests' weight sizes
        (approximate, the small tokenizer and config files left out); None where a weight file's size is unknown."""
        total, exact = 0, True
        for model_id, pattern in entry.files:
            listed = self._remote.get((model_id, pattern))
            if listed is not None and all(f.size is not None for f in listed):
                total += sum(f.size for f in listed)
                continue
            exact = False
            known = model_facts.KNOWN_SIZES.get((model_id, pattern))
            if known is not None:
                total += known
            elif model_facts.is_weights(pattern):
                return None, False
        return total, exact

    def status(self, entry: Entry) -> str:
        state = self.state()
        if state["phase"] == "running" and state["name"] == entry.name:
            return f"{state['task']}…"
        have = sum(1 for m, p in entry.files if self.local_files(m, p))
        if have == len(entry.files):
            return "installed"
        if entry.demo:                # its shared files may be here already (another demo wrote them)
            return "demo: written on first use"
        partial = " (a partial download to resume)" if self.partial_files(entry) else ""
        if have:
            return f"partial: {have} of {len(entry.files)} files{partial}"
        return "not downloaded" + partial

    def rows(self) -> list[dict]:
        """One row per entry: {"name", "kind", "files" (count of patterns), "file_list", "size", "on_disk",
        "licence", "gated", "status", "installed"}."""
        out = []
        for e in entries():
            on_disk = sum(p.stat().st_size for p in self.entry_files(e))
            expected, exact = self.expected_size(e)
            installed = self.installed(e)
            if installed:
                size = size_text(on_disk)
            elif e.demo:
                size = "small"
            else:
                size = "unknown" if expected is None else ("" if exact else "≈ ") + size_text(expected)
                if on_disk:
                    size = f"{size_text(on_disk)} here of {size}"
            lic, gated = licence_text(e)
            out.append({"name": e.name, "kind": e.kind, "files": len(e.files),
                        "file_list": [f"{m}/{p}" for m, p in e.files], "size": size, "on_disk": on_disk,
                        "licence": lic, "gated": gated, "status": self.status(e), "installed": installed})
        return out

    def disk(self) -> dict:
        """{"folder", "used" (bytes of every file in the models folder), "free", "total"} of its disk."""
        used = 0
        if self.models_dir.is_dir():
            used = sum(p.stat().st_size for p in self.models_dir.rglob("*") if p.is_file() and not p.is_symlink())
        where = self.models_dir
        while not where.exists() and where != where.parent:
            where = where.parent
        usage = shutil.disk_usage(where)
        return {"folder": str(self.models_dir), "used": used, "free": usage.free, "total": usage.total}

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        """What the running (or last) task is doing: {"task", "name", "phase" (idle | running | done | failed |
        cancelled), "done", "total" (bytes), "file", "message", "problems", "source"}. Never the token."""
        with self._lock:
            return {**self._state, "problems": list(self._state["problems"])}

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise EngineError(f"This studio is shared: only its owner can {what} models (at the console, or in a "
                              f"studio of their own).")

    def _set(self, **values) -> None:
        with self._lock:
            self._state.update(values)

    def _start(self, task: str, name: str, work: Callable[[], str], source: str = "") -> dict:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise EngineError(f"{self._state['name']} is still {self._state['task'].lower()}: wait for it or "
                                  f"cancel it first.")
            self._cancel.clear()
            self._state = {"task": task, "name": name, "phase": "running", "done": 0, "total": None, "file": "",
                           "message": "", "problems": [], "started": time.time(), "source": source}

            def run():
                try:
                    self._set(phase="done", message=work())
                except DownloadCancelled:
                    self._set(phase="cancelled", message=f"{task} of {name} cancelled; a download resumes where it "
                                                         f"stopped next time.")
                except Exception as exc:  # noqa: BLE001 - every failure is shown on the page, the thread ends
                    self._set(phase="failed", message=_failure_text(task, name, exc))

            self._thread = threading.Thread(target=run, daemon=True, name=f"model-manager-{task.lower()}")
            self._thread.start()
        return self.state()

    def cancel(self) -> dict:
        if self.busy():
            self._cancel.set()
            when = "after the file it is fetching" if self.state()["source"] == "ModelScope" else "within seconds"
            self._set(message=f"Cancelling… ({when})")
        return self.state()

    def wait(self, timeout: Optional[float] = None) -> dict:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.state()

    # ------------------------------------------------------------------------------------------- download
    def start_download(self, name: str, source: str, token: Optional[str] = None) -> dict:
        """Fetch the entry's missing files in the background (``state()`` tells the progress)."""
        self._check_writable("download")
        entry = self.entry(name)
        if entry.demo:
            raise EngineError(f"{name} is a random-weight demo: the studio writes it on first use, nothing to download.")
        source = hub_files.check_source(source)
        token = (token or "").strip() or None
        return self._start("Downloading", name, lambda: self._download(entry, source, token), source)

    def _list(self, entry: Entry, source: str, token: Optional[str]) -> list[tuple[str, RemoteFile]]:
        wanted = []
        for model_id in entry.repos:
            patterns = [p for m, p in entry.files if m == model_id]
            listed = hub_files.list_files(model_id, patterns, source, token)
            for pattern in patterns:
                found = [f for f in listed if hub_files.matches(f.path, pattern)]
                if not found:
                    raise EngineError(f"{model_id} on {source} has no file matching {pattern}.")
                self._remote[(model_id, pattern)] = found
            wanted += [(model_id, f) for f in listed]
        return list(dict.fromkeys(wanted))

    def _download(self, entry: Entry, source: str, token: Optional[str]) -> str:
        reason = hub_files.offline_reason(source)
        if reason:
            raise EngineError(f"cannot reach {source}: {reason}. Connect to the internet (or choose the other "
                              f"source), or put the files in {self.models_dir}/<model id>/ by hand.")
        self._set(message=f"Listing {', '.join(entry.repos)} on {source}…")
        files = self._list(entry, source, token)
        todo = [(m, f) for m, f in files if not _whole(self.models_dir / m / f.path, f.size)]
        total = sum(f.size or 0 for _, f in todo)
        self._set(total=total or None, message="")
        before = 0
        for model_id, remote in todo:
            self._set(file=f"{model_id}/{remote.path}")
            hub_files.fetch_file(model_id, remote, self.models_dir / model_id, source, token,
                                 on_bytes=lambda n, b=before: self._set(done=b + n), cancelled=self._cancel)
            problem = hub_files.file_problem(self.models_dir / model_id / remote.path, remote.size, label=remote.path)
            if problem:
                raise EngineError(problem)
            self._record(model_id, remote, source)
            before += remote.size or 0
            self._set(done=before)
        for model_id, remote in files:        # whole files from an earlier download: recorded as well
            if (model_id, remote) not in todo:
                self._record(model_id, remote, source)
        got = size_text(sum(f.size or 0 for _, f in todo))
        return (f"{entry.name}: {len(todo)} file(s) downloaded ({got}), {len(files) - len(todo)} already here. "
                f"Sizes checked; Verify also checks the published hashes.")

    # -------------------------------------------------------------------------------------------- records
    def _record_path(self, model_id: str) -> pathlib.Path:
        return self.models_dir / model_id / RECORD

    def recorded(self, model_id: str) -> dict:
        try:
            return json.loads(self._record_path(model_id).read_text())
        except (OSError, ValueError):
            return {}

    def _record(self, model_id: str, remote: RemoteFile, source: str) -> None:
        data = self.recorded(model_id)
        data[remote.path] = {"size": remote.size, "sha256": remote.sha256, "source": source}
        safe_files.write_text(self._record_path(model_id), json.dumps(data, indent=1, sort_keys=True))

    def _unrecord(self, model_id: str, paths) -> None:
        data = self.recorded(model_id)
        for p in paths:
            data.pop(p, None)
        if data:
            safe_files.write_text(self._record_path(model_id), json.dumps(data, indent=1, sort_keys=True))
        else:
            self._record_path(model_id).unlink(missing_ok=True)

    # --------------------------------------------------------------------------------------------- verify
    def start_verify(self, name: str, source: str = "HuggingFace", token: Optional[str] = None,
                     online: bool = True) -> dict:
        """Check the entry's files in the background: against the hub's sizes and sha256 when it can be reached
        (``online``), else against the sizes recorded at download; safetensors files also against their headers."""
        entry = self.entry(name)
        source = hub_files.check_source(source)
        token = (token or "").strip() or None
        return self._start("Verifying", name, lambda: self._verify(entry, source, token, online), source)

    def _verify(self, entry: Entry, source: str, token: Optional[str], online: bool) -> str:
        local = {(m, p): self.local_files(m, p) for m, p in entry.files}
        missing = [f"{m}/{p}" for (m, p), found in local.items() if not found]
        if missing:
            raise EngineError(f"not all files are here (missing: {', '.join(missing)}): download it first.")
        hub = None if entry.demo or not online else hub_files.offline_reason(source)
        expected: dict = {}
        if online and not entry.demo and hub is None:
            expected = {(m, f.path): f for m, f in self._list(entry, source, token)}
            how = f"against {source}'s listing"
        else:
            for m in entry.repos:
                expected.update({(m, path): RemoteFile(path, r.get("size"), r.get("sha256"))
                                 for path, r in self.recorded(m).items()})
            how = "offline, against the sizes recorded at download" + (f" ({hub})" if hub else "")
        files = list(dict.fromkeys((m, p) for (m, _), found in local.items() for p in found))
        hashed = [(m, p) for m, p in files if (m, _rel(self.models_dir / m, p)) in expected
                  and expected[(m, _rel(self.models_dir / m, p))].sha256]
        self._set(total=sum(p.stat().st_size for _, p in hashed) or None)
        problems, checked, by_header, done = [], 0, 0, 0
        for model_id, path in files:
            rel = _rel(self.models_dir / model_id, path)
            self._set(file=f"{model_id}/{rel}")
            known = expected.get((model_id, rel))
            problem = None
            if known is not None:
                checked += 1
                problem = hub_files.file_problem(path, known.size, known.sha256, cancelled=self._cancel, label=rel,
                                                 on_bytes=lambda n, b=done: self._set(done=b + n))
                if known.sha256:
                    done += path.stat().st_size
            if problem is None and path.suffix == ".safetensors":
                by_header += 1
                problem = hub_files.safetensors_problem(path, label=rel)
            if problem:
                problems.append(f"{model_id}: {problem}")
        self._set(problems=problems)
        if problems:
            raise EngineError(f"{len(problems)} problem(s): " + "; ".join(problems) + ". Delete and download again.")
        hashes = f", {len(hashed)} by sha256" if hashed else ""
        compared = (f"{checked} checked {how}{hashes}" if checked else
                    "no hub listing or download record to compare sizes with" + (f" ({hub})" if hub else ""))
        return f"{entry.name}: {len(files)} file(s) OK — {compared}; {by_header} safetensors file(s) match their headers."

    # --------------------------------------------------------------------------------------------- delete
    def inside(self, path) -> pathlib.Path:
        """``path`` resolved, when it lies inside the models folder (links followed); else an error."""
        root = self.models_dir.resolve()
        resolved = pathlib.Path(path).resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise EngineError(f"Refusing to delete {path}: it is not inside the models folder {root}.")
        return resolved

    def delete_plan(self, name: str) -> dict:
        """What ``delete`` would remove: {"files": [paths], "bytes", "kept": [paths other installed models use],
        "also": [names of installed entries made of the same files, which go with it]}."""
        entry = self.entry(name)
        mine = self.entry_files(entry) + self.partial_files(entry)
        others, also = set(), []
        for e in entries():
            if e.name == entry.name or not self.installed(e):
                continue
            theirs = set(self.entry_files(e))
            if theirs <= set(mine):
                also.append(e.name)          # the same files under another name (a demo run as Kontext)
            else:
                others |= theirs
        files = [p for p in mine if p not in others]
        return {"files": files, "bytes": sum(p.stat().st_size for p in files if p.exists()),
                "kept": [p for p in mine if p in others], "also": also}

    def delete(self, name: str) -> str:
        """Remove the entry's files that no other installed model uses (and its partial downloads); every path must
        lie inside the models folder, or nothing is removed."""
        self._check_writable("delete")
        if self.busy() and self.state()["name"] == name:
            raise EngineError(f"{name} is still {self.state()['task'].lower()}: cancel it first.")
        plan = self.delete_plan(name)
        resolved = [self.inside(p) for p in plan["files"]]     # all checked before the first is removed
        for path in resolved:
            path.unlink(missing_ok=True)
        for model_id in self.entry(name).repos:
            folder = self.models_dir / model_id
            self._unrecord(model_id, [_rel(folder, p) for p in plan["files"] if _under(p, folder)])
            _prune_empty(folder, self.models_dir)
        kept = f"; kept {len(plan['kept'])} shared file(s) other installed models use" if plan["kept"] else ""
        also = f"; {', '.join(plan['also'])} (the same files) went with it" if plan["also"] else ""
        return f"Deleted {name}: {len(resolved)} file(s), {size_text(plan['bytes'])} freed{kept}{also}."


def _whole(path: pathlib.Path, size: Optional[int]) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)


def _rel(folder: pathlib.Path, path: pathlib.Path) -> str:
    return pathlib.Path(path).relative_to(folder).as_posix()


def _under(path: pathlib.Path, folder: pathlib.Path) -> bool:
    return pathlib.Path(path).is_relative_to(folder)


def _prune_empty(folder: pathlib.Path, stop: pathlib.Path) -> None:
    """Remove empty folders from ``folder`` down, and its parents up to (not including) ``stop``."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _failure_text(task: str, name: str, exc: Exception) -> str:
    kind = type(exc).__name__
    text = str(exc).splitlines()[0][:300] if str(exc) else kind
    if kind == "GatedRepoError" or " 401" in text or " 403" in text or "401 " in text or "403 " in text:
        return (f"{task} {name} failed: the repository is gated or needs a token. Accept its licence on the hub's "
                f"page while logged in, then paste an access token (read) in the token box. ({kind})")
    if isinstance(exc, EngineError):
        return f"{task} {name} failed: {text}"
    return f"{task} {name} failed: {kind}: {text}"
