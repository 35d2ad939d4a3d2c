"""``specs-jax init --preset NAME OUT_DIR``: a randomly initialised model from a preset, saved as HF or Orbax."""

from __future__ import annotations

import argparse

from specs_jax.model.config import DTYPES, list_presets


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a randomly initialised model from a preset",
                       description="Create a Qwen2.5-VL model with random weights from an architecture preset in "
                                   "models/ and save it (HF safetensors or specs-jax Orbax). Useful for tests, "
                                   "benchmarks and for starting the tiny CPU pipeline.")
    p.add_argument("out", metavar="OUT_DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--preset", default="tiny", choices=list_presets(), help="architecture preset (default: tiny)")
    p.add_argument("--format", choices=["hf", "orbax"], default="hf", help="checkpoint format (default: hf)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default: float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import jax
    from flax import nnx

    from specs_jax.convert.io import save_model
    from specs_jax.model import Qwen2_5_VLForConditionalGeneration, load_preset

    cfg = load_preset(args.preset, dtype=args.dtype)
    model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(args.seed))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = save_model(model, args.out, fmt=args.format, overwrite=args.overwrite)
    print(f"wrote {args.preset} ({n / 1e6:.1f}M parameters, {args.dtype}) as {args.format} to {out}")
    return 0
