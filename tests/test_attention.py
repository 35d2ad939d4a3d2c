"""The attention interface: every backend equals the XLA (dense-mask) reference in forward and gradients.

Cases: causal self-attention with left / right padding, GQA and MQA, a prefill written at the start
of a longer KV cache, cached decode steps (``kv_lengths``), packed sequences, the vision tower's
windows and images (non-causal segments). The blockwise backend runs with small blocks (many block
pairs, skipping exercised) and with its default blocks (one block pair); splash runs in Pallas
interpret mode on CPU; cuDNN needs a GPU (``scripts/check_gpu.sh``). Its O(T) memory is measured
with XLA's memory analysis of the compiled forward + backward.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.model.attention import Segments, attention, dense_mask, resolve_backend, xla_attention
from specs_jax.model.attention_blockwise import blockwise_attention

TOL = 1e-5  # fp32, forward and gradients


def padded(lengths, t, side):
    seg = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        if side == "left":
            seg[i, t - n:] = 1
        else:
            seg[i, :n] = 1
    return seg


def windows(sizes):
    return np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(sizes)])[None]


CASES = {
    # name: (B, T, S, N, K, D, causal, q segment ids, kv segment ids, kv_lengths)
    "causal-left-padding-gqa": (2, 40, 40, 4, 2, 8, True, padded([29, 40], 40, "left"), None, None),
    "causal-right-padding-gqa": (2, 40, 40, 4, 2, 8, True, padded([40, 17], 40, "right"), None, None),
    "mqa-left-padding": (2, 33, 33, 3, 1, 16, True, padded([33, 5], 33, "left"), None, None),
    "mha-packed-sequences": (1, 48, 48, 2, 2, 8, True, windows([10, 20, 18]), None, None),
    "vision-windows": (1, 72, 72, 2, 2, 8, False, windows([16, 16, 8, 16, 16]), None, None),
    "vision-images": (1, 72, 72, 2, 2, 8, False, windows([40, 32]), None, None),
    "prefill-into-cache": (2, 24, 40, 4, 2, 8, True, padded([24, 11], 24, "left"),
                           np.pad(padded([24, 11], 24, "left"), ((0, 0), (0, 16))), None),
}
DECODE = {
    "decode-one-token": (2, 1, 40, 4, 2, 8, True, np.ones((2, 1), np.int32),
                         np.pad(padded([24, 11], 24, "left"), ((0, 0), (0, 16)), constant_values=1), [25, 30]),
    "decode-chunk": (2, 3, 40, 4, 2, 8, True, np.ones((2, 3), np.int32),
                     np.pad(padded([24, 11], 24, "left"), ((0, 0), (0, 16)), constant_values=1), [27, 40]),
}


def make(case):
    b, t, s, n, k, d, causal, qseg, kseg, kv_len = case
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, d))
    kk = jax.random.normal(keys[1], (b, s, k, d))
    v = jax.random.normal(keys[2], (b, s, k, d))
    w = jax.random.normal(keys[3], (b, t, n, d))  # a random cotangent for the gradient check
    kseg = qseg if kseg is None else kseg
    segs = Segments(jnp.asarray(qseg, jnp.int32), jnp.asarray(kseg, jnp.int32),
                    None if kv_len is None else jnp.asarray(kv_len, jnp.int32))
    return (q, kk, v), w, segs, causal, d**-0.5


def assert_matches_reference(fn, case):
    (q, k, v), w, segs, causal, scale = make(case)
    ref_fn = lambda q, k, v: xla_attention(q, k, v, segs, scale=scale, causal=causal)
    out_fn = lambda q, k, v: fn(q, k, v, segs, scale=scale, causal=causal)
    ref, out = jax.jit(ref_fn)(q, k, v), jax.jit(out_fn)(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)
    g_ref = jax.jit(jax.grad(lambda *a: (ref_fn(*a) * w).sum(), (0, 1, 2)))(q, k, v)
    g_out = jax.jit(jax.grad(lambda *a: (out_fn(*a) * w).sum(), (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_out, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=f"d{name}")
    return float(jnp.abs(out - ref).max()), max(float(jnp.abs(a - b).max()) for a, b in zip(g_out, g_ref))


@pytest.mark.parametrize("blocks", [8, None], ids=["blocks8", "default-blocks"])
@pytest.mark.parametrize("name", [*CASES, *DECODE])
def test_blockwise_equals_reference(name, blocks):
    kw = {} if blocks is None else dict(block_q=blocks, block_kv=blocks)
    fn = lambda *a, **k: blockwise_attention(*a, **k, **kw)
    fwd, grad = assert_matches_reference(fn, {**CASES, **DECODE}[name])
    print(f"blockwise {name} ({blocks}): forward {fwd:.1e}, gradients {grad:.1e}")


@pytest.mark.parametrize("name", ["causal-left-padding-gqa", "causal-right-padding-gqa", "vision-windows",
                                  "prefill-into-cache"])
def test_splash_interpret_equals_reference(name):
    from specs_jax.model.attention_splash import splash_attention

    fwd, grad = assert_matches_reference(splash_attention, CASES[name])
    print(f"splash (interpret) {name}: forward {fwd:.1e}, gradients {grad:.1e}")


@pytest.mark.parametrize("backend", ["splash", "cudnn"])
def test_decode_steps_of_kernel_backends_use_the_reference(backend, caplog):
    (q, k, v), _, segs, causal, scale = make(DECODE["decode-chunk"])
    with caplog.at_level(logging.WARNING):
        out = attention(q, k, v, segs, scale=scale, causal=causal, backend=backend)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(xla_attention(q, k, v, segs, scale=scale,
                                                                             causal=causal)))


def test_cudnn_off_gpu_falls_back_to_blockwise_with_a_log_line(caplog):
    from specs_jax.model import attention as attention_module

    attention_module._LOGGED.clear()
    case = CASES["causal-left-padding-gqa"]
    (q, k, v), _, segs, causal, scale = make(case)
    with caplog.at_level(logging.WARNING, logger="specs_jax.model.attention"):
        out = attention(q, k, v, segs, scale=scale, causal=causal, backend="cudnn")
    assert "falling back to blockwise" in caplog.text
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla_attention(q, k, v, segs, scale=scale, causal=causal)),
                               atol=TOL)


def test_auto_backend_per_platform():
    assert resolve_backend("auto", "tpu") == "splash"
    assert resolve_backend("auto", "gpu") == "cudnn"
    assert resolve_backend("auto", "cpu") == "blockwise"
    assert resolve_backend("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("flash")


def test_dense_mask_of_decode_segments():
    """kv_lengths: the T queries are the last T of the first kv_lengths keys; later keys are hidden."""
    segs = Segments(jnp.ones((1, 2), jnp.int32), jnp.array([[0, 1, 1, 1, 1, 1]], jnp.int32), jnp.array([4]))
    mask = np.asarray(dense_mask(segs, causal=True))[0, 0]
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]])


# --------------------------------------------------------------------------------------------
# memory: O(T) for blockwise, measured on the compiled forward + backward
# --------------------------------------------------------------------------------------------

def grad_temp_bytes(backend: str, t: int, b: int = 1, n: int = 4, k: int = 2, d: int = 64) -> int:
    """XLA's temp allocation of the compiled gradient of a causal, padded attention at length ``t``."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def loss(q, kk, v, mask):
        segs = Segments(mask, mask)
        return attention(q, kk, v, segs, scale=d**-0.5, causal=True, backend=backend).sum()

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
        spec(b, t, n, d), spec(b, t, k, d), spec(b, t, k, d), jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_blockwise_memory_is_linear_in_sequence_length():
    temps = {t: grad_temp_bytes("blockwise", t) for t in (1024, 2048, 4096)}
    xla = grad_temp_bytes("xla", 4096)
    scores = 4 * 4096 * 4096 * 4  # one fp32 [heads, T, T] score matrix at T = 4096
    print(f"blockwise temp bytes {temps}; xla at 4096: {xla}")
    # a fixed part (the [B, heads, block_q, block_kv] block temporaries) plus a part that doubles with T:
    # quadratic memory would quadruple the increment from one doubling to the next
    step1, step2 = temps[2048] - temps[1024], temps[4096] - temps[2048]
    assert 0 < step2 <= 2.2 * step1, (step1, step2)
    assert temps[4096] < scores / 4
    assert xla > scores > 7 * temps[4096]  # the reference materialises the scores (and more)


