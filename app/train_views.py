"""What the Train tab shows, made from the training service's plain answers: the caption table, the loss plot's
data, the samples gallery and the checkpoint grid, the runs list, the base model's notes and the one-line failures.
No torch; gradio only for the updates it returns.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

MAX_SHOWN_SAMPLES = 24
CAPTION_HEADERS = ["file", "caption"]
TARGET_HINTS = {
    "FLUX.1": "a_to_qkv,b_to_qkv,to_qkv_mlp (DiffSynth's names) or to_q,to_k,to_v (diffusers')",
    "FLUX.2": "to_q,to_k,to_v,to_out.0,linear_in,linear_out,to_qkv_mlp_proj (FLUX.2's module names)",
    "FLUX 3": "to_q,to_k,to_v,to_out.0,linear_in,linear_out, or one stream's: mode_blocks.image_cond.0.attn.to_q "
              "(FLUX 3's module names)",
}


def _pandas():
    import pandas as pd  # noqa: PLC0415 - gradio's own dependency; imported when a table or plot is made

    return pd


def caption_frame(rows: list | None):
    return _pandas().DataFrame([list(r) for r in rows or []], columns=CAPTION_HEADERS)


def table_rows(value: Any) -> list[list[str]]:
    """The caption table's value (a DataFrame from the browser, or rows) as [[file, caption]]."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):
        value = value.values.tolist()
    return [[("" if c is None else str(c)) for c in list(row)[:2]] for row in value]


def caption_notes(rows: list) -> list[str]:
    empty = sum(1 for row in rows if not str(row[1] if len(row) > 1 else "").strip())
    if not empty:
        return []
    return [f"{empty} of {len(rows)} images have no caption yet: write them in the table (an empty caption trains "
            f"with an empty prompt)."]


def loss_frame(series: list[dict]):
    """The loss plot's data: each step's loss and its running average, as two lines; None before the first step
    (Gradio's plot never draws its lines if it was first given an empty table)."""
    if not series:
        return None
    rows = [{"step": p["step"], "loss": p["loss"], "series": "loss"} for p in series]
    rows += [{"step": p["step"], "loss": p["loss_avg"], "series": "average (last 20)"} for p in series]
    return _pandas().DataFrame(rows, columns=["step", "loss", "series"]).astype(
        {"step": "int64", "loss": "float64", "series": "str"})


def sample_items(samples: list[dict]) -> list:
    """The newest samples as (image, "step N") for the gallery. Images are read here (and not handed over as
    paths) so the gallery works wherever the models folder is, not only under the allowed output folder."""
    from PIL import Image  # noqa: PLC0415

    items = []
    for s in samples[-MAX_SHOWN_SAMPLES:][::-1]:
        try:
            with Image.open(s["path"]) as im:
                items.append((im.convert("RGB"), f"step {s['step']}"))
        except OSError:
            continue
    return items


