"""BFL -> diffusers layouts for the demo's diffusers copy (``transformer/``, ``vae/``): the same weights under
diffusers' key names, so BFL-path and diffusers-path loads can be compared for parity.

The key mapping takes widths from the tensors: diffusers' own BFL converter assumes the full width (3072) when it
splits the fused qkv, so it cannot convert the tiny demo.
"""
from __future__ import annotations

import contextlib
import pathlib
import re


def bfl_to_diffusers_transformer(sd):
    """BFL transformer keys -> diffusers ``FluxTransformer2DModel`` keys; widths are taken from the tensors."""
    import torch

    out = {}
    h = sd["img_in.weight"].shape[0]

    def cp(src, dst):
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    cp("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    cp("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    cp("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    cp("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    cp("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    cp("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    cp("txt_in", "context_embedder")
    cp("img_in", "x_embedder")
    n_double = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    for i in range(n_double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        cp(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        cp(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for s in ("weight", "bias"):
            q, k, v = sd[f"{b}.img_attn.qkv.{s}"].split(h, dim=0)
            out[f"{d}.attn.to_q.{s}"], out[f"{d}.attn.to_k.{s}"], out[f"{d}.attn.to_v.{s}"] = q, k, v
            q, k, v = sd[f"{b}.txt_attn.qkv.{s}"].split(h, dim=0)
            out[f"{d}.attn.add_q_proj.{s}"], out[f"{d}.attn.add_k_proj.{s}"], out[f"{d}.attn.add_v_proj.{s}"] = q, k, v
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
        cp(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        cp(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        cp(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        cp(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        cp(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        cp(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(n_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for s in ("weight", "bias"):
            t = sd[f"{b}.linear1.{s}"]
            q, k, v, m = t.split([h, h, h, t.shape[0] - 3 * h], dim=0)
            out[f"{d}.attn.to_q.{s}"], out[f"{d}.attn.to_k.{s}"], out[f"{d}.attn.to_v.{s}"] = q, k, v
            out[f"{d}.proj_mlp.{s}"] = m
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
        cp(f"{b}.linear2", f"{d}.proj_out")
        cp(f"{b}.modulation.lin", f"{d}.norm.linear")
    cp("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):  # BFL final adaLN gives (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{s}"].chunk(2, dim=0)
        out[f"norm_out.linear.{s}"] = torch.cat([scale, shift], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def bfl_to_diffusers_vae(sd, num_levels: int):
    """BFL autoencoder keys -> diffusers ``AutoencoderKL`` keys (1x1 conv attention -> linear)."""
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", n)
        n = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", n)
        n = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                   lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.", n)
        n = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                   lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", n)
        n = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", n)
        n = n.replace(".mid.attn_1.", ".mid_block.attentions.0.")
        n = n.replace(".nin_shortcut.", ".conv_shortcut.")
        n = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", n)
        if ".mid_block.attentions.0." in n:
            n = n.replace(".attentions.0.norm.", ".attentions.0.group_norm.")
            n = re.sub(r"\.attentions\.0\.(q|k|v)\.", r".attentions.0.to_\1.", n)
            n = n.replace(".attentions.0.proj_out.", ".attentions.0.to_out.0.")
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        out[n] = v.contiguous()
    return out


def transformer_config(c: dict) -> dict:
    """``FluxTransformer2DModel`` arguments for a BFL transformer config (``flux1.TRANSFORMER``'s keys)."""
    return dict(
        patch_size=1,
        in_channels=c["in_channels"],
        out_channels=None,
        num_layers=c["depth"],
        num_single_layers=c["depth_single_blocks"],
        attention_head_dim=c["head_dim"],
        num_attention_heads=c["num_heads"],
        joint_attention_dim=c["context_in_dim"],
        pooled_projection_dim=c["vec_in_dim"],
        guidance_embeds=c["guidance_embed"],
        axes_dims_rope=tuple(c["axes_dim"]),
    )


def vae_config(c: dict) -> dict:
    """``AutoencoderKL`` arguments for a BFL autoencoder config (``flux1.AE``'s keys)."""
    n = len(c["ch_mult"])
    return dict(
        in_channels=c["in_channels"],
        out_channels=c["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c["ch"] * m for m in c["ch_mult"]),
        layers_per_block=c["num_res_blocks"],
        act_fn="silu",
        latent_channels=c["z_channels"],
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=c["scale_factor"],
        shift_factor=c["shift_factor"],
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def write_diffusers(root: pathlib.Path, dit_sd, ae_sd, dit_cfg: dict, vae_cfg: dict, shards: list) -> None:
    """Write ``transformer/`` and ``vae/`` under ``root`` with diffusers' own ``save_pretrained``, holding the same
    weights as the BFL state dicts (the VAE rounded to BF16). The configs are the diffusers models' arguments
    (``transformer_config``, ``vae_config``); the transformer goes into the shard files named ``shards``."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):  # no init work: every parameter is assigned from the converted BFL weights
        dit = FluxTransformer2DModel(**dit_cfg)
        vae = AutoencoderKL(**vae_cfg)
    dit.load_state_dict(bfl_to_diffusers_transformer(dit_sd), strict=True, assign=True)
    vae_sd = bfl_to_diffusers_vae(ae_sd, len(vae_cfg["block_out_channels"]))
    vae_sd = {k: v.to(torch.bfloat16) for k, v in vae_sd.items()}
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    for m in (dit, vae):
        bad = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.is_meta]
        if bad:
            raise RuntimeError(f"demo: diffusers model left on meta: {bad[:5]}")
    # Two shards like the real three-shard transformer/ (load through the index, never by shard name).
    total = sum(v.numel() * v.element_size() for v in dit_sd.values())
    with contextlib.redirect_stdout(None):
        dit.save_pretrained(root / "transformer", safe_serialization=True, max_shard_size=int(total * 0.6))
        vae.save_pretrained(root / "vae", safe_serialization=True)
    got = sorted(p.name for p in (root / "transformer").glob("*.safetensors"))
    want = sorted(shards)
    if got != want:
        raise RuntimeError(f"demo: diffusers wrote transformer shards {got}, expected {want}")
