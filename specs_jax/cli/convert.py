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
        if name == "orbax-to-hf":
            k.add_argument("--max-shard-size", default="5GiB", metavar="SIZE",
                           help="largest safetensors file, e.g. 4GB (the published Qwen2.5-VL repositories' shards "
                                "are about 4 GB) or 500MB; a larger model is written as "
                                "model-0000k-of-0000n.safetensors plus model.safetensors.index.json (default: 5GiB)")
        k.set_defaults(run=run)


def shard_bytes(size: str) -> int:
    """``--max-shard-size`` in bytes, read as transformers' ``max_shard_size`` (``4GB`` = 4e9, ``5GiB`` = 5*2**30)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size.strip())
    except (ValueError, TypeError):
        value = None
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"--max-shard-size {size!r}: expected a size such as 4GB, 500MB or 5GiB")
    return value


def run(args: argparse.Namespace) -> int:
    from specs_jax.convert.io import hf_to_orbax, orbax_to_hf

    start = time.perf_counter()
    if args.direction == "hf-to-orbax":
        out = hf_to_orbax(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = orbax_to_hf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                          max_shard_bytes=shard_bytes(args.max_shard_size))
    print(f"wrote {out} ({args.direction}) in {time.perf_counter() - start:.1f}s")
    return 0
