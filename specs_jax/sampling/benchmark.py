"""The rollout benchmark of ``scripts/bench_rollout.py``: a skewed RL-like workload through static batching
(every sample in one decode batch until the longest ends: the sampler's behaviour before the engine) and through
the engine's continuous batching with fewer slots, in one run, on the same model and prompts.

Lengths are controlled by a stop schedule (:func:`skewed_caps`): each prompt's samples stop after its cap (the
model's EOS is never produced), most caps short, a few at the limit. Decode bytes per generated token
(:func:`decode_bytes`) count, per decode iteration, the weights read once plus the slots' whole KV cache (the
attention reads every slot position), divided by the tokens generated.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from specs_jax.sampling.engine import kv_bytes_per_token
from specs_jax.sampling.sample import SamplingParams
from specs_jax.sampling.sampler import Sampler, SamplerConfig


def skewed_caps(prompts: int, short: int, long: int, long_every: int) -> np.ndarray:
    """Per-prompt token caps: every ``long_every``-th prompt (0, long_every, ...) gets ``long``, the others
    ``short``. ``[prompts]`` int."""
    if not 1 <= short <= long or long_every < 1:
        raise ValueError(f"need 1 <= short ({short}) <= long ({long}) and long_every ({long_every}) >= 1")
    return np.where(np.arange(prompts) % long_every == 0, long, short)


def engine_iterations(lengths: np.ndarray, slots: int) -> int:
    """Decode iterations of the engine's schedule: samples in order take the first free slot and hold it for
    ``lengths[j]`` iterations (a slot freed at the end of an iteration is refilled at the start of the next)."""
    free_at = [0] * min(slots, len(lengths))  # iteration at which each slot is free again
    heapq.heapify(free_at)
    end = 0
    for length in lengths:
        start = heapq.heappop(free_at)
        end = max(end, start + int(length))
        heapq.heappush(free_at, start + int(length))
    return end


def decode_bytes(weight_bytes: int, slots: int, slot_tokens: int, kv_per_token: int, iterations: int) -> int:
    """Bytes a decode moves: ``iterations * (weight_bytes + slots * slot_tokens * kv_per_token)``."""
    return iterations * (weight_bytes + slots * slot_tokens * kv_per_token)


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_rollout(model, *, prompts: int, group_size: int, prompt_len: int, short: int, long: int,
                  long_every: int, slots: int, repeats: int = 1, seed: int = 0) -> dict:
    """Run the skewed workload through static batching (``slots = prompts * group_size``) and the engine with
    ``slots`` slots; their generated tokens/s, the ratio, decode bytes per token against the weight bytes, and
    whether both produced the same tokens."""
    vocab = model.config.text.vocab_size
    ids = np.random.default_rng(seed).integers(5, min(vocab, 1000), (prompts, prompt_len))
    caps = skewed_caps(prompts, short, long, long_every)
    samples = prompts * group_size
    lengths = np.repeat(caps, group_size)
    params = SamplingParams(temperature=1.0)
    never = -1  # an EOS id no token equals: the stop schedule sets every length
    runs = {}
    for name, n_slots in (("static", samples), ("engine", slots)):
        sampler = Sampler(model, None, SamplerConfig(max_new_tokens=long, max_slots=n_slots,
                                                     batch_buckets=(prompts,), prompt_buckets=(prompt_len,)),
                          eos_ids=[never], pad_id=0)
        out = {}

        def run():
            out["gen"] = sampler.generate_ids(ids, n=group_size, params=params, seed=seed, decode=False,
                                              max_tokens=caps)
            jax.block_until_ready(out["gen"].tokens)

        seconds = _timed(run, repeats)
        generated = int(out["gen"].mask.sum())
        iterations = engine_iterations(lengths, n_slots)
        runs[name] = {"slots": n_slots, "seconds": seconds, "generated": generated, "tokens_per_s": generated / seconds,
                      "iterations": iterations, "tokens": out["gen"].tokens}
    return _report(model, runs, lengths, prompt_len + long)


def _report(model, runs: dict, lengths: np.ndarray, slot_tokens: int) -> dict:
    """Figures of the two runs: tokens/s, ratio, decode bytes per generated token (text decoder weights + KV)."""
    text = nnx.state(model.model.language_model, nnx.Param)
    weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(text)))
    if model.lm_head is not None:
        weight_bytes += int(model.lm_head.weight[...].size * model.lm_head.weight[...].dtype.itemsize)
    per_token = kv_bytes_per_token(model.config)
    out = {"samples": int(len(lengths)), "generated": int(lengths.sum()), "length_mean": float(lengths.mean()),
           "length_max": int(lengths.max()), "weight_bytes": weight_bytes,
           "same_tokens": bool(np.array_equal(runs["static"]["tokens"], runs["engine"]["tokens"]))}
    for name, r in runs.items():
        moved = decode_bytes(weight_bytes, r["slots"], slot_tokens, per_token, r["iterations"])
        out[name] = {k: v for k, v in r.items() if k != "tokens"}
        out[name]["bytes_per_token"] = moved / r["generated"]
        out[name]["bytes_per_token_over_weights"] = moved / r["generated"] / weight_bytes
        out[name]["gb_per_s"] = moved / r["seconds"] / 1e9
    out["ratio"] = runs["engine"]["tokens_per_s"] / runs["static"]["tokens_per_s"]
    return out
