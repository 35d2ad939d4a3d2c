"""The loss variants of METHOD.md 4b (GSPO, CISPO, Dr. GRPO, sampler importance sampling; IPO, hinge,
robust DPO) against references: TRL 1.x's own ``GRPOTrainer._compute_loss`` / ``DPOTrainer._compute_loss``
called on a minimal stand-in for ``self`` wherever TRL has the configuration, else the papers' formulas
written here in torch (checked against TRL where the two overlap). Values and gradients within 1e-6 (fp32
against float64), on random inputs with ragged padding and an empty row.
"""

import inspect
import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specs_jax.losses import (
    cispo_loss,
    dpo_hybrid_loss,
    dr_grpo_loss,
    get_loss,
    grpo_loss,
    gspo_loss,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
FAMILY = {"grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "gspo": gspo_loss, "cispo": cispo_loss}
# our loss_agg -> TRL loss_type of the same aggregation (token-mean: "dapo" with num_items_in_batch)
TRL_AGG = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


# ------------------------------------------------------------------------------------------------ data


def _ragged_mask(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """Completion masks of random lengths: row 0 full, the last row empty."""
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0], lengths[-1] = t, 0
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def _batch(seed: int, b: int = 6, t: int = 8, spread: float = 0.6) -> dict:
    """``old`` within ``+-2 spread`` nats of ``logps`` (so that ratios fall on both sides of the clip range),
    ``ref`` within 0.6; the sampler's log-probs within 0.15 of ``old`` per token, with the first token of
    each row moved so that the sequence log-ratios ``sum_t (old - sampler)`` are ``linspace(-0.6, 0.6)``
    in random order (sequence weights both inside and outside ``[0.8, 1.25]``)."""
    rng = np.random.default_rng(seed)
    logps = -rng.exponential(size=(b, t)).astype(np.float32)

    def near(x, s):
        return (x + rng.uniform(-s, s, size=(b, t))).astype(np.float32)

    old = near(logps, spread) + rng.uniform(-spread, spread, size=(b, 1)).astype(np.float32)  # row shifts too
    mask = _ragged_mask(rng, b, t)
    sampler = near(old, 0.15)
    target = rng.permutation(np.linspace(-0.6, 0.6, b))
    sampler[:, 0] += np.sum((old - sampler) * mask, axis=-1) - target
    return {
        "logps": logps,
        "old": old,
        "ref": near(logps, 0.6),
        "sampler": sampler.astype(np.float32),
        "adv": (np.abs(rng.normal(size=(b,))) * np.resize([1.0, -1.0], b)).astype(np.float32),  # both signs
        "mask": mask,
    }


def _ours(variant: str, x: dict, *, kl_coef: float, **kwargs):
    """(loss, metrics, d loss / d logps) of the JAX loss, jitted, in float32."""
    fn = FAMILY[variant]
    ref = x["ref"] if kl_coef else None

    def loss(lp):
        return fn(lp, x["old"], ref, x["adv"], x["mask"], kl_coef=kl_coef, sampler_logps=x["sampler"], **kwargs)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(x["logps"])
    return float(value), metrics, np.asarray(grad)


# ------------------------------------------------------------------------------- references (torch)


def _is_ratio(old, sampler, mask, mode, clip_min, clip_max):
    """TRL GRPOTrainer._generate_and_score_completions' vLLM importance-sampling ratio, written out."""
    diff = torch.nan_to_num((old - sampler) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _tensors(x: dict):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in x.items()}
    t["logps"].requires_grad_(True)
    return t


def _trl_grpo(variant: str, x: dict, *, eps_low, eps_high, kl_coef, loss_agg, max_len, is_mode, is_min, is_max):
    """Loss and gradient from TRL's own ``GRPOTrainer._compute_loss`` on a stand-in ``self``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    t = _tensors(x)
    b, length = t["mask"].shape
    loss_type = "cispo" if variant == "cispo" else TRL_AGG[loss_agg]
    if variant == "cispo":
        assert loss_agg == "token-mean", "TRL's cispo aggregates by token-mean only"
    accelerator = SimpleNamespace(
        num_processes=1, device="cpu", gather=lambda v: v, gather_for_metrics=lambda v: v, reduce=lambda v, reduction: v
    )
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (t["logps"], torch.zeros_like(t["logps"]), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if variant == "gspo" else "token",
        beta=kl_coef,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=is_mode is not None,
        vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        max_completion_length=max_len or length,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros((b, 1), dtype=torch.long),
        "prompt_mask": torch.ones((b, 1), dtype=torch.long),
        "completion_ids": torch.zeros((b, length), dtype=torch.long),
        "completion_mask": t["mask"],
        "advantages": t["adv"],
        "old_per_token_logps": t["old"],
        "ref_per_token_logps": t["ref"],
        "num_items_in_batch": t["mask"].sum(),
    }
    if is_mode is not None:
        inputs["importance_sampling_ratio"] = _is_ratio(t["old"], t["sampler"], t["mask"], is_mode, is_min, is_max)
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.item(), t["logps"].grad.numpy()


def _formula_grpo(
    variant, x, *, eps_low, eps_high, kl_coef, kl_estimator, loss_agg, max_len, dual_clip, is_mode, is_min, is_max
):
    """The papers' per-token objectives (GRPO/PPO clip, GSPO sequence ratio, CISPO stopped weight), verl's
    dual clip and KL estimators, TRL's sampler IS ratio and the three aggregations, in float64."""
    t = _tensors(x)
    lp, old, m = t["logps"], t["old"], t["mask"]
    a = t["adv"].unsqueeze(1)
    log_ratio = lp - old
    if variant == "gspo":  # one ratio per sequence: exp of the mean token log-ratio
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)
    if variant == "cispo":
        pg = -torch.clamp(ratio, max=eps_high).detach() * a * lp
    else:
        pg = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
        if dual_clip is not None:
            pg = torch.where(a < 0, torch.min(pg, -a * dual_clip), pg)
    pg = pg.expand_as(m)
    if is_mode is not None:
        pg = pg * _is_ratio(old, t["sampler"], m, is_mode, is_min, is_max)
    d = t["ref"] - lp
    kl = {"k1": -d, "k2": 0.5 * d**2, "k3": torch.exp(d) - d - 1}[kl_estimator]
    per_token = pg + kl_coef * kl
    if loss_agg == "token-mean":
        loss = (per_token * m).sum() / m.sum()
    elif loss_agg == "seq-mean-token-mean":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    else:
        loss = (per_token * m).sum() / (m.shape[0] * (max_len or m.shape[1]))
    loss.backward()
    return loss.item(), lp.grad.numpy()


# --------------------------------------------------------------------------- GRPO family: the cases

# variant, loss_agg (None: the variant's default), eps_low, eps_high (None: defaults), kl_coef, kl_estimator,
# dual_clip, max_len, sampler IS (mode, clip_min, clip_max), spread of old around logps
CASES = [
    ("grpo", "token-mean", 0.2, 0.28, 0.04, "k3", None, None, (None, None, 3.0), 0.6),
    ("grpo", "seq-mean-token-mean", 0.2, 0.2, 0.0, "k3", None, None, ("token_truncate", 0.9, 1.1), 0.6),
    ("grpo", "seq-mean-token-sum-norm", 0.2, 0.28, 0.01, "k3", None, 12, ("token_mask", 0.9, 1.1), 0.6),
    ("grpo", "token-mean", 0.1, 0.3, 0.1, "k1", 3.0, None, ("sequence_truncate", 0.8, 1.25), 0.6),
    ("grpo", "seq-mean-token-mean", 0.2, 0.28, 0.1, "k2", 1.3, None, ("sequence_mask", 0.8, 1.25), 0.6),
    ("dr_grpo", None, 0.2, 0.28, 0.0, "k3", None, None, (None, None, 3.0), 0.6),
    ("dr_grpo", None, 0.2, 0.28, 0.04, "k3", None, 10, ("sequence_mask", 0.8, None), 0.6),
    ("dr_grpo", "token-mean", 0.2, 0.28, 0.04, "k3", None, None, ("token_truncate", 0.9, None), 0.6),
    ("dr_grpo", None, 0.2, 0.28, 0.1, "k2", 2.0, 16, ("token_mask", 0.9, None), 0.6),
    ("gspo", None, None, None, 0.0, "k3", None, None, (None, None, 3.0), 3e-3),
    ("gspo", None, None, None, 0.04, "k3", None, None, ("sequence_truncate", 0.8, 1.25), 3e-3),
    ("gspo", "token-mean", None, None, 0.04, "k3", None, None, ("token_truncate", 0.9, 1.1), 3e-3),
    ("gspo", "seq-mean-token-sum-norm", 0.05, 0.05, 0.01, "k3", None, None, ("sequence_mask", 0.8, 1.25), 0.3),
    ("gspo", "seq-mean-token-mean", 0.05, 0.05, 0.1, "k1", 1.2, None, ("token_mask", 0.9, 1.1), 0.3),
    ("cispo", None, None, None, 0.0, "k3", None, None, (None, None, 3.0), 0.6),
    ("cispo", None, None, 1.2, 0.04, "k3", None, None, ("token_truncate", 0.9, 1.1), 0.6),
    ("cispo", "token-mean", None, 1.2, 0.04, "k3", None, None, ("sequence_mask", 0.8, 1.25), 0.6),
    ("cispo", "seq-mean-token-mean", None, 1.1, 0.1, "k2", None, None, ("sequence_truncate", 0.8, None), 0.6),
    ("cispo", "seq-mean-token-sum-norm", None, 1.1, 0.1, "k1", None, 12, ("token_mask", None, 1.1), 0.6),
]


def _case_kwargs(variant, loss_agg, eps_low, eps_high, kl_coef, kl_estimator, dual_clip, max_len, is_opts):
    """(options passed to our loss, options with the defaults filled in for the references)."""
    params = inspect.signature(FAMILY[variant]).parameters
    ours = {"kl_estimator": kl_estimator, "max_completion_length": max_len}
    for name, value in (("loss_agg", loss_agg), ("eps_low", eps_low), ("eps_high", eps_high)):
        if value is not None:
            ours[name] = value
    if dual_clip is not None:
        ours["dual_clip"] = dual_clip
    mode, clip_min, clip_max = is_opts
    ours.update(sampler_is_mode=mode, sampler_is_clip_min=clip_min, sampler_is_clip_max=clip_max)

    def opt(name):
        return ours.get(name, params[name].default if name in params else None)

    full = {
        "eps_low": opt("eps_low"),
        "eps_high": opt("eps_high"),
        "kl_coef": kl_coef,
        "kl_estimator": kl_estimator,
        "loss_agg": opt("loss_agg"),
        "max_len": max_len,
        "dual_clip": dual_clip,
        "is_mode": mode,
        "is_min": clip_min,
        "is_max": clip_max,
    }
    return ours, full


def _in_trl(variant, full) -> bool:
    """Whether TRL 1.x's GRPOTrainer has this configuration (k3 KL only, no dual clip, cispo token-mean)."""
    return (
        full["kl_estimator"] == "k3"
        and full["dual_clip"] is None
        and (variant != "cispo" or full["loss_agg"] == "token-mean")
    )


def _prepare(case: tuple, seed: int) -> tuple[str, dict, dict, dict]:
    """(variant, inputs, options of our loss, options with the defaults filled in) of a case."""
    variant, loss_agg, eps_low, eps_high, kl_coef, kl_estimator, dual_clip, max_len, is_opts, spread = case
    x = _batch(seed, spread=spread)
    if dual_clip is not None:  # push some ratios past the dual-clip constant (the sampler moves along)
        x["sampler"][:, ::3] += x["logps"][:, ::3] - 1.5 - x["old"][:, ::3]
        x["old"][:, ::3] = x["logps"][:, ::3] - 1.5
    ours, full = _case_kwargs(variant, loss_agg, eps_low, eps_high, kl_coef, kl_estimator, dual_clip, max_len, is_opts)
    return variant, x, ours, full


def _trl_args(full: dict) -> dict:
    return {k: v for k, v in full.items() if k not in ("kl_estimator", "dual_clip")}


def _case_id(case: tuple) -> str:
    variant, loss_agg, _, _, kl_coef, kl_estimator, dual_clip, _, (mode, _, _), _ = case
    return f"{variant}-{loss_agg or 'default'}-kl{kl_coef}{kl_estimator}-dual{dual_clip}-{mode}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grpo_family_matches_reference(case):
    variant, x, ours, full = _prepare(case, seed=CASES.index(case))
    value, metrics, grad = _ours(variant, x, kl_coef=full["kl_coef"], **ours)
    if _in_trl(variant, full):
        exp_value, exp_grad = _trl_grpo(variant, x, **_trl_args(full))
    else:
        exp_value, exp_grad = _formula_grpo(variant, x, **full)
    np.testing.assert_allclose(value, exp_value, **TOL)
    np.testing.assert_allclose(grad, exp_grad, **TOL)
    assert np.any(exp_grad) and not np.any(exp_grad[-1])  # the empty row gets no gradient
    # the case is not degenerate: some tokens are clipped and some are not
    clipped = metrics["clip_ratio/high"] if variant == "cispo" else metrics["clip_ratio/region"]
    if variant != "cispo" or full["eps_high"] < 2:
        assert 0.0 < float(clipped) < 1.0, metrics
    if full["is_mode"] is not None:
        assert 0.0 < float(metrics["sampler_is/clipped"]) < 1.0, metrics


TRL_CASES = [c for c in CASES if _in_trl(c[0], _case_kwargs(*c[:-1])[1])]


@pytest.mark.parametrize("case", TRL_CASES, ids=_case_id)
def test_formula_reference_equals_trl(case):
    """The formulas written in this file agree with TRL's implementation where both exist."""
    variant, x, _, full = _prepare(case, seed=99)
    trl_value, trl_grad = _trl_grpo(variant, x, **_trl_args(full))
    value, grad = _formula_grpo(variant, x, **full)
    np.testing.assert_allclose(value, trl_value, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- GRPO family: properties


@pytest.mark.parametrize("variant", list(FAMILY))
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", None])
@pytest.mark.parametrize("is_mode", [None, "token_truncate", "sequence_mask"])
def test_micro_batches_with_the_global_normaliser_sum_to_the_full_batch(variant, loss_agg, is_mode):
    """The trainer's contract: n = global token count for token-mean, else the global sequence count."""
    x = _batch(11, b=8, spread=1e-3 if variant == "gspo" else 0.6)
    fn = FAMILY[variant]
    agg = loss_agg or inspect.signature(fn).parameters["loss_agg"].default
    kwargs = {"kl_coef": 0.04, "sampler_is_mode": is_mode, "sampler_is_clip_min": 0.5, "sampler_is_clip_max": 1.5}
    if loss_agg is not None:
        kwargs["loss_agg"] = loss_agg

    def loss(lp, rows, n):
        return fn(lp, x["old"][rows], x["ref"][rows], x["adv"][rows], x["mask"][rows], num_items_in_batch=n,
                  logits=None, sampler_logps=x["sampler"][rows], **kwargs)[0]

    n = jnp.asarray(x["mask"].sum()) if agg == "token-mean" else jnp.float32(8)
    full, full_grad = jax.value_and_grad(loss)(x["logps"], slice(None), None)
    parts = [jax.value_and_grad(loss)(x["logps"][rows], rows, n) for rows in (slice(0, 3), slice(3, 8))]
    np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grad, rtol=1e-6, atol=1e-8)


def test_signatures_share_the_positional_inputs_and_internal_keywords():
    names = ["logps", "old_logps", "ref_logps", "advantages", "mask"]
    defaults = {"grpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm", "gspo": "seq-mean-token-mean",
                "cispo": "token-mean"}
    for name, fn in FAMILY.items():
        assert get_loss(name) is fn
        params = inspect.signature(fn).parameters
        positional = [k for k, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == names, name
        for internal in ("logits", "num_items_in_batch", "sampler_logps"):
            assert params[internal].kind is inspect.Parameter.KEYWORD_ONLY and params[internal].default is None
        assert params["loss_agg"].default == defaults[name]
        assert params["sampler_is_mode"].default is None and params["sampler_is_clip_max"].default == 3.0
        assert {"kl_coef", "kl_estimator", "max_completion_length"} <= set(params)
    assert inspect.signature(gspo_loss).parameters["eps_low"].default == 3e-4
    assert inspect.signature(gspo_loss).parameters["eps_high"].default == 4e-4
    assert inspect.signature(cispo_loss).parameters["eps_high"].default == 5.0


def test_dr_grpo_is_grpo_with_the_constant_normaliser():
    x = _batch(12)
    kw = {"max_completion_length": 20, "sampler_is_mode": "token_mask", "sampler_logps": x["sampler"]}
    a = dr_grpo_loss(x["logps"], x["old"], x["ref"], x["adv"], x["mask"], **kw)
    b = grpo_loss(x["logps"], x["old"], x["ref"], x["adv"], x["mask"], loss_agg="seq-mean-token-sum-norm", **kw)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-7)
    assert a[1].keys() == b[1].keys()


def test_gspo_on_one_token_sequences_is_grpo_and_ratio_is_a_sequence_value():
    x = _batch(13, spread=0.3)
    mask1 = np.zeros_like(x["mask"])
    mask1[:-1, 0] = 1.0  # one token per row, the last row empty
    kw = {"eps_low": 0.2, "eps_high": 0.28, "loss_agg": "seq-mean-token-mean"}
    g = jax.grad(lambda lp: gspo_loss(lp, x["old"], x["ref"], x["adv"], mask1, **kw)[0])(x["logps"])
    r = jax.grad(lambda lp: grpo_loss(lp, x["old"], x["ref"], x["adv"], mask1, **kw)[0])(x["logps"])
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-9)
    _, metrics = gspo_loss(x["logps"], x["old"], None, x["adv"], x["mask"], kl_coef=0.0)
    m = x["mask"]
    s = np.exp(np.sum((x["logps"] - x["old"]) * m, -1) / np.maximum(m.sum(-1), 1))
    np.testing.assert_allclose(metrics["ratio"], np.sum(s * m.sum(-1)) / m.sum(), rtol=1e-6)  # token-weighted