# --------------------------------------------------------------------------------------------
# cuDNN: only on a CUDA GPU (scripts/check_gpu.sh)
# --------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="needs a CUDA GPU")
BF16_TOL = 2e-2  # cuDNN takes bf16: its result vs the fp32 reference on the same bf16 inputs


def uses_cudnn(fn, *args) -> bool:
    return "cudnn" in jax.jit(fn).lower(*args).compile().as_text().lower()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["causal-left-padding-gqa", "causal-right-padding-gqa"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_equals_reference(name, head_dim):
    b, t, s, n, k, _, causal, qseg, kseg, kv_len = CASES[name]
    t = s = 128
    qseg = padded([100, 128], t, "left" if "left" in name else "right")
    (q, kk, v), w, segs, causal, scale = make((b, t, s, n, k, head_dim, causal, qseg, kseg, kv_len))
    q, kk, v = (x.astype(jnp.bfloat16) for x in (q, kk, v))
    fn = lambda q, k, v: attention(q, k, v, segs, scale=scale, causal=causal, backend="cudnn")
    ref = lambda q, k, v: xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), segs,
                                        scale=scale, causal=causal)
    assert uses_cudnn(fn, q, kk, v), "the cuDNN fused attention was not used"
    real = np.asarray(segs.q, bool)[:, :, None, None]
    out, expected = np.asarray(jax.jit(fn)(q, kk, v), np.float32), np.asarray(ref(q, kk, v))
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=BF16_TOL)
    wm = jnp.where(jnp.asarray(real), w, 0)  # padding rows carry no cotangent (their outputs are not defined)
    g = jax.jit(jax.grad(lambda *a: (fn(*a).astype(jnp.float32) * wm).sum(), (0, 1, 2)))(q, kk, v)
    g_ref = jax.grad(lambda *a: (ref(*a) * wm).sum(), (0, 1, 2))(q, kk, v)
    for name_, a, b_ in zip("qkv", g, g_ref):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), atol=5 * BF16_TOL,
                                   err_msg=f"d{name_}")


