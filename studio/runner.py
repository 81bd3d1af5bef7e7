"""Running one validated job (``ValidJob``): the pipeline for its variant, each feature's arguments, models and LoRAs,
room in the memory plan for the job's size and sequence, then one image per seed, each finished by the features and
saved with its recipe and the input copies beside it.

It knows no feature by name: it asks each registered feature (``studio.features``). A feature may ask for one more
pass over the finished image (``Feature.refine``: a hires fix upscales and refines it at a low strength); the recipe
records every pass. Every step that can run out of GPU memory goes through the job's ``OomGuard``. The studio engine
calls ``run`` under its job lock. With ``preview`` (given the pipeline, it returns the pipeline's
``preview_callback``) the denoising shows a picture every few steps. The variant's family (``studio.families``) gives
the pipeline's base arguments and says whether LoRAs, previews and the memory planner apply (FLUX.2: none yet).
"""
from __future__ import annotations

import random
from typing import Callable, Optional

from . import recipes
from .families import family_of
from .oom import OomGuard

Progress = Callable[[int, int, str], None]
Preview = Callable[[object], Optional[Callable]]     # pipeline -> its preview_callback (None: no previews)


def run(job, features, models, outputs_dir, progress: Progress, check_cancel: Callable[[], None],
        preview: Optional[Preview] = None) -> list[dict]:
    """The job's results: [{"path", "seed", "width", "height", "recipe", "info", "notes" (when any)}]."""
    notes: list[str] = []   # what the studio did to finish the job (out-of-memory recovery, inputs fitted)
    guard = OomGuard(models, notes, progress)
    family = family_of(job.variant)
    pipe = guard(lambda: models.pipeline(job.variant.name, progress))
    active = [(f, job.states[f.name]) for f in features if f.name in job.states]
    for feature in features:    # a feature's switch on the pipeline, or its inputs made first (the prompt upsampler);
        guard(lambda feature=feature: feature.configure(job.states.get(feature.name), job, pipe))   # undone if unused
    kwargs = _pipe_kwargs(job, active, notes)
    if family.planned:
        _make_room(job, kwargs, pipe, models, guard)
    _attach_models(job, features, pipe, models, guard, progress)
    loras = []
    if family.loras:
        from engine.lora import library
        side = [lora for feature, state in active for lora in feature.loras(state, job, models.models_dir)]
        loras = library.sync(pipe.dit, models.models_dir, job.settings.loras, extra=side)   # kept while unchanged
    check_cancel()
    on_preview = _previews(preview if family.previews else None, pipe, guard, notes)
    seed = random.randrange(2 ** 31) if job.settings.seed == -1 else job.settings.seed
    results = []
    for k in range(job.settings.num_images):
        on_step = _on_step(job, k, progress, check_cancel)
        say_if_compiling(pipe, (job.width, job.height), progress, job.settings.num_inference_steps)
        image = guard(lambda: _make(pipe, job, kwargs, seed + k, on_step, on_preview))
        cached = cache_counts(pipe, job.settings.num_inference_steps, notes if k == 0 else [])
        for feature, state in active:
            image = feature.finish(state, job, image)
        made_size = (job.width, job.height)
        for feature, state in active:
            again = feature.refine(state, job, image)
            if again:                 # one more pass over the image (a hires fix), same prompt and seed
                check_cancel()
                made_size = (again.get("width", job.width), again.get("height", job.height))
                if family.planned:
                    _make_room(job, kwargs, pipe, models, guard, size=made_size)
                on_step = _on_step(job, k, progress, check_cancel, again.get("num_inference_steps"), "refining, ")
                image = guard(lambda: _make(pipe, job, {**kwargs, **again}, seed + k, on_step, on_preview))
        check_cancel()        # cancelled during the last step: nothing is saved
        results.append(_save(job, active, image, seed + k, pipe, loras, models.models_dir, outputs_dir, made_size,
                             cached))
        if notes or job.notes:
            results[-1]["notes"] = list(job.notes) + list(notes)
    return results


def _pipe_kwargs(job, active, notes: list) -> dict:
    """The features' pipeline arguments together; two features setting the same one cannot both be honoured."""
    kwargs: dict = {}
    owner: dict = {}
    for feature, state in active:
        for key, value in feature.pipe_kwargs(state, job, notes).items():
            if key in owner:
                from engine.errors import EngineError
                raise EngineError(f"Two of the job's inputs both set the model's {key} ({owner[key]} and "
                                  f"{feature.name}): use one of them.")
            owner[key] = feature.name
            kwargs[key] = value
    return kwargs


def _previews(preview: Optional[Preview], pipe, guard, notes: list) -> Optional[Callable]:
    """The pipeline's preview_callback, or None; a preview decoder that cannot be made only turns previews off."""
    if preview is None:
        return None
    from engine.errors import EngineError
    try:
        return guard(lambda: preview(pipe))
    except (EngineError, OSError, RuntimeError, ValueError) as exc:
        notes.append(f"No live previews for this job: {exc}")
        return None


