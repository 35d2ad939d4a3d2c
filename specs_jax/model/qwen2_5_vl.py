"""Flax NNX Qwen2.5-VL: vision tower (window attention, 2D RoPE, PatchMerger) + Qwen2 decoder with M-RoPE.

Module and parameter names mirror transformers' ``Qwen2_5_VLForConditionalGeneration``
(``model.visual.blocks.*``, ``model.language_model.layers.*``, ``lm_head``), with the per-layer
modules stacked on a leading ``layers`` axis and run under ``lax.scan``.

Two ways to call it:

- ``model(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None)`` takes the
  arguments of transformers' forward (numpy or jax arrays), computes the data-dependent indices on
  the host (:func:`prepare_inputs`) and runs a jitted forward. Returns logits ``[B, T, V]``.
- ``model.forward(inputs)`` with :class:`ModelInputs` is traceable: use it inside your own
  ``jax.jit``/``nnx.jit`` (the trainer and the sampler do), with inputs prepared by the data pipeline.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from specs_jax.model.attention import Segments, attention, padding_segments, self_segments
from specs_jax.model.config import ModelConfig
from specs_jax.model.layers import (Embedding, GatedMLP, dense, Linear, RMSNorm, _param, activation, apply_rotary,
                                    constrain_batch, scan_layers)
from specs_jax.model.positions import get_rope_index, image_rows, row_patches, vision_layout


class VisionInputs(NamedTuple):
    """The images of a batch laid out in rows of patches, one per batch row, so that they shard over the batch
    axes with the tokens and each row's images go through the vision tower on the device that holds the row;
    or (``feature_rows`` set) one per batch row that shows images, for single-device calls, where a row without
    images would only cost the tower a row of padding.

    Vision row ``r`` holds the patches of one batch row's images (processor order, images in the order of its
    ``<|image_pad|>`` blocks) padded to a per-row budget ``P`` (a bucket, a multiple of ``merge**2``), and their
    :class:`~specs_jax.model.positions.VisionLayout` padded alike. The segment ids are the validity mask:
    padding patches carry :data:`PAD_SEGMENT` (a segment of their own, so no real patch attends to them) and
    their merged features are never read (batch row ``b``'s ``k``-th image token takes merged feature ``k`` of
    vision row ``b``, or of ``feature_rows[b]``). The vision tower's attention therefore never spans rows.
    """

    pixel_values: jax.Array  # [B, P, C*T*P*P]
    permutation: jax.Array  # [B, P]: window order of the row's patches (padding last)
    pos_hw: jax.Array  # [B, P, 2]
    window_segment: jax.Array  # [B, P], PAD_SEGMENT on padding
    image_segment: jax.Array  # [B, P], PAD_SEGMENT on padding
    unpermute: jax.Array  # [B, P / merge**2]: processor order of the merged tokens (padding last)
    feature_rows: jax.Array | None = None  # [B]: the vision row of batch row b's images; None: row b (V = B)


PAD_SEGMENT = -1  # segment id of the padding patches of a row's image budget


class KVCache(NamedTuple):
    """Static-shape key/value cache of all decoder layers: ``k, v [layers, B, S, kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, size: int) -> "KVCache":
        t = cfg.text
        shape = (t.num_hidden_layers, batch, size, t.num_key_value_heads, t.head_dim)
        return cls(jnp.zeros(shape, _dtype(cfg.dtype)), jnp.zeros(shape, _dtype(cfg.dtype)))


class ModelInputs(NamedTuple):
    """A prepared batch: token ids, M-RoPE positions, padding mask, optional images."""

    input_ids: jax.Array  # [B, T] int
    positions: jax.Array  # [3, B, T] int
    attention_mask: jax.Array  # [B, T] bool
    vision: VisionInputs | None = None


def _dtype(name: str):
    return jnp.dtype(name)


# --------------------------------------------------------------------------------------------
# Rotary embeddings (pure functions)
# --------------------------------------------------------------------------------------------

