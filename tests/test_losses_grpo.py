"""grpo_loss and group_advantages against TRL / verl definitions, written here in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from specs_jax.losses import group_advantages, grpo_loss


def _ragged_mask(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """Completion masks of random lengths (one full row, one empty row)."""
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0], lengths[-1] = t, 0
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def _batch(seed: int, b: int = 6, t: int = 8):
    rng = np.random.default_rng(seed)
    logps = -rng.exponential(size=(b, t)).astype(np.float32)
    # old / ref within +-0.6 nats so that ratios fall on both sides of the clip range
    old = (logps + rng.uniform(-0.6, 0.6, size=(b, t))).astype(np.float32)
    ref = (logps + rng.uniform(-0.6, 0.6, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=(b,)).astype(np.float32)
    return logps, old, ref, adv, _ragged_mask(rng, b, t)


def _reference(logps, old, ref, adv, mask, *, eps_low, eps_high, beta, estimator, loss_agg, max_len, dual_clip):
    """TRL GRPOTrainer._compute_loss (token level) with verl's dual clip, KL estimators and agg_loss modes."""
    lp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    old_t, ref_t = torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    a = torch.tensor(adv, dtype=torch.float64).unsqueeze(1)
    m = torch.tensor(mask, dtype=torch.float64)
    coef_1 = torch.exp(torch.clamp(lp - old_t, -20.0, 20.0))
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    if dual_clip is not None:  # verl compute_policy_loss
        per_token_loss = torch.where(a < 0, torch.min(-a * dual_clip, per_token_loss), per_token_loss)
    if estimator == "k1":  # verl kl_penalty "kl"
        kl = lp - ref_t
    elif estimator == "k2":  # verl "mse"
        kl = 0.5 * (lp - ref_t).square()
    else:  # TRL per_token_kl
        kl = torch.exp(ref_t - lp) - (ref_t - lp) - 1
    per_token_loss = per_token_loss + beta * kl
    if loss_agg == "token-mean":  # TRL "dapo" / "bnpo", verl token-mean
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    elif loss_agg == "seq-mean-token-mean":  # TRL "grpo"
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    else:  # TRL "dr_grpo"
        loss = (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)
    loss.backward()
    is_low = (coef_1 < 1 - eps_low) & (a < 0)
    is_high = (coef_1 > 1 + eps_high) & (a > 0)

    def masked_mean(x):
        return ((x.double() * m).sum() / m.sum()).item()

    metrics = {
        "ratio": masked_mean(coef_1.detach()),
        "kl": masked_mean(kl.detach()),
        "clip_ratio/low": masked_mean(is_low),
        "clip_ratio/high": masked_mean(is_high),
        "clip_ratio/region": masked_mean(is_low | is_high),
    }
    return loss.item(), lp.grad.numpy(), metrics


CASES = [
    # loss_agg, estimator, eps_low, eps_high, beta, dual_clip, max_len
    ("token-mean", "k3", 0.2, 0.28, 0.01, None, None),
    ("seq-mean-token-mean", "k3", 0.2, 0.2, 0.04, None, None),
    ("seq-mean-token-sum-norm", "k3", 0.2, 0.28, 0.01, None, 12),
    ("seq-mean-token-sum-norm", "k1", 0.1, 0.3, 0.1, None, None),
    ("token-mean", "k1", 0.2, 0.28, 0.1, 3.0, None),
    ("token-mean", "k2", 0.2, 0.28, 0.1, 1.3, None),
    ("seq-mean-token-mean", "k2", 0.05, 0.05, 0.5, 1.2, None),
]


@pytest.mark.parametrize(("loss_agg", "estimator", "eps_low", "eps_high", "beta", "dual_clip", "max_len"), CASES)
def test_matches_trl_verl_reference(loss_agg, estimator, eps_low, eps_high, beta, dual_clip, max_len):
    logps, old, ref, adv, mask = _batch(0)
    if dual_clip is not None:  # push some ratios past the dual-clip constant
        old[:, ::3] = logps[:, ::3] - 1.5
    exp_loss, exp_grad, exp_metrics = _reference(
        logps,
        old,
        ref,
        adv,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        estimator=estimator,
        loss_agg=loss_agg,
        max_len=max_len or logps.shape[1],
        dual_clip=dual_clip,
    )
    kwargs = {
        "eps_low": eps_low,
        "eps_high": eps_high,
        "kl_coef": beta,
        "kl_estimator": estimator,
        "loss_agg": loss_agg,
        "max_completion_length": max_len,
        "dual_clip": dual_clip,
    }
    fn = jax.jit(jax.value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, **kwargs), has_aux=True))
    (loss, metrics), grad = fn(logps)
    np.testing.assert_allclose(loss, exp_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, exp_grad, rtol=1e-5, atol=1e-7)
    for key, value in exp_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    assert 0.0 < float(metrics["clip_ratio/region"]) < 1.0
    if dual_clip is not None:
        ratio = np.exp(logps - old)
        expected_dual = np.sum(((ratio > dual_clip) & (adv[:, None] < 0)) * mask) / mask.sum()
        assert expected_dual > 0
        np.testing.assert_allclose(metrics["clip_ratio/dual"], expected_dual, rtol=1e-6)


