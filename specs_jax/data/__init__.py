"""Data preparation for specs-jax."""

from specs_jax.data.pairs import PairConfig, PromptSamples, build_pairs, save_pairs

__all__ = ["PairConfig", "PromptSamples", "build_pairs", "save_pairs"]
