"""The LoRA picker: a multiselect of the files in ``<models>/loras/`` and one weight slider per chosen LoRA; the
/generate endpoint's ``loras`` input; restoring a recipe's LoRAs (matched by name, their fingerprints checked).

What a LoRA list may hold, and which names and weights are valid, is the engine's rule (``engine.lora.names``, no
torch): the picker only turns its errors into gr.Error.

Families: each listed file carries the family it is for ("FLUX.1", "FLUX.2", or None when its names fit either;
``engine.lora.family``). Given the tab's model dropdown, the picker offers only the LoRAs of that model's family;
choosing a model of the other family sets the chosen ones that no longer fit aside, and the hint says which and why.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import gradio as gr

from app.common import call_engine
from engine.errors import EngineError
from engine.fingerprints import fingerprint
from engine.lora import names as lora_names

MAX_LORAS = 6
# How the chosen LoRAs apply beyond their weights (each a studio feature: studio.features.lora_encoder / lora_fusion).
LORA_OPTIONS = [("Encode as prompt (LoRA Encoder)", "encode"), ("Merge with LoRA Fusion", "fuse")]
OPTIONS_INFO = ("Encode as prompt: each LoRA also becomes a prompt token, which brings out its effect without its "
                "trigger words (the LoRA must cover every layer). LoRA Fusion: learned gates merge several LoRAs "
                "per layer instead of adding them. FLUX.1 models.")
LORA_MIN_WEIGHT, LORA_MAX_WEIGHT, LORA_WEIGHT_STEP = -2.0, 2.0, 0.05


def list_loras(engine: Any) -> list[dict]:
    """The engine's LoRA files ({"name", "path", "size_mb"}), or [] when it lists none."""
    if engine is None or not hasattr(engine, "loras"):
        return []
    return list(call_engine(engine.loras, title="Could not list the LoRAs") or [])


def lora_short_name(name: str) -> str:
    """"style/ink.safetensors" -> "style/ink": what the chips and sliders show."""
    return name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name


def lora_label(item: dict) -> str:
    name = lora_short_name(item["name"])
    try:
        size = float(item.get("size_mb"))
    except (TypeError, ValueError):
        return name
    return f"{name} · {size:.0f} MB" if size >= 1 else f"{name} · {max(size * 1024, 1):.0f} KB"


def model_family(variant: Any) -> str | None:
    """"FLUX.1" or "FLUX.2": the family of the model named ``variant`` (None for a name the registry lacks)."""
    if not variant:
        return None
    try:
        from engine.registry import get_variant
        from studio.families import family_of
        return family_of(get_variant(str(variant))).name
    except Exception:
        return None


def fits(item: dict, family: str | None) -> bool:
    """Whether a listed LoRA fits a model of ``family`` (a file of no known family fits both)."""
    return not family or not item.get("family") or item.get("family") == family


def lora_choices(items: list[dict], family: str | None = None) -> list[tuple[str, str]]:
    """Dropdown choices (label, name) of the LoRAs that fit ``family`` (all of them without one)."""
    return [(lora_label(item), item["name"]) for item in items if fits(item, family)]


def family_note(items: list[dict], family: str | None, set_aside=()) -> str:
    """Why some LoRAs are not offered (and which chosen ones were set aside), or "" when all fit."""
    hidden = [item for item in items if not fits(item, family)]
    if not hidden and not set_aside:
        return ""
    others = sorted({item.get("family") for item in hidden if item.get("family")})
    other = " / ".join(others) or ("FLUX.2" if family == "FLUX.1" else "FLUX.1")
    note = (f" {len(hidden)} {other} LoRA{'s are' if len(hidden) != 1 else ' is'} not offered: the model is "
            f"{family}, and a {other} LoRA does not fit it (choose a {other} model to use "
            f"{'them' if len(hidden) != 1 else 'it'}).") if hidden else ""
    if set_aside:
        note += (f" Set aside: {', '.join(lora_short_name(n) for n in set_aside)} ({other} LoRA"
                 f"{'s' if len(set_aside) != 1 else ''}, not for this {family} model).")
    return note


