"""Rollout sampler for Qwen2.5-VL: one prefill per prompt batch into a static KV cache, then a jitted
``lax.while_loop`` decode that samples ``n`` continuations per prompt and exits when every row is done.

Shapes are bucketed (prompt length, batch size, image patch count) so that a training run compiles
a handful of programs; :attr:`Sampler.compilations` counts them.

Positions: prompt tokens get the 3D M-RoPE positions of :func:`specs_jax.model.get_rope_index`;
generated token ``i`` gets ``last prompt position + 1 + i`` on every stream (transformers' rule of
cache length plus the row's ``rope_delta``). The ``<|image_pad|>``/``<|video_pad|>`` placeholders
are never sampled: in a training forward they would be read as vision inputs.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specs_jax.model.attention import Segments
from specs_jax.model.qwen2_5_vl import KVCache, ModelInputs, Qwen2_5_VLForConditionalGeneration, prepare_inputs
from specs_jax.sampling.sample import SamplingParams, sample_tokens

log = logging.getLogger(__name__)


class Rollout(NamedTuple):
    """Device arrays of one generate call, rows ordered prompt-major (``row = prompt * n + sample``)."""

    tokens: jax.Array  # [R, M] int32, pad after the first EOS
    logps: jax.Array  # [R, M] float32, log-prob of each sampled token under softmax(logits / T)
    mask: jax.Array  # [R, M] bool, completion tokens up to and including the first EOS
    top_probs: jax.Array | None  # [R, M, k] top-k probabilities per step (for the RBF metric)


@dataclasses.dataclass
class Generation:
    """Host-side result: numpy arrays of :class:`Rollout` trimmed to the real rows, plus the texts."""

    tokens: np.ndarray
    logps: np.ndarray
    mask: np.ndarray
    texts: list[str]
    top_probs: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None  # [R, T] left-padded prompt of each row
    prompt_mask: np.ndarray | None = None


def _decode_positions(positions: jax.Array, steps: jax.Array) -> jax.Array:
    """``positions [3, R, T]`` of a left-padded prompt -> positions ``[3, R, 1]`` of generated token ``steps``."""
    return (positions[:, :, -1] + 1 + steps)[..., None]


def generate_rollout(model: Qwen2_5_VLForConditionalGeneration, inputs: ModelInputs, key: jax.Array, *,
                     max_new_tokens: int, n: int, params: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                     top_probs: int = 0) -> Rollout:
    """Traceable generation from a left-padded prompt batch (see :class:`Rollout`)."""
    b, t = inputs.input_ids.shape
    size = t + max_new_tokens
    lm = model.model.language_model
    cache = KVCache.zeros(model.config, b, size)
    # attention segments: real tokens 1, padding (and cache slots not written yet) 0. The prefill's
    # queries sit at positions 0..t-1 of the cache, so causality hides the unwritten slots.
    prompt_seg = inputs.attention_mask.astype(jnp.int32)
    key_seg = jnp.zeros((b, size), jnp.int32).at[:, :t].set(prompt_seg)
    hidden, cache = lm(model.embed(inputs), inputs.positions, Segments(prompt_seg, key_seg), cache, 0)
    logits = model.logits(hidden[:, -1])

    # n samples per prompt share the prefill: repeat its results along the batch.
    rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)
    cache = KVCache(rep(cache.k, 1), rep(cache.v, 1))
    logits, key_seg, positions = rep(logits), rep(key_seg), rep(inputs.positions, 1)
    r = b * n
    eos = jnp.asarray(eos_ids, jnp.int32)
    # image/video placeholders would be read as vision inputs when the rollout is trained on
    banned = (model.config.image_token_id, model.config.video_token_id)

    state = dict(
        step=jnp.int32(0), logits=logits, cache=cache, key_seg=key_seg, done=jnp.zeros((r,), bool),
        tokens=jnp.full((r, max_new_tokens), pad_id, jnp.int32), logps=jnp.zeros((r, max_new_tokens), jnp.float32),
        mask=jnp.zeros((r, max_new_tokens), bool),
        top=jnp.zeros((r, max_new_tokens, top_probs), jnp.float32) if top_probs else None)

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        i = s["step"]
        tok, logp, top = sample_tokens(s["logits"], jax.random.fold_in(key, i), params, top_probs, banned)
        live = ~s["done"]
        tok = jnp.where(live, tok, pad_id)
        out = dict(s, step=i + 1, done=s["done"] | jnp.isin(tok, eos),
                   tokens=s["tokens"].at[:, i].set(tok), logps=s["logps"].at[:, i].set(jnp.where(live, logp, 0.0)),
                   mask=s["mask"].at[:, i].set(live))
        if top_probs:
            out["top"] = s["top"].at[:, i].set(top)
        key_seg = s["key_seg"].at[:, t + i].set(live.astype(jnp.int32))
        embeds = lm.embed_tokens(tok[:, None])
        # one query per row, the last of the t + i + 1 keys written so far; it sees the real ones (segment 1)
        segments = Segments(jnp.ones((r, 1), jnp.int32), key_seg, jnp.full((r,), t + i + 1, jnp.int32))
        hidden, cache = lm(embeds, _decode_positions(positions, i), segments, s["cache"], t + i)
        return dict(out, key_seg=key_seg, cache=cache, logits=model.logits(hidden[:, 0]))

    s = jax.lax.while_loop(cond, body, state)
    return Rollout(s["tokens"], s["logps"], s["mask"], s["top"])


def _bucket(value: int, buckets: Sequence[int], what: str) -> int:
    i = bisect.bisect_left(buckets, value)
    if i == len(buckets):
        raise ValueError(f"{what} {value} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    return (*out, hi)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static shapes of the sampler. Prompts are left-padded to the next ``prompt_buckets`` length,
    batches padded to the next ``batch_buckets`` size, image patches to the next ``patch_buckets``."""

    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = powers_of_two(32, 8192)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    patch_buckets: tuple[int, ...] = powers_of_two(64, 65536)
    top_probs: int = 0  # >0: also return the top-k probabilities per step (RBF metric)
    attention: str | None = None  # attention backend of the rollouts (specs_jax.model.attention); None: the model's


