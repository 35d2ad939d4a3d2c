"""Flax NNX Qwen2.5-VL (vision tower + M-RoPE Qwen2 decoder) with HF parameter names."""

from specs_jax.model.attention import Segments
from specs_jax.model.config import (ConfigError, ModelConfig, TextConfig, VisionConfig, from_hf_dict, list_presets,
                                    load_config, load_preset)
from specs_jax.model.positions import get_rope_index, image_rows, row_patches, vision_layout
from specs_jax.model.qwen2_5_vl import (KVCache, ModelInputs, Qwen2_5_VLForConditionalGeneration, VisionInputs,
                                        prepare_inputs, row_vision_inputs)

__all__ = [
    "Segments",
    "ConfigError", "ModelConfig", "TextConfig", "VisionConfig", "from_hf_dict", "list_presets", "load_config",
    "load_preset", "get_rope_index", "image_rows", "row_patches", "vision_layout", "KVCache", "ModelInputs",
    "Qwen2_5_VLForConditionalGeneration",
    "VisionInputs", "prepare_inputs", "row_vision_inputs",
]
