"""Benchmark token log-probs from logits vs the vocabulary-chunked variant from hidden states.

Both variants compute value and gradient (w.r.t. the hidden states and the lm-head weight) of
``sum(g * logp(labels))`` including the lm-head matmul:

- ``logits``:  ``token_logps(hidden @ W.T, labels)``, materialising ``[B, T, V]`` logits;
- ``chunked``: ``token_logps_from_hidden(hidden, W, labels, chunk_size=...)``.

Each variant runs in a fresh process (so one cannot inherit the other's allocations) and reports
the XLA temp allocation of the compiled program (``memory_analysis().temp_size_in_bytes``), the
peak resident-memory increase while it runs (sampled from /proc/self/statm, Linux), and the
median wall time of the jitted step. Example::

    python scripts/bench_losses.py --batch 1 --seq-len 2048 --hidden 896 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Callable


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _call_with_peak_rss(fn: Callable[[], object], interval_s: float = 0.002) -> tuple[object, int]:
    """``(fn(), peak resident set size in bytes while it ran)``, sampled in a background thread."""
    peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak, _rss_bytes())


def _measure(variant: str, args: argparse.Namespace, results: mp.Queue) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from specs_jax.losses import token_logps, token_logps_from_hidden

    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(args.batch, args.seq_len, args.hidden)), dtype)
    weight = jnp.asarray(rng.normal(size=(args.vocab, args.hidden)) / np.sqrt(args.hidden), dtype)
    labels = jnp.asarray(rng.integers(0, args.vocab, size=(args.batch, args.seq_len)), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(args.batch, args.seq_len)), jnp.float32)

    if variant == "logits":

        def objective(h: jax.Array, w: jax.Array) -> jax.Array:
            logits = jnp.einsum("bth,vh->btv", h, w, preferred_element_type=jnp.float32)
            return jnp.sum(cot * token_logps(logits, labels, args.temperature))

    else:

        def objective(h: jax.Array, w: jax.Array) -> jax.Array:
            logps = token_logps_from_hidden(h, w, labels, args.temperature, chunk_size=args.chunk_size)
            return jnp.sum(cot * logps)

    compiled = jax.jit(jax.value_and_grad(objective, argnums=(0, 1))).lower(hidden, weight).compile()
    memory = compiled.memory_analysis()
    baseline = _rss_bytes()
    (value, _), peak = _call_with_peak_rss(lambda: jax.block_until_ready(compiled(hidden, weight)))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(hidden, weight))
        times.append(time.perf_counter() - start)
    results.put(
        {
            "variant": variant,
            "temp": memory.temp_size_in_bytes,
            "out": memory.output_size_in_bytes,
            "rss": peak - baseline,
            "time": statistics.median(times),
            "value": float(value),
        }
    )


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="T (default 2048)")
    parser.add_argument("--hidden", type=int, default=896, help="H, hidden width (default 896)")
    parser.add_argument("--vocab", type=int, default=151_936, help="V (default 151936, Qwen2.5-VL)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="vocabulary rows per chunk (default 8192)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden/weight dtype")
    parser.add_argument("--temperature", type=float, default=1.0, help="logit temperature (default 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first (default 3)")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    ctx = mp.get_context("spawn")
    rows = {}
    for variant in ("logits", "chunked"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(variant, args, queue))
        proc.start()
        rows[variant] = queue.get()
        proc.join()
    mib = 2**20
    print(
        f"B={args.batch} T={args.seq_len} H={args.hidden} V={args.vocab} chunk={args.chunk_size} "
        f"dtype={args.dtype}: value+grad of sum(g * token log-probs) incl. the lm-head matmul"
    )
    print(f"{'variant':<9} {'XLA temp MiB':>13} {'outputs MiB':>12} {'peak RSS+ MiB':>14} {'median s':>9}  value")
    for name, r in rows.items():
        print(
            f"{name:<9} {r['temp'] / mib:>13.1f} {r['out'] / mib:>12.1f} {r['rss'] / mib:>14.1f} {r['time']:>9.3f}  {r['value']:.6g}"
        )
    plain, chunked = rows["logits"], rows["chunked"]
    print(
        f"ratios logits/chunked: XLA temp {plain['temp'] / max(chunked['temp'], 1):.1f}x, "
        f"peak RSS increase {plain['rss'] / max(chunked['rss'], 1):.1f}x, time {plain['time'] / chunked['time']:.2f}x "
        f"(>1 means chunked is faster); |value difference| {abs(plain['value'] - chunked['value']):.3g}"
    )


if __name__ == "__main__":
    main()
