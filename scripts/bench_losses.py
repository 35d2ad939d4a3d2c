"""Benchmark token log-probs from logits vs the vocabulary-chunked variant from hidden states.

Both variants compute value and gradient (w.r.t. the hidden states and the lm-head weight) of
``sum(g * logp(labels))`` including the lm-head matmul:

- ``logits``:  ``token_logps(hidden @ W.T, labels)``, materialising ``[B, T, V]`` logits;
- ``chunked``: ``token_logps_from_hidden(hidden, W, labels, chunk_size=...)``.

Memory is measured for each variant in a fresh process (so one cannot inherit the other's
allocations): the XLA temp allocation of the compiled program (``memory_analysis()``) and the peak
resident-memory increase during one step (sampled from /proc/self/statm, Linux). Time is the
median and minimum over ``--repeats`` steps of each variant, run in alternation in one process so
both see the same machine load. Example::

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
from typing import Any

VARIANTS = ("logits", "chunked")


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


def _build(variant: str, args: argparse.Namespace) -> tuple[Any, tuple[Any, Any]]:
    """(compiled value-and-grad step, (hidden, weight)) for one variant."""
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
    return compiled, (hidden, weight)


def _measure_memory(variant: str, args: argparse.Namespace, results: mp.Queue) -> None:
    """In a fresh process: XLA temp/output sizes and the peak RSS increase of one step."""
    import jax

    compiled, inputs = _build(variant, args)
    memory = compiled.memory_analysis()
    baseline = _rss_bytes()
    (value, _), peak = _call_with_peak_rss(lambda: jax.block_until_ready(compiled(*inputs)))
    results.put(
        {
            "temp": memory.temp_size_in_bytes,
            "out": memory.output_size_in_bytes,
            "rss": peak - baseline,
            "value": float(value),
        }
    )


def _measure_time(args: argparse.Namespace, results: mp.Queue) -> None:
    """Both variants in one process, timed in alternation so that they see the same machine load."""
    import jax

    steps = {variant: _build(variant, args) for variant in VARIANTS}
    for compiled, inputs in steps.values():
        jax.block_until_ready(compiled(*inputs))  # warm-up
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for variant, (compiled, inputs) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times[variant].append(time.perf_counter() - start)
    results.put(times)


def _in_fresh_process(target: Callable[..., None], *args: object) -> Any:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant after a warm-up (default 3)")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    rows = {variant: _in_fresh_process(_measure_memory, variant, args) for variant in VARIANTS}
    times = _in_fresh_process(_measure_time, args)
    mib = 2**20
    print(
        f"B={args.batch} T={args.seq_len} H={args.hidden} V={args.vocab} chunk={args.chunk_size} "
        f"dtype={args.dtype}: value+grad of sum(g * token log-probs) incl. the lm-head matmul"
    )
    print(f"{'variant':<8} {'XLA temp MiB':>12} {'outputs MiB':>11} {'peak RSS+ MiB':>13} {'median s':>8} {'min s':>7}")
    for name, r in rows.items():
        median, fastest = statistics.median(times[name]), min(times[name])
        print(
            f"{name:<8} {r['temp'] / mib:>12.1f} {r['out'] / mib:>11.1f} {r['rss'] / mib:>13.1f} "
            f"{median:>8.2f} {fastest:>7.2f}"
        )
    plain, chunked = rows["logits"], rows["chunked"]
    print(
        f"logits/chunked ratios: XLA temp {plain['temp'] / max(chunked['temp'], 1):.1f}x, "
        f"peak RSS increase {plain['rss'] / max(chunked['rss'], 1):.1f}x, "
        f"median time {statistics.median(times['logits']) / statistics.median(times['chunked']):.2f}x "
        f"(> 1: chunked is faster); |loss difference| {abs(plain['value'] - chunked['value']):.3g}"
    )


if __name__ == "__main__":
    main()