class Sampler:
    """Generate rollouts from a Qwen2.5-VL model.

    ``processor`` is a transformers processor (or tokenizer) used to apply the chat template,
    tokenise text, preprocess images and decode completions. The model's params may be sharded on a
    mesh: the jitted program runs where they live, nothing is gathered.
    """

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, processor: Any = None,
                 config: SamplerConfig = SamplerConfig(), eos_ids: Sequence[int] | None = None,
                 pad_id: int | None = None):
        self.model, self.processor, self.config = model, processor, config
        tokenizer = getattr(processor, "tokenizer", processor)
        hf = model.config.hf_config
        text = hf.get("text_config") or {}
        default_eos = hf.get("eos_token_id", text.get("eos_token_id"))
        if eos_ids is None:  # the config's, the tokenizer's and generation_config.json's (Processor.eos_token_ids)
            eos_ids = [default_eos] if isinstance(default_eos, int) else list(default_eos or [])
            eos_ids += list(getattr(processor, "eos_token_ids", ()) or ())
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos_ids.append(tokenizer.eos_token_id)
            eos_ids = sorted(set(eos_ids))
        if not eos_ids:
            raise ValueError("no EOS token id: pass eos_ids= or use a config/tokenizer that defines one")
        self.eos_ids = tuple(int(e) for e in eos_ids)
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(self.eos_ids[0] if pad_id is None else pad_id)
        self.compilations = 0

    # ---------------------------------------------------------------- compiled core
    @functools.cached_property
    def _jitted(self):
        # The params enter as plain inputs (never outputs), so they stay where and how they are sharded.
        graphdef = nnx.graphdef(self.model)

        @functools.partial(jax.jit, static_argnames=("max_new_tokens", "n", "params", "top_probs"))
        def run(state, inputs, key, *, max_new_tokens, n, params, top_probs):
            self.compilations += 1  # runs at trace time only: counts compilations
            log.info("sampler: compiling for batch %s, prompt length %s, n=%d", inputs.input_ids.shape[0],
                     inputs.input_ids.shape[1], n)
            model = nnx.merge(graphdef, state)
            if self.config.attention is not None:
                model.set_attention(self.config.attention)
            return generate_rollout(model, inputs, key, max_new_tokens=max_new_tokens, n=n,
                                    params=params, eos_ids=self.eos_ids, pad_id=self.pad_id, top_probs=top_probs)

        return run

    def _pad_batch(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> tuple[ModelInputs, int]:
        """Left-pad to the prompt bucket, pad rows to the batch bucket and patches to the patch bucket."""
        ids = np.asarray(input_ids)
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        b, t = ids.shape
        # re-pad on the left whatever the input padding side was
        lengths = mask.sum(1)
        tb = _bucket(max(int(lengths.max()), 1), self.config.prompt_buckets, "prompt length")
        bb = _bucket(b, self.config.batch_buckets, "batch size")
        out_ids = np.full((bb, tb), self.pad_id, np.int32)
        out_mask = np.zeros((bb, tb), bool)
        for row in range(b):
            toks = ids[row][mask[row]]
            out_ids[row, tb - len(toks):] = toks
            out_mask[row, tb - len(toks):] = True
        out_mask[b:, -1] = True  # padding rows: one dummy token so they are well defined
        patch_bucket = None
        if pixel_values is not None:
            patch_bucket = _bucket(len(pixel_values), self.config.patch_buckets, "image patch count")
        inputs = prepare_inputs(self.model.config, out_ids, out_mask, pixel_values, image_grid_thw,
                                patch_bucket=patch_bucket)
        return inputs, b

    # ---------------------------------------------------------------- public API
    def generate_ids(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, n: int = 1,
                     params: SamplingParams = SamplingParams(), seed: int = 0, stop: Sequence[str] = (),
                     decode: bool = True, weights: dict | None = None) -> Generation:
        """Sample ``n`` completions per prompt of an already tokenised batch (transformers' arguments).

        ``weights``: a full pure-dict of parameters (e.g. a trainer's current params) to sample with
        instead of the model's own; they are read, never copied or resharded."""
        inputs, b = self._pad_batch(input_ids, attention_mask, pixel_values, image_grid_thw)
        key = jax.random.key(seed)
        state = nnx.state(self.model) if weights is None else nnx.State(weights)
        out = self._jitted(state, inputs, key, max_new_tokens=self.config.max_new_tokens, n=n, params=params,
                           top_probs=self.config.top_probs)
        rows = b * n
        tokens, logps, mask = (np.array(x[:rows]) for x in (out.tokens, out.logps, out.mask))
        top = None if out.top_probs is None else np.asarray(out.top_probs)[:rows]
        texts = self._decode(tokens, mask, stop) if decode else []
        prompt_ids = np.repeat(np.asarray(inputs.input_ids)[:b], n, axis=0)
        prompt_mask = np.repeat(np.asarray(inputs.attention_mask)[:b], n, axis=0)
        return Generation(tokens, logps, mask, texts, top, prompt_ids, prompt_mask)

    def generate(self, prompts: Sequence[str | list], images: Sequence[Sequence[Any]] | None = None, *,
                 n: int = 1, params: SamplingParams = SamplingParams(), seed: int = 0,
                 stop: Sequence[str] = (), system: str | None = None) -> Generation:
        """Sample from chat prompts. ``prompts[i]`` is a user message (str) or a list of chat messages;
        ``images[i]`` the PIL images of prompt i (one ``<|image_pad|>`` block each, before the text).
        Needs a :class:`specs_jax.data.tokenizer.Processor` (``load_processor``)."""
        if not hasattr(self.processor, "encode"):
            raise ValueError("Sampler.generate needs a specs_jax Processor (specs_jax.data.tokenizer.load_processor); "
                             "use generate_ids for tokenised input")
        images = images or [[] for _ in prompts]
        rows, pixels, grids = [], [], []
        for prompt, imgs in zip(prompts, images):
            messages = prompt if isinstance(prompt, list) else [
                {"role": "user", "content": [*({"type": "image"} for _ in imgs), {"type": "text", "text": prompt}]}]
            if system is not None and not isinstance(prompt, list):
                messages = [{"role": "system", "content": system}, *messages]
            text = self.processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = self.processor.encode(text, imgs)
            rows.append(enc["input_ids"])
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
        ids = np.full((len(rows), max(map(len, rows))), self.pad_id, np.int32)
        mask = np.zeros(ids.shape, bool)
        for i, row in enumerate(rows):
            ids[i, ids.shape[1] - len(row):], mask[i, ids.shape[1] - len(row):] = row, True
        has_images = any(len(g) for g in grids)
        return self.generate_ids(ids, mask, np.concatenate(pixels) if has_images else None,
                                 np.concatenate(grids) if has_images else None, n=n, params=params, seed=seed, stop=stop)

    def _decode(self, tokens: np.ndarray, mask: np.ndarray, stop: Sequence[str]) -> list[str]:
        """Decode completions; a stop string truncates the text and masks the tokens after the one
        that completes it (in place)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is None:
            return []
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        texts = []
        for row in range(len(tokens)):
            ids = tokens[row][mask[row]].tolist()
            text = decode(ids)
            hits = [text.find(s) + len(s) for s in stop if s in text]
            if hits:
                text = text[:min(hits)]
                # smallest prefix of tokens whose text holds the stop string (monotone: binary search)
                lo, hi = 1, len(ids)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if any(s in decode(ids[:mid]) for s in stop):
                        hi = mid
                    else:
                        lo = mid + 1
                mask[row, lo:] = False
            texts.append(text)
        return texts
