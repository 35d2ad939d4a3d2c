"""dpo_hybrid_loss against TRL's sigmoid DPO + SFT formulas, written here in torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specs_jax.losses import dpo_hybrid_loss


def _ragged_mask(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """Prompt prefix of 0s, response of 1s, right padding of 0s; row 0 has the full length."""
    mask = np.zeros((b, t), np.float32)
    for i in range(b):
        start = 0 if i == 0 else int(rng.integers(0, t // 2))
        end = t if i == 0 else int(rng.integers(start + 1, t + 1))
        mask[i, start:end] = 1.0
    return mask


def _batch(seed: int, b: int = 4, tc: int = 7, tr: int = 9):
    rng = np.random.default_rng(seed)
    arrays = {
        "policy_chosen_logps": -rng.exponential(size=(b, tc)),
        "policy_rejected_logps": -rng.exponential(size=(b, tr)),
        "ref_chosen_logps": -rng.exponential(size=(b, tc)),
        "ref_rejected_logps": -rng.exponential(size=(b, tr)),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    arrays["chosen_mask"] = _ragged_mask(rng, b, tc)
    arrays["rejected_mask"] = _ragged_mask(rng, b, tr)
    return arrays


def _trl_reference(a: dict, beta: float, sft_weight: float, sft_norm: str, label_smoothing: float):
    """TRL DPOTrainer (sigmoid loss, conservative label smoothing) + rpo/sft term; LLaMA-Factory pref_ftx."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k.startswith("policy")) for k, v in a.items()}
    cm, rm = t["chosen_mask"], t["rejected_mask"]
    chosen_logps = (t["policy_chosen_logps"] * cm).sum(-1)
    rejected_logps = (t["policy_rejected_logps"] * rm).sum(-1)
    ref_chosen = (t["ref_chosen_logps"] * cm).sum(-1)
    ref_rejected = (t["ref_rejected_logps"] * rm).sum(-1)
    logits = (chosen_logps - ref_chosen) - (rejected_logps - ref_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if sft_norm == "token":
        nll = -t["policy_chosen_logps"][cm.bool()].mean()
    else:
        nll = (-chosen_logps / cm.sum(-1)).mean()
    loss = losses.mean() + sft_weight * nll
    loss.backward()
    chosen_rewards = beta * (chosen_logps - ref_chosen).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "nll": nll.detach(),
    }
    grads = (t["policy_chosen_logps"].grad.numpy(), t["policy_rejected_logps"].grad.numpy())
    return loss.item(), {k: v.item() for k, v in metrics.items()}, grads


@pytest.mark.parametrize(
    ("beta", "sft_weight", "sft_norm", "label_smoothing"),
    [(0.1, 1.0, "token", 0.0), (0.1, 1.0, "sequence", 0.0), (0.5, 0.5, "token", 0.2), (0.05, 2.0, "sequence", 0.1)],
)
def test_matches_trl_values_metrics_and_gradients(beta, sft_weight, sft_norm, label_smoothing):
    a = _batch(0)
    exp_loss, exp_metrics, exp_grads = _trl_reference(a, beta, sft_weight, sft_norm, label_smoothing)
    kwargs = {"beta": beta, "sft_weight": sft_weight, "sft_norm": sft_norm, "label_smoothing": label_smoothing}

    def loss_fn(pc, pr):
        return dpo_hybrid_loss(
            pc, pr, a["ref_chosen_logps"], a["ref_rejected_logps"], a["chosen_mask"], a["rejected_mask"], **kwargs
        )

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        a["policy_chosen_logps"], a["policy_rejected_logps"]
    )
    np.testing.assert_allclose(loss, exp_loss, rtol=1e-5)
    assert set(metrics) == set(exp_metrics)
    for key, value in exp_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    for got, exp in zip(grads, exp_grads):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-7)


def test_policy_equal_to_reference_gives_ln2():
    a = _batch(1)
    loss, metrics = dpo_hybrid_loss(
        a["policy_chosen_logps"],
        a["policy_rejected_logps"],
        a["policy_chosen_logps"],
        a["policy_rejected_logps"],
        a["chosen_mask"],
        a["rejected_mask"],
        sft_weight=0.0,
    )
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["rewards/accuracies"]) == 0.0


def test_reference_logps_get_no_gradient():
    a = _batch(2)
    grad = jax.grad(
        lambda rc: dpo_hybrid_loss(
            a["policy_chosen_logps"],
            a["policy_rejected_logps"],
            rc,
            a["ref_rejected_logps"],
            a["chosen_mask"],
            a["rejected_mask"],
        )[0]
    )(a["ref_chosen_logps"])
    assert not np.any(np.asarray(grad))


def test_bad_arguments_are_named():
    a = _batch(3)
    args = [
        a[k]
        for k in (
            "policy_chosen_logps",
            "policy_rejected_logps",
            "ref_chosen_logps",
            "ref_rejected_logps",
            "chosen_mask",
            "rejected_mask",
        )
    ]
    with pytest.raises(ValueError, match="sft_norm"):
        dpo_hybrid_loss(*args, sft_norm="batch")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_hybrid_loss(*args, label_smoothing=0.5)
    bad = list(args)
    bad[2] = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_hybrid_loss(*bad)
