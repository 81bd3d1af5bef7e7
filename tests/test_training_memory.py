"""Training under a VRAM limit (issue 18, item 3), on the CPU.

- The plan (``engine.training.memory``) for FLUX.1-dev LoRA rank 16 at 1024x1024 from the checkpoint manifests: at
  12 GB it fits (streamed frozen blocks, checkpointing, the T5 off the device); with no limit everything is resident;
  the person's flags are kept; an impossible limit names what the smallest plan needs.
- Streaming (``engine.training.offload.BlockStreamer``) on a tiny transformer with the CPU as the device: a streamed
  block's frozen weights are really dropped (an empty tensor) when it is not on the 'device', so a wrong reload fails
  loudly; the loss and the LoRA gradients equal the resident run's, with and without checkpointing, with at most one
  block onloaded at a time.
- The optimizer on the CPU gives the same weights as the plain optimizer and keeps its state on the CPU.
- ``train.py --vram_limit`` with both seed offload flags on the demo model: the plan is shown (a ``plan`` event before
  the first step) and the trained LoRA, stopped after a step and resumed, equals the unplanned run's; fp8 storage
  with streamed blocks trains exactly as resident fp8 storage.
"""
import copy
import json
import threading

import pytest
import torch

from engine import memory as vram
from engine.errors import EngineError
from engine.training import checkpoints as ck
from engine.training.args import TrainConfig, parse_args
from engine.training.memory import Fixed, TrainingJob, lora_params, plan_for_config, plan_training
from engine.training.offload import BlockStreamer, CPUOffloadOptimizer
from engine.training.runner import Trainer
from tests.test_training import demo_args, folder_data, lora_config  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("reference_rates")   # fixed rates: tests/conftest.py
JOB = TrainingJob(rank=16, width=1024, height=1024)


@pytest.fixture(scope="module")
def flux_dev(manifests_dir):
    d = manifests_dir / "FLUX.1-dev"
    paths = {"dit": d / "flux1-dev.safetensors.json", "vae": d / "ae.safetensors.json",
             "text_encoder_1": d / "text_encoder" / "model.safetensors.json",
             "text_encoder_2": d / "text_encoder_2" / "model.safetensors.json"}
    return vram.sizes_from_manifests(paths), json.loads(paths["dit"].read_text())["tensors"]


# ------------------------------------------------------------------------------------------------------ the plan
def test_12gb_plan_for_flux_dev_lora(flux_dev):
    sizes, tensors = flux_dev
    assert lora_params(tensors, 16) == 76_578_816      # rank x (in + out) of every block linear
    plan = plan_training(sizes, 12, JOB, Fixed(), "cuda", dit_tensors=tensors)
    print("\n" + plan.describe())
    assert plan.fits and plan.predicted_peak_vram_gb <= 12
    assert plan.summary().startswith("== training plan for 12 GB: predicted peak VRAM ")
    assert plan.dit == "stream" and 0 < plan.resident_blocks < plan.total_blocks == 57   # bf16: no fp8 needed
    assert plan.checkpointing != "none"
    assert plan.encoders["text_encoder_2"] in ("offload", "stream")   # the 9 GB T5 leaves before the DiT runs
    assert max(plan.stage_peaks_gb.values()) <= 12

    unlimited = plan_training(sizes, None, JOB, Fixed(), "cuda", dit_tensors=tensors)
    assert unlimited.all_resident and unlimited.fits and unlimited.predicted_peak_vram_gb > 40
    peaks = []
    for limit in (8, 12, 16, 24, 48):
        p = plan_training(sizes, limit, JOB, Fixed(), "cuda", dit_tensors=tensors)
        assert p.fits and p.predicted_peak_vram_gb <= limit
        peaks.append(p.resident_blocks if p.streams else p.total_blocks)
    assert peaks == sorted(peaks)                      # more room: more blocks stay