def test_on_policy_cispo_and_grpo_have_the_same_gradient():
    x = _batch(14)
    g_cispo = jax.grad(lambda lp: cispo_loss(lp, None, None, x["adv"], x["mask"], kl_coef=0.0)[0])(x["logps"])
    g_grpo = jax.grad(lambda lp: grpo_loss(lp, None, None, x["adv"], x["mask"], kl_coef=0.0)[0])(x["logps"])
    np.testing.assert_allclose(g_cispo, g_grpo, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g_grpo, -x["adv"][:, None] * x["mask"] / x["mask"].sum(), rtol=1e-6)


def test_cispo_clipped_tokens_keep_their_gradient():
    """Where r > eps_high and A > 0, GRPO's clip zeroes the gradient; CISPO's stopped weight keeps -eps_high*A."""
    logps = np.zeros((1, 3), np.float32)
    old = np.array([[-1.0, 0.0, 1.0]], np.float32)  # r = e, 1, 1/e
    adv, mask = np.ones(1, np.float32), np.ones((1, 3), np.float32)
    g = jax.grad(lambda lp: cispo_loss(lp, old, None, adv, mask, kl_coef=0.0, eps_high=2.0)[0])(logps)
    np.testing.assert_allclose(g, [[-2.0 / 3, -1.0 / 3, -np.exp(-1.0) / 3]], rtol=1e-6)
    g = jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, kl_coef=0.0)[0])(logps)
    assert float(g[0, 0]) == 0.0


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_importance_weights_and_metrics(mode):
    x = _batch(15)
    lo, hi = (0.9, 1.1) if mode.startswith("token") else (0.8, 1.25)
    kw = {"kl_coef": 0.0, "sampler_is_mode": mode, "sampler_is_clip_min": lo, "sampler_is_clip_max": hi}
    _, metrics = grpo_loss(x["logps"], x["old"], None, x["adv"], x["mask"], sampler_logps=x["sampler"], **kw)
    m = x["mask"]
    d = (x["old"] - x["sampler"]).astype(np.float64) * m
    if mode.startswith("sequence"):
        w, weights = np.exp(d.sum(-1)), (m.sum(-1) > 0).astype(np.float64)
    else:
        w, weights = np.exp(d), m
    outside = (w < lo) | (w > hi)
    w = np.clip(w, lo, hi) if mode.endswith("truncate") else np.where(outside, 0.0, w)
    np.testing.assert_allclose(metrics["sampler_is/mean"], np.sum(w * weights) / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["sampler_is/clipped"], np.sum(outside * weights) / weights.sum(), rtol=1e-6)
    # sampler == trainer: weight 1 everywhere, the loss of the uncorrected objective
    off = grpo_loss(x["logps"], x["old"], None, x["adv"], m, kl_coef=0.0)[0]
    same = grpo_loss(x["logps"], x["old"], None, x["adv"], m, sampler_logps=x["old"], **kw)
    np.testing.assert_allclose(same[0], off, rtol=1e-7)
    assert float(same[1]["sampler_is/clipped"]) == 0.0
    # the sampler's log-probs carry no gradient
    g = jax.grad(lambda s: grpo_loss(x["logps"], x["old"], None, x["adv"], m, sampler_logps=s, **kw)[0])(x["sampler"])
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("variant", list(FAMILY))
def test_sampler_correction_errors_are_named(variant):
    x = _batch(16)
    fn = FAMILY[variant]
    args = (x["logps"], x["old"], x["ref"], x["adv"], x["mask"])
    with pytest.raises(ValueError, match="sampler_logps is None"):
        fn(*args, sampler_is_mode="token_truncate")
    with pytest.raises(ValueError, match="sampler_is_mode"):
        fn(*args, sampler_is_mode="token_clip", sampler_logps=x["sampler"])
    with pytest.raises(ValueError, match="sampler_is_clip_min or sampler_is_clip_max"):
        fn(*args, sampler_is_mode="sequence_truncate", sampler_is_clip_max=None, sampler_logps=x["sampler"])
    with pytest.raises(ValueError, match="must be <"):
        fn(*args, sampler_is_mode="token_mask", sampler_is_clip_min=3.0, sampler_logps=x["sampler"])
    with pytest.raises(ValueError, match="sampler_logps"):
        fn(*args, sampler_is_mode="token_mask", sampler_logps=x["sampler"][:, :3])
    with pytest.raises(ValueError, match="ref_logps"):
        fn(x["logps"], x["old"], None, x["adv"], x["mask"], kl_coef=0.1)
    with pytest.raises(ValueError, match=f"{variant}_loss: unknown loss_agg"):
        fn(*args, loss_agg="seq-sum")
    fn(*args, sampler_logps=x["sampler"])  # sampler_logps without a mode: ignored