def _gradio_error(exc: EngineError) -> gr.Error:
    return gr.Error(str(exc), print_exception=False)


def check_weight(value: Any, name: str) -> float:
    """A LoRA's weight as the engine checks it; a bad one is a gr.Error naming the LoRA."""
    try:
        return lora_names.check_weight(value, name)
    except EngineError as exc:
        raise _gradio_error(exc) from None


def lora_request(value: Any) -> dict:
    """The request keys of the picker's spec (``LoraPicker.spec``; an API client's list or JSON text too):
    {"loras": [...]} and, for the options, {"lora_encode": [names]} / {"lora_fusion": True}."""
    chosen = parse_loras(value)
    if not chosen:
        return {}
    out: dict = {"loras": chosen}
    try:
        encode = lora_names.flagged(value, "encode")
        fuse = lora_names.flagged(value, "fuse")
    except EngineError as exc:
        raise _gradio_error(exc) from None
    if encode:
        out["lora_encode"] = encode
    if fuse:
        out["lora_fusion"] = True
    return out


def parse_loras(value: Any) -> list[dict]:
    """The /generate endpoint's ``loras`` input as the engine's request list [{"name", "weight"}], by the engine's
    own rules (``engine.lora.names.normalize``: JSON text, a list of {"name", "weight"}, [name, weight] pairs or
    names). A bad value is a gr.Error naming what was expected."""
    try:
        return lora_names.normalize(value)
    except EngineError as exc:
        raise _gradio_error(exc) from None


def _lora_key(path: str) -> str:
    return str(path).replace("\\", "/").strip("/")


def match_lora(entry: Any, names: list[str]) -> str | None:
    """The available LoRA name that a recipe entry refers to, or None.

    A recipe names the file relative to the models folder ("loras/style/x.safetensors") or to the LoRA folder
    ("style/x.safetensors"), or gives a path; a file moved to another subfolder is still found by its file name
    when that name is unique.
    """
    if isinstance(entry, dict):
        raw = entry.get("name") or entry.get("file") or entry.get("path")
    elif isinstance(entry, (list, tuple)) and entry:
        raw = entry[0]
    else:
        raw = entry
    if not raw:
        return None
    key = _lora_key(raw)
    keys = {_lora_key(n): n for n in names}
    if key in keys:
        return keys[key]
    marker = f"{lora_names.FOLDER}/"
    if marker in key:
        rest = key[key.rindex(marker) + len(marker):]
        if rest in keys:
            return keys[rest]
    for k, name in keys.items():
        if key.endswith("/" + k):
            return name
    base = pathlib.PurePosixPath(key).name
    same = [name for k, name in keys.items() if pathlib.PurePosixPath(k).name == base]
    return same[0] if len(same) == 1 else None


def _entry_name(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("file") or entry.get("name") or entry.get("path") or "?")
    if isinstance(entry, (list, tuple)) and entry:
        return str(entry[0])
    return str(entry)


def _entry_weight(entry: Any) -> float:
    value = None
    if isinstance(entry, dict):
        value = entry.get("weight", entry.get("scale", entry.get("alpha")))
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        value = entry[1]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 1.0
    return min(max(value, LORA_MIN_WEIGHT), LORA_MAX_WEIGHT)


def lora_restore_plan(loras: Any, items: list[dict]) -> tuple[list[str], dict[str, float], list[str], list[str]]:
    """(names to select, name -> weight, missing files, files present but different) for a recipe's LoRAs."""
    by_name = {item["name"]: item for item in items}
    chosen: list[str] = []
    weights: dict[str, float] = {}
    missing: list[str] = []
    changed: list[str] = []
    for entry in loras or []:
        name = match_lora(entry, list(by_name))
        if name is None:
            missing.append(_entry_name(entry))
            continue
        if name in chosen:
            continue
        if len(chosen) >= MAX_LORAS:
            missing.append(f"{_entry_name(entry)} (more than {MAX_LORAS} LoRAs)")
            continue
        chosen.append(name)
        weights[name] = _entry_weight(entry)
        tag = entry.get("fingerprint") if isinstance(entry, dict) else None
        path = by_name[name].get("path")
        if tag and path:
            try:
                if fingerprint(path) != tag:
                    changed.append(name)
            except OSError:
                pass
    return chosen, weights, missing, changed


