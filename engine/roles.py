"""The Role table: every component a pipeline can hold, defined once.

A role is a slot of a pipeline (``pipe.dit``, ``pipe.text_encoder_2``, ...). What the rest of the engine
needs to know about one lives in its row here: how a person calls it (plan tables, loader errors), what its stage
is called (the peak-memory note), the order it runs in, how much the planner cares about it, which placements the
planner may choose for it and what each costs, and which components compute in the same stage. The planner
(``engine.memory``), the loader's messages (``engine.loading.errors``), the pipeline's slots and the studio read it;
adding a component is one row.

Two pipelines read the table (the ``pipelines`` column): ``FluxImagePipeline`` (FLUX.1 and its adapters, ``"flux1"``)
and ``engine.flux2.Flux2ImagePipeline`` (FLUX.2, ``"flux2"``, slots ``text_encoder``, ``dit``, ``vae``). A slot both
pipelines have is ONE row, not a row per family: FLUX.2's transformer and VAE are placed by exactly FLUX.1's rules
(the transformer's blocks are the same ``transformer_blocks`` + ``single_transformer_blocks`` lists, its fp8 layers the
blocks' Linears, its activations the same per-token estimate; the VAE is resident or offloaded), what differs between
the families (widths, block counts, sizes) is read from the tensor shapes, and the studio's model cache, re-plan,
out-of-memory guard and memory tab all key components by slot, so a family-scoped name ("flux2_dit") would need a
slot <-> role translation at each of them. The slot only FLUX.2 has, its Qwen3 / Mistral Small ``text_encoder``, is its
own row; FLUX.1's pipeline has no such slot (``ROLE_NAMES`` lists FLUX.1's slots, ``FLUX2_ROLE_NAMES`` FLUX.2's).

Pure data, no torch: the planner and the studio import it without loading models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Placement options the planner scores (see engine.memory.OPTIONS): R resident, O offloaded, F fp8, FO fp8+offload,
# S streamed, SF streamed in fp8, SM streamed from the memory-mapped file, SFM the same in fp8 (no RAM copy when the
# file itself is fp8). The planner picks the plan with the least predicted time (engine.memory.cost); these costs
# (quality first, then speed) only break ties between plans predicted equally fast.
SMALL_COSTS = {"R": 0, "O": 1, "F": 6, "FO": 7, "S": 8, "SF": 9, "SM": 10, "SFM": 11}
ENCODER_COSTS = {"R": 0, "O": 2, "F": 9, "FO": 10, "S": 12, "SF": 14, "SM": 16, "SFM": 18}
DEFAULT_COSTS = {"R": 0, "O": 3, "F": 15, "FO": 16, "S": 30, "SF": 33, "SM": 45, "SFM": 48}
DEFAULT_OPTIONS = ("R", "O", "FO", "S")


@dataclass(frozen=True)
class Role:
    name: str                      # the pipeline attribute, e.g. "text_encoder_2"
    label: str                     # in plan tables: "T5-XXL text encoder"
    loader_name: str               # in loader errors: "... this slot expects <loader_name>"
    stage: str                     # in the peak note: "Predicted peak ... during <stage>"
    order: int                     # when it runs in a job (plans list components in this order)
    importance: float              # the planner's lexicographic order: lower is decided first
    costs: dict = field(default_factory=lambda: dict(DEFAULT_COSTS))
    planner_options: tuple = DEFAULT_OPTIONS   # what the planner itself may pick (the seed's fields may ask more)
    partners: tuple = ()           # components on the device in the same stage (the ControlNets beside the DiT)
    base: bool = False             # one of FLUX.1's four components, loaded from a plain file by engine.loading
    family: str = "flux1"          # which feature brings it ("flux1", "step1x", "controlnet", "redux", ...)
    pipelines: tuple = ("flux1",)  # pipelines with this slot: "flux1" FluxImagePipeline, "flux2" Flux2ImagePipeline
    labels: dict = field(default_factory=dict)   # {pipeline: label} where a shared slot is called otherwise there
    runs: str = "prompt"           # how often it computes in a job: "step" (every denoising step), "prompt" (once
                                   # per new prompt or image prompt), "image" (once per image): the time model's count


ROLES: dict[str, Role] = {r.name: r for r in (
    Role("text_encoder_1", "CLIP-L text encoder", "the CLIP-L text encoder (text_encoder)", "CLIP encoding",
         order=0, importance=4, costs=dict(SMALL_COSTS), planner_options=("R", "O"), base=True),
    Role("text_encoder_2", "T5-XXL text encoder", "the T5-XXL text encoder (text_encoder_2)", "T5 encoding",
         order=1, importance=2, costs=dict(ENCODER_COSTS),
         planner_options=("R", "O", "F", "FO", "S", "SF", "SM", "SFM"),
         base=True),
    # FLUX.2's one text encoder (klein: Qwen3-4B / Qwen3-8B; [dev]: Mistral Small 3.x, 24B), run once per prompt as
    # T5 is, trimmed to the decoder layers whose hidden states the transformer reads. Every option: its decoder layers
    # stream one at a time and its Linears and token embedding go fp8 (a 24B encoder needs both on small cards).
    Role("text_encoder", "FLUX.2 text encoder (Qwen3 / Mistral Small)", "the FLUX.2 text encoder (text_encoder/)",
         "FLUX.2 text encoding", order=1, importance=2, costs=dict(ENCODER_COSTS),
         planner_options=("R", "O", "F", "FO", "S", "SF", "SM", "SFM"), family="flux2", pipelines=("flux2", "flux3"),
         labels={"flux3": "FLUX 3 text encoder (Qwen3-VL)"}),
    # Qwen2.5-VL runs once per prompt (as T5). Resident or offloaded only: its blocks sit two levels down and
    # transformers calls its embedding outside its forward, which block streaming does not cover, and fp8 storage
    # would change what ``model.dtype`` reports to its vision tower.
    Role("qwen_vl", "Qwen2.5-VL encoder (Step1X-Edit)", "the Qwen2.5-VL encoder (Step1X-Edit)",
         "Qwen2.5-VL encoding", order=2, importance=2, costs=dict(ENCODER_COSTS), planner_options=("R", "O"),
         family="step1x"),
    # The connector runs at every step (as the transformer) but is small, so moving it costs little.
    Role("step1x_connector", "Step1X-Edit connector", "the Step1X-Edit connector", "the Step1X connector",
         order=3, importance=1, costs=dict(DEFAULT_COSTS), planner_options=("R", "O"), family="step1x",
         runs="step"),
    # Redux: SigLIP's vision tower and the embedder run once per image prompt, like a text encoder.
    Role("flux_redux_image_encoder", "SigLIP vision encoder (Redux)", "the SigLIP vision tower of FLUX.1-Redux "
         "(image_encoder/model.safetensors)", "SigLIP image encoding", order=4, importance=3,
         costs=dict(ENCODER_COSTS), planner_options=("R", "O"), family="redux"),
    Role("flux_redux_image_embedder", "Redux image embedder", "the FLUX.1-Redux image embedder "
         "(image_embedder/diffusion_pytorch_model.safetensors)", "the Redux embedder", order=5, importance=3,
         costs=dict(SMALL_COSTS), planner_options=("R", "O"), family="redux"),
    # IP-Adapter: SigLIP's vision tower and the IP-Adapter (image projection + every block's keys/values) run once
    # per call, like a text encoder; the loop only reads the keys and values they made.
    Role("ipadapter_image_encoder", "SigLIP vision encoder (IP-Adapter)", "the SigLIP vision tower of the "
         "IP-Adapter (google/siglip-so400m-patch14-384 model.safetensors)", "SigLIP image encoding", order=5,
         importance=3, costs=dict(ENCODER_COSTS), planner_options=("R", "O"), family="ipadapter"),
    Role("ipadapter", "IP-Adapter (image projection + block keys/values)", "InstantX's FLUX.1 IP-Adapter "
         "(ip-adapter.bin)", "the IP-Adapter's keys and values", order=5, importance=3, costs=dict(ENCODER_COSTS),
         planner_options=("R", "O"), family="ipadapter"),
    # InfiniteYou: the projector runs once per identity photo (8 tokens); InfuseNet at every step beside the DiT.
    Role("infinityou_image_projector", "InfiniteYou image projector", "InfiniteYou's image projector "
         "(infu_flux_v1.0/aes_stage2/image_proj_model.bin)", "the InfiniteYou projector", order=5, importance=3,
         costs=dict(SMALL_COSTS), planner_options=("R", "O"), family="infiniteyou"),
    # DiffSynth's LoRA Encoder: runs once per call (one token per LoRA), like a text encoder.
    Role("lora_encoder", "LoRA Encoder (DiffSynth-Studio)", "DiffSynth-Studio's LoRA Encoder "
         "(LoRA-Encoder-FLUX.1-Dev model.safetensors)", "LoRA encoding", order=5, importance=3,
         costs=dict(ENCODER_COSTS), planner_options=("R", "O"), family="lora_encoder"),
    # Nexus-GenV2: the AR Qwen2.5-VL (~8B, as Step1X's) runs once per prompt, with the same limits as qwen_vl; its
    # decoders (the generation adapter, the editing merger: one Qwen layer + a projector) once per prompt after it.
    Role("nexus_gen", "Nexus-GenV2 AR model (Qwen2.5-VL)", "Nexus-GenV2's autoregressive Qwen2.5-VL "
         "(DiffSynth-Studio/Nexus-GenV2 model*.safetensors)", "Nexus-Gen's AR pass", order=2, importance=2,
         costs=dict(ENCODER_COSTS), planner_options=("R", "O"), family="nexus_gen"),
    Role("nexus_gen_generation_adapter", "Nexus-GenV2 generation adapter", "Nexus-GenV2's generation adapter "
         "(generation_decoder.bin)", "the Nexus-Gen adapter", order=3, importance=3, costs=dict(SMALL_COSTS),
         planner_options=("R", "O"), family="nexus_gen"),
    Role("nexus_gen_editing_adapter", "Nexus-GenV2 embedding merger", "Nexus-GenV2's embedding merger "
         "(edit_decoder.bin)", "the Nexus-Gen merger", order=3, importance=3, costs=dict(SMALL_COSTS),
         planner_options=("R", "O"), family="nexus_gen"),
    # The transformer runs at every step: offloading costs ~2 copies per new prompt, fp8 precision, streaming a copy
    # per step.
    Role("dit", "FLUX transformer", "the FLUX transformer (DiT)", "denoising", order=6, importance=0,
         costs={"R": 0, "O": 5, "F": 20, "FO": 22, "S": 40, "SF": 45, "SM": 60, "SFM": 65},
         planner_options=("R", "O", "F", "FO", "S", "SF", "SM", "SFM"),
         partners=("controlnet", "infinityou_infusenet"),
         base=True, pipelines=("flux1", "flux2", "flux3"),
         labels={"flux2": "FLUX.2 transformer", "flux3": "FLUX 3 transformer"}, runs="step"),
    # ControlNets run at every step beside the transformer. No streaming: a few blocks, run at every step.
    Role("controlnet", "ControlNet", "a FLUX ControlNet", "denoising with the ControlNet", order=7, importance=0.5,
         costs={"R": 0, "O": 4, "F": 18, "FO": 20, "S": 35, "SF": 40, "SM": 55, "SFM": 60},
         planner_options=("R", "O", "F", "FO"), partners=("dit",), family="controlnet", runs="step"),
    Role("infinityou_infusenet", "InfiniteYou InfuseNet", "InfiniteYou's InfuseNet "
         "(infu_flux_v1.0/aes_stage2/InfuseNetModel/)", "denoising with InfuseNet", order=7, importance=0.5,
         costs={"R": 0, "O": 4, "F": 18, "FO": 20, "S": 35, "SF": 40, "SM": 55, "SFM": 60},
         planner_options=("R", "O", "F", "FO"), partners=("dit",), family="infiniteyou", runs="step"),
    Role("vae", "VAE (autoencoder)", "the FLUX VAE", "VAE decoding", order=8, importance=3,
         costs=dict(SMALL_COSTS), planner_options=("R", "O"), base=True, pipelines=("flux1", "flux2", "flux3"),
         labels={"flux2": "FLUX.2 VAE (32 channels)", "flux3": "FLUX.2 VAE (32 channels)"}, runs="image"),
)}

ROLE_NAMES = tuple(r for r in ROLES if "flux1" in ROLES[r].pipelines)    # FluxImagePipeline's slots, in run order
FLUX2_ROLE_NAMES = tuple(r for r in ROLES if "flux2" in ROLES[r].pipelines)  # Flux2ImagePipeline's slots
FLUX3_ROLE_NAMES = tuple(r for r in ROLES if "flux3" in ROLES[r].pipelines)  # Flux3ImagePipeline's (the same three)
BASE_ROLES = tuple(r for r in ROLES if ROLES[r].base)   # FLUX.1's four components
LABELS = {r.name: r.label for r in ROLES.values()}      # a view of the label column, for display tables


# A component with no row (an adapter not in the table yet): named by its slot, planned after the known ones, decided
# right after the transformer, with the default costs and options.
UNKNOWN_IMPORTANCE = 1


def role(name: str) -> Optional[Role]:
    return ROLES.get(name)


def row(name: str) -> Role:
    """The role's row, or the defaults for a component the table does not know."""
    r = ROLES.get(name)
    if r is not None:
        return r
    return Role(name, label=name, loader_name=name, stage=name, order=len(ROLES), importance=UNKNOWN_IMPORTANCE)


def label(name: str, pipeline: Optional[str] = None) -> str:
    """How a plan table calls the component (the role name itself for an unknown one); ``pipeline`` ("flux2") picks
    the name a shared slot has there."""
    r = row(name)
    return r.labels.get(pipeline, r.label)


def ordered(names) -> list:
    """Role names in the order they run in a job (unknown ones last, by name): the order plans list them in."""
    return sorted(names, key=lambda n: (row(n).order, n))


def by_importance(names) -> list:
    """Role names most important first: the order in which the planner compares per-component costs."""
    return sorted(names, key=lambda n: (row(n).importance, n))


def roles_of(family: str) -> tuple:
    return tuple(r.name for r in ROLES.values() if r.family == family)


__all__ = ["Role", "ROLES", "ROLE_NAMES", "FLUX2_ROLE_NAMES", "FLUX3_ROLE_NAMES", "BASE_ROLES", "LABELS",
           "role", "row", "label", "ordered", "by_importance",
           "roles_of", "DEFAULT_COSTS", "DEFAULT_OPTIONS", "UNKNOWN_IMPORTANCE"]
