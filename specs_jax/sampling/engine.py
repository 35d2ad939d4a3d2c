"""Rollout engine: a fixed number of decode slots over a slot KV cache, with continuous batching.

One jitted program per shape bucket:

1. **Prefill** every prompt of the (left-padded, bucketed) batch once, one prompt at a time (``lax.map``: the
   prefill's transients are those of one prompt): its keys/values ``[B, layers, 1, T, K, D]`` and the logits
   of its last position. The ``n`` samples of a prompt share this prefill.
2. **Decode** in ``slots`` rows over a cache ``[layers, slots, T + max_new_tokens, K, D]`` inside one
   ``lax.while_loop``. Each iteration first **refills** the free slots with the next pending samples (in
   sample order ``j = prompt * n + sample``): the prompt's prefill keys/values are copied into the slot,
   its step counter restarts at 0. Then every live slot samples one token and runs it through the decoder,
   writing its key/value at its own position ``T + step`` (a per-row cache write). A slot whose sample ends
   (EOS or its token cap) is free again at the next iteration, so the decode batch stays full while
   samples are pending and the cache holds ``slots`` sequences, not the whole batch.

With ``slots >= samples`` every sample starts at iteration 0: static batching. Results do not depend on
``slots``: sample ``j``'s token at step ``s`` is drawn with the key ``fold(seed, prompt, sample index, s)``
(:func:`sample_keys`) and each slot's attention sees only its own sequence.

Positions: prompt tokens have the 3D M-RoPE positions of :func:`specs_jax.model.get_rope_index`; generated
token ``s`` gets ``last prompt position + 1 + s`` on every stream (transformers' cache length plus
``rope_delta``). The ``<|image_pad|>``/``<|video_pad|>`` placeholders are never sampled.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from specs_jax.model.attention import Segments
from specs_jax.model.config import ModelConfig
from specs_jax.model.qwen2_5_vl import KVCache, ModelInputs, Qwen2_5_VLForConditionalGeneration
from specs_jax.sampling.sample import SamplingParams, sample_tokens

GIB = 2**30


class Rollout(NamedTuple):
    """Device arrays of one generate call, rows ordered prompt-major (``row = prompt * n + sample``)."""

    tokens: jax.Array  # [R, M] int32, pad after the first EOS
    logps: jax.Array  # [R, M] float32, log-prob of each sampled token under softmax(logits / T)
    mask: jax.Array  # [R, M] bool, completion tokens up to and including the first EOS
    top_probs: jax.Array | None  # [R, M, k] top-k probabilities per step (for the RBF metric)


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes of cached keys and values per token: ``2 * layers * kv_heads * head_dim * itemsize(dtype)``."""
    t = cfg.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * np.dtype(cfg.dtype).itemsize


