"""The Feature seam: what one kind of extra input of a job (edit references, inpainting and control, EliGen's
regions, ...) tells the studio, so that the request parser, the job runner and the recipe reader need no feature's
name.

A feature declares its request keys as a dataclass (``Inputs``: field names are the keys, defaults the defaults;
``metadata={"file": "how a person calls it"}`` marks a path that the file guard checks before anything is opened,
``metadata={"kinds": (list, tuple)}`` a setting that must be a list). A job then asks it, in this order:

``validate``      its inputs -> a typed state (None when the request does not use the feature); may set the size
                  the model works at (``job.width``/``job.height``) and add notes
``pipe_kwargs``   the pipeline's (the seed's) arguments for its state
``extra_models``  models it puts in pipeline slots (``roles``) beside the variant's, e.g. ControlNets
``configure``     what it switches on the pipeline for the job (LoRA Fusion's gates), or inputs it makes with a model
                  first (the prompt upsampler's caption); called for every feature before ``pipe_kwargs``, with
                  None when the job does not use it, so a switch an earlier job set is undone
``loras``         LoRAs it attaches beside the person's own (EliGen's)
``finish``        the image after the pipeline (crop the padding, paste the original back outside a mask)
``refine``        arguments for one more pipeline pass over the finished image (a hires fix), or None
``recipe``        its entries in the image's recipe; input copies go beside the result through ``copies``
``restore``       a recipe's entries back into its request keys (pointing at the copies)
``describe``      its recipe entries as lines a person reads (the image-info text)

Every method but ``validate`` has a default that does nothing, so a feature writes only what it uses.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterable, Optional


@dataclasses.dataclass(frozen=True)
class ExtraModel:
    """A model a feature puts in a pipeline slot beside the variant's own (a ControlNet, Redux's image encoder)."""

    role: str                 # the pipeline slot (a row of engine.roles)
    name: str                 # how the studio tells it apart (kept while the next job asks for the same names)
    label: str                # for progress messages: "the Union-alpha ControlNet"
    model_id: str             # its files: models/<model_id>/<pattern>, downloaded when missing and allowed
    pattern: str
    load: Callable            # (files, torch_dtype) -> the module, on the CPU
    write_demo: Optional[Callable] = None   # (models_dir) -> None: writes a demo's random-weight files first


def adapter_models(adapter: str, demo: bool, parts: dict, loader: Callable[[str], Callable],
                   demo_writer) -> list:
    """The ``ExtraModel`` of each file of a registry adapter (``engine.registry.ADAPTERS``: Redux, IP-Adapter,
    InfiniteYou, ...). ``parts``: role -> what the file is ("image encoder"), for messages; ``loader(role)`` -> the
    ``load`` of that slot; a demo variant gets the adapter's random-weight twin, written on first use by
    ``engine.demo.<demo_writer>`` (or by ``demo_writer`` itself when it is a function)."""
    from engine import registry
    spec = registry.get_adapter(adapter, demo=demo)
    write_demo = None
    if spec.demo:
        import engine.demo
        write_demo = demo_writer if callable(demo_writer) else getattr(engine.demo, demo_writer)
    return [ExtraModel(role=f.role, name=f"{spec.name}/{f.pattern}", label=f"the {spec.label} {parts[f.role]}",
                       model_id=f.model_id, pattern=f.pattern, load=loader(f.role), write_demo=write_demo)
            for f in spec.files]


def own_prompt(variant) -> bool:
    """Whether the variant writes its own prompt tokens instead of T5's (Step1X-Edit's Qwen2.5-VL + connector,
    Nexus-GenV2's AR model): inputs that add to or replace T5's tokens cannot apply to it."""
    return any(f.role in ("qwen_vl", "nexus_gen") for f in variant.files)


def describe_files(label: str, entries) -> list:
    """Lines for a recipe's image entries ({"file", "size", "copy", "fingerprint"}, one or a list): file, size as
    used, the copy saved beside the image, fingerprint; numbered when there are several."""
    listed = isinstance(entries, (list, tuple))
    lines = []
    for i, entry in enumerate(entries if listed else [entries]):
        if not isinstance(entry, dict):
            lines.append(f"  {label}: {entry}")
            continue
        parts = [f"  {label}{f' {i + 1}' if listed and len(entries) > 1 else ''}: {entry.get('file') or '?'}"]
        size = entry.get("size")
        if isinstance(size, (list, tuple)) and len(size) == 2:
            parts.append(f"{size[0]}x{size[1]} as used")
        if entry.get("copy"):
            parts.append(f"copy saved as <image name>{entry['copy']}")
        line = " · ".join(parts)
        if entry.get("fingerprint"):
            line += f"  [{entry['fingerprint']}]"
        lines.append(line)
    return lines


def number_in(value, low: float, high: float, message: str, above_low: bool = False) -> float:
    """``value`` as a finite float from ``low`` (excluded with ``above_low``) to ``high``; else an EngineError
    with ``message`` (``{value}`` in it is the value as sent)."""
    import math
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    fits = low < number <= high if above_low else low <= number <= high
    if not math.isfinite(number) or not fits:
        from engine.errors import EngineError
        raise EngineError(message.format(value=f"{value!r:.40}"))
    return number


def file_entry(path, image, copies, kind: str = "ref") -> dict:
    """A recipe entry for an input image: its file name, the suffix of the copy kept beside the result (``copies``
    gets the image), its size and, while the file is readable, its fingerprint."""
    from engine.fingerprints import fingerprint
    entry = {"file": pathlib.Path(path).name, "copy": copies.add(image, kind), "size": [image.width, image.height]}
    try:
        entry["fingerprint"] = fingerprint(path)
    except OSError:
        pass
    return entry


def file_entries(value) -> list:
    """A file setting as a list of its non-empty items (one path, or a list of them)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in items if item is not None and item != ""]