def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """``1 / theta^(2i/dim)`` for ``i < dim/2``, in float32 as transformers computes it."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, section: tuple[int, ...],
                  dtype) -> tuple[jax.Array, jax.Array]:
    """Multimodal RoPE tables. ``positions [3, B, T]`` (t, h, w streams) -> ``cos, sin [B, T, head_dim]``.

    Frequency ``j`` of the ``head_dim/2`` frequencies uses stream ``s(j)``, where ``mrope_section``
    gives how many consecutive frequencies each stream owns; the table is duplicated to head_dim.
    """
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    stream = np.repeat(np.arange(len(section)), section)  # [head_dim/2]
    pos = jnp.moveaxis(positions, 0, -1).astype(jnp.float32)[..., stream]  # [B, T, head_dim/2]
    freqs = pos * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(pos_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D axial RoPE of the vision tower: ``pos_hw [..., N, 2]`` -> fp32 ``cos, sin [..., N, head_dim]``.

    ``head_dim/4`` frequencies ``1/theta^(2i/(head_dim/2))`` rotate the row and the column
    coordinate: ``[f*h, f*w, f*h, f*w]``.
    """
    inv_freq = jnp.asarray(rope_inv_freq(head_dim // 2, theta))
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [..., N, 2, head_dim/4]
    freqs = rearrange(freqs, "... s f -> ... (s f)")
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# --------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------

class PatchProjection(nnx.Module):
    """The patch-embedding Conv3d (stride = kernel) as a matmul; ``weight [E, C, T, P, P]`` as in HF."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        self.weight = _param(rngs, shape, ("vision_embed", None, None, None, None), _dtype(cfg.param_dtype),
                             "normal", None)
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        w = self.weight[...].reshape(self.weight.shape[0], -1).astype(self.dtype)
        return patches.astype(self.dtype) @ w.T


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.proj = PatchProjection(cfg, rngs=rngs)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int):
        v = cfg.vision
        kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs, stack=stack)
        self.qkv = Linear(v.hidden_size, 3 * v.hidden_size, use_bias=True, axes=("vision_qkv", "vision_embed"), **kw)
        self.proj = Linear(v.hidden_size, v.hidden_size, use_bias=True, axes=("vision_embed", "vision_heads"), **kw)
        self.num_heads = v.num_heads
        self.attention = cfg.attention

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Attention of each row's patches ``x [B, P, E]`` within their segment (``segment_ids [B, P]``: window
        or image)."""
        q, k, val = rearrange(self.qkv(x), "b n (three h d) -> three b n h d", three=3, h=self.num_heads)
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = attention(q, k, val, self_segments(segment_ids), scale=q.shape[-1] ** -0.5, causal=False,
                        backend=self.attention)
        return self.proj(rearrange(out, "b n h d -> b n (h d)"))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int):
        v = cfg.vision
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.norm1 = RMSNorm(v.hidden_size, eps=1e-6, axis="vision_embed", dtype=dt, param_dtype=pdt, stack=stack)
        self.norm2 = RMSNorm(v.hidden_size, eps=1e-6, axis="vision_embed", dtype=dt, param_dtype=pdt, stack=stack)
        self.attn = VisionAttention(cfg, rngs=rngs, stack=stack)
        self.mlp = GatedMLP(v.hidden_size, v.intermediate_size, act=v.hidden_act, use_bias=True,
                            axes=("vision_embed", "vision_mlp"), dtype=dt, param_dtype=pdt, rngs=rngs, stack=stack)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


class _GELU(nnx.Module):
    """Parameter-free slot so the merger MLP's layers keep HF's indices ``mlp.0`` / ``mlp.2``."""

    def __call__(self, x):
        return activation("gelu")(x)


class PatchMerger(nnx.Module):
    """RMSNorm, then merge ``merge**2`` neighbouring patches and project: ``Linear -> GELU -> Linear``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        width = v.hidden_size * v.spatial_merge_size**2
        self.ln_q = RMSNorm(v.hidden_size, eps=1e-6, axis="vision_embed", dtype=dt, param_dtype=pdt)
        kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mlp = nnx.List([Linear(width, width, axes=("vision_mlp", "vision_mlp"), **kw), _GELU(),
                             Linear(width, v.out_hidden_size, axes=("embed", "vision_mlp"), **kw)])
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(*x.shape[:-2], -1, self.width)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = VisionBlock(cfg, rngs=rngs, stack=v.depth)
        self.merger = PatchMerger(cfg, rngs=rngs)
        self.full_attention = tuple(i in v.fullatt_block_indexes for i in range(v.depth))
        self.head_dim, self.theta, self.remat = v.head_dim, v.rope_theta, cfg.remat

    def __call__(self, vis: VisionInputs) -> jax.Array:
        """Per-row patches ``[B, P, C*T*P*P]`` -> merged features ``[B, P / merge**2, out_hidden]``, each row's in
        processor order (its padding last)."""
        gather = lambda x, index: jnp.take_along_axis(x, index[..., None], axis=1)
        x = constrain_batch(gather(self.patch_embed(vis.pixel_values), vis.permutation))
        cos, sin = vision_cos_sin(vis.pos_hw, self.head_dim, self.theta)

        def body(block, h, is_full):  # full-attention blocks attend within an image, the others within a window
            return block(h, cos, sin, jnp.where(is_full, vis.image_segment, vis.window_segment)), None

        x, _ = scan_layers(self.blocks, x, jnp.asarray(self.full_attention), body, self.remat)
        return gather(self.merger(x), vis.unpermute)


# --------------------------------------------------------------------------------------------
# Text decoder
# --------------------------------------------------------------------------------------------

class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int):
        t = cfg.text
        kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs, stack=stack)
        d = t.head_dim
        self.q_proj = Linear(t.hidden_size, t.num_attention_heads * d, use_bias=True, axes=("heads", "embed"), **kw)
        self.k_proj = Linear(t.hidden_size, t.num_key_value_heads * d, use_bias=True, axes=("kv_heads", "embed"), **kw)
        self.v_proj = Linear(t.hidden_size, t.num_key_value_heads * d, use_bias=True, axes=("kv_heads", "embed"), **kw)
        self.o_proj = Linear(t.num_attention_heads * d, t.hidden_size, use_bias=False, axes=("embed", "heads"), **kw)
        self.head_dim = d
        self.attention = cfg.attention

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [B, T, E]`` -> rotated ``q [B,T,N,D]``, ``k [B,T,K,D]`` and ``v [B,T,K,D]``."""
        split = lambda y: rearrange(y, "b t (h d) -> b t h d", d=self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def __call__(self, x, cos, sin, segments: Segments, cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 index=0):
        """Causal self-attention of ``x [B,T,E]`` within ``segments`` (:mod:`specs_jax.model.attention`).
        With ``cache = (k, v [layers,B,S,K,D], layer)`` this chunk's keys/values are written in place at
        ``[layer, :, index]`` (``index`` a scalar, or ``[B]`` per-row positions of a one-token step, ``T = 1``) and the queries attend over the layer's whole cache (``segments.kv [B, S]``);
        returns ``(output, (k, v) or None)``."""
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            k_all, v_all, layer = cache
            if jnp.ndim(index):  # row b's token goes to [layer, b, index[b]]
                hit = (jnp.arange(k_all.shape[2])[None, :] == index[:, None])[:, :, None, None]  # [B, S, 1, 1]
                k_all = k_all.at[layer].set(jnp.where(hit, k.astype(k_all.dtype), k_all[layer]))
                v_all = v_all.at[layer].set(jnp.where(hit, v.astype(v_all.dtype), v_all[layer]))
            else:
                at = (layer, 0, index, 0, 0)
                k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
                v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
            k, v, cache = k_all[layer], v_all[layer], (k_all, v_all)
        out = attention(q, k, v, segments, scale=self.head_dim**-0.5, causal=True, backend=self.attention)
        return self.o_proj(rearrange(out, "b t h d -> b t (h d)")), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int):
        t = cfg.text
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs, stack=stack)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, act=t.hidden_act, use_bias=False,
                            axes=("embed", "mlp"), dtype=dt, param_dtype=pdt, rngs=rngs, stack=stack,
                            tile=cfg.mlp_tile)
        self.input_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, axis="embed", dtype=dt, param_dtype=pdt,
                                       stack=stack)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, axis="embed", dtype=dt,
                                                param_dtype=pdt, stack=stack)

    def __call__(self, x, cos, sin, segments, cache=None, index=0):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, segments, cache, index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.embed_tokens = Embedding(t.vocab_size, t.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.layers = DecoderLayer(cfg, rngs=rngs, stack=t.num_hidden_layers)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, axis="embed", dtype=dt, param_dtype=pdt)
        self.text_cfg, self.dtype, self.remat = t, dt, cfg.remat

    def __call__(self, embeds: jax.Array, positions: jax.Array, segments: Segments, cache: KVCache | None = None,
                 index=0) -> tuple[jax.Array, KVCache | None]:
        """``embeds [B,T,E]``, ``positions [3,B,T]``, attention ``segments`` (``q [B,T]``, ``kv [B,S]``,
        ``kv_lengths`` for a decode step) -> final-normed hidden ``[B,T,E]`` and the cache with this
        chunk's keys/values written at ``index`` (a scalar, or ``[B]`` per-row positions when ``T = 1``; S = cache
        size), or None without a cache (S = T)."""
        t = self.text_cfg
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, self.dtype)
        if cache is None:
            h, _ = scan_layers(self.layers, constrain_batch(embeds), None,
                               lambda layer, h, _: (constrain_batch(layer(h, cos, sin, segments)[0]), None), self.remat)
            return constrain_batch(self.norm(h)), None

        def body(layer, carry, i):  # the cache rides in the carry so each step updates it in place
            h, kv = layer(carry[0], cos, sin, segments, (*carry[1:], i), index)
            return (h, *kv), None

        (h, k, v), _ = scan_layers(self.layers, (embeds, cache.k, cache.v), jnp.arange(t.num_hidden_layers), body,
                                   self.remat)
        return self.norm(h), KVCache(k, v)


