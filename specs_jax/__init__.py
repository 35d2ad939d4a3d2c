"""specs-jax: post-training Qwen2.5-VL in JAX/Flax NNX with SPECS and on-policy self-distillation.

Top-level API (imported lazily so that ``import specs_jax.losses`` stays light):

- :func:`load_model` -- load a Qwen2.5-VL model from an HF directory or an Orbax checkpoint.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_model":
        from specs_jax.convert.io import load_model

        return load_model
    raise AttributeError(f"module 'specs_jax' has no attribute {name!r}")