@dataclasses.dataclass
class LoraPicker:
    """A multiselect of the LoRA files and one weight slider per chosen LoRA (in the order chosen)."""

    accordion: gr.Accordion
    choose: gr.Dropdown
    weights: list            # MAX_LORAS gr.Slider, the first len(chosen) shown
    refresh: gr.Button
    hint: gr.Markdown
    shown: gr.State          # the names the sliders stand for, in order
    memory: gr.State         # name -> last weight, so removing and re-adding a LoRA keeps its weight
    engine: Any = None
    family: Any = None       # gr.State: the family of the tab's model ("FLUX.1" / "FLUX.2"; None: offer all)
    options: Any = None      # gr.CheckboxGroup of LORA_OPTIONS' values

    @property
    def inputs(self) -> list:
        """What ``spec`` reads: [choose, shown, memory, *weights]."""
        return [self.choose, self.shown, self.memory, *self.weights]

    @property
    def outputs(self) -> list:
        """What a selection update sets: [accordion, choose, shown, memory, *weights]."""
        return [self.accordion, self.choose, self.shown, self.memory, *self.weights]

    @property
    def spec_inputs(self) -> list:
        """What ``spec`` reads: ``inputs`` and the options."""
        return [*self.inputs, *([self.options] if self.options is not None else [])]

    @staticmethod
    def spec(chosen, shown, memory, *values) -> list[dict]:
        """The request's list [{"name", "weight"}] from the controls' values (``spec_inputs``: the weights, then
        the options, which mark every entry: {"encode": true}, {"fuse": true})."""
        weights, options = values[:MAX_LORAS], (values[MAX_LORAS] if len(values) > MAX_LORAS else None) or []
        current = dict(zip(shown or [], weights))
        memory = memory or {}
        flags = {flag: True for _, flag in LORA_OPTIONS if flag in options}
        return [{"name": name, "weight": check_weight(current.get(name, memory.get(name, 1.0)), name), **flags}
                for name in (chosen or [])]

    @staticmethod
    def selection_updates(chosen: list[str], weights: dict[str, float], memory: dict | None = None,
                          choices: list | None = None, set_choice: bool = True) -> list:
        """Updates for ``outputs``: select ``chosen`` with ``weights`` (1 where not given)."""
        memory = {**(memory or {}), **weights}
        sliders = []
        for i in range(MAX_LORAS):
            if i < len(chosen):
                name = chosen[i]
                sliders.append(gr.update(visible=True, label=f"{lora_short_name(name)} · weight",
                                         value=memory.get(name, 1.0)))
            else:
                sliders.append(gr.update(visible=False))
        accordion = gr.update(label=accordion_label(len(chosen)))
        if len(chosen):
            accordion = gr.update(label=accordion_label(len(chosen)), open=True)
        if not set_choice:  # the person is choosing in the dropdown: leave it alone
            choose = gr.update()
        elif choices is None:
            choose = gr.update(value=list(chosen))
        else:
            choose = gr.update(choices=choices, value=list(chosen))
        return [accordion, choose, list(chosen), memory, *sliders]

    def pick_updates(self, name: str, chosen, shown, memory, *values, weight: float = 1.0, drop=()) -> list:
        """Updates for ``outputs`` (the values of ``inputs`` given) that tick ``name`` at ``weight``, keeping the other
        chosen LoRAs and their weights, but those in ``drop``; the list is re-read first (a file just added is in
        it). Nothing changes when ``name`` is not in the LoRA folder."""
        items = list_loras(self.engine)
        names = [item["name"] for item in items]
        if name not in names:
            return [gr.update() for _ in self.outputs]
        remembered = {**(memory or {}), **dict(zip(shown or [], values))}
        kept = [n for n in (chosen or []) if n in names and n != name and n not in set(drop)]
        return LoraPicker.selection_updates([*kept, name][-MAX_LORAS:], {name: weight}, remembered,
                                            lora_choices(items))


def accordion_label(count: int) -> str:
    return "LoRAs" if not count else f"LoRAs · {count} active"


