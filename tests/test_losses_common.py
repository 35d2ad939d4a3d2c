"""Properties every loss shares: registry, jit, finite gradients on extreme inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.losses import (
    get_loss,
    list_losses,
    register_loss,
    token_logps_from_hidden,
)

B, T, V = 4, 6, 9


def _extreme_inputs() -> dict:
    """Log-probs of -1e4, logits of +-1e4 and a fully masked row."""
    rng = np.random.default_rng(0)
    logps = np.where(rng.random((B, T)) < 0.5, -1e4, -rng.exponential(size=(B, T))).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    mask[1] = 0.0
    mask[2, 3:] = 0.0
    logits = (1e4 * rng.choice([-1.0, 0.0, 1.0], size=(B, T, V))).astype(np.float32)
    teachers = (1e4 * rng.choice([-1.0, 0.0, 1.0], size=(3, B, T, V))).astype(np.float32)
    return {"logps": logps, "zeros": np.zeros((B, T), np.float32), "mask": mask, "logits": logits, "teachers": teachers}


def _calls(x: dict) -> dict:
    """name -> (function of the differentiated array, that array)."""
    index = np.tile(np.array([0, 0, 1, 1, 2, 2], np.int32), (B, 1))
    return {
        "dpo_hybrid": (
            lambda lp: get_loss("dpo_hybrid")(lp, x["zeros"], x["zeros"], lp[::-1], x["mask"], x["mask"]),
            x["logps"],
        ),
        "grpo": (
            lambda lp: get_loss("grpo")(
                lp,
                x["zeros"],
                x["zeros"],
                jnp.array([1.0, -1.0, 2.0, -2.0]),
                x["mask"],
                dual_clip=3.0,
                logits=x["logits"],
            ),
            x["logps"],
        ),
        "grpo-no-ref": (lambda lp: get_loss("grpo")(lp, None, None, jnp.ones(B), x["mask"], kl_coef=0.0), x["logps"]),
        **{
            name: (
                lambda lp, name=name: get_loss(name)(
                    lp,
                    x["zeros"],
                    x["zeros"],
                    jnp.array([1.0, -1.0, 2.0, -2.0]),
                    x["mask"],
                    sampler_is_mode=mode,
                    sampler_logps=x["logps"][::-1],
                    logits=x["logits"],
                ),
                x["logps"],
            )
            for name, mode in (("dr_grpo", "token_mask"), ("gspo", "sequence_truncate"), ("cispo", "token_truncate"))
        },
        **{
            f"dpo_hybrid-{loss_type}": (
                lambda lp, loss_type=loss_type: get_loss("dpo_hybrid")(
                    lp, x["zeros"], x["zeros"], lp[::-1], x["mask"], x["mask"], loss_type=loss_type
                ),
                x["logps"],
            )
            for loss_type in ("ipo", "hinge", "robust")
        },
        "opsd": (lambda s: get_loss("opsd")(s, x["teachers"][0], x["mask"], divergence="jsd", top_k=4), x["logits"]),
        "vigos": (lambda s: get_loss("vigos")(s, x["teachers"], index, x["mask"], token_clip=None), x["logits"]),
    }


def test_registry_lists_every_loss_and_names_the_known_ones_on_error():
    assert list_losses() == ["cispo", "dpo_hybrid", "dr_grpo", "grpo", "gspo", "opsd", "sft", "vigos"]
    with pytest.raises(ValueError, match=r"unknown loss 'ppo'.*cispo.*dpo_hybrid.*dr_grpo.*grpo.*gspo.*opsd.*sft.*vigos"):
        get_loss("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("grpo")(lambda: None)


def test_register_a_new_loss_with_one_function():
    @register_loss("test_mean_nll")
    def mean_nll(logps, mask):
        return -jnp.sum(logps * mask) / jnp.sum(mask), {}

    try:
        assert get_loss("test_mean_nll") is mean_nll
        assert float(get_loss("test_mean_nll")(jnp.full((1, 2), -2.0), jnp.ones((1, 2)))[0]) == 2.0
    finally:
        from specs_jax.losses import registry

        del registry._LOSSES["test_mean_nll"]


@pytest.mark.parametrize(
    "name",
    [
        "dpo_hybrid",
        "dpo_hybrid-ipo",
        "dpo_hybrid-hinge",
        "dpo_hybrid-robust",
        "grpo",
        "grpo-no-ref",
        "dr_grpo",
        "gspo",
        "cispo",
        "opsd",
        "vigos",
    ],
)
def test_jits_with_finite_gradients_on_extreme_inputs(name):
    fn, arg = _calls(_extreme_inputs())[name]
    (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(arg)
    assert loss.shape == () and np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) and v.shape == () for v in metrics.values()), metrics
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.any(np.asarray(grad))  # (the extreme divergences would all be clipped by a token_clip)


def test_token_logps_from_hidden_finite_gradients_on_extreme_hidden_states():
    rng = np.random.default_rng(1)
    hidden = (1e3 * rng.normal(size=(2, 3, 8))).astype(np.float32)
    weight = rng.normal(size=(50, 8)).astype(np.float32)
    labels = np.array([[0, 49, -100], [3, 3, 3]])
    grads = jax.jit(jax.grad(lambda h, w: jnp.sum(token_logps_from_hidden(h, w, labels, chunk_size=16)), (0, 1)))(
        hidden, weight
    )
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
