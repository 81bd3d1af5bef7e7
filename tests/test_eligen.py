"""EliGen (engine.eligen): regional prompts through the joint attention mask.

- The mask on hand-checkable cases (2 entities on a 4x4 token grid, overlapping, written out), and against the
  seed's ``FluxDiT.construct_mask`` / ``preprocess_masks`` rules written out below as loops (DiffSynth-Studio's
  diffsynth/models/flux_dit.py and pipelines/flux_image.py).
- The transformer: diffusers' Flux attention with an all-allowed mask equals no mask; with EliGen's mask it equals
  attention computed by hand (masked softmax) in every block; entity tokens no image token may see change nothing.
- End to end on the random-weight demo model; bad input; and with two LoRAs (the EliGen LoRA in DiffSynth's key
  format plus another) the mask is still applied in every attention call.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import latents as lat
from engine.conditions import StepState, Text
from engine.conditions.eligen import EliGenCondition as EliGen
from engine.eligen import joint_attention_mask, load_layout, save_layout
from engine.eligen import masks as em
from engine.errors import EngineError

pytestmark = pytest.mark.filterwarnings("ignore")

H = W = 64                   # 4x4 image tokens
T5_LEN = 8                   # entity and prompt tokens each
STEPS = 3
PROMPT = "a cat and a dog in a garden"
ENTITIES = ["a black cat", "a brown dog"]


def grid(rows):
    return torch.tensor(rows, dtype=torch.bool)


def box_mask(w, h, box, mode="RGB"):
    """White box on black, in ``mode``."""
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m.convert(mode)


# ------------------------------------------------------------------------------------------- the mask, by hand
# Entity A: the two left columns. Entity B: the top two rows, columns 1-3. They overlap at (0,1) and (1,1).
A = grid([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
B = grid([[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_mask_two_entities_4x4_written_out():
    p = 2                                               # tokens per prompt: [A A | B B | G G | 16 image tokens]
    mask = joint_attention_mask(torch.stack([A.reshape(-1), B.reshape(-1)]), p)
    assert mask.shape == (22, 22) and mask.dtype == torch.bool
    # Text rows over text columns: each prompt (A, B, global) sees itself only.
    assert mask[:6, :6].int().tolist() == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1]]
    # Text rows over image columns (image tokens row-major over the 4x4 grid).
    a = [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    b = [0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    g = [1] * 16
    assert mask[:6, 6:].int().tolist() == [a, a, b, b, g, g]
    # Image rows over text columns: which prompts each image token sees.
    img_to_text = mask[6:, :6].int().tolist()
    assert img_to_text[0] == [1, 1, 0, 0, 1, 1]        # (0,0): A only, + global
    assert img_to_text[1] == [1, 1, 1, 1, 1, 1]        # (0,1): the overlap sees both entities
    assert img_to_text[3] == [0, 0, 1, 1, 1, 1]        # (0,3): B only
    assert img_to_text[15] == [0, 0, 0, 0, 1, 1]       # (3,3): no entity, the global prompt only
    assert mask[6:, :6].T.tolist() == mask[:6, 6:].tolist()
    # Image tokens see every image token.
    assert mask[6:, 6:].all()


def test_mask_extra_image_tokens_belong_to_no_entity():
    """Kontext reference tokens after the generated image: the global prompt and all image tokens only."""
    mask = joint_attention_mask(torch.stack([A.reshape(-1), B.reshape(-1)]), 2, num_image_tokens=20)
    assert mask.shape == (26, 26)
    assert mask[22:, :6].int().tolist() == [[0, 0, 0, 0, 1, 1]] * 4
    assert mask[:4, 22:].sum() == 0 and mask[4:6, 22:].all() and mask[6:, 6:].all()
    with pytest.raises(ValueError):
        joint_attention_mask(torch.stack([A.reshape(-1)]), 2, num_image_tokens=3)


def seed_construct_mask(regions, prompt_len, image_len):
    """The seed's FluxDiT.construct_mask written out as its loops (global prompt appended as an all-ones mask)."""
    masks = [r for r in regions] + [torch.ones(image_len, dtype=torch.bool)]
    n = len(masks)
    total = n * prompt_len + image_len
    out = torch.ones(total, total, dtype=torch.bool)
    img0 = n * prompt_len
    for i, m in enumerate(masks):
        s, e = i * prompt_len, (i + 1) * prompt_len
        out[s:e, img0:] = m[None, :].repeat(prompt_len, 1)
        out[img0:, s:e] = m[None, :].repeat(prompt_len, 1).T
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i * prompt_len:(i + 1) * prompt_len, j * prompt_len:(j + 1) * prompt_len] = False
    return out