def lora_hint(models_dir: Any, count: int, note: str = "") -> str:
    """The line under the picker; ``note``: why some files are not offered (``family_note``)."""
    where = f"`{lora_names.lora_dir(str(models_dir))}`"
    if count:
        return (f"{count} LoRA file{'s' if count != 1 else ''} in {where} (subfolders too). "
                f"Up to {MAX_LORAS} at once; weights from {LORA_MIN_WEIGHT:g} to {LORA_MAX_WEIGHT:g}.{note}")
    return (f"No LoRA files yet. Put `.safetensors` LoRAs (kohya, diffusers/PEFT, BFL, XLabs, ai-toolkit, DiffSynth, "
            f"...; FLUX.1 or FLUX.2) in {where}, then press ↻ Refresh.")


def refresh_loras_on_open(ctx: Any, picker: "LoraPicker") -> None:
    """Opening the tab re-reads the LoRA folder, so a LoRA just trained in the Train tab is in the list (the choice
    made so far is kept)."""
    if getattr(ctx, "tab", None) is None:
        return

    def on_open(family=None):
        found = list_loras(ctx.engine)
        return (gr.update(choices=lora_choices(found, family)),
                lora_hint(ctx.models_dir, len(found), family_note(found, family)))

    inputs = [picker.family] if picker.family is not None else []
    ctx.tab.select(on_open, inputs=inputs, outputs=[picker.choose, picker.hint], queue=False,
                   api_visibility="private")


def build_lora_picker(engine: Any, models_dir: Any = None, id_prefix: str = "", model: Any = None) -> LoraPicker:
    """The LoRA picker (an accordion); events for choosing and refreshing are wired here. ``id_prefix`` keeps element
    ids unique when several tabs have one ("edit-" gives #edit-lora-choose, ...). ``model``: the tab's model
    dropdown, whose family decides which LoRAs are offered (all of them without it)."""
    models_dir = models_dir or getattr(engine, "models_dir", None) or "models"
    try:
        items = list_loras(engine)
    except gr.Error:
        items = []
    start_family = model_family(getattr(model, "value", None)) if model is not None else None
    with gr.Accordion(accordion_label(0), open=bool(items), elem_id=f"{id_prefix}lora-accordion") as accordion:
        with gr.Row(equal_height=False, elem_classes=["tool-row"]):
            choose = gr.Dropdown(choices=lora_choices(items, start_family), value=[], multiselect=True,
                                 max_choices=MAX_LORAS, label="LoRAs to apply", scale=5, min_width=200,
                                 elem_id=f"{id_prefix}lora-choose", interactive=True, filterable=True)
            with gr.Column(scale=1, min_width=100, elem_classes=["tool-buttons"]):
                refresh = gr.Button("↻ Refresh", size="sm", elem_id=f"{id_prefix}lora-refresh")
        weights = [gr.Slider(LORA_MIN_WEIGHT, LORA_MAX_WEIGHT, value=1.0, step=LORA_WEIGHT_STEP, label=f"LoRA {i + 1}",
                             visible=False, elem_id=f"{id_prefix}lora-weight-{i}", elem_classes=["lora-weight"])
                   for i in range(MAX_LORAS)]
        options = gr.CheckboxGroup(LORA_OPTIONS, value=[], label="How the LoRAs apply", info=OPTIONS_INFO,
                                   visible=start_family in (None, "FLUX.1"), elem_id=f"{id_prefix}lora-options")
        hint = gr.Markdown(lora_hint(models_dir, len(items), family_note(items, start_family)),
                           elem_classes=["hint"], elem_id=f"{id_prefix}lora-hint")
    shown = gr.State([])
    memory = gr.State({})
    family = gr.State(start_family)
    picker = LoraPicker(accordion=accordion, choose=choose, weights=weights, refresh=refresh, hint=hint, shown=shown,
                        memory=memory, engine=engine, family=family, options=options)

    def on_choose(chosen, shown_names, remembered, *values):
        remembered = {**(remembered or {}), **dict(zip(shown_names or [], values))}
        return LoraPicker.selection_updates(list(chosen or []), {}, remembered, set_choice=False)

    helper = {"queue": False, "api_visibility": "private"}
    # .input: only a person's choice rebinds the sliders (restore and refresh set everything themselves).
    choose.input(on_choose, inputs=picker.inputs[:3] + weights, outputs=picker.outputs, **helper)

    def on_refresh(fam, chosen, shown_names, remembered, *values):
        found = list_loras(engine)
        names = [item["name"] for item in found if fits(item, fam)]
        remembered = {**(remembered or {}), **dict(zip(shown_names or [], values))}
        kept = [name for name in (chosen or []) if name in names]
        gone = [name for name in (chosen or []) if name not in names]
        if gone:
            gr.Warning(f"No longer in the LoRA folder, or not for this {fam or 'FLUX'} model: {', '.join(gone)}.")
        return (*LoraPicker.selection_updates(kept, {}, remembered, lora_choices(found, fam)),
                lora_hint(models_dir, len(found), family_note(found, fam)))

    # Queued (its own slot): its warning about vanished files reaches the page only from a queued event.
    refresh.click(on_refresh, inputs=[family, *picker.inputs], outputs=[*picker.outputs, hint], show_progress="hidden",
                  api_visibility="private")

    if model is not None:
        def on_model(name, chosen, shown_names, remembered, *values):
            fam = model_family(name)
            found = list_loras(engine)
            remembered = {**(remembered or {}), **dict(zip(shown_names or [], values))}
            fitting = {item["name"] for item in found if fits(item, fam)}
            kept = [n for n in (chosen or []) if n in fitting]
            aside = [n for n in (chosen or []) if n not in fitting]
            return (*LoraPicker.selection_updates(kept, {}, remembered, lora_choices(found, fam)),
                    lora_hint(models_dir, len(found), family_note(found, fam, aside)), fam,
                    gr.update(visible=fam in (None, "FLUX.1")))    # the options are FLUX.1's (DiffSynth's models)

        model.change(on_model, inputs=[model, *picker.inputs], outputs=[*picker.outputs, hint, family, options],
                     **helper)
    return picker