def max_slots_for_budget(cfg: ModelConfig, slot_length: int, kv_cache_gib: float) -> int:
    """How many slots of ``slot_length`` tokens fit ``kv_cache_gib``: ``floor(budget / (slot_length * bytes per
    token))``."""
    return int(kv_cache_gib * GIB // (slot_length * kv_bytes_per_token(cfg)))


def choose_slots(cfg: ModelConfig, samples: int, slot_length: int, *, max_slots: int | None = None,
                 kv_cache_gib: float | None = None, multiple: int = 1) -> int:
    """Decode slots for ``samples`` sequences of up to ``slot_length`` tokens: ``min(samples, max_slots,
    slots that fit kv_cache_gib)`` (the caps that are set), rounded down to a multiple of ``multiple`` (the
    data-parallel groups that share the slots and the budget) when there are at least that many. Raises when
    a group's share of the budget does not hold one slot."""
    slots = samples if max_slots is None else min(samples, max_slots)
    if kv_cache_gib is not None:
        fit = max_slots_for_budget(cfg, slot_length, kv_cache_gib / multiple)
        if fit < 1:
            need = slot_length * kv_bytes_per_token(cfg) / GIB
            raise ValueError(f"a slot of {slot_length} tokens (prompt bucket + max_new_tokens) needs {need:.3f} GiB of "
                             f"KV cache, over the budget kv_cache_gib={kv_cache_gib / multiple:.3f} (per data group): "
                             "shorten the prompt or max_new_tokens, or raise the budget")
        slots = min(slots, fit * multiple)
    return slots - slots % multiple if slots >= multiple else max(slots, 1)


def constrain_slots(x: jax.Array, axis: int = 0) -> jax.Array:
    """Pin the slot axis of ``x`` to the ``(data, fsdp)`` axes of the ambient mesh (``jax.set_mesh``; the rollout
    mesh of :mod:`specs_jax.sampling.layout`), so each data-parallel group decodes its own slots. No-op without
    such a mesh or when the slot count does not divide evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    if x.shape[axis] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x
    spec = [None] * x.ndim
    spec[axis] = ("data", "fsdp")
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def sample_keys(key: jax.Array, sample: jax.Array, step: jax.Array, n: int) -> jax.Array:
    """Random key of sample ``sample`` (``= prompt * n + index``) at generation step ``step``: ``key`` folded with the
    prompt, the sample index and the step, so it does not depend on scheduling. ``sample, step [R]`` -> ``[R]``."""
    fold = jax.random.fold_in
    return jax.vmap(lambda j, s: fold(fold(fold(key, j // n), j % n), s))(sample, step)


def engine_rollout(model: Qwen2_5_VLForConditionalGeneration, inputs: ModelInputs, key: jax.Array, *,
                   samples: jax.Array, limits: jax.Array, n: int, slots: int, max_new_tokens: int,
                   params: SamplingParams, eos_ids: tuple[int, ...], pad_id: int, top_probs: int = 0) -> Rollout:
    """Traceable rollout of ``n`` samples per prompt of a left-padded batch ``[B, T]`` (module docstring).

    ``samples``: int32 scalar, how many of the ``B * n`` samples are real (the first ones; the rest are batch
    padding and never decoded). ``limits [B * n]`` int32: each sample's token cap (``<= max_new_tokens``).
    Returns :class:`Rollout` ``[B * n, max_new_tokens]``."""
    cfg = model.config
    b, t = inputs.input_ids.shape
    size, total = t + max_new_tokens, b * n
    lm = model.model.language_model

    # 1. prefill every prompt once, one prompt at a time (the transients of one prompt): per prompt its
    #    keys/values [B, layers, 1, T, K, D] and the logits of its last position [B, V]
    prompt_valid = inputs.attention_mask.astype(bool)

    def prefill_one(x):
        embeds, positions, valid = x
        segment = valid.astype(jnp.int32)[None]  # real tokens 1, padding 0 (causal attention within them)
        hidden, kv = lm(embeds[None], positions[:, None], Segments(segment, segment), KVCache.zeros(cfg, 1, t), 0)
        return kv, model.logits(hidden[0, -1])

    prefill, first_logits = jax.lax.map(prefill_one, (model.embed(inputs), jnp.moveaxis(inputs.positions, 1, 0),
                                                      prompt_valid))
    next_position = inputs.positions[:, :, -1] + 1  # [3, B]: position of generated token 0

    eos = jnp.asarray(eos_ids, jnp.int32)
    banned = (cfg.image_token_id, cfg.video_token_id)  # would be read as vision inputs when trained on
    slot_rows = jnp.arange(slots)
    state = dict(
        cache=jax.tree.map(lambda x: constrain_slots(x, 1), KVCache.zeros(cfg, slots, size)),
        key_valid=jnp.zeros((slots, size), bool),
        logits=jnp.zeros((slots, first_logits.shape[-1]), first_logits.dtype),
        sample=jnp.full((slots,), -1, jnp.int32), step=jnp.zeros((slots,), jnp.int32), next=jnp.int32(0),
        tokens=jnp.full((total, max_new_tokens), pad_id, jnp.int32),
        logps=jnp.zeros((total, max_new_tokens), jnp.float32), mask=jnp.zeros((total, max_new_tokens), bool),
        top=jnp.zeros((total, max_new_tokens, top_probs), jnp.float32) if top_probs else None)

    def refill(s):
        """Free slots take the next pending samples: the prompt's prefill goes into the slot."""
        free = s["sample"] < 0
        count = jnp.minimum(free.sum(), samples - s["next"])
        order = jnp.nonzero(free, size=slots, fill_value=0)[0]

        def one(k, st):
            slot, j = order[k], st["next"] + k
            p = j // n
            put = lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src[p], slot, axis=1)
            cache = KVCache(put(st["cache"].k, prefill.k), put(st["cache"].v, prefill.v))
            valid = jnp.zeros((size,), bool).at[:t].set(prompt_valid[p])
            return dict(st, cache=cache, key_valid=st["key_valid"].at[slot].set(valid),
                        logits=st["logits"].at[slot].set(first_logits[p]), sample=st["sample"].at[slot].set(j),
                        step=st["step"].at[slot].set(0))

        s = jax.lax.fori_loop(0, count, one, s)
        return dict(s, next=s["next"] + count)

    def cond(s):
        return jnp.any(s["sample"] >= 0) | (s["next"] < samples)

    def body(s):
        s = refill(s)
        live = s["sample"] >= 0
        j, step = jnp.maximum(s["sample"], 0), s["step"]
        tok, logp, top = sample_tokens(s["logits"], sample_keys(key, j, step, n), params, top_probs, banned)
        tok = jnp.where(live, tok, pad_id)
        row = jnp.where(live, j, total)  # out of range: the write is dropped
        out = dict(s, tokens=s["tokens"].at[row, step].set(tok, mode="drop"),
                   logps=s["logps"].at[row, step].set(logp, mode="drop"),
                   mask=s["mask"].at[row, step].set(True, mode="drop"))
        if top_probs:
            out["top"] = s["top"].at[row, step].set(top, mode="drop")
        ended = live & (jnp.isin(tok, eos) | (step + 1 >= limits[j]))
        # run the sampled tokens through the decoder, each at its slot's own position
        index = t + step
        key_valid = s["key_valid"].at[slot_rows, index].set(True)
        positions = (next_position[:, j // n] + step)[..., None]  # [3, slots, 1]
        # one query per slot, over its own keys written so far (kv_lengths: index + 1, per slot)
        segments = Segments(jnp.ones((slots, 1), jnp.int32), key_valid.astype(jnp.int32), index + 1)
        hidden, cache = lm(lm.embed_tokens(tok[:, None]), positions, segments, s["cache"], index)
        cache = KVCache(constrain_slots(cache.k, 1), constrain_slots(cache.v, 1))
        return dict(out, cache=cache, key_valid=key_valid, logits=constrain_slots(model.logits(hidden[:, 0])),
                    sample=jnp.where(ended, -1, s["sample"]), step=jnp.where(live & ~ended, step + 1, step))

    s = jax.lax.while_loop(cond, body, state)
    return Rollout(s["tokens"], s["logps"], s["mask"], s["top"])