def test_a_run_from_cached_inputs_plans_no_encoder(flux_dev):
    """Split stage 2 and --cache_dir runs train without the text encoders and the VAE: the plan holds none of them,
    and the per-step encoder copies of an offloaded T5 are gone from the predicted step."""
    from engine.training.memory import fixed_from_config
    sizes, tensors = flux_dev
    assert fixed_from_config(TrainConfig(cache_dir="/tmp/c"), "cuda").cached_inputs
    assert fixed_from_config(TrainConfig(task="sft:train"), "cuda").cached_inputs
    assert not fixed_from_config(TrainConfig(), "cuda").cached_inputs
    encoding = plan_training(sizes, 12, JOB, Fixed(fp8_dit=True), "cuda", dit_tensors=tensors)
    cached = plan_training(sizes, 12, JOB, Fixed(fp8_dit=True, cached_inputs=True), "cuda", dit_tensors=tensors)
    print("\n" + cached.describe())
    assert cached.fits and cached.encoders == {} and encoding.encoders
    assert cached.predicted_step_s < encoding.predicted_step_s


def test_plan_keeps_the_flags_and_names_the_smallest_plan(flux_dev):
    sizes, tensors = flux_dev
    fixed = Fixed(checkpointing="checkpoint+offload", optimizer_offload=True, fp8_dit=True)
    p = plan_training(sizes, 24, JOB, fixed, "cuda", dit_tensors=tensors)
    assert (p.checkpointing, p.optimizer_offload, p.fp8) == ("checkpoint+offload", True, True)
    offload = plan_training(sizes, None, JOB, Fixed(model_offload=True), "cuda", dit_tensors=tensors)
    assert offload.streams and offload.resident_blocks == 0        # the seed's flag alone: every block streams
    tiny = plan_training(sizes, 1, JOB, Fixed(), "cuda", dit_tensors=tensors)
    assert not tiny.fits and "the smallest plan needs" in tiny.notes[0]
    assert "DOES NOT FIT" in tiny.summary()
    eight = plan_training(sizes, 12, JOB, Fixed(adamw8bit_available=True), "cuda", dit_tensors=tensors)
    assert eight.optimizer in ("AdamW 8-bit", "AdamW")
    assert plan_training(sizes, 12, JOB, Fixed(adamw8bit_available=True), "cpu").optimizer == "AdamW"


# ----------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def tiny_dit():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _lora_dit(base, checkpointing: str):
    from engine.training.model import add_lora, enable_checkpointing
    dit = copy.deepcopy(base)
    add_lora(dit, TrainConfig(lora_base_model="dit", lora_target_modules="", lora_rank=4), log=lambda m: None)
    with torch.no_grad():   # non-zero up matrices, so every LoRA matrix gets a gradient
        for i, (name, p) in enumerate(dit.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    if checkpointing != "none":
        enable_checkpointing(dit, checkpointing == "checkpoint+offload")
    return dit.train()


def _loss_and_grads(dit):
    from engine.training.objective import TrainingInputs, flow_matching_loss
    g = torch.Generator().manual_seed(1)
    inputs = TrainingInputs(latents=torch.randn(1, 16, 8, 8, generator=g),
                            prompt_emb=torch.randn(1, 7, 32, generator=g), pooled=torch.randn(1, 32, generator=g),
                            height=64, width=64)
    loss = flow_matching_loss(dit, inputs, 0.5, 1.0, torch.randn(1, 16, 8, 8, generator=g), torch.float32)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", ["none", "checkpoint", "checkpoint+offload"])
def test_streamed_training_equals_resident(tiny_dit, checkpointing):
    loss0, grads0 = _loss_and_grads(_lora_dit(tiny_dit, "none"))
    dit = _lora_dit(tiny_dit, checkpointing)
    streamer = BlockStreamer(dit, "cpu", resident_blocks=1, capacity=1)
    assert len(streamer.blocks) == 4
    blocks = streamer.blocks
    frozen = [[p for p in b.parameters() if not p.requires_grad] for b in blocks]
    assert all(p.numel() == 0 for ps in frozen for p in ps)          # dropped until a block runs
    loss, grads = _loss_and_grads(dit)
    assert loss == loss0 and grads.keys() == grads0.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], grads0[n]) for n in grads)
    assert streamer.max_loaded == 1
    assert streamer.onloads == 4 + 3        # forward, then the backward copies all but the last one in again
    assert sum(any(p.numel() for p in ps) for ps in frozen) <= 1
    assert all(p.numel() for p in dit.transformer_blocks[0].parameters())   # the resident block stays


