"""Rollout engine: a fixed number of decode slots over a slot KV cache, with continuous batching.

One jitted program per shape bucket:

Data groups: under a mesh with ``(data, fsdp)`` axes (the rollout mesh, ``G`` groups), group ``k`` owns prompts
``k * B/G .. (k+1) * B/G - 1``, their samples and the slots ``k * slots/G ..``: it prefills, holds the prefill
of and decodes only its own prompts, so the prefill cache per device is ``B / G`` prompts and no key/value ever
moves between groups (when ``G`` does not divide ``B`` or ``slots``, one group holds everything, on every group).

1. **Prefill** every prompt once, embedding included, ``G`` prompts at a time (one per group, ``lax.map`` over
   ``B / G`` iterations: the prefill's transients are those of one prompt per group): its keys/values
   ``[B/G, layers, G, T, K, D]`` (group axis sharded) and the logits of its last position. The ``n`` samples
   of a prompt share this prefill.
2. **Decode** in ``slots`` rows over a cache ``[layers, slots, T + max_new_tokens, K, D]`` inside one
   ``lax.while_loop``. Each iteration first **refills** each group's free slots with its next pending samples
   (in sample order ``j = prompt * n + sample``; under ``shard_map`` over the groups, so on the group's own
   devices): the prompt's prefill keys/values are copied into the slot, its step counter restarts at 0. Then
   every live slot samples one token and runs it through the decoder, writing its key/value at its own
   position ``T + step`` (a per-row cache write). A slot whose sample ends (EOS or its token cap) is free again
   at the next iteration, so the decode batch stays full while samples are pending and the cache holds
   ``slots`` sequences, not the whole batch.

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


def data_groups() -> int:
    """Data-parallel groups of the ambient mesh (``jax.set_mesh``; the rollout mesh of
    :mod:`specs_jax.sampling.layout`): the size of its ``(data, fsdp)`` axes, 1 without such a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return 1
    return mesh.shape["data"] * mesh.shape["fsdp"]


