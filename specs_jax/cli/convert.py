"""``specs-jax convert {hf-to-orbax,orbax-to-hf} SRC OUT_DIR [--dtype D] [--overwrite]``."""

from __future__ import annotations

import argparse
import time

from specs_jax.model.config import DTYPES

HELP = """Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and specs-jax Orbax.
Conversion streams tensor by tensor and writes to a temporary directory beside OUT_DIR that is
renamed into place only when everything is written; tokenizer and processor files are carried."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between HF and Orbax", description=HELP)
    kinds = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for name, src_help in (("hf-to-orbax", "HF model directory (config.json + safetensors)"),
                           ("orbax-to-hf", "specs-jax Orbax checkpoint directory")):
        k = kinds.add_parser(name, help=f"{src_help} -> {'Orbax' if name == 'hf-to-orbax' else 'HF'}",
                             description=HELP)
        k.add_argument("src", metavar="SRC_DIR", help=src_help)
        k.add_argument("out", metavar="OUT_DIR", help="output directory (must not exist or be empty)")
        k.add_argument("--dtype", choices=DTYPES, default=None,
                       help="cast parameters to this dtype (default: keep the source dtype, bit-exact)")
        k.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR after success")
        k.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from specs_jax.convert.io import hf_to_orbax, orbax_to_hf

    convert = hf_to_orbax if args.direction == "hf-to-orbax" else orbax_to_hf
    start = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({args.direction}) in {time.perf_counter() - start:.1f}s")
    return 0
