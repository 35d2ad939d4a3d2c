"""Rollout sampler for Qwen2.5-VL: tokenised (or chat) prompts in, ``n`` sampled completions per prompt out,
through the rollout engine of :mod:`specs_jax.sampling.engine` (one prefill per prompt, a fixed number of
decode slots sized from a KV-cache budget, continuous batching).

Shapes are bucketed (prompt length, batch size, image patch count) so that a training run compiles
a handful of programs; :attr:`Sampler.compilations` counts them. The sampled tokens and log-probs of a
seed do not depend on the slot count (see :func:`specs_jax.sampling.engine.sample_keys`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from specs_jax.model.positions import row_patches
from specs_jax.model.qwen2_5_vl import ModelInputs, Qwen2_5_VLForConditionalGeneration, prepare_inputs
from specs_jax.sampling.engine import GIB, choose_slots, data_groups, engine_rollout
from specs_jax.sampling.sample import SamplingParams
from specs_jax.training.sharding import agree_max, allgather_rows, spans_processes

log = logging.getLogger(__name__)


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
    batches padded to the next ``batch_buckets`` size, each prompt's image patches to the next ``patch_buckets``."""

    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = powers_of_two(32, 8192)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    patch_buckets: tuple[int, ...] = powers_of_two(64, 65536)
    top_probs: int = 0  # >0: also return the top-k probabilities per step (RBF metric)
    attention: str | None = None  # attention backend of the rollouts (specs_jax.model.attention); None: the model's
    # decode slots (concurrent sequences) of the engine: at most max_slots, and as many as fit kv_cache_gib GiB of
    # KV cache (slot = prompt bucket + max_new_tokens tokens); None/None: the budget is half the free memory of
    # the first device, or no cap where the platform reports none (CPU)
    max_slots: int | None = None
    kv_cache_gib: float | None = None

    def __post_init__(self):
        if self.max_slots is not None and self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")