def test_per_token_advantages_and_global_normaliser():
    logps, old, ref, adv, mask = _batch(1)
    adv_bt = np.broadcast_to(adv[:, None], mask.shape)
    loss_b, _ = grpo_loss(logps, old, ref, adv, mask)
    loss_bt, _ = grpo_loss(logps, old, ref, adv_bt, mask)
    np.testing.assert_allclose(loss_bt, loss_b, rtol=1e-6)
    # two micro-batches normalised by the global token count sum to the full-batch token mean
    half = mask.shape[0] // 2
    n_tok = mask.sum()
    parts = [
        grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], num_items_in_batch=n_tok)[0]
        for s in (slice(None, half), slice(half, None))
    ]
    np.testing.assert_allclose(sum(parts), loss_b, rtol=1e-5)
    parts = [
        grpo_loss(
            logps[s], old[s], ref[s], adv[s], mask[s], loss_agg="seq-mean-token-mean", num_items_in_batch=mask.shape[0]
        )[0]
        for s in (slice(None, half), slice(half, None))
    ]
    np.testing.assert_allclose(
        sum(parts), grpo_loss(logps, old, ref, adv, mask, loss_agg="seq-mean-token-mean")[0], rtol=1e-5
    )


def test_on_policy_equals_reference_gives_ratio_one_and_zero_kl():
    logps, _, _, adv, mask = _batch(2)
    for estimator in ("k1", "k2", "k3"):
        loss, metrics = grpo_loss(logps, logps, logps, adv, mask, kl_estimator=estimator)
        np.testing.assert_allclose(metrics["ratio"], 1.0, rtol=1e-7)
        np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-8)
        assert float(metrics["clip_ratio/region"]) == 0.0
        # ratio 1: the loss is -A averaged over tokens
        np.testing.assert_allclose(loss, -np.sum(adv[:, None] * mask) / mask.sum(), rtol=1e-6)
    # old_logps=None is on-policy; the gradient is then -A / n_tok per token (token-mean)
    grad = jax.grad(lambda lp: grpo_loss(lp, None, None, adv, mask, kl_coef=0.0)[0])(logps)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-6)


def test_no_reference_model_with_zero_kl_coef():
    logps, old, _, adv, mask = _batch(3)
    loss, metrics = jax.jit(lambda lp: grpo_loss(lp, old, None, adv, mask, kl_coef=0.0))(logps)
    loss_ref, _ = grpo_loss(logps, old, logps - 5.0, adv, mask, kl_coef=0.0)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-7)
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, kl_coef=0.01)


def test_log_ratio_clamped_at_20():
    logps = np.zeros((1, 2), np.float32)
    old = np.array([[-50.0, 50.0]], np.float32)
    _, metrics = grpo_loss(logps, old, None, np.ones(1, np.float32), np.ones((1, 2)), kl_coef=0.0)
    np.testing.assert_allclose(metrics["ratio"], (np.exp(20.0) + np.exp(-20.0)) / 2, rtol=1e-6)


def test_entropy_metric_from_logits():
    logps, old, ref, adv, mask = _batch(4)
    logits = np.random.default_rng(4).normal(size=(*mask.shape, 11)).astype(np.float32)
    _, metrics = grpo_loss(logps, old, ref, adv, mask, logits=logits)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1)
    entropy = -(p * p.log()).sum(-1).numpy()
    np.testing.assert_allclose(metrics["entropy"], np.sum(entropy * mask) / mask.sum(), rtol=1e-5)


def test_bad_arguments_are_named():
    logps, old, ref, adv, mask = _batch(5)
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(logps, old, ref, adv, mask, loss_agg="seq-mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(logps, old, ref, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match="old_logps"):
        grpo_loss(logps, old[:, :3], ref, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, old, ref, adv[:2], mask)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_agg="seq-mean-token-sum-norm", max_completion_length=0)
    with pytest.raises(ValueError, match="dual_clip"):
        grpo_loss(logps, old, ref, adv, mask, dual_clip=0.5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    rewards = np.random.default_rng(6).choice([0.0, 0.5, 1.0, 1.5], size=24).astype(np.float32)
    rewards[:4] = 1.5  # an all-equal group: std 0 -> advantages 0
    r = torch.tensor(rewards, dtype=torch.float64)
    mean = r.view(-1, 4).mean(dim=1).repeat_interleave(4)
    std = r.view(-1, 4).std(dim=1).repeat_interleave(4) if scale == "group" else r.std().expand_as(r)
    expected = r - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    got = group_advantages(jnp.asarray(rewards), 4, scale=scale)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got[:4]))


def test_group_advantages_errors_and_single_sample_groups():
    np.testing.assert_array_equal(group_advantages(jnp.array([1.0, 2.0]), 1), [0.0, 0.0])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.ones(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.ones(8), 4, scale="prompt")