def test_mask_matches_the_seeds_construction():
    g = torch.Generator().manual_seed(0)
    for n, p, img in ((1, 3, 16), (3, 4, 24), (5, 2, 12)):
        regions = torch.rand(n, img, generator=g) > 0.5
        assert torch.equal(joint_attention_mask(regions, p), seed_construct_mask(regions, p, img))


def seed_regions(mask, height, width):
    """The seed's mask reading: resize (nearest) to the latent grid, [-1, 1], channel mean > 0, patchify (2x2 x 16
    channels) and sum > 0."""
    arr = np.asarray(mask.resize((width // 8, height // 8), Image.NEAREST), dtype=np.float32) * (2 / 255) - 1
    cells = arr.mean(axis=2) > 0                                       # (h/8, w/8)
    c = np.repeat(cells[None], 16, axis=0)                             # 16 latent channels
    h, w = cells.shape[0] // 2, cells.shape[1] // 2
    patches = c.reshape(16, h, 2, w, 2).transpose(1, 3, 0, 2, 4).reshape(h * w, -1)
    return torch.from_numpy(patches.sum(axis=1) > 0)


def test_regions_from_images_match_the_seed():
    rng = np.random.RandomState(1)
    for (mw, mh), (w, h) in (((64, 64), (64, 64)), ((200, 120), (96, 64)), ((37, 53), (64, 80))):
        small = (rng.rand(max(1, mh // 9), max(1, mw // 9), 3) * 255).astype("uint8")
        mask = Image.fromarray(small).resize((mw, mh), Image.BICUBIC)   # grey levels, colours: the threshold matters
        ours = em.entity_token_regions([mask], h, w)[0]
        assert torch.equal(ours, seed_regions(mask, h, w)), (mw, mh, w, h)


def test_regions_one_cell_resized_and_painted_layers():
    # One latent cell (8x8 px at (8, 8)) on a 64x64 mask: token (0, 0) only (any of its four cells counts).
    one = box_mask(64, 64, (8, 8, 16, 16))
    expected = torch.zeros(16, dtype=torch.bool)
    expected[0] = True
    assert torch.equal(em.entity_token_regions([one], 64, 64)[0], expected)
    # The same mask at another size is resized to the output: 128x128 -> the same token.
    assert torch.equal(em.entity_token_regions([box_mask(128, 128, (16, 16, 32, 32), "L")], 64, 64)[0], expected)
    # A painted layer counts by its alpha, whatever the brush colour.
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((20, 20, 20, 255), (48, 48, 64, 64))
    assert em.entity_token_regions([layer], 64, 64)[0].nonzero().flatten().tolist() == [15]
    # The threshold is the seed's: channel mean above 127.5.
    assert em.entity_token_regions([Image.new("L", (64, 64), 128)], 64, 64)[0].all()
    assert not em.entity_token_regions([Image.new("L", (64, 64), 127)], 64, 64)[0].any()


def test_inpaint_region_is_the_union_at_latent_resolution():
    masks = [box_mask(64, 64, (0, 0, 16, 64)), box_mask(64, 64, (48, 0, 64, 16))]
    cells = em.inpaint_region(masks, 64, 64)
    assert cells.shape == (8, 8)
    assert cells[:, :2].all() and cells[:2, 6:].all() and not cells[2:, 2:].any() and not cells[:, 2:6].any()


def test_additive_mask():
    m = torch.tensor([[True, False], [True, True]])
    out = em.additive(m, torch.float32)
    assert out[0, 0] == 0 and out[0, 1] == float("-inf") and out[1].eq(0).all()


# ---------------------------------------------------------------------------------------------- the transformer
@pytest.fixture(scope="module")
def pipe(demo_dir):
    from engine import FluxImagePipeline, ModelConfig
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=demo_dir / f) for f in ("flux1-dev.safetensors", "ae.safetensors",
                                                                "text_encoder/model.safetensors", "text_encoder_2")],
        tokenizer_1_config=ModelConfig(path=demo_dir / "tokenizer"),
        tokenizer_2_config=ModelConfig(path=demo_dir / "tokenizer_2"))


def dit_inputs(pipe, n_entities, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = pipe.dit.config
    text = (n_entities + 1) * T5_LEN
    return dict(hidden_states=torch.randn(1, 16, d.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text, d.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, d.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                img_ids=lat.image_ids(H, W), txt_ids=lat.text_ids(text), return_dict=False)


def run_dit(pipe, mask=None, **inputs):
    kw = {} if mask is None else {"joint_attention_kwargs": {"attention_mask": em.additive(mask, torch.float32)[None, None]}}
    with torch.no_grad():
        return pipe.dit(**inputs, **kw)[0]


class HandMaskedAttention:
    """Flux joint attention computed by hand with a bool mask: masked softmax(q k^T / sqrt(d)) v. Text first, then
    image, as the model's blocks concatenate them; rotary embedding by diffusers' public helper."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / attn.head_dim ** 0.5
        scores = scores.masked_fill(~self.mask, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])


class Recorder:
    """Wraps a processor and records the attention mask each call received."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self.log.append(attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class processors:
    """Context: every attention module of ``dit`` gets ``make(name, original)``; the originals come back after."""

    def __init__(self, dit, make):
        self.dit, self.make = dit, make

    def __enter__(self):
        self.saved = dict(self.dit.attn_processors)
        self.dit.set_attn_processor({n: self.make(n, p) for n, p in self.saved.items()})

    def __exit__(self, *exc):
        self.dit.set_attn_processor(self.saved)


def regions_2():
    return torch.stack([A.reshape(-1), B.reshape(-1)])


def test_all_allowed_mask_equals_plain_attention(pipe):
    inputs = dit_inputs(pipe, 2)
    plain = run_dit(pipe, **inputs)
    allowed = run_dit(pipe, torch.ones(3 * T5_LEN + 16, 3 * T5_LEN + 16, dtype=torch.bool), **inputs)
    assert torch.allclose(plain, allowed, atol=1e-6)


def assert_mask_equals_attention_by_hand(pipe, **dit_kw):
    """EliGen's mask passed to the transformer equals attention masked by hand in every block, and matters."""
    inputs = dit_inputs(pipe, 2, **dit_kw)
    mask = joint_attention_mask(regions_2(), T5_LEN)
    masked = run_dit(pipe, mask, **inputs)
    with processors(pipe.dit, lambda n, p: HandMaskedAttention(mask)):
        by_hand = run_dit(pipe, **inputs)
    assert torch.allclose(masked, by_hand, atol=1e-5)
    assert not torch.allclose(masked, run_dit(pipe, **inputs), atol=1e-3)


def test_eligen_mask_equals_attention_by_hand(pipe):
    assert_mask_equals_attention_by_hand(pipe)


def test_entities_no_image_token_sees_change_nothing(pipe):
    """With empty regions, no image token and not the global prompt may see the entity tokens: the image's output
    equals the run on the global prompt alone (checks the layout: entities first, global last, then the image)."""
    inputs = dit_inputs(pipe, 2)
    empty = joint_attention_mask(torch.zeros(2, 16, dtype=torch.bool), T5_LEN)
    with_entities = run_dit(pipe, empty, **inputs)
    alone = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, 2 * T5_LEN:],
                 txt_ids=lat.text_ids(T5_LEN))
    assert torch.allclose(with_entities, run_dit(pipe, **alone), atol=1e-5)


def _state(negative):
    """A transformer call with 16 image tokens, as the attention hook sees it."""
    z = torch.zeros(1, 16, 64)
    return StepState(step=0, negative=negative, latents=z, latent_ids=lat.image_ids(H, W), hidden_states=z,
                     image_ids=lat.image_ids(H, W), timestep=torch.ones(1), guidance=None,
                     text=Text(torch.zeros(1, T5_LEN, 32), torch.zeros(1, 768), lat.text_ids(T5_LEN)))


def test_condition_text_and_kwargs():
    embs = torch.randn(2, T5_LEN, 32)
    c = EliGen(regions_2(), embs, on_negative=False)
    emb, ids = torch.randn(1, T5_LEN, 32), lat.text_ids(T5_LEN)
    text = Text(emb, torch.zeros(1, 768), ids)
    joined = c.transformer_text(text, negative=False)
    assert joined.embeds.shape == (1, 3 * T5_LEN, 32) and joined.ids.shape == (3 * T5_LEN, 3)
    assert torch.equal(joined.embeds[:, :T5_LEN], embs[:1]) and torch.equal(joined.embeds[:, 2 * T5_LEN:], emb)
    assert c.transformer_text(text, negative=True).embeds is emb          # plain negative pass
    assert c.attention_kwargs(_state(negative=True)) == {}
    m = c.attention_kwargs(_state(negative=False))["attention_mask"]
    assert m.shape == (1, 1, 3 * T5_LEN + 16, 3 * T5_LEN + 16)
    neg = EliGen(regions_2(), embs, on_negative=True)
    joined_neg = neg.transformer_text(text, negative=True).embeds          # the negative prompt for every entity
    assert torch.equal(joined_neg, emb.repeat(1, 3, 1))


# ---------------------------------------------------------------------------------------------------- end to end
def arr(image):
    return np.asarray(image, dtype=np.int16)


def masks_lr():
    """Entity 1 the left half, entity 2 the top-right quarter."""
    return [box_mask(W, H, (0, 0, 32, 64)), box_mask(W, H, (32, 0, 64, 32))]


def gen(pipe, **kw):
    args = dict(prompt=PROMPT, height=H, width=W, seed=3, num_inference_steps=STEPS, t5_sequence_length=T5_LEN,
                progress_bar_cmd=lambda x: x)
    args.update(kw)
    return pipe(**args)


def test_entity_masks_change_the_image_and_swapping_them_too(pipe):
    plain = arr(gen(pipe))
    masks = masks_lr()
    eligen = arr(gen(pipe, eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks))
    swapped = arr(gen(pipe, eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks[::-1]))
    again = arr(gen(pipe, eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks))
    # Deterministic, so any difference is the layout's; the demo's random text weights move pixels little (a whole
    # other prompt changes them by about 1 level on average).
    assert np.array_equal(eligen, again)
    assert np.abs(eligen - plain).mean() > 0.05
    assert np.abs(eligen - swapped).mean() > 0.05
    # Masks of another size are fitted to the output: the same layout at 2x gives the same image.
    big = [m.resize((2 * W, 2 * H), Image.NEAREST) for m in masks]
    assert np.array_equal(arr(gen(pipe, eligen_entity_prompts=ENTITIES, eligen_entity_masks=big)), eligen)


def test_on_negative_matters_only_with_cfg(pipe):
    kw = dict(eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks_lr(), negative_prompt="blurry")
    assert np.array_equal(arr(gen(pipe, **kw, eligen_enable_on_negative=True)),
                          arr(gen(pipe, **kw, eligen_enable_on_negative=False)))
    on = arr(gen(pipe, **kw, cfg_scale=2.0, eligen_enable_on_negative=True))
    off = arr(gen(pipe, **kw, cfg_scale=2.0, eligen_enable_on_negative=False))
    assert np.abs(on - off).mean() > 0.05


def test_inpaint_keeps_the_unmasked_region(pipe):
    rng = np.random.RandomState(4)
    source = Image.fromarray((rng.rand(8, 8, 3) * 255).astype("uint8")).resize((W, H), Image.BICUBIC)
    masks = [box_mask(W, H, (0, 0, 32, 32))]                                 # the top-left quarter
    clean = pipe.encode_image(source)
    seen = {}
    decode = pipe.decode_latents

    def capture(latents, *a, **k):
        seen["latents"] = latents.clone()
        return decode(latents, *a, **k)
    pipe.decode_latents = capture
    try:
        out = gen(pipe, input_image=source, eligen_entity_prompts=ENTITIES[:1], eligen_entity_masks=masks,
                  eligen_enable_inpaint=True, cfg_scale=2.0, negative_prompt="blurry")
    finally:
        del pipe.decode_latents
    final = seen["latents"]
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[:4, :4] = False
    # Latents: exactly the input's outside the mask (walked straight to it), new inside.
    assert torch.allclose(final[..., keep], clean[..., keep], atol=1e-4)
    assert (final[..., ~keep] - clean[..., ~keep]).abs().mean() > 0.1
    # Pixels: closer to the input's VAE round trip than without inpainting. (Only roughly: the demo's random VAE
    # decoder mixes the whole image, so the repainted quarter shows everywhere; the latents above are the real check.)
    roundtrip = arr(pipe.decode_latents(clean))
    plain = arr(gen(pipe, input_image=source, eligen_entity_prompts=ENTITIES[:1], eligen_entity_masks=masks))
    assert np.abs(arr(out) - roundtrip).mean() < np.abs(plain - roundtrip).mean()


def test_kontext_reference_tokens_belong_to_no_entity(pipe):
    """Kontext's reference tokens come after the image's: the mask grows to cover them (global prompt only)."""
    log = []
    with processors(pipe.dit, lambda n, p: Recorder(p, log)):
        gen(pipe, num_inference_steps=1, eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks_lr(),
            kontext_images=Image.new("RGB", (W, H), (30, 60, 200)))
    regions = em.entity_token_regions(masks_lr(), H, W)
    expected = joint_attention_mask(regions, T5_LEN, num_image_tokens=32)
    assert log and all(torch.equal(m[0, 0] == 0, expected) for m in log)


def test_other_conditions_see_the_plain_prompt(pipe, monkeypatch):
    """As in the seed (its ControlNet runs on the global prompt before EliGen joins the entities), conditions get
    the prompt alone; only the transformer gets the entity tokens."""
    import engine.pipeline as pipeline_mod
    from engine.conditions import Condition
    seen = []

    class Spy(Condition):
        def dit_kwargs(self, state):
            seen.append((state.negative, state.text.embeds.shape[1], state.text.ids.shape[0]))
            return {}
    build = pipeline_mod.build_conditions
    monkeypatch.setattr(pipeline_mod, "build_conditions", lambda *a, **k: build(*a, **k) + [Spy()])
    gen(pipe, num_inference_steps=1, cfg_scale=2.0, eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks_lr(),
        eligen_enable_on_negative=True)
    assert seen == [(False, T5_LEN, T5_LEN), (True, T5_LEN, T5_LEN)]


@pytest.mark.parametrize("kw, message", [
    (dict(eligen_entity_prompts=ENTITIES), r"entity 1 \('a black cat'\) has no mask"),
    (dict(eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks_lr()[:1]), r"entity 2 \('a brown dog'\) has no mask"),
    (dict(eligen_entity_masks=masks_lr()), r"mask 1 has no entity prompt"),
    (dict(eligen_entity_prompts=["a cat", "  "], eligen_entity_masks=masks_lr()), r"mask 2 has no entity prompt"),
    (dict(eligen_entity_prompts=ENTITIES, eligen_entity_masks=[masks_lr()[0], np.zeros((64, 64))]),
     r"entity 2 .*not an image"),
    (dict(eligen_entity_prompts=ENTITIES, eligen_entity_masks=[masks_lr()[0], Image.new("L", (64, 64))]),
     r"entity 2 \('a brown dog'\): its mask covers no part"),
    (dict(eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks_lr(), eligen_enable_inpaint=True),
     r"pass input_image"),
])
def test_bad_input_names_the_entity_and_the_fix(pipe, kw, message):
    with pytest.raises(EngineError, match=message):
        gen(pipe, **kw)
    assert gen(pipe, num_inference_steps=1).size == (W, H)            # still usable


# --------------------------------------------------------------------------------------------- with other LoRAs
ELIGEN_DOUBLE = ("attn.a_to_qkv", "attn.b_to_qkv", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "attn.a_to_out",
                 "attn.b_to_out", "norm1_a.linear", "norm1_b.linear")
ELIGEN_SINGLE = ("to_qkv_mlp", "proj_out", "norm.linear")


def eligen_lora(dit, rank=4, seed=0):
    """A LoRA as DiffSynth's trainer saves the EliGen LoRA: PEFT keys over DiffSynth's FluxDiT names
    (``blocks.N.attn.a_to_qkv.lora_A.default.weight``), on the modules of EliGen's training script
    (examples/flux/model_training/lora/FLUX.1-dev-EliGen.sh, --lora_target_modules)."""
    g = torch.Generator().manual_seed(seed)
    hidden = dit.config.num_attention_heads * dit.config.attention_head_dim
    mlp = dit.single_transformer_blocks[0].proj_mlp.out_features
    shapes = {"attn.a_to_qkv": (hidden, 3 * hidden), "attn.b_to_qkv": (hidden, 3 * hidden),
              "ff_a.0": (hidden, 4 * hidden), "ff_a.2": (4 * hidden, hidden), "ff_b.0": (hidden, 4 * hidden),
              "ff_b.2": (4 * hidden, hidden), "attn.a_to_out": (hidden, hidden), "attn.b_to_out": (hidden, hidden),
              "norm1_a.linear": (hidden, 6 * hidden), "norm1_b.linear": (hidden, 6 * hidden),
              "to_qkv_mlp": (hidden, 3 * hidden + mlp), "proj_out": (hidden + mlp, hidden),
              "norm.linear": (hidden, 3 * hidden)}
    sd = {}
    for prefix, names, count in (("blocks", ELIGEN_DOUBLE, len(dit.transformer_blocks)),
                                 ("single_blocks", ELIGEN_SINGLE, len(dit.single_transformer_blocks))):
        for i in range(count):
            for name in names:
                inp, out = shapes[name]
                sd[f"{prefix}.{i}.{name}.lora_A.default.weight"] = torch.randn(rank, inp, generator=g) * 0.1
                sd[f"{prefix}.{i}.{name}.lora_B.default.weight"] = torch.randn(out, rank, generator=g) * 0.1
    return sd


def style_lora(dit, rank=4, seed=1):
    """Another LoRA, diffusers/PEFT keys, on the image-stream attention and the single blocks' output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in dit.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")) or (name.startswith("single") and name.endswith("proj_out")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


def test_eligen_lora_format_binds_every_layer(pipe, tmp_path):
    from engine.lora import read_lora
    path = tmp_path / "model_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in eligen_lora(pipe.dit).items()}, str(path))
    info = read_lora(path)
    assert info.format == "DiffSynth"
    # 10 DiffSynth modules per double block -> 14 diffusers layers (fused q|k|v split), 3 per single block -> 6.
    assert len(info.targets) == 14 * len(pipe.dit.transformer_blocks) + 6 * len(pipe.dit.single_transformer_blocks)
    assert not info.unmapped and not info.problems


def test_mask_stays_in_force_with_the_eligen_lora_and_another(pipe, tmp_path):
    eligen_path, style_path = tmp_path / "eligen.safetensors", tmp_path / "style.safetensors"
    save_file(eligen_lora(pipe.dit), str(eligen_path))
    save_file(style_lora(pipe.dit), str(style_path))
    kw = dict(eligen_entity_prompts=ENTITIES, eligen_entity_masks=masks_lr())
    no_lora = arr(gen(pipe, **kw))
    try:
        for path in (eligen_path, style_path):
            rep = pipe.load_lora(pipe.dit, str(path), alpha=1.0, verbose=0)
            assert rep["bound"] == rep["total"] > 0
        # Every attention call of every block and step gets EliGen's mask.
        log = []
        with processors(pipe.dit, lambda n, p: Recorder(p, log)):
            with_mask = arr(gen(pipe, **kw))
        blocks = len(pipe.dit.transformer_blocks) + len(pipe.dit.single_transformer_blocks)
        assert len(log) == blocks * STEPS
        expected = joint_attention_mask(em.entity_token_regions(masks_lr(), H, W), T5_LEN)
        for m in log:
            assert m is not None and torch.equal(m[0, 0] == 0, expected)
        assert np.array_equal(arr(gen(pipe, **kw)), with_mask)                   # the recorder changed nothing
        assert np.abs(with_mask - no_lora).mean() > 0.05                         # the LoRAs act
        assert np.abs(with_mask - arr(gen(pipe))).mean() > 0.05                  # and so do the entities
        # The transformer with both LoRAs: the mask passed by EliGen equals attention masked by hand.
        assert_mask_equals_attention_by_hand(pipe, seed=5)
    finally:
        pipe.clear_lora(verbose=0)
    assert np.array_equal(arr(gen(pipe, **kw)), no_lora)


# ------------------------------------------------------------------------------------------------------ layouts
def test_layout_round_trip(tmp_path):
    masks = masks_lr()
    folder = save_layout(tmp_path / "layout", PROMPT, ENTITIES, masks, seed=7, negative_prompt="blurry")
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "prompts.json"]
    back = load_layout(folder)
    assert back["prompt"] == PROMPT and back["entity_prompts"] == ENTITIES and back["seed"] == 7
    assert back["negative_prompt"] == "blurry"
    assert all(np.array_equal(np.asarray(a.convert("L")), np.asarray(b.convert("L")))
               for a, b in zip(masks, back["entity_masks"]))
    with pytest.raises(EngineError, match="already holds"):
        save_layout(folder, PROMPT, ENTITIES, masks)
    with pytest.raises(EngineError, match="entity 2"):
        save_layout(tmp_path / "other", PROMPT, ENTITIES, masks[:1])


def test_layout_and_checks_need_no_torch():
    """The studio's tabs never import torch: the layout and input checks must not pull it in."""
    import subprocess
    import sys
    code = ("import sys; from engine.eligen.layout import save_layout, load_layout; "
            "from engine.eligen import check_entities, mask_notes; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parent.parent))


def test_mask_notes_say_when_a_mask_is_stretched():
    from engine.eligen import mask_notes
    assert mask_notes([box_mask(128, 128, (0, 0, 8, 8)), box_mask(100, 50, (0, 0, 8, 8))], 64, 64) == [
        "EliGen mask 2 (100x50) was stretched to the image's shape (64x64)."]
