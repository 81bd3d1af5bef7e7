"""DiffSynth-Studio's Nexus-GenV2 (``DiffSynth-Studio/Nexus-GenV2``) on the pinned transformers (5.x).

Files and what they become:

- ``model*.safetensors`` (+ ``processor/``): the autoregressive Qwen2.5-VL with ``vision_head`` (Linear 3584 -> 3584,
  no bias) and ``image_prefill_embeds`` (Embedding 81 x 3584) -> ``ar_model.NexusGenAR``, slot ``nexus_gen``;
- ``generation_decoder.bin``: ``pipe.dit.*`` (a FLUX.1-dev DiT in DiffSynth-native names) + ``adapter.*`` ->
  slots ``dit`` and ``nexus_gen_generation_adapter`` (``decoders.NexusGenAdapter``);
- ``edit_decoder.bin``: ``pipe.dit.*`` + ``embedding_merger.*`` -> ``dit`` and ``nexus_gen_editing_adapter``
  (``decoders.NexusGenEmbeddingMerger``).

Porting the seed's AR code from transformers 4.49 (its pin) to transformers 5:

- key layout: 4.49's ``Qwen2_5_VLForConditionalGeneration`` kept ``model.*`` (language model), ``visual.*`` and
  ``lm_head.*``; in 5 they are ``model.language_model.*``, ``model.visual.*``, ``lm_head.*``
  (``engine.step1x.encoder.convert_qwen_vl``); ``vision_head.*`` / ``image_prefill_embeds.*`` stay at the top.
  The seed wraps the model once more (its converter adds ``model.``); the files hold the unwrapped keys.
- ``get_rope_index`` moved from the ForConditionalGeneration class to ``Qwen2_5_VLModel`` (``model.model``) and
  takes ``mm_token_type_ids`` (1 at image tokens) as its second argument; a still image's temporal index no longer
  multiplies by ``tokens_per_second`` (t = 0 for images either way, so the positions are the same).
- the vision tower returns a ``BaseModelOutputWithPooling``: the merged image tokens are its ``pooler_output``
  (4.49 returned them as a tensor); the language model is ``model.model.language_model``, its output after the
  final norm ``last_hidden_state`` (4.49: ``outputs[0]`` of ``model.model``).
- rotary ``inv_freq`` buffers are not persistent and are rebuilt after meta-device assembly; ``rope_scaling`` of
  the published config is read as ``rope_parameters``.
- the processor: the seed ships its own copy of 4.49's ``Qwen2_5_VLProcessor``; here transformers 5's processor
  from the ``processor/`` folder (``engine.step1x.encoder.load_processor`` with the folder's own pixel bounds;
  without torchvision its video processor cannot be built, so an image-only processor is assembled).
- ``smart_resize`` comes from transformers' Qwen2-VL image processor (the seed imports ``qwen_vl_utils``).
"""
