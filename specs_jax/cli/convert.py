"""``specs-jax convert {hf-to-orbax,orbax-to-hf} SRC OUT_DIR [--dtype D] [--overwrite]``; ``orbax-to-hf`` also
takes a training checkpoint: ``RUN/checkpoints/STEP OUT_DIR`` or ``RUN OUT_DIR --step latest|best|N``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from specs_jax.model.config import DTYPES

HELP = """Convert Qwen2.5-VL checkpoints between Hugging Face safetensors and specs-jax Orbax.
Conversion streams tensor by tensor and writes to a temporary directory beside OUT_DIR that is
renamed into place only when everything is written; tokenizer and processor files are carried."""

TO_HF_HELP = HELP + """ SRC may be a specs-jax Orbax checkpoint or any checkpoint of a training run:
RUN/checkpoints/STEP, or RUN (train.output_dir) or its checkpoint directory with --step latest|best|N.
From a training checkpoint the trained and frozen parameters are joined and written with the run's
tokenizer, processor, chat template and generation config; the optimizer state is never read."""

# What an HF model directory needs besides config.json and the weights, by the files that provide it.
MODEL_FILES = {
    "tokenizer": ("tokenizer_config.json",),
    "processor": ("preprocessor_config.json",),
    "chat template": ("chat_template.jinja", "chat_template.json"),
    "generation config": ("generation_config.json",),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between HF and Orbax (any step of a training run to HF)",
                       description=HELP)
    kinds = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for name, src_help in (("hf-to-orbax", "HF model directory (config.json + safetensors)"),
                           ("orbax-to-hf", "specs-jax Orbax checkpoint directory, or a training checkpoint: "
                                           "RUN/checkpoints/STEP, or RUN with --step")):
        to_hf = name == "orbax-to-hf"
        k = kinds.add_parser(name, help=f"{src_help} -> {'HF' if to_hf else 'Orbax'}",
                             description=TO_HF_HELP if to_hf else HELP)
        k.add_argument("src", metavar="SRC", help=src_help)
        k.add_argument("out", metavar="OUT_DIR", help="output directory (must not exist or be empty)")
        k.add_argument("--dtype", choices=DTYPES, default=None,
                       help="cast parameters to this dtype (default: keep the source dtype, bit-exact)")
        k.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR after success")
        if to_hf:
            k.add_argument("--step", default=None, metavar="latest|best|N",
                           help="with SRC a run directory (train.output_dir) or its checkpoint directory: the step "
                                "to convert; best = the checkpoint kept by checkpoint.keep_best_metric")
            k.add_argument("--model", default=None, metavar="DIR",
                           help="training checkpoints: take config.json and the tokenizer/processor files from this "
                                "model directory instead of the run's record (runs written before specs-jax "
                                "recorded their model, or a preset run without tokenizer files)")
            k.add_argument("--max-shard-size", default="5GiB", metavar="SIZE",
                           help="largest safetensors file, e.g. 4GB (the published Qwen2.5-VL repositories' shards "
                                "are about 4 GB) or 500MB; a larger model is written as "
                                "model-0000k-of-0000n.safetensors plus model.safetensors.index.json (default: 5GiB)")
        k.set_defaults(run=run)


def missing_model_files(out: Path) -> list[str]:
    """What of :data:`MODEL_FILES` an HF directory lacks (a chat template inside tokenizer_config.json counts)."""
    import json

    missing = [what for what, files in MODEL_FILES.items() if not any((out / f).is_file() for f in files)]
    if "chat template" in missing and (out / "tokenizer_config.json").is_file():
        if json.loads((out / "tokenizer_config.json").read_text()).get("chat_template"):
            missing.remove("chat template")
    return missing


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
        print(f"wrote {out} ({args.direction}) in {time.perf_counter() - start:.1f}s")
        return 0
    from specs_jax.convert.training import resolve_reference

    source = resolve_reference(args.src, args.step)  # a run's latest/best -> that step, named in the summary
    out = orbax_to_hf(source, args.out, dtype=args.dtype, overwrite=args.overwrite, model=args.model,
                      max_shard_bytes=shard_bytes(args.max_shard_size))
    print(f"wrote {out} ({args.direction} of {source}) in {time.perf_counter() - start:.1f}s")
    missing = missing_model_files(Path(out))
    if missing:
        print(f"note: {out} holds config.json and the weights, but no {', '.join(missing)}: the source model "
              f"had none (e.g. a run from a model preset). Copy them from the tokenizer's directory, or pass "
              f"--model DIR to take them from a model directory.")
    return 0
