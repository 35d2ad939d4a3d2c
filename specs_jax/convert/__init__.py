"""Checkpoint conversion: HF safetensors <-> specs-jax Orbax, and model loading/saving."""

from specs_jax.convert.io import (CheckpointError, hf_to_orbax, load_model, orbax_to_hf, save_model)

__all__ = ["CheckpointError", "hf_to_orbax", "load_model", "orbax_to_hf", "save_model"]