def test_optimizer_on_the_cpu_gives_the_same_weights():
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    opt = CPUOffloadOptimizer(ours, torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    scheds = [torch.optim.lr_scheduler.ConstantLR(o) for o in (opt_ref, opt)]   # the runner's (lr / 3 at first)
    for step in range(3):
        for params, o in ((ref, opt_ref), (ours, opt)):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            o.step()
            o.zero_grad()
        for sched in scheds:
            sched.step()
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
    states = [t for s in opt.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert states and all(t.device.type == "cpu" for t in states)
    assert opt.state_dict()["state"][0]["exp_avg"].shape == (5, 3)
    with torch.no_grad():   # a weight copied in from outside (a resumed state) is read back before the next step
        ours[1].fill_(0.5)
    ours[0].grad, ours[1].grad = torch.zeros(5, 3), torch.zeros(7)
    opt.step()
    assert ours[1].abs().max() < 0.51


# ------------------------------------------------------------------------------------------------- train.py
def test_seed_offload_flags_parse():
    config, _resume, notes = parse_args("--lora_base_model dit --vram_limit 12 --enable_model_cpu_offload "
                                        "--enable_optimizer_cpu_offload")
    assert (config.vram_limit, config.enable_model_cpu_offload, config.enable_optimizer_cpu_offload) == (12, True, True)
    assert not any("offload" in n for n in notes)


def test_train_py_under_a_plan_equals_the_plain_run(folder_data, demo_args, tmp_path):  # noqa: F811
    plain = lora_config(folder_data, demo_args, tmp_path / "a", max_steps=2, height=64, width=64)
    run_a = ck.new_run_dir(plain.output_path)
    Trainer(plain, run_a, log=lambda m: None).run()
    planned = plain.replace(output_path=str(tmp_path / "b"), vram_limit=1.0, enable_model_cpu_offload=True,
                            enable_optimizer_cpu_offload=True, use_gradient_checkpointing=True)
    shown = plan_for_config(planned, 1.0, device="cpu")
    assert shown["fits"] and shown["dit"] == "stream" and shown["optimizer_offload"]
    run_b, events = ck.new_run_dir(planned.output_path), []
    stop = threading.Event()   # stopped after step 1 and resumed: the optimizer state comes back to the CPU copies

    def progress(event):
        events.append(event)
        if event["event"] == "step":
            stop.set()
    stopped = Trainer(planned.replace(save_steps=1), run_b, on_progress=progress, stop_event=stop,
                      log=lambda m: None).run()
    assert stopped["status"] == "stopped" and stopped["step"] == 1
    resumed = Trainer(planned.replace(save_steps=1), run_b, log=lambda m: None).run()
    assert resumed["status"] == "finished" and resumed["step"] == 2
    kinds = [e["event"] for e in events]
    assert "plan" in kinds and kinds.index("plan") < kinds.index("step")
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["summary"].startswith("== training plan for 1 GB") and plan["dit"] == "stream"
    a, b = (ck.load_state(ck.latest_state(r))["trainable"] for r in (run_a, run_b))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    with pytest.raises(EngineError, match="the smallest plan needs"):
        Trainer(plain.replace(output_path=str(tmp_path / "c"), vram_limit=1e-6), ck.new_run_dir(tmp_path / "c"),
                log=lambda m: None).run()


def test_fp8_storage_with_streaming_equals_fp8_resident(folder_data, demo_args, tmp_path):  # noqa: F811
    """--fp8_models with --enable_model_cpu_offload: the streamed blocks rest and move in fp8 (the plan's fields keep
    fp8 storage) and train exactly as the resident fp8 run."""
    fp8_entry = json.loads(demo_args["model_paths"])[0]
    resident = lora_config(folder_data, demo_args, tmp_path / "a", max_steps=2, height=64, width=64,
                           fp8_models=fp8_entry)
    streamed = resident.replace(output_path=str(tmp_path / "b"), enable_model_cpu_offload=True)
    states, dtypes = [], []
    for config in (resident, streamed):
        run_dir = ck.new_run_dir(config.output_path)
        trainer = Trainer(config, run_dir, log=lambda m: None)
        trainer.run()
        states.append(ck.load_state(ck.latest_state(run_dir))["trainable"])
        dtypes.append(trainer.dit.single_transformer_blocks[0].proj_mlp.weight.dtype)
    assert dtypes == [torch.float8_e4m3fn] * 2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
