"""token_logps and the vocabulary-chunked token_logps_from_hidden."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.losses import token_logps, token_logps_from_hidden


def _inputs(seed: int, b: int = 2, t: int = 5, h: int = 16, v: int = 1000):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, h)).astype(np.float32)
    weight = (0.5 * rng.normal(size=(v, h))).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    cot = rng.normal(size=(b, t)).astype(np.float32)
    return hidden, weight, labels, cot


def test_token_logps_matches_float64_log_softmax():
    hidden, weight, labels, _ = _inputs(0)
    logits = np.einsum("bth,vh->btv", hidden, weight)
    z = logits.astype(np.float64) / 0.7
    log_z = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), axis=-1)) + z.max(-1)
    expected = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0] - log_z
    np.testing.assert_allclose(
        token_logps(jnp.asarray(logits), jnp.asarray(labels), 0.7), expected, rtol=1e-5, atol=1e-5
    )


def test_token_logps_negative_labels_read_token_zero():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 6)), jnp.float32)
    labels = jnp.array([[-100, 2, -100]])
    out = token_logps(logits, labels)
    expected = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(out, [[expected[0, 0, 0], expected[0, 1, 2], expected[0, 2, 0]]], rtol=1e-6)


# remainder chunk, exact split, a single chunk larger than V; sequence blocks: 5 positions in blocks of 2 (the
# last one padded), in one exact block, in one block longer than the rows
@pytest.mark.parametrize(("chunk_size", "temperature", "seq_chunk"),
                         [(128, 1.0, 2), (250, 0.6, 5), (4096, 0.6, 64), (128, 0.6, 1)])
def test_chunked_matches_plain_values_and_gradients(chunk_size, temperature, seq_chunk):
    hidden, weight, labels, cot = _inputs(2)

    def plain(h, w):
        return jnp.sum(cot * token_logps(jnp.einsum("bth,vh->btv", h, w), labels, temperature))

    def chunked(h, w):
        return jnp.sum(cot * token_logps_from_hidden(h, w, labels, temperature, chunk_size, seq_chunk))

    np.testing.assert_allclose(
        token_logps_from_hidden(hidden, weight, labels, temperature, chunk_size, seq_chunk),
        token_logps(jnp.einsum("bth,vh->btv", hidden, weight), labels, temperature),
        rtol=1e-5,
        atol=1e-5,
    )
    g_plain = jax.jit(jax.grad(plain, argnums=(0, 1)))(hidden, weight)
    g_chunked = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, weight)
    for a, b in zip(g_chunked, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_bf16_inputs_keep_dtypes_of_gradients():
    hidden, weight, labels, _ = _inputs(3, v=300)
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16)

    def chunked(h, w):
        return jnp.sum(token_logps_from_hidden(h, w, labels, chunk_size=128))

    reference = token_logps(np.einsum("bth,vh->btv", np.asarray(h16, np.float32), np.asarray(w16, np.float32)), labels)
    np.testing.assert_allclose(
        jax.jit(token_logps_from_hidden, static_argnums=(3, 4))(h16, w16, labels, 1.0, 128),
        reference,
        rtol=1e-4,
        atol=1e-4,
    )
    gh, gw = jax.jit(jax.grad(chunked, (0, 1)))(h16, w16)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16


def test_shape_errors_name_the_arguments():
    hidden, weight, labels, _ = _inputs(4)
    with pytest.raises(ValueError, match="labels"):
        token_logps(jnp.zeros((2, 5, 10)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logps_from_hidden(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match="labels"):
        token_logps_from_hidden(hidden, weight, labels[:, :3])
