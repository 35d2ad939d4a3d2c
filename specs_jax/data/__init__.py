"""Data preparation for specs-jax.

The pipeline (:mod:`specs_jax.data.pipeline`, grain), dataset formats (:mod:`specs_jax.data.formats`),
processor (:mod:`specs_jax.data.tokenizer`) and synthetic dataset (:mod:`specs_jax.data.synth`) names
are imported lazily on first access.
"""

from specs_jax.data.pairs import PairConfig, PromptSamples, build_pairs, save_pairs

_LAZY = {
    "specs_jax.data.pipeline": ("DataConfig", "Columns", "PAIR_COLUMNS", "load_rows", "rl_batches", "sft_batches",
                                "preference_batches"),
    "specs_jax.data.formats": ("FORMATS", "canonical_row", "detect_format", "flat_rows", "resolve_layout"),
    "specs_jax.data.inspect": ("inspect_rows",),
    "specs_jax.data.tokenizer": ("Processor", "ProcessorConfig", "build_processor", "load_processor",
                                 "model_token_fields"),
    "specs_jax.data.synth": ("SynthConfig", "synth_dataset", "save_synth"),
}

__all__ = ["PairConfig", "PromptSamples", "build_pairs", "save_pairs"]
__all__ += [n for names in _LAZY.values() for n in names]  # resolved by __getattr__


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'specs_jax.data' has no attribute {name!r}")