class Feature:
    """One kind of extra input. Subclasses set ``name`` and ``Inputs`` and override what they use."""

    name: str = ""
    Inputs: type = type(None)      # a dataclass of the request keys this feature reads, with their defaults
    roles: tuple = ()              # pipeline slots it fills beside the variant's (emptied when a job does not use it)

    # ------------------------------------------------------------------------------------------ request keys
    def fields(self) -> tuple:
        return dataclasses.fields(self.Inputs)

    def defaults(self) -> dict:
        return {f.name: f.default for f in self.fields()}

    def list_kinds(self) -> dict:
        """Settings that must be lists: {key: accepted types}."""
        return {f.name: f.metadata["kinds"] for f in self.fields() if "kinds" in f.metadata}

    def read_inputs(self, values: dict):
        """Its inputs out of a request's settings (defaults already filled in), as sent: ``validate`` checks them."""
        return self.Inputs(**{f.name: values.get(f.name, f.default) for f in self.fields()})

    def paths(self, inputs) -> Iterable[tuple]:
        """(what, path) for each file the inputs name, to be checked before any is opened."""
        for f in self.fields():
            if "file" in f.metadata:
                for item in file_entries(getattr(inputs, f.name)):
                    yield f.metadata["file"], item

    # --------------------------------------------------------------------------------------------- the job
    def validate(self, inputs, job) -> Optional[Any]:
        raise NotImplementedError

    def pipe_kwargs(self, state, job, notes: list) -> dict:
        return {}

    def extra_models(self, state, job) -> list:
        return []

    def configure(self, state, job, pipe) -> None:
        """Switch what the feature needs on ``pipe`` for this job, or off again (``state`` None: not used)."""

    def combine(self, role: str, modules: list):
        """The module a slot holds, made of the loaded ``extra_models`` of that role (one, unless overridden)."""
        if len(modules) != 1:
            raise ValueError(f"{type(self).__name__} puts {len(modules)} models in {role!r}; say how to combine them")
        return modules[0]

    def loras(self, state, job, models_dir) -> list:
        """[{"name", "weight", "path"}] attached beside the person's LoRAs (kept out of the LoRA picker)."""
        return []

    def finish(self, state, job, image):
        return image

    def refine(self, state, job, image) -> Optional[dict]:
        """Pipeline arguments for one more pass over ``image`` with the same prompt and seed (they override the
        job's: a bigger ``width``/``height``, ``input_image``, ``denoising_strength``, ``num_inference_steps``);
        None for no further pass. Its ``recipe`` records what the pass did."""
        return None

    # ------------------------------------------------------------------------------------------ the recipe
    def recipe(self, state, job, copies) -> dict:
        return {}

    def describe(self, recipe: dict) -> list:
        """Its recipe entries as lines a person reads, under a heading of its own; [] when the recipe has none."""
        return []

    def restore(self, found: dict, result: pathlib.Path) -> dict:
        """Its request keys from the recipe ``found`` of ``result``: plain settings as stored; a file setting from the
        copies beside the result (its entries name them: {"copy": suffix}); a file whose copy is gone is left out."""
        from ..recipes import sidecar
        out = {}
        for f in self.fields():
            if f.name not in found:
                continue
            if "file" not in f.metadata:
                out[f.name] = found[f.name]
                continue
            entries = found[f.name] if isinstance(found[f.name], list) else [found[f.name]]
            paths = [str(p) for p in (sidecar(result, e.get("copy")) for e in entries if isinstance(e, dict)) if p]
            if paths:
                out[f.name] = paths if "kinds" in f.metadata else paths[0]
        return out