def _make_room(job, kwargs: dict, pipe, models, guard, size: Optional[tuple] = None) -> None:
    """Re-plan when this job is bigger than the plan made room for: its size's activations (``size``, else the
    job's), and the tokens the sequence holds beside the image's (the prompt's, and what the conditions of
    ``kwargs`` add: references, entity prompts, image prompts)."""
    width, height = size or (job.width, job.height)
    tokens = models.family.sequence_tokens(kwargs, width, height, job.settings.t5_sequence_length)
    bigger = width * height > pipe.plan_size[0] * pipe.plan_size[1]
    if bigger or tokens > pipe.plan_text_tokens:
        if bigger:
            pipe.plan_size = (width, height)
        pipe.plan_text_tokens = max(pipe.plan_text_tokens, tokens)
        guard(models.replan)


def _attach_models(job, features, pipe, models, guard, progress) -> None:
    """Each feature's pipeline slots hold exactly what this job asks for (emptied for features it does not use)."""
    wanted: dict = {}                 # role -> (the feature that fills it, [ExtraModel])
    for feature in features:
        for role in feature.roles:
            wanted.setdefault(role, (feature, []))
        if feature.name in job.states:
            for model in feature.extra_models(job.states[feature.name], job):
                if model.role not in feature.roles:     # an undeclared slot would never be emptied again
                    raise ValueError(f"{type(feature).__name__} attaches {model.role!r} without declaring it in roles")
                wanted[model.role][1].append(model)
    for role, (feature, extra) in wanted.items():
        guard(lambda role=role, feature=feature, extra=extra:
              models.attach(pipe, role, extra, feature.combine, progress))


def say_if_compiling(pipe, size: tuple, progress: Progress, steps: int) -> None:
    """Before the first image at a size the compiled transformer has not run at, say that it compiles now (torch
    compiles at the first call of each shape, which can take a minute; the step count stays at 0 meanwhile)."""
    from engine.acceleration.compile import compiled_backend
    backend = compiled_backend(pipe.dit) if getattr(pipe, "dit", None) is not None else None
    if backend is None:
        return
    seen = pipe.__dict__.setdefault("compiled_sizes", set())
    if size not in seen:
        seen.add(size)
        progress(0, steps, f"Compiling the transformer's blocks for {size[0]}×{size[1]} ({backend}; the first image "
                           f"at a new size waits for it, later ones reuse it)")


def _on_step(job, k: int, progress: Progress, check_cancel, steps: Optional[int] = None, what: str = "") -> Callable:
    """The pipeline's step_callback: progress through the job's images (a refining pass counts its own steps)."""
    steps, n = steps or job.settings.num_inference_steps, job.settings.num_images

    def on_step(done, _total):
        progress(k * steps + done, n * steps, f"Image {k + 1}/{n}, {what}step {done}/{steps}")
        check_cancel()
    return on_step


def _make(pipe, job, kwargs: dict, seed: int, on_step: Callable, on_preview: Optional[Callable] = None):
    """One pipeline pass: the job's settings, overridden by ``kwargs`` (the features' arguments; a refining pass's
    size, input image, strength and steps)."""
    family = family_of(job.variant)
    args = family.call_args(job, seed)
    extra = {"preview_callback": on_preview} if family.previews else {}
    return pipe(**{**args, **kwargs}, progress_bar_cmd=lambda it: it, step_callback=on_step, **extra)


def cache_counts(pipe, steps: int, notes: list) -> dict:
    """What the step cache did in the last pipeline pass, for the recipe ({"steps_skipped": n}, the steps whose
    blocks the positive pass skipped; {} without a cache at work); a note says it for the first image."""
    speed = getattr(pipe, "acceleration", None)
    call = dict(getattr(speed, "last_call", None) or {})
    if not call.get("threshold"):
        return {}
    per_pass = call.get("skipped_steps")             # TeaCache: the skipped steps of each CFG pass
    if call.get("cache") == "tea_cache" and isinstance(per_pass, dict):
        skipped = len(per_pass.get("cond", []))
        notes.append(f"Step cache (TeaCache, threshold {call['threshold']:g}): {skipped} of {steps} steps reused "
                     f"the last computed step's blocks.")
        return {"steps_skipped": skipped}
    # The first-block cache counts transformer passes (two a step with true CFG), not steps.
    skipped, passes = int(call.get("skipped") or 0), int(call.get("passes") or 0)
    notes.append(f"Step cache (first-block cache, threshold {call['threshold']:g}): {skipped} of {passes} "
                 f"transformer passes reused the last computed blocks.")
    return {"passes_skipped": skipped}


def _save(job, active, image, seed: int, pipe, loras, models_dir, outputs_dir, made_size=None,
          cached: Optional[dict] = None) -> dict:
    """The image saved with its recipe (the features' entries included) and the input copies beside it."""
    copies = recipes.Sidecars()
    speed = getattr(pipe, "acceleration", None)        # engine.acceleration: the speed settings in force
    recipe = recipes.job_recipe(job, seed, pipe.model_files, loras, models_dir,
                                acceleration=speed.in_force() if speed is not None else None)
    recipe.update(cached or {})
    for feature, state in active:
        recipe.update(feature.recipe(state, job, copies))
    made_size = made_size or (job.width, job.height)
    if made_size == (job.width, job.height) and made_size != image.size:   # the padding to 16s was cropped
        recipe.update(width=image.width, height=image.height, work_size=[job.width, job.height])
    path = recipes.save_image(image, recipe, outputs_dir)
    copies.save(path)
    return {"path": str(path), "seed": seed, "width": image.width, "height": image.height, "recipe": recipe,
            "info": recipes.a1111_parameters(recipe)}
