"""Small random-weight models in the official file layouts, one module per family, one writer.

They let the studio run every control on a machine without weights (``--demo``) and let the tests drive the real
loading code, which infers architectures from tensor shapes. Images made with them are noise.

- ``flux1``: FLUX.1-dev (transformer, autoencoder, CLIP-L, T5), ``write_demo_model``
- ``inpaint``: FLUX.1-Fill-dev and Flex.2-preview transformers, ``write_inpaint_demos``
- ``step1x``: Step1X-Edit (DiT + connector, Qwen2.5-VL), ``write_step1x_demo``
- ``controlnet``: the three ControlNet layouts, ``write_controlnet_demos``
- ``redux``: FLUX.1-Redux (SigLIP vision tower + image embedder), ``write_redux_demo``
- ``ipadapter``: InstantX's IP-Adapter (ip-adapter.bin + a whole SigLIP model), ``write_ipadapter_demo``
- ``flux2``: FLUX.2 [klein] 4B (transformer/, vae/, text_encoder/ Qwen3, tokenizer/), ``write_flux2_demo``
- ``flux2_loras``: random FLUX.2 LoRAs for that demo, one file per format (diffusers, DiffSynth, kohya, ai-toolkit),
  ``write_flux2_demo_loras``
- ``flux3``: FLUX 3 Image Klein, step-distilled and base (model.safetensors, transformer/, text_encoder/ Qwen3-VL with
  its tokenizer, vae/), ``write_flux3_demo``
- ``flux3_loras``: random FLUX 3 LoRAs for that demo, one file per format (diffusers, BFL, kohya, DiffSynth),
  ``write_flux3_demo_loras``
- ``flux3_pup``: BFL's FLUX 3 prompt upsampler (Qwen3.5: config.json, model.safetensors, tokenizer, processor JSON,
  chat template), ``write_flux3_pup_demo``
- ``infiniteyou``: ByteDance InfiniteYou (image_proj_model.bin + InfuseNet), ``write_infiniteyou_demo``
- ``lora_encoder``: DiffSynth-Studio's LoRA Encoder (model.safetensors), ``write_lora_encoder_demo``
- ``nexus_gen``: Nexus-GenV2 (AR Qwen2.5-VL + processor/, generation_decoder.bin, edit_decoder.bin),
  ``write_nexus_gen_demo``
- ``files``: the one writer: once, atomically, one process at a time; safetensors, JSON, stamps and markers
- ``weights``: seeded random tensors (``RandomWeights``), one stream per component
- ``tokenizers``: CLIP BPE and T5 Unigram tokenizers trained offline on a built-in text
- ``convert``: BFL -> diffusers keys for the FLUX.1 demo's diffusers copy

Nothing here imports torch at import time. Family modules with clashing names (``demo_file``, ``VERSION``) are
reached as submodules: ``engine.demo.controlnet.demo_file``.
"""
from .controlnet import controlnet_state_dict, demo_model_id, write_controlnet_demo, write_controlnet_demos
from .convert import bfl_to_diffusers_transformer, bfl_to_diffusers_vae
from .files import (demo_stamp, has_stamp, read_marker, save_safetensors, write_file_once, write_folder_once,
                    write_json, write_safetensors_once)
from .flux1 import (AE, CLIP, DEMO_DIFFUSERS_FILES, DEMO_FILES, DEMO_MODEL_ID, DEMO_VERSION, MARKER_NAME, T5,
                    TRANSFORMER, bfl_ae_state_dict, bfl_transformer_state_dict, clip_config, clip_state_dict,
                    demo_dir, demo_files, demo_marker, diffusers_transformer_config, diffusers_vae_config,
                    is_demo_complete, t5_config, t5_state_dict, write_demo_model)
from .flux2 import flux2_demo_dir, flux2_demo_files, write_flux2_demo
from .flux2_loras import write_flux2_demo_loras
from .flux3 import flux3_demo_dir, flux3_demo_files, write_flux3_demo
from .flux3_loras import write_flux3_demo_loras
from .flux3_pup import flux3_pup_demo_dir, write_flux3_pup_demo
from .infiniteyou import write_infiniteyou_demo
from .inpaint import write_inpaint_demo, write_inpaint_demos
from .ipadapter import write_ipadapter_demo
from .lora_encoder import write_lora_encoder_demo
from .nexus_gen import nexus_gen_demo_dir, write_nexus_gen_demo
from .redux import write_redux_demo
from .step1x import step1x_demo_dir, step1x_demo_files, write_step1x_demo
from .weights import RandomWeights