def wire_lora_restore(button: gr.Button, source: gr.State, picker: LoraPicker) -> None:
    """Clicking ``button`` selects the recipe's LoRAs (in ``source``) with their weights; a LoRA whose file is not
    in the LoRA folder is named in a warning. A recipe without LoRAs clears the selection."""

    def restore(value, remembered):
        recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
        if not recipe:
            return [gr.update() for _ in picker.outputs] + [gr.update()]
        items = list_loras(picker.engine)
        fam = model_family(recipe.get("variant"))      # the recipe's model (its dropdown is restored too)
        chosen, weights, missing, changed = lora_restore_plan(recipe.get("loras"), items)
        models_dir = str(getattr(picker.engine, "models_dir", "models"))
        if missing:
            gr.Warning(f"Not in the LoRA folder, so not selected: {', '.join(missing)}. "
                       f"Put the file{'s' if len(missing) > 1 else ''} in {lora_names.lora_dir(models_dir)} "
                       "and restore again.")
        if changed:
            gr.Warning(f"A file with the same name but different contents is selected: {', '.join(changed)}; "
                       "the image may not come out the same.")
        updates = LoraPicker.selection_updates(chosen, weights, remembered, lora_choices(items, fam))
        return [*updates, lora_hint(models_dir, len(items), family_note(items, fam))]

    button.click(restore, inputs=[source, picker.memory], outputs=[*picker.outputs, picker.hint],
                 show_progress="hidden", api_visibility="private")
    if picker.options is not None:
        button.click(restored_options, inputs=[source], outputs=[picker.options], queue=False,
                     show_progress="hidden", api_visibility="private")


def restored_options(value: Any) -> Any:
    """The picker's options as a recipe (or a result holding one) used them."""
    recipe = value.get("recipe") if isinstance(value, dict) and "recipe" in value else value
    if not isinstance(recipe, dict):
        return gr.update()
    return [flag for flag, used in (("encode", recipe.get("lora_encode")), ("fuse", recipe.get("lora_fusion")))
            if used]