def default_kv_cache_gib() -> float | None:
    """Half the free memory of the first local device in GiB, or None where the platform reports no memory stats."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2 / GIB


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

        @functools.partial(jax.jit, static_argnames=("max_new_tokens", "n", "slots", "params", "top_probs"))
        def run(state, inputs, key, samples, limits, *, max_new_tokens, n, slots, params, top_probs):
            self.compilations += 1  # runs at trace time only: counts compilations
            log.info("sampler: compiling for batch %s, prompt length %s, n=%d, %d slots", inputs.input_ids.shape[0],
                     inputs.input_ids.shape[1], n, slots)
            model = nnx.merge(graphdef, state)
            if self.config.attention is not None:
                model.set_attention(self.config.attention)
            return engine_rollout(model, inputs, key, samples=samples, limits=limits, n=n,
                                  slots=slots, max_new_tokens=max_new_tokens, params=params, eos_ids=self.eos_ids,
                                  pad_id=self.pad_id, top_probs=top_probs)

        return run

    def slots(self, samples: int, prompt_length: int) -> int:
        """Decode slots for ``samples`` sequences with prompts padded to ``prompt_length`` (SamplerConfig caps).
        Raises when one slot does not fit the KV-cache budget."""
        c = self.config
        budget = c.kv_cache_gib if c.kv_cache_gib is not None or c.max_slots is not None else default_kv_cache_gib()
        groups = data_groups()  # of the rollout mesh when the caller set one: the engine's own grouping
        return choose_slots(self.model.config, samples, prompt_length + c.max_new_tokens, max_slots=c.max_slots,
                            kv_cache_gib=budget, multiple=groups)

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
            most = row_patches(self.model.config, out_ids, out_mask, image_grid_thw).max()
            patch_bucket = _bucket(int(most), self.config.patch_buckets, "image patches of a prompt")
        inputs = prepare_inputs(self.model.config, out_ids, out_mask, pixel_values, image_grid_thw,
                                patch_bucket=patch_bucket, image_rows_only=False)
        return inputs, b

    # ---------------------------------------------------------------- public API
    def generate_ids(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, n: int = 1,
                     params: SamplingParams = SamplingParams(), seed: int = 0, stop: Sequence[str] = (),
                     decode: bool = True, weights: dict | None = None,
                     max_tokens: Sequence[int] | None = None) -> Generation:
        """Sample ``n`` completions per prompt of an already tokenised batch (transformers' arguments).

        ``weights``: a full pure-dict of parameters (e.g. a trainer's current params) to sample with
        instead of the model's own; they are read, never copied or resharded. When they are global arrays of a
        multi-process job, every process calls this with its own prompts: the prompts of all processes are
        gathered (in process order), sampled in one program on the global mesh, and each process gets the
        samples of its own prompts, drawn exactly as one process sampling the whole batch draws them.
        ``max_tokens``: per-prompt caps on the generated tokens (each in ``[1, max_new_tokens]``; default
        ``max_new_tokens``)."""
        m = self.config.max_new_tokens
        caps = np.full(len(input_ids), m) if max_tokens is None else np.asarray(max_tokens)
        if caps.shape != (len(input_ids),) or caps.min(initial=1) < 1 or caps.max(initial=1) > m:
            raise ValueError(f"max_tokens must hold one cap in [1, max_new_tokens={m}] per prompt "
                             f"({len(input_ids)}), got {caps.tolist()}")
        state = nnx.state(self.model) if weights is None else nnx.State(weights)
        own = slice(0, len(input_ids))
        if spans_processes(state):  # weights of a multi-process job: one rollout of every process's prompts, in process order
            input_ids, attention_mask, pixel_values, image_grid_thw, caps, own = _gather_prompts(
                input_ids, attention_mask, pixel_values, image_grid_thw, caps, self.model.config.vision.patch_dim)
        inputs, b = self._pad_batch(input_ids, attention_mask, pixel_values, image_grid_thw)
        bb, t = inputs.input_ids.shape
        slots = self.slots(bb * n, t)  # a function of the shape bucket; checked before any work starts
        limits = np.full(bb * n, m, np.int32)
        limits[:b * n] = np.repeat(caps, n)
        out = self._jitted(state, inputs, jax.random.key(seed), np.int32(b * n), limits, max_new_tokens=m, n=n,
                           slots=slots, params=params, top_probs=self.config.top_probs)
        rows = slice(own.start * n, own.stop * n)  # this process's samples
        tokens, logps, mask = (_host(x)[rows].copy() for x in (out.tokens, out.logps, out.mask))
        top = None if out.top_probs is None else _host(out.top_probs)[rows]
        texts = self._decode(tokens, mask, stop) if decode else []
        prompt_ids = np.repeat(np.asarray(inputs.input_ids)[own], n, axis=0)
        prompt_mask = np.repeat(np.asarray(inputs.attention_mask)[own], n, axis=0)
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


def _host(x: jax.Array) -> np.ndarray:
    """A result of the rollout program as a numpy array (gathered from the other processes when needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_prompts(input_ids, attention_mask, pixel_values, image_grid_thw, caps, patch_dim: int) -> tuple:
    """Every process's prompts (and images, token caps) in process order, and the slice of this process's
    prompts in them. Widths are padded to the longest process's (on the right: the rollout re-pads by the mask)."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    (width, images) = agree_max(ids.shape[1], pixel_values is not None)
    ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])))
    mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
    counts = allgather_rows(np.array([len(ids)]))
    start = int(counts[:jax.process_index()].sum())
    if images:
        pixel_values = allgather_rows(np.zeros((0, patch_dim), np.float32) if pixel_values is None
                                      else np.asarray(pixel_values, np.float32))
        image_grid_thw = allgather_rows(np.zeros((0, 3), np.int64) if image_grid_thw is None
                                        else np.asarray(image_grid_thw, np.int64).reshape(-1, 3))
    return (allgather_rows(ids), allgather_rows(mask), pixel_values, image_grid_thw,
            allgather_rows(np.asarray(caps, np.int64)), slice(start, start + len(ids)))