@pytest.mark.gpu
@needs_gpu
def test_cudnn_falls_back_on_packed_segments_at_run_time():
    """Two real segments in a row: not expressible with sequence lengths -> the blockwise branch."""
    (q, kk, v), _, segs, causal, scale = make((1, 128, 128, 4, 2, 64, True, windows([60, 68]) + 1, None, None))
    q, kk, v = (x.astype(jnp.bfloat16) for x in (q, kk, v))
    out = jax.jit(lambda q, k, v: attention(q, k, v, segs, scale=scale, causal=causal, backend="cudnn"))(q, kk, v)
    ref = xla_attention(*(x.astype(jnp.float32) for x in (q, kk, v)), segs, scale=scale, causal=causal)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=BF16_TOL)


@pytest.mark.gpu
@needs_gpu
def test_cudnn_model_logits_match_xla_in_bf16(tmp_path):
    """A bf16 model (head_dim 16) with attention=cudnn gives the logits of attention=xla."""
    from hf_fixtures import image_row, pixels, random_hf_model, tiny_config

    import specs_jax

    config = tiny_config(hidden_size=64, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config.vision_config.out_hidden_size = 64
    hf = random_hf_model(config)
    hf.save_pretrained(tmp_path)
    grids = [(1, 8, 12)]
    long, short = image_row(grids, [[5, 6], [7, 8, 9]]), image_row(grids, [[5], [7]])
    pad = len(long) - len(short)
    ids = np.array([long, [0] * pad + short])  # the second row left-padded
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    pix = pixels(grids * 2)
    logits = {b: np.asarray(specs_jax.load_model(tmp_path, "bfloat16", attention=b)(
        ids, mask, pix, np.array(grids * 2)), np.float32) for b in ("xla", "cudnn")}
    m = mask.astype(bool)
    assert np.abs(logits["cudnn"] - logits["xla"])[m].max() <= 0.1


def test_sequence_tiled_mlp_equals_the_mlp_in_value_and_gradients_with_less_memory():
    """GatedMLP(tile=256) over T = 1000 (the last tile padded) equals the untiled MLP in the output and in the
    gradients of the input and weights; XLA's memory analysis of value+grad at T = 4096: the tiled one's
    temporaries are at least 3x smaller (its [B, T, 1536] intermediates exist for one tile at a time)."""
    from flax import nnx

    from specs_jax.model.layers import GatedMLP

    def mlp(tile):
        return GatedMLP(128, 1536, act="silu", use_bias=False, axes=("embed", "mlp"), dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=nnx.Rngs(0), tile=tile)

    def value_and_grad(model, x):
        graphdef, state = nnx.split(model)
        loss = lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))
        return jax.jit(jax.value_and_grad(loss, (0, 1))), state

    x = jax.random.normal(jax.random.key(1), (2, 1000, 128))
    fn, state = value_and_grad(mlp(0), x)
    fn_tiled, state_tiled = value_and_grad(mlp(256), x)
    (v, (gs, gx)), (v_t, (gs_t, gx_t)) = fn(state, x), fn_tiled(state_tiled, x)
    np.testing.assert_allclose(v_t, v, rtol=1e-5)
    np.testing.assert_allclose(gx_t, gx, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(gs_t), jax.tree.leaves(gs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    long = jax.ShapeDtypeStruct((2, 4096, 128), jnp.float32)
    temp = lambda fn, state: fn.lower(state, long).compile().memory_analysis().temp_size_in_bytes
    assert temp(fn, state) >= 3 * temp(fn_tiled, state_tiled)


def test_dense_contracts_one_token_axis_in_the_forward_and_the_weight_gradient():
    """``layers.dense`` equals ``einsum('...i,oi->...o')`` in value and gradients, and every matrix product of its
    value-and-grad contracts a single axis of 2-D operands: the weight gradient is one ``[tokens, out] x
    [tokens, in]`` product (a contraction over (batch, seq) made XLA:CPU transpose the output gradient first)."""
    from specs_jax.model.layers import dense

    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
    w = jax.random.normal(jax.random.key(1), (6, 8))
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
    ref = lambda x, w: jnp.einsum("...i,oi->...o", x, w)
    (v, g), (v_ref, g_ref) = (jax.value_and_grad(loss(f), (0, 1))(x, w) for f in (dense, ref))
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def dots(f):
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss(f), (0, 1)))(x, w).jaxpr
        return [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]

    def single_axis(e):
        (lc, rc), _ = e.params["dimension_numbers"]
        return len(lc) == len(rc) == 1 and all(v.aval.ndim == 2 for v in e.invars)

    assert len(dots(dense)) == 3 and all(single_axis(e) for e in dots(dense))  # forward, dx, dw
    assert not all(single_axis(e) for e in dots(ref))  # the check sees the form it guards against
    y = dense(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(y, ref(x, w), rtol=0.05, atol=0.1)  # bf16 operands, float32 products