def constrain_slots(x: jax.Array, axis: int = 0) -> jax.Array:
    """Pin axis ``axis`` of ``x`` (slots, or data groups) to the ``(data, fsdp)`` axes of the ambient mesh, so each
    data-parallel group holds and decodes its own share. No-op without such a mesh or when the axis does not
    divide evenly."""
    groups = data_groups()
    if groups == 1 or x.shape[axis] % groups:
        return x
    spec = [PartitionSpec.UNCONSTRAINED] * x.ndim  # the other axes keep their sharding (e.g. KV heads on tensor)
    spec[axis] = ("data", "fsdp")
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def slot_logits(model: Qwen2_5_VLForConditionalGeneration, hidden: jax.Array) -> jax.Array:
    """``hidden [slots, E] -> logits [slots, V]``, computed where the (vocabulary-sharded) LM head lives: with a
    ``tensor`` axis the logits are pinned to ``(slots: data groups, vocab: tensor)``, so the partitioner gathers
    the small logits for the sampling's full-vocabulary ops, never the ``[V, E]`` head weight."""
    mesh = jax.sharding.get_abstract_mesh()
    logits = model.logits(hidden)
    if mesh.empty or mesh.shape.get("tensor", 1) == 1 or logits.shape[-1] % mesh.shape["tensor"]:
        return constrain_slots(logits)
    groups = data_groups()
    slots = ("data", "fsdp") if logits.shape[0] % groups == 0 else None
    return jax.lax.with_sharding_constraint(logits, PartitionSpec(slots, "tensor"))


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
    groups = data_groups()
    g = groups if b % groups == 0 and slots % groups == 0 else 1  # else every group holds every prompt
    bg, sg = b // g, slots // g  # prompts and slots of a group

    # 1. prefill: iteration i embeds and prefills prompt k * bg + i of every group k (a batch of g prompts, one per
    #    group, on its group): per group its prompts' keys/values [bg, layers, g, T, K, D] and last logits
    def per_iteration(x, axis):  # batch axis [B] -> [bg, ..., g, ...] with prompt k * bg + i at [i, ..., k, ...]
        x = jnp.moveaxis(x, axis, 0)
        x = x.reshape(g, bg, *x.shape[1:]).swapaxes(0, 1)
        return jnp.moveaxis(x, 1, axis + 1)

    def prefill_one(x: ModelInputs):
        x = x._replace(input_ids=constrain_slots(x.input_ids))
        segment = x.attention_mask.astype(jnp.int32)  # real tokens 1, padding 0 (causal attention within them)
        hidden, kv = lm(model.embed(x), x.positions, Segments(segment, segment), KVCache.zeros(cfg, g, t), 0)
        kv = KVCache(constrain_slots(kv.k, 1), constrain_slots(kv.v, 1))
        return kv, slot_logits(model, hidden[:, -1])

    batched = jax.tree.map(lambda x: per_iteration(x, 0), inputs._replace(positions=None))
    batched = batched._replace(positions=per_iteration(inputs.positions, 1))
    prefill, first_logits = jax.lax.map(prefill_one, batched)  # [bg, layers, g, T, K, D], [bg, g, V]
    first_logits = first_logits.swapaxes(0, 1)  # [g, bg, V]
    prompt_valid = inputs.attention_mask.astype(bool).reshape(g, bg, t)
    next_position = inputs.positions[:, :, -1] + 1  # [3, B]: position of generated token 0

    eos = jnp.asarray(eos_ids, jnp.int32)
    banned = (cfg.image_token_id, cfg.video_token_id)  # would be read as vision inputs when trained on
    slot_rows = jnp.arange(slots)
    state = dict(
        cache=jax.tree.map(lambda x: constrain_slots(x, 1), KVCache.zeros(cfg, slots, size)),
        key_valid=jnp.zeros((slots, size), bool),
        logits=jnp.zeros((slots, first_logits.shape[-1]), first_logits.dtype),
        sample=jnp.full((slots,), -1, jnp.int32), step=jnp.zeros((slots,), jnp.int32),
        next=jnp.zeros((g,), jnp.int32),  # per group: its next pending sample (local index)
        tokens=jnp.full((total, max_new_tokens), pad_id, jnp.int32),
        logps=jnp.zeros((total, max_new_tokens), jnp.float32), mask=jnp.zeros((total, max_new_tokens), bool),
        top=jnp.zeros((total, max_new_tokens, top_probs), jnp.float32) if top_probs else None)
    # group k's samples are the global samples k * bg * n + local (its prompts' samples, in order)
    real = jnp.clip(samples - jnp.arange(g) * bg * n, 0, bg * n)  # [g] real samples of each group

    def refill_group(cache, key_valid, logits, sample, step, nxt, pre, pre_logits, valid, real):
        """One group's free slots take its next pending samples (the prompt's prefill goes into the slot). One
        group's views: ``cache [layers, sg, S, K, D]``, slot arrays ``[sg, ...]``, its prefill
        ``[bg, layers, 1, T, K, D]``, ``pre_logits [1, bg, V]``, ``valid [1, bg, T]``, ``nxt, real [1]``."""
        free = sample < 0
        count = jnp.minimum(free.sum(), real[0] - nxt[0])
        order = jnp.nonzero(free, size=sg, fill_value=0)[0]
        first = jax.lax.axis_index(("data", "fsdp")) * bg * n if g > 1 else 0  # the group's first global sample

        def one(i, st):
            cache, key_valid, logits, sample, step = st
            slot, j = order[i], nxt[0] + i
            p = j // n
            put = lambda dst, src: jax.lax.dynamic_update_slice_in_dim(dst, src[p], slot, axis=1)
            return (KVCache(put(cache.k, pre.k), put(cache.v, pre.v)),
                    key_valid.at[slot].set(jnp.zeros((size,), bool).at[:t].set(valid[0, p])),
                    logits.at[slot].set(pre_logits[0, p]), sample.at[slot].set(first + j), step.at[slot].set(0))

        out = jax.lax.fori_loop(0, count, one, (cache, key_valid, logits, sample, step))
        return (*out, nxt + count)

    if g > 1:  # each group refills its own slots from its own prompts, on its own devices (no collective)
        spec = lambda axis: PartitionSpec(*[None] * axis, ("data", "fsdp"))
        cache_spec = KVCache(spec(1), spec(1))
        refill_group = jax.shard_map(
            refill_group, axis_names={"data", "fsdp"}, check_vma=False,
            in_specs=(cache_spec, spec(0), spec(0), spec(0), spec(0), spec(0), KVCache(spec(2), spec(2)), spec(0),
                      spec(0), spec(0)),
            out_specs=(cache_spec, spec(0), spec(0), spec(0), spec(0), spec(0)))

    def refill(s):
        *out, nxt = refill_group(s["cache"], s["key_valid"], s["logits"], s["sample"], s["step"], s["next"], prefill,
                                 first_logits, prompt_valid, real)
        return dict(s, **dict(zip(("cache", "key_valid", "logits", "sample", "step"), out)), next=nxt)

    def cond(s):
        return jnp.any(s["sample"] >= 0) | jnp.any(s["next"] < real)

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
        return dict(out, cache=cache, key_valid=key_valid, logits=slot_logits(model, hidden[:, 0]),
                    sample=jnp.where(ended, -1, s["sample"]), step=jnp.where(live & ~ended, step + 1, step))

    s = jax.lax.while_loop(cond, body, state)
    return Rollout(s["tokens"], s["logps"], s["mask"], s["top"])
