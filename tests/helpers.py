"""Helpers shared by tests: models folders laid out like the real repositories, made from the demo files."""
import json
import math
import os
import pathlib
import shutil
import struct

DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8}

OFFICIAL_FILES = ("flux1-dev.safetensors", "ae.safetensors", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def official_models_dir(root, demo_dir, variants=("black-forest-labs/FLUX.1-dev",), dit_names=None) -> pathlib.Path:
    """A models folder where the demo's files sit under the real repositories' names.

    ``dit_names`` maps a model id to the transformer file name it should hold (default flux1-dev.safetensors).
    Files are linked, not copied, so this is cheap.
    """
    root = pathlib.Path(root)
    dit_names = dit_names or {}
    for model_id in variants:
        target = root / model_id
        target.mkdir(parents=True, exist_ok=True)
        for name in OFFICIAL_FILES:
            src = pathlib.Path(demo_dir) / name
            dst = target / (dit_names.get(model_id, name) if name == "flux1-dev.safetensors" else name)
            if dst.exists() or dst.is_symlink():
                continue
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=os.link)
            else:
                os.link(src, dst)
    return root


def write_sparse_safetensors(tensors: dict, path) -> None:
    """A header-exact safetensors file of ``{key: {"shape", "dtype"}}`` (a manifest's ``tensors``) whose data is a
    hole: the real size, almost no disk, reads as zeros. It exercises the real file-reading path at full size."""
    hdr, off = {}, 0
    for k, v in sorted(tensors.items()):
        n = math.prod(v["shape"]) * DTYPE_BYTES[v["dtype"]]
        hdr[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)


def linked_models(root: pathlib.Path, demo_dir: pathlib.Path) -> pathlib.Path:
    """A models folder of its own holding the session's demo model (hard links: no second write)."""
    target = root / demo_dir.relative_to(demo_dir.parents[1])
    shutil.copytree(demo_dir, target, copy_function=os.link)
    return root


def smooth_photo(w, h, seed):
    """A smooth random image (VAE-friendly), as PIL RGB."""
    import numpy as np
    from PIL import Image
    small = np.random.RandomState(seed).rand(max(1, h // 8), max(1, w // 8), 3) * 255
    return Image.fromarray(small.astype("uint8")).resize((w, h), Image.BICUBIC)


def box_mask(w, h, box):
    """An "L" mask: 255 inside ``box``, 0 elsewhere."""
    from PIL import Image
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def as_int16(img):
    import numpy as np
    return np.asarray(img, dtype=np.int16)


def no_bar(x):
    """A progress_bar_cmd that shows nothing."""
    return x


def tiny_flux_modules(tokenizers, text_width: int = 32) -> dict:
    """Small random FLUX.1 components built directly from the library classes (independent of our loader): CLIP
    (pooled 64), T5 (width ``text_width``), a 2+2-block transformer and a 4-level VAE, for parity tests."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    tok1, tok2 = tokenizers
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok1), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act="quick_gelu", eos_token_id=2)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=text_width, d_kv=16, d_ff=64, num_layers=2,
                                 num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    dit = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=text_width,
                                 pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()
    with torch.no_grad():   # diffusers zero-initialises output projections: random ones make parity meaningful
        for p in dit.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.02)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return {"dit": dit, "vae": vae, "text_encoder_1": clip, "text_encoder_2": t5}


def demo_pipeline(demo_dir):
    """The random-weight demo model as a float32 CPU pipeline, loaded from its official files."""
    import torch
    from engine import FluxImagePipeline, ModelConfig
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=demo_dir / "flux1-dev.safetensors"), ModelConfig(path=demo_dir / "ae.safetensors"),
                       ModelConfig(path=demo_dir / "text_encoder" / "model.safetensors"),
                       ModelConfig(path=demo_dir / "text_encoder_2")],
        tokenizer_1_config=ModelConfig(path=demo_dir / "tokenizer"),
        tokenizer_2_config=ModelConfig(path=demo_dir / "tokenizer_2"))
