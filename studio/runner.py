"""Running one validated job (``ValidJob``): the pipeline for its variant, each feature's arguments, models and LoRAs,
room in the memory plan for the job's size and sequence, then one image per seed, each finished by the features and
saved with its recipe and the input copies beside it.

It knows no feature by name: it asks each registered feature (``studio.features``). Every step that can run out of
GPU memory goes through the job's ``OomGuard``. The studio engine calls ``run`` under its job lock.
"""
from __future__ import annotations

import random
from typing import Callable

from . import recipes
from .oom import OomGuard

Progress = Callable[[int, int, str], None]


def run(job, features, models, outputs_dir, progress: Progress, check_cancel: Callable[[], None]) -> list[dict]:
    """The job's results: [{"path", "seed", "width", "height", "recipe", "info", "notes" (when any)}]."""
    notes: list[str] = []   # what the studio did to finish the job (out-of-memory recovery, inputs fitted)
    guard = OomGuard(models, notes, progress)
    pipe = guard(lambda: models.pipeline(job.variant.name, progress))
    active = [(f, job.states[f.name]) for f in features if f.name in job.states]
    kwargs: dict = {}
    for feature, state in active:
        kwargs.update(feature.pipe_kwargs(state, job, notes))
    _make_room(job, kwargs, pipe, models, guard)
    _attach_models(job, features, pipe, models, guard, progress)
    from engine.lora import library
    side = [lora for feature, state in active for lora in feature.loras(state, job, models.models_dir)]
    loras = library.sync(pipe.dit, models.models_dir, job.settings.loras, extra=side)   # kept while unchanged
    check_cancel()
    seed = random.randrange(2 ** 31) if job.settings.seed == -1 else job.settings.seed
    results = []
    for k in range(job.settings.num_images):
        image = guard(lambda k=k: _make(pipe, job, kwargs, seed + k, _on_step(job, k, progress, check_cancel)))
        for feature, state in active:
            image = feature.finish(state, job, image)
        check_cancel()        # cancelled during the last step: nothing is saved
        results.append(_save(job, active, image, seed + k, pipe, loras, models.models_dir, outputs_dir))
        if notes or job.notes:
            results[-1]["notes"] = list(job.notes) + list(notes)
    return results


def _make_room(job, kwargs: dict, pipe, models, guard) -> None:
    """Re-plan when this job is bigger than the plan made room for: its size's activations, and the tokens the
    sequence holds beside the image's (the prompt's, and what the conditions of ``kwargs`` add: references, entity
    prompts, image prompts)."""
    from engine.conditions import sequence_tokens
    tokens = sequence_tokens(kwargs, job.width, job.height, job.settings.t5_sequence_length)
    bigger = job.width * job.height > pipe.plan_size[0] * pipe.plan_size[1]
    if bigger or tokens > pipe.plan_text_tokens:
        if bigger:
            pipe.plan_size = (job.width, job.height)
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


def _on_step(job, k: int, progress: Progress, check_cancel) -> Callable:
    steps, n = job.settings.num_inference_steps, job.settings.num_images

    def on_step(done, _total):
        progress(k * steps + done, n * steps, f"Image {k + 1}/{n}, step {done}/{steps}")
        check_cancel()
    return on_step


def _make(pipe, job, kwargs: dict, seed: int, on_step: Callable):
    s = job.settings
    return pipe(**kwargs, prompt=s.prompt, negative_prompt=s.negative_prompt, cfg_scale=s.cfg_scale,
                embedded_guidance=s.embedded_guidance, t5_sequence_length=s.t5_sequence_length, height=job.height,
                width=job.width, seed=seed, rand_device=s.rand_device, sigma_shift=s.sigma_shift,
                num_inference_steps=s.num_inference_steps, schedule=s.schedule, progress_bar_cmd=lambda it: it,
                step_callback=on_step)


def _save(job, active, image, seed: int, pipe, loras, models_dir, outputs_dir) -> dict:
    """The image saved with its recipe (the features' entries included) and the input copies beside it."""
    copies = recipes.Sidecars()
    recipe = recipes.job_recipe(job, seed, pipe.model_files, loras, models_dir)
    for feature, state in active:
        recipe.update(feature.recipe(state, job, copies))
    if (job.width, job.height) != image.size:      # the padding to multiples of 16 was cropped
        recipe.update(width=image.width, height=image.height, work_size=[job.width, job.height])
    path = recipes.save_image(image, recipe, outputs_dir)
    copies.save(path)
    return {"path": str(path), "seed": seed, "width": image.width, "height": image.height, "recipe": recipe,
            "info": recipes.a1111_parameters(recipe)}