def checkpoint_grid(checkpoints: list[dict], side: int = 160):
    """One image: a row per saved checkpoint (oldest on top, its step on the left), a column per sample prompt; None
    when no checkpoint has samples. Small samples are enlarged (nearest) so a 64 px try-out run is visible."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    rows = []
    for c in checkpoints:
        images = []
        for path in c["samples"]:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except OSError:
                continue
            scale = side / max(image.size)
            images.append(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                       Image.NEAREST if scale > 1 else Image.LANCZOS))
        if images:
            rows.append((f"step {c['step']}", images))
    if not rows:
        return None
    gap, label_w = 6, 80
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + columns * (side + gap), len(rows) * (side + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:        # Pillow before 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        y = r * (side + gap)
        draw.text((6, y + side // 2 - 8), label, fill=(30, 30, 30), font=font)
        for i, image in enumerate(images):
            grid.paste(image, (label_w + i * (side + gap), y))
    return grid


def checkpoint_updates(checkpoints: list[dict]) -> list:
    """The grid of samples per saved checkpoint and the checkpoint picker (the newest chosen)."""
    grid = checkpoint_grid(checkpoints)
    choices = [(f"step {c['step']} · {c['name']}", c["path"]) for c in checkpoints[::-1]]
    return [gr.update(value=grid, visible=grid is not None),
            gr.update(choices=choices, value=choices[0][1] if choices else None)]


def gallery_update(samples: list[dict]):
    """The samples, the newest opened large (selected_index 0: the gallery's preview with its step)."""
    items = sample_items(samples)
    return gr.update(value=items, selected_index=0 if items else None)


def failure_text(error: gr.Error, doing: str = "start training") -> str:
    """The one line a refused Start / Resume / View shows under the buttons (the last run's view stays as it was)."""
    return f"⚠️ **Could not {doing}:** {getattr(error, 'message', None) or error}"


def base_choices(bases: list[dict]) -> list[tuple[str, str]]:
    return [(b["label"], b["name"]) for b in bases if b.get("available")]


def model_for_lora(value, current: str, chosen_base: str, infos: dict) -> list:
    """Generate's model for trying a LoRA (``value``: {"family", ...}) and that model's steps, guidance and CFG:
    unchanged when it is of the LoRA's family, else the Train tab's base model when that is, else the first model of
    that family on offer (a base model samples with CFG: its defaults come with it)."""
    family = (value or {}).get("family")
    unchanged = [gr.skip()] * 4
    if not family or (infos.get(current) or {}).get("family") == family:
        return unchanged
    names = [chosen_base] + [n for n, info in infos.items() if info.get("available")]
    name = next((n for n in names if (infos.get(n) or {}).get("family") == family), None)
    if name is None:
        return unchanged
    info = infos[name]
    return [gr.update(value=name), gr.update(value=int(info.get("default_steps") or 30)),
            gr.update(value=float(info.get("default_guidance", 3.5))),
            gr.update(value=float(info.get("default_cfg", 1.0)))]


def base_note(bases: list[dict], name: str | None) -> str:
    info = next((b for b in bases if b["name"] == name), None)
    if info is None:
        missing = [b["name"] for b in bases if not b.get("available")]
        return ("No trainable model in the models folder." + (f" Not present yet: {', '.join(missing)}." if missing
                                                                else ""))
    return info.get("note") or ""



def base_info(bases: list[dict], name: str | None) -> dict:
    return next((b for b in bases if b["name"] == name), {})


def sample_steps_for(info: dict) -> int:
    """The sample steps a base starts with: its own default (klein: 4), at most 20 (8 for a demo)."""
    return min(8 if info.get("demo") else 20, int(info.get("default_steps") or 20))


def run_choices(runs: list[dict]) -> list[tuple[str, str]]:
    out = []
    for r in runs:
        total = f"/{r['total']}" if r.get("total") else ""
        out.append((f"{r['name']} · {r['status']} · step {r['step']}{total}", r["run_dir"]))
    return out


def runs_frame(runs: list[dict]):
    rows = []
    for r in runs:
        total = f"/{r['total']}" if r.get("total") else ""
        loss = f"{r['loss']:.4f}" if isinstance(r.get("loss"), (int, float)) else ""
        lora = r.get("published") or r.get("final") or ""
        rows.append([r["name"], r["status"], f"{r['step']}{total}", loss, (r.get("created") or "").replace("T", " "),
                     lora.rsplit("/", 1)[-1]])
    return _pandas().DataFrame(rows, columns=["run", "status", "step", "loss", "created", "LoRA / weights"])


def when(value) -> str:
    """A time for a table: seconds since the epoch or an ISO string, as "YYYY-MM-DD HH:MM"."""
    import datetime as dt  # noqa: PLC0415
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M")
    return str(value or "").replace("T", " ")[:16]


def caches_frame(caches: list[dict]):
    """The cached datasets (split training's), one row each: its name, samples, size on disk, model family, when."""
    rows = []
    for c in caches:
        done = f"{c.get('samples', 0)}" + ("" if c.get("complete") else f" of {c.get('total') or '?'} (unfinished)")
        rows.append([c.get("name", ""), done, f"{float(c.get('size_mb') or 0):.1f} MB", c.get("family") or "",
                     when(c.get("created"))])
    return _pandas().DataFrame(rows, columns=["cache", "samples", "size", "model", "made"])