class Qwen2_5_VLModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.visual = VisionTransformer(cfg, rngs=rngs)
        self.language_model = TextModel(cfg, rngs=rngs)


def scatter_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                           image_token_id: int, feature_rows: jax.Array | None = None) -> jax.Array:
    """Replace the embeddings ``[B, T, E]`` at the ``<|image_pad|>`` tokens by the image features ``[V, M, E]``
    of the vision rows: row ``b``'s ``k``-th image token takes ``features[b, k]`` (``V = B``), or
    ``features[feature_rows[b], k]`` (:class:`VisionInputs` with vision rows only for the rows that show images)."""
    is_image = input_ids == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    if feature_rows is None:  # row to row, so a batch sharded over rows gathers on each device
        gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    else:
        gathered = features[feature_rows[:, None], index]
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL with the LM head. See the module docstring for the two calling conventions."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Qwen2_5_VLModel(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, axes=("vocab", "embed"),
            dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)

    def set_attention(self, backend: str) -> "Qwen2_5_VLForConditionalGeneration":
        """Switch every attention of the model to ``backend`` (see :mod:`specs_jax.model.attention`), in
        place; returns the model. The backend is static: jitted programs traced before keep theirs."""
        from specs_jax.model.attention import resolve_backend

        resolve_backend(backend)  # validates the name
        self.config = self.config.replace(attention=backend)
        for _, module in nnx.iter_graph(self):
            if isinstance(module, (Attention, VisionAttention)):
                module.attention = backend
        return self

    def lm_head_weight(self) -> jax.Array:
        """``[vocab, embed]`` weight of the LM head (the embedding table when tied)."""
        head = self.model.language_model.embed_tokens if self.lm_head is None else self.lm_head
        return head.weight[...]

    def embed(self, inputs: ModelInputs) -> jax.Array:
        """Token embeddings ``[B, T, E]`` with the vision features scattered at the image tokens."""
        embeds = self.model.language_model.embed_tokens(inputs.input_ids)
        if inputs.vision is not None:
            features = self.model.visual(inputs.vision)
            embeds = scatter_image_features(embeds, inputs.input_ids, features, self.config.image_token_id,
                                            inputs.vision.feature_rows)
        return embeds

    def hidden_states(self, inputs: ModelInputs) -> jax.Array:
        """Final-normed decoder hidden states ``[B, T, E]`` (traceable)."""
        segments = padding_segments(inputs.attention_mask)  # real tokens 1, padding 0 (its own segment)
        return self.model.language_model(self.embed(inputs), inputs.positions, segments)[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., E] -> logits [..., V]`` in the compute dtype."""
        return dense(hidden, self.lm_head_weight().astype(hidden.dtype))

    def forward(self, inputs: ModelInputs) -> jax.Array:
        """Traceable forward: prepared inputs -> logits ``[B, T, V]``."""
        return self.logits(self.hidden_states(inputs))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """transformers-style forward on concrete arrays -> logits ``[B, T, V]`` (jitted)."""
        inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw)
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, inputs: ModelInputs) -> jax.Array:
    """Params are inputs only, so the model keeps them as (and where) they are."""
    return nnx.merge(graphdef, state).forward(inputs)


def prepare_inputs(cfg: ModelConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, *, patch_bucket: int | None = None,
                   image_rows_only: bool = True) -> ModelInputs:
    """Host-side preparation of a transformers-style batch into :class:`ModelInputs` (numpy arrays).

    ``pixel_values [N, C*T*P*P]`` / ``image_grid_thw [I, 3]`` come flat, as transformers' processor returns
    them (images in row-major order of their ``<|image_pad|>`` blocks), and are laid out per row
    (:func:`row_vision_inputs`). Checks that the number of ``<|image_pad|>`` tokens matches the images' merged
    patch counts and that ``pixel_values`` has one row per patch. ``patch_bucket``: every row's patch budget
    (default: the largest row's patch count), so that batches with other image sizes share one compiled program.
    ``image_rows_only``: only the rows that show images get a row of patches (the vision tower's work is the
    batch's images, not ``B`` rows); ``False`` for batches that are sharded or split by rows (the trainer, the
    sampler), which need one row of patches per batch row.
    """
    if isinstance(input_ids, jax.core.Tracer):
        raise TypeError("model(...) needs concrete arrays; inside jit call model.forward(prepare_inputs(...))")
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    n_image_tokens = int(((ids == cfg.image_token_id) & mask).sum())
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    if pixel_values is not None:
        grid = np.asarray(image_grid_thw).reshape(-1, 3).astype(np.int64)
        pixels = np.asarray(pixel_values)
        n_patches = int(grid.prod(-1).sum())
        if pixels.shape != (n_patches, cfg.vision.patch_dim):
            raise ValueError(f"pixel_values shape {pixels.shape} != (patches in image_grid_thw, patch_dim) = "
                             f"{(n_patches, cfg.vision.patch_dim)}")
        n_features = n_patches // cfg.vision.spatial_merge_size**2
        if n_image_tokens != n_features:
            raise ValueError(f"Image features and image tokens do not match: tokens {n_image_tokens}, "
                             f"features {n_features}")
        positions, _ = get_rope_index(cfg, ids, grid, mask)
        vision = row_vision_inputs(cfg, ids, mask, pixels, grid, patch_bucket, image_rows_only)
        return ModelInputs(ids.astype(np.int32), positions, mask, vision)
    if n_image_tokens:
        raise ValueError(f"input_ids hold {n_image_tokens} <|image_pad|> tokens but no pixel_values were given")
    positions, _ = get_rope_index(cfg, ids, None, mask)
    return ModelInputs(ids.astype(np.int32), positions, mask, None)


def row_vision_inputs(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
                      image_grid_thw: np.ndarray, patch_bucket: int | None = None,
                      image_rows_only: bool = True) -> VisionInputs:
    """The :class:`VisionInputs` of flat ``pixel_values [N, D]`` / ``image_grid_thw [I, 3]`` (images in
    row-major order of their image tokens): vision row ``b`` gets batch row ``b``'s images' patches, padded to
    ``patch_bucket`` patches (default: the largest row's count; it must be at least that and a multiple of
    ``merge**2``). ``image_rows_only``: vision rows only for the batch rows that show images, in batch order
    (``feature_rows`` maps each batch row to its vision row; rows without images to row 0, never read)."""
    unit = cfg.vision.spatial_merge_size**2
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    sizes = grid.prod(-1)
    ends = np.cumsum(sizes)
    rows = image_rows(cfg, input_ids, attention_mask, grid)
    counts = row_patches(cfg, input_ids, attention_mask, grid)
    budget = max(int(counts.max()), unit) if patch_bucket is None else patch_bucket
    if budget < counts.max() or budget % unit:
        raise ValueError(f"patch_bucket {budget} must be >= the largest row's {counts.max()} image patches and a "
                         f"multiple of {unit}")
    shown = np.unique(rows)  # the batch rows that show images
    if image_rows_only:  # slot: the vision row of each batch row
        slot = np.zeros(len(input_ids), np.int32)
        slot[shown] = np.arange(len(shown))
        b = max(len(shown), 1)
    else:
        slot, b = np.arange(len(input_ids)), len(input_ids)
    pixels = np.zeros((b, budget, pixel_values.shape[1]), pixel_values.dtype)
    permutation = np.tile(np.arange(budget, dtype=np.int32), (b, 1))
    unpermute = np.tile(np.arange(budget // unit, dtype=np.int32), (b, 1))
    pos_hw = np.zeros((b, budget, 2), np.int32)
    window_segment = np.full((b, budget), PAD_SEGMENT, np.int32)
    image_segment = np.full((b, budget), PAD_SEGMENT, np.int32)
    for row in shown:
        images = np.flatnonzero(rows == row)
        n, r = int(counts[row]), slot[row]
        pixels[r, :n] = np.concatenate([pixel_values[ends[i] - sizes[i]:ends[i]] for i in images])
        layout = vision_layout(cfg, grid[images])
        permutation[r, :n], pos_hw[r, :n] = layout.permutation, layout.pos_hw
        window_segment[r, :n], image_segment[r, :n] = layout.window_segment, layout.image_segment
        unpermute[r, :n // unit] = layout.unpermute
    return VisionInputs(pixels, permutation, pos_hw, window_segment, image_segment, unpermute,
                        slot if image_rows_only else None)