def test_entropy_and_kl_metrics_in_every_variant():
    x = _batch(17)
    logits = np.random.default_rng(17).normal(size=(*x["mask"].shape, 5)).astype(np.float32)
    _, base = grpo_loss(x["logps"], x["old"], x["ref"], x["adv"], x["mask"], logits=logits)
    for fn in FAMILY.values():
        _, metrics = fn(x["logps"], x["old"], x["ref"], x["adv"], x["mask"], logits=logits)
        np.testing.assert_allclose(metrics["entropy"], base["entropy"], rtol=1e-7)
        np.testing.assert_allclose(metrics["kl"], base["kl"], rtol=1e-7)
        assert {"policy_loss", "ratio", "clip_ratio/high"} <= set(metrics)


# ------------------------------------------------------------------------------------- DPO family

DPO_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _dpo_batch(seed: int, b: int = 5, tc: int = 7, tr: int = 9) -> dict:
    """Ragged chosen/rejected responses of different padded lengths; chosen row 2 and rejected row 3 empty."""
    rng = np.random.default_rng(seed)
    a = {k: -rng.exponential(size=(b, tc if "chosen" in k else tr)).astype(np.float32) for k in DPO_KEYS}
    a["chosen_mask"] = _ragged_mask(rng, b, tc)
    a["rejected_mask"] = _ragged_mask(rng, b, tr)
    a["chosen_mask"][[2, -1]] = a["chosen_mask"][[-1, 2]]  # the empty rows of chosen and rejected differ
    a["rejected_mask"][[3, -1]] = a["rejected_mask"][[-1, 3]]
    return a


