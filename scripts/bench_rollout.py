#!/usr/bin/env python
"""Rollout throughput on a skewed RL-like workload: the engine's continuous batching vs static batching.

A random Qwen2.5-VL text model (``--hidden``, ``--layers``, ``--vocab``); ``--prompts`` prompts x ``--group-size``
samples; a stop schedule caps every ``--long-every``-th prompt's samples at ``--long`` tokens and the others at
``--short`` (most rows end early, a few run to the limit). Both paths sample the same tokens (same seed; the
engine's results do not depend on the slot count), measured in one run:

- static: every sample in one decode batch (slots = samples) until the longest ends;
- engine: ``--slots`` decode slots, a freed slot takes the next pending sample.

Prints generated tokens/s of each, decode bytes moved per generated token against the bytes of the decoder
weights, and ends with ``engine/static tokens/s ratio: X.XX``.

    python scripts/bench_rollout.py
    python scripts/bench_rollout.py --prompts 16 --group-size 4 --short 32 --long 512 --long-every 8 --slots 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_forward.build_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--short", type=int, default=32, help="tokens of most samples")
    p.add_argument("--long", type=int, default=512, help="tokens of the long samples (the limit)")
    p.add_argument("--long-every", type=int, default=8, help="every N-th prompt's samples are long")
    p.add_argument("--slots", type=int, default=16, help="decode slots of the engine")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import specs_jax
    from bench_forward import build_config
    from specs_jax.sampling.benchmark import bench_rollout

    cfg = build_config(argparse.Namespace(hidden=args.hidden, layers=args.layers, vocab=args.vocab, vision_depth=1))
    torch.manual_seed(0)
    path = tempfile.mkdtemp()
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    r = bench_rollout(specs_jax.load_model(path), prompts=args.prompts, group_size=args.group_size,
                      prompt_len=args.prompt_len, short=args.short, long=args.long, long_every=args.long_every,
                      slots=args.slots, repeats=args.repeats)
    print(f"workload: {r['samples']} samples, {r['generated']} generated tokens (mean {r['length_mean']:.0f}, "
          f"max {r['length_max']}); decoder weights {r['weight_bytes'] / 2**20:.1f} MiB; "
          f"same tokens: {r['same_tokens']}")
    for name in ("static", "engine"):
        x = r[name]
        print(f"{name:>6}: {x['slots']:4d} slots, {x['iterations']:5d} decode iterations, {x['seconds']:7.2f} s, "
              f"{x['tokens_per_s']:8.1f} generated tokens/s; decode bytes/token {x['bytes_per_token'] / 2**20:7.2f} "
              f"MiB = {x['bytes_per_token_over_weights']:5.2f} x weights ({x['gb_per_s']:.1f} GB/s)")
    print(f"engine/static tokens/s ratio: {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
