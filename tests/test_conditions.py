"""The condition registry (engine.conditions): pipe(...) keywords dispatched to the Condition classes, unknown ones
refused by name, each keyword read by one class, and the sequence estimate the memory planner reads."""
import pytest
from PIL import Image

from engine import EngineError
from engine.conditions import CONDITIONS, build_conditions, call_arguments, check_arguments, sequence_tokens
from engine.conditions.flex import FlexCondition
from engine.pipeline import PIPELINE_ARGUMENTS, FluxImagePipeline


def test_an_unknown_pipe_keyword_is_refused_by_name():
    pipe = FluxImagePipeline(device="cpu")           # no models: the keywords are checked before anything runs
    with pytest.raises(EngineError, match=r"unknown argument 'kontext_image'\..*kontext_images") as err:
        pipe(prompt="x", kontext_image=Image.new("RGB", (16, 16)))
    assert "num_inference_steps" in str(err.value)   # the pipeline's own arguments are listed too
    with pytest.raises(EngineError, match=r"unknown arguments 'foo', 'bar'"):
        pipe(prompt="x", foo=1, bar=2)
    # A known condition keyword passes the check (and then meets the missing transformer).
    with pytest.raises(EngineError, match="No FLUX transformer"):
        pipe(prompt="x", kontext_images=None, eligen_enable_inpaint=False)
    with pytest.raises(EngineError, match="'flux_fill_imag'"):
        build_conditions(None, {"flux_fill_imag": None})


def test_every_keyword_is_read_by_one_condition_and_is_not_the_pipelines():
    seen = {}
    for cls in CONDITIONS:
        assert cls.call_args, f"{cls.__name__} declares no pipe(...) arguments"
        for name in cls.call_args:
            assert name not in seen, f"{name} is declared by {seen[name]} and {cls.__name__}"
            seen[name] = cls.__name__
    assert set(seen) == set(call_arguments())
    assert not set(seen) & set(PIPELINE_ARGUMENTS)
    # The seed's names and defaults.
    args = call_arguments()
    assert args["flex_control_strength"] == 0.5 and args["flex_control_stop"] == 0.5
    assert args["eligen_enable_on_negative"] is False and args["eligen_enable_inpaint"] is False
    assert {"controlnet_inputs", "kontext_images", "step1x_reference_image", "flux_fill_image"} <= set(args)
    check_arguments(args)                                # every declared name is accepted


def test_a_setting_alone_asks_for_no_condition():
    settings = dict(FlexCondition.call_args, flex_control_strength=0.9, flex_control_stop=0.2)
    assert not FlexCondition.requested(settings, None)
    assert FlexCondition.requested(dict(settings, flex_control_image=Image.new("RGB", (16, 16))), None)


def test_sequence_tokens_count_text_entities_and_references():
    assert sequence_tokens({}, 1024, 1024, 512) == 512
    assert sequence_tokens({"eligen_entity_prompts": ["a", "b"], "eligen_entity_masks": [None, None]},
                           1024, 1024, 256) == 256 * 3
    # A Kontext reference of 100 x 60 is rounded up to 112 x 64: 7 x 4 tokens.
    assert sequence_tokens({"kontext_images": [Image.new("RGB", (100, 60))]}, 512, 512, 512) == 512 + 28
    # Step1X's 640 Qwen tokens replace T5's; its reference is resized to the output (64 x 32 tokens).
    assert sequence_tokens({"step1x_reference_image": Image.new("RGB", (10, 10))}, 1024, 512, 512) == 640 + 64 * 32