def _trl_dpo(a: dict, *, loss_type: str, beta: float, sft_weight: float, label_smoothing: float):
    """TRL's own ``DPOTrainer._compute_loss`` with ``loss_type=[loss_type, "sft"]``, ``loss_weights=[1,
    sft_weight]`` (= our hybrid with ``sft_norm="token"``) on a stand-in ``self`` and model output."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b, t = a["chosen_mask"].shape[0], max(a["chosen_mask"].shape[1], a["rejected_mask"].shape[1])

    def pad(v):
        return np.pad(v, ((0, 0), (0, t - v.shape[1])))

    policy = torch.tensor(np.concatenate([pad(a["policy_chosen_logps"]), pad(a["policy_rejected_logps"])]),
                          dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(np.concatenate([pad(a["chosen_mask"]), pad(a["rejected_mask"])]), dtype=torch.float64)
    ref = torch.tensor(np.concatenate([pad(a["ref_chosen_logps"]), pad(a["ref_rejected_logps"])]), dtype=torch.float64)
    ref_seq = (ref * mask).sum(-1)
    outputs = SimpleNamespace(  # the fused LM head's log-probs are 0 off the completion (labels -100)
        log_probs=policy * mask,
        entropy=torch.zeros(2 * b, t),
        mean_logits=torch.zeros(2 * b, t),
        is_top1=torch.zeros(2 * b, t, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device="cpu", gather=lambda v: v, gather_for_metrics=lambda v: v)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type, "sft"],
        loss_weights=[1.0, sft_weight],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {  # a 1-token prompt column in front: the shifted completion mask is `mask`
        "input_ids": torch.zeros((2 * b, t + 1), dtype=torch.long),
        "attention_mask": torch.ones((2 * b, t + 1), dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(2 * b, 1), mask], dim=1),
        "ref_chosen_logps": ref_seq[:b],
        "ref_rejected_logps": ref_seq[b:],
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    loss.backward()
    grad = policy.grad.numpy()
    tc, tr = a["chosen_mask"].shape[1], a["rejected_mask"].shape[1]
    metrics = {k: float(np.mean(v)) for k, v in stub._metrics["train"].items()}
    return loss.item(), (grad[:b, :tc], grad[b:, :tr]), metrics


def _formula_dpo(a: dict, *, loss_type: str, beta: float, sft_weight: float, label_smoothing: float):
    """The same losses written out from the papers (IPO eq. 17 with TRL's length average; SLiC hinge; rDPO),
    with the LLaMA-Factory sequence-normalised SFT term."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k.startswith("policy")) for k, v in a.items()}
    cm, rm = t["chosen_mask"], t["rejected_mask"]
    pc, pr = (t["policy_chosen_logps"] * cm).sum(-1), (t["policy_rejected_logps"] * rm).sum(-1)
    rc, rr = (t["ref_chosen_logps"] * cm).sum(-1), (t["ref_rejected_logps"] * rm).sum(-1)
    h = (pc - rc) - (pr - rr)
    e = label_smoothing
    if loss_type == "ipo":
        d = (pc - rc) / cm.sum(-1).clamp(min=1) - (pr - rr) / rm.sum(-1).clamp(min=1)
        pref = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        pref = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        pref = ((1 - e) * -F.logsigmoid(beta * h) - e * -F.logsigmoid(-beta * h)) / (1 - 2 * e)
    else:
        pref = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    nll = (-pc / cm.sum(-1).clamp(min=1)).mean()
    loss = pref.mean() + sft_weight * nll
    loss.backward()
    return loss.item(), (t["policy_chosen_logps"].grad.numpy(), t["policy_rejected_logps"].grad.numpy())


def _ours_dpo(a: dict, **kwargs):
    def loss_fn(pc, pr):
        return dpo_hybrid_loss(pc, pr, a["ref_chosen_logps"], a["ref_rejected_logps"], a["chosen_mask"],
                               a["rejected_mask"], **kwargs)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
        a["policy_chosen_logps"], a["policy_rejected_logps"]
    )
    return float(loss), metrics, grads


