#!/usr/bin/env python
"""Measure the peak RSS of checkpoint conversion on a generated checkpoint of at least 1 GB.

Writes a random Qwen2.5-VL-architecture HF checkpoint (fp32 safetensors by default, ~2.1 GB), then
runs ``specs-jax convert hf-to-orbax`` and ``specs-jax convert orbax-to-hf`` each in a fresh
process and reports the child's peak resident set size (``ru_maxrss``) against the checkpoint size,
together with the RSS of a process that only imports the same libraries (the fixed cost of
Python + JAX + Orbax). Target: peak RSS under 1.5x the checkpoint size. Also checks that the
round trip is bit-exact.

    python scripts/bench_convert_memory.py                                # 2.1 GB fp32
    python scripts/bench_convert_memory.py --dtype bfloat16 --layers 48   # 2.1 GB bf16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# VmHWM (this process image's peak RSS; unlike ru_maxrss it does not inherit the parent's peak
# across fork+exec).
MEASURE = """
import re, sys
from specs_jax.cli.main import main
import orbax.checkpoint, jax  # same imports as a conversion
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
sys.exit(code)
"""


def make_checkpoint(path: Path, args) -> int:
    """Write a random checkpoint tensor by tensor (never more than one tensor in memory)."""
    import jax.numpy as jnp

    from specs_jax.convert.io import hf_plan, param_specs, write_hf_weights
    from specs_jax.model import from_hf_dict

    hf = json.loads((Path(__file__).resolve().parents[1] / "models" / "tiny.json").read_text())
    hf.update(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
              num_attention_heads=args.hidden // 128, num_key_value_heads=2, vocab_size=args.vocab,
              tie_word_embeddings=False, torch_dtype=args.dtype,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    hf["vision_config"].update(out_hidden_size=args.hidden)
    cfg = from_hf_dict(hf)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    rng = np.random.default_rng(0)
    dtype = np.dtype(jnp.dtype(args.dtype))
    plan = hf_plan(cfg, {key: dtype for key in param_specs(cfg)})
    # 256 MB shards, one state entry generated at a time.
    write_hf_weights(path, plan, lambda key: rng.standard_normal(param_specs(cfg)[key].shape, np.float32).astype(dtype),
                     max_shard_bytes=256 * 1024**2)
    return sum(int(np.prod(t.shape)) * dtype.itemsize for t in plan)


def peak_rss(*cli_args: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cli_args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="checkpoint dtype")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        size = make_checkpoint(work / "hf", args)
        gb = size / 1024**3
        print(f"checkpoint: {gb:.2f} GiB of {args.dtype} tensors ({args.layers} layers, hidden {args.hidden})")
        base = peak_rss()
        to_orbax = peak_rss("convert", "hf-to-orbax", str(work / "hf"), str(work / "orbax"))
        to_hf = peak_rss("convert", "orbax-to-hf", str(work / "orbax"), str(work / "hf_back"))
        for name, rss in (("imports only", base), ("hf-to-orbax", to_orbax), ("orbax-to-hf", to_hf)):
            print(f"{name:>13}: peak RSS {rss / 1024**3:5.2f} GiB = {rss / size:4.2f}x checkpoint "
                  f"({(rss - base) / size:4.2f}x above the imports)")
        from specs_jax.convert.io import hf_tensor_index
        from specs_jax.convert.safetensors_io import read_tensor

        a, b = hf_tensor_index(work / "hf"), hf_tensor_index(work / "hf_back")
        exact = a.keys() == b.keys() and all(read_tensor(a[k]).tobytes() == read_tensor(b[k]).tobytes() for k in a)
        print(f"round trip bit-exact: {exact}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