DPO_CASES = [
    # loss_type, beta, sft_weight, label_smoothing
    ("sigmoid", 0.1, 0.0, 0.0),
    ("sigmoid", 0.5, 1.0, 0.0),
    ("ipo", 0.1, 0.0, 0.0),
    ("ipo", 0.5, 1.0, 0.0),
    ("ipo", 2.0, 0.3, 0.0),
    ("hinge", 0.1, 0.0, 0.0),
    ("hinge", 1.5, 1.0, 0.0),  # beta * h on both sides of the hinge at 1
    ("robust", 0.1, 0.0, 0.0),
    ("robust", 0.5, 1.0, 0.1),
    ("robust", 0.2, 0.5, 0.3),
]


@pytest.mark.parametrize(("loss_type", "beta", "sft_weight", "label_smoothing"), DPO_CASES)
def test_dpo_types_match_trl(loss_type, beta, sft_weight, label_smoothing):
    a = _dpo_batch(DPO_CASES.index((loss_type, beta, sft_weight, label_smoothing)))
    kw = {"loss_type": loss_type, "beta": beta, "sft_weight": sft_weight, "label_smoothing": label_smoothing}
    exp_loss, exp_grads, exp_metrics = _trl_dpo(a, **kw)
    loss, metrics, grads = _ours_dpo(a, sft_norm="token", **kw)
    np.testing.assert_allclose(loss, exp_loss, **TOL)
    for got, exp in zip(grads, exp_grads):
        np.testing.assert_allclose(got, exp, **TOL)
        assert np.any(exp)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        np.testing.assert_allclose(metrics[key], exp_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if loss_type == "hinge" and beta > 1:  # some pairs inside the margin, some outside
        margins = beta * _pair_margins(a)
        assert np.any(margins > 1.01) and np.any(margins < 0.99)


@pytest.mark.parametrize(("loss_type", "beta", "sft_weight", "label_smoothing"), DPO_CASES)
def test_dpo_types_with_sequence_sft_match_the_formula(loss_type, beta, sft_weight, label_smoothing):
    a = _dpo_batch(20 + DPO_CASES.index((loss_type, beta, sft_weight, label_smoothing)))
    kw = {"loss_type": loss_type, "beta": beta, "sft_weight": sft_weight, "label_smoothing": label_smoothing}
    exp_loss, exp_grads = _formula_dpo(a, **kw)
    loss, _, grads = _ours_dpo(a, sft_norm="sequence", **kw)
    np.testing.assert_allclose(loss, exp_loss, **TOL)
    for got, exp in zip(grads, exp_grads):
        np.testing.assert_allclose(got, exp, **TOL)


def test_dpo_sigmoid_with_label_smoothing_is_todays_cdpo():
    """sigmoid + label_smoothing (conservative DPO; not in TRL 1.x's sigmoid) against the formula of this
    file, which agrees with TRL on every other case."""
    a = _dpo_batch(30)
    kw = {"loss_type": "sigmoid", "beta": 0.3, "sft_weight": 0.5, "label_smoothing": 0.2}
    exp_loss, exp_grads = _formula_dpo(a, **kw)
    loss, _, grads = _ours_dpo(a, sft_norm="sequence", **kw)
    np.testing.assert_allclose(loss, exp_loss, **TOL)
    for got, exp in zip(grads, exp_grads):
        np.testing.assert_allclose(got, exp, **TOL)


def _pair_margins(a):
    def seq(k, m):
        return np.sum(a[k] * a[m], -1)

    return (seq("policy_chosen_logps", "chosen_mask") - seq("ref_chosen_logps", "chosen_mask")) - (
        seq("policy_rejected_logps", "rejected_mask") - seq("ref_rejected_logps", "rejected_mask")
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("sft_norm", ["token", "sequence"])
def test_dpo_micro_batches_weighted_by_pairs_sum_to_the_full_batch(loss_type, sft_norm):
    """training.steps.dpo_spec's weighting: a micro-batch of b of B pairs counts (b / B) * loss, with the
    token-normalised SFT weight rescaled by (B / b) * (n / N). Every loss_type is a mean over pairs."""
    a = _dpo_batch(31, b=6)
    kw = {"loss_type": loss_type, "beta": 0.3, "sft_norm": sft_norm, "label_smoothing": 0.1 * (loss_type == "robust")}
    full, _ = dpo_hybrid_loss(*(a[k] for k in (*DPO_KEYS, "chosen_mask", "rejected_mask")), sft_weight=0.7, **kw)
    total, big_n = 0.0, a["chosen_mask"].sum()
    for rows in (slice(0, 2), slice(2, 6)):
        weight = (rows.stop - rows.start) / 6
        sft = 0.7
        if sft_norm == "token":
            sft = 0.7 * a["chosen_mask"][rows].sum() / (weight * big_n)
        part, _ = dpo_hybrid_loss(*(a[k][rows] for k in (*DPO_KEYS, "chosen_mask", "rejected_mask")),
                                  sft_weight=sft, **kw)
        total += weight * part
    np.testing.assert_allclose(total, full, rtol=1e-6)


def test_dpo_loss_type_errors_and_default():
    a = _dpo_batch(32)
    args = [a[k] for k in (*DPO_KEYS, "chosen_mask", "rejected_mask")]
    assert inspect.signature(dpo_hybrid_loss).parameters["loss_type"].default == "sigmoid"
    np.testing.assert_allclose(dpo_hybrid_loss(*args, label_smoothing=0.1)[0],
                               dpo_hybrid_loss(*args, label_smoothing=0.1, loss_type="sigmoid")[0])
    with pytest.raises(ValueError, match="loss_type"):
        dpo_hybrid_loss(*args, loss_type="kto")
    for lt in ("ipo", "hinge"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_hybrid_loss(*args, loss_type=lt, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_hybrid_loss(*args, loss_type="robust", label_smoothing=0.5)
    # robust with e = 0 is plain sigmoid DPO
    np.testing.assert_allclose(dpo_hybrid_loss(*args, loss_type="robust")[0], dpo_hybrid_loss(*args)[0], rtol=1e-7)
