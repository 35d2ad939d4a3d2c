"""The findings of a SPECS pipeline report, computed from the run's numbers: pure functions, no I/O.

Means and sample std over seeds, comparisons of two ablation variants, GF values of a cold-start curve,
the verdicts of the paper's claims (computed from the run, never written in) and the ablation findings,
as markdown lines. :mod:`specs_jax.pipeline.report` reads the run's artefacts, calls these and renders
the tables and plots.

Conventions: numbers are printed with :func:`fmt_num` (3 decimals); a claim "holds" only with a
strict improvement (a tie does not hold); two ablation means are "distinguishable" when their
difference exceeds one sample std of either variant (``|a - b| > max(std_a, std_b)``), which needs
at least two seeds for both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Claim",
    "ablation_findings",
    "claim_cold_start_format",
    "claim_final_beats_grpo_zero",
    "claim_gf_positive",
    "compare_means",
    "eval_metric",
    "fmt_mean_std",
    "fmt_num",
    "gf_values",
    "mean_std",
    "run_claims",
]

NA = "not available"
DASH = "—"
DEFAULT_SPLITS = ("id_test", "ood_test")
KIND_LABELS = {"dpo": "DPO-hybrid", "sft": "SFT", "none": "none"}


# ---------------------------------------------------------------------------------- numbers


def fmt_num(x: float | None, digits: int = 3) -> str:
    """A number as printed in the report (``digits`` decimals); missing or non-finite -> ``—``."""
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return DASH
    return f"{x:.{digits}f}"


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1), n)`` of the finite values; std is NaN for n < 2, mean NaN for n = 0."""
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if n > 1 else math.nan, n


def fmt_mean_std(values: Iterable[float | None], n_total: int | None = None) -> str:
    """``"m ± s"`` (``"m"`` with one value, ``—`` with none); ``" (n=k)"`` is appended when fewer than
    ``n_total`` values exist."""
    m, s, n = mean_std(values)
    if n == 0:
        return DASH
    text = fmt_num(m) if n == 1 else f"{fmt_num(m)} ± {fmt_num(s)}"
    if n_total is not None and n != n_total:
        text += f" (n={n})"
    return text


def compare_means(a: Sequence[float], b: Sequence[float]) -> tuple[float, bool | None]:
    """``(mean(a) - mean(b), distinguishable)``: distinguishable when the difference exceeds one sample
    std of either side (``|d| > max(std_a, std_b)``); ``None`` when a side has fewer than two values."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    diff = ma - mb
    if na < 2 or nb < 2 or not math.isfinite(diff):
        return diff, None
    return diff, bool(abs(diff) > max(sa, sb))


def gf_values(curve: Mapping[str, Any] | None) -> list[float] | None:
    """The GF values of a ``gf.json`` curve: its ``gf`` list, else computed from ``acc_id``/``acc_ood``
    with :func:`specs_jax.metrics.gf_curve` (gains over entry 0, GF 0 for a gain <= 0)."""
    if not curve:
        return None
    if curve.get("gf"):
        return [float(g) for g in curve["gf"]]
    if curve.get("acc_id") and curve.get("acc_ood") and curve.get("samples_seen"):
        from specs_jax.metrics import gf_curve

        return [float(g) for g in gf_curve(curve["samples_seen"], curve["acc_id"], curve["acc_ood"])]
    return None


# ---------------------------------------------------------------------------------- claims of one run


@dataclasses.dataclass
class Claim:
    """A claim of the paper checked on the run: ``holds`` True/False, ``None`` when it cannot be checked."""

    text: str
    holds: bool | None
    detail: str
    untestable: str | None = None  # why the run cannot test the claim (then no verdict, the measurement stays)

    @property
    def verdict(self) -> str:
        if self.untestable:
            return "untestable"
        return NA if self.holds is None else ("holds" if self.holds else "does not hold")

    def markdown(self, tag: str) -> str:
        why = f"Untestable here: {self.untestable}. Measured: " if self.untestable else ""
        return f"- **({tag}) {self.text}**: **{self.verdict}**. {why}{self.detail}"


def _per_split_claim(text: str, new: Mapping[str, float | None], old: Mapping[str, float | None],
                     new_name: str, old_name: str, splits: Sequence[str], what: str) -> Claim:
    parts, verdicts = [], []
    for split in splits:
        a, b = new.get(split), old.get(split)
        if a is None or b is None:
            parts.append(f"{split}: {NA}")
            verdicts.append(None)
            continue
        ok = a > b
        verdicts.append(ok)
        parts.append(f"{split}: {what} {new_name} {fmt_num(a)} {'>' if ok else '<='} {old_name} {fmt_num(b)} "
                     f"({'holds' if ok else 'does not hold'})")
    holds = None if not verdicts or None in verdicts else all(verdicts)
    if verdicts and False in verdicts:
        holds = False  # one split that fails is enough
    return Claim(text, holds, "; ".join(parts) + "." if parts else f"{NA}.")


def claim_cold_start_format(base_fmt: Mapping[str, float | None], cold_fmt: Mapping[str, float | None] | None,
                            splits: Sequence[str] = DEFAULT_SPLITS) -> Claim:
    """(a) The cold start raises the greedy format rate above the base model's, on every split."""
    text = "the cold start raises the format rate above the base model's"
    if not cold_fmt:
        return Claim(text, None, "No cold-start evaluation (no cold start in this run, or eval/cold_start.json "
                                 f"missing): {NA}.")
    return _per_split_claim(text, cold_fmt, base_fmt, "cold start", "base", splits, "format rate")


def claim_final_beats_grpo_zero(final_acc: Mapping[str, float | None] | None,
                                zero_acc: Mapping[str, float | None] | None,
                                splits: Sequence[str] = DEFAULT_SPLITS) -> Claim:
    """(b) Final GRPO after the cold start beats GRPO-zero in greedy accuracy on ID and on OOD."""
    text = "final GRPO after the cold start beats GRPO-zero on ID and on OOD accuracy"
    if not final_acc or not zero_acc:
        return Claim(text, None, f"Final or GRPO-zero evaluation missing: {NA}.")
    return _per_split_claim(text, final_acc, zero_acc, "final", "GRPO-zero", splits, "accuracy")


def claim_gf_positive(curve: Mapping[str, Any] | None) -> Claim:
    """(c) GF > 0 at the end of the cold start (last point of the GF curve)."""
    text = "GF > 0 at the end of the cold start"
    gf = gf_values(curve)
    if not gf:
        return Claim(text, None, f"No GF curve (cold_start/gf.json): {NA}.")
    end = gf[-1]
    seen = (curve.get("samples_seen") or [None])[-1]
    acc_id, acc_ood = curve.get("acc_id") or [], curve.get("acc_ood") or []
    gains = ""
    if len(acc_id) >= 2 and len(acc_ood) >= 2:
        gains = (f" (ID accuracy {fmt_num(acc_id[0])} -> {fmt_num(acc_id[-1])}, OOD accuracy "
                 f"{fmt_num(acc_ood[0])} -> {fmt_num(acc_ood[-1])})")
    where = f" after {seen} samples" if seen is not None else ""
    return Claim(text, end > 0, f"GF = {fmt_num(end)}{where}{gains}.")


def eval_metric(ev: Mapping | None, split: str, key: str) -> float | None:
    """``ev["splits"][split][key]`` of an ``eval/<model>.json`` as a float; ``None`` when missing or not a number."""
    v = ((ev or {}).get("splits") or {}).get(split, {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


MIN_RL_FORMAT = 0.9  # RL stability criterion: greedy format rate of an RL model at least this ...
MAX_RL_ACC_DROP = 0.05  # ... and its ID accuracy at most this far below the model the RL run started from
RL_CRITERION = (f"greedy ID format rate >= {MIN_RL_FORMAT}, ID accuracy at most {MAX_RL_ACC_DROP} below the model "
                "the RL run started from")


def rl_start(evals: Mapping[str, Mapping | None], cold_start: str) -> str:
    """The model a final GRPO started from: its cold start ``cold_start`` when that was evaluated, else the base
    model (no cold start)."""
    return cold_start if evals.get(cold_start) is not None else "base"


def rl_collapse(evals: Mapping[str, Mapping | None], model: str, start: str = "base",
                split: str = "id_test") -> str | None:
    """Why the RL model ``model`` (``grpo_zero``, ``final``, ...) fails the tiny runs' RL stability criterion
    (:data:`RL_CRITERION`), or None: its greedy format rate on ``split`` below :data:`MIN_RL_FORMAT`, or its
    accuracy more than :data:`MAX_RL_ACC_DROP` below that of ``start``, the model the run started from (the base
    model for GRPO-zero, the cold-start model for a final GRPO). ``evals``: model name -> ``eval/<model>.json``.
    The criterion looks at one RL run against its start, never at a comparison between cold starts."""
    ev, before = evals.get(model), evals.get(start)
    fmt, acc, start_acc = eval_metric(ev, split, "format_rate"), eval_metric(ev, split, "accuracy"), \
        eval_metric(before, split, "accuracy")
    if fmt is None or acc is None or start_acc is None:
        return None
    reasons = []
    if fmt < MIN_RL_FORMAT:
        reasons.append(f"{split} format rate {fmt:.3f} < {MIN_RL_FORMAT}")
    if acc < start_acc - MAX_RL_ACC_DROP:
        reasons.append(f"{split} accuracy {acc:.3f}, more than {MAX_RL_ACC_DROP} below its start's ({start}) "
                       f"{start_acc:.3f}")
    return "; ".join(reasons) or None


def _by_split(ev: Mapping | None, splits: Sequence[str], key: str) -> dict[str, float | None] | None:
    if ev is None:
        return None
    return {s: eval_metric(ev, s, key) for s in splits}


def run_claims(evals: Mapping[str, Mapping | None], splits: Sequence[str], curve: Mapping | None,
               untestable: str | None = None) -> list[Claim]:
    """Claims (a), (b), (c) of one run from its evaluations (model name -> ``eval/<model>.json``) and its
    cold-start GF curve; ``untestable``: why the run cannot test them (e.g. a base model that does not read its
    images, :func:`~specs_jax.pipeline.image_use.blind_base`), which replaces the verdicts."""
    claims = [
        claim_cold_start_format(_by_split(evals.get("base"), splits, "format_rate") or {},
                                _by_split(evals.get("cold_start"), splits, "format_rate"), splits),
        claim_final_beats_grpo_zero(_by_split(evals.get("final"), splits, "accuracy"),
                                    _by_split(evals.get("grpo_zero"), splits, "accuracy"), splits),
        claim_gf_positive(curve),
    ]
    return [dataclasses.replace(c, untestable=untestable) for c in claims]


# ---------------------------------------------------------------------------------- ablation


def _compare_text(name_a: str, a: Sequence[float], name_b: str, b: Sequence[float]) -> str:
    diff, dist = compare_means(a, b)
    if not math.isfinite(diff):
        return f"`{name_a}` vs `{name_b}`: {NA}"
    amount = (f"{'higher' if diff > 0 else 'lower'} by {fmt_num(abs(diff))}" if fmt_num(abs(diff)) != fmt_num(0.0)
              else "equal")
    if dist is None:
        verdict = "fewer than two seeds on a side: no std, cannot tell whether it is distinguishable"
    elif dist:
        verdict = "distinguishable (more than one std apart)"
    else:
        verdict = "within one std: not distinguishable"
    return f"`{name_a}` {fmt_mean_std(a)} vs `{name_b}` {fmt_mean_std(b)}: {amount}, {verdict}"


def _ranking(ranked: Sequence[tuple[float, str]]) -> str:
    """```a` 0.700 > `b` 0.600 = `c` 0.600``: ``=`` where the printed means are equal."""
    text = ""
    for i, (m, v) in enumerate(ranked):
        if i:
            text += " = " if fmt_num(m) == fmt_num(ranked[i - 1][0]) else " > "
        text += f"`{v}` {fmt_num(m)}"
    return text


def _summary_word(diff: float, dist: bool | None) -> str:
    if not math.isfinite(diff):
        return NA
    sign = f"{'+' if diff >= 0 else '-'}{fmt_num(abs(diff))}"
    if dist is None:
        return f"{sign} (one seed: no std)"
    if not dist:
        return f"{sign} (within one std: not distinguishable)"
    return f"{sign} ({'better' if diff > 0 else 'worse'}, distinguishable)"


def ablation_findings(variants: Sequence[str], kinds: Mapping[str, str],
                      data: Mapping[str, Mapping[int, Mapping[str, float]]], splits: Sequence[str]) -> list[str]:
    """The findings section of an ablation, as markdown lines: per metric, the best variant of each kind
    (``kinds``: variant -> ``dpo`` | ``sft`` | ``none``) compared pairwise, a ranking, and a summary of the
    final accuracies. ``data[variant][seed]``: metric key (``final/<split>/<metric>``,
    ``cold_start/<split>/<metric>``, ``gf_end``) -> value."""
    def values(v: str, key: str) -> list[float]:
        return [d[key] for d in data[v].values() if key in d]

    metrics = [(f"final/{s}/accuracy", f"final {s} accuracy") for s in splits]
    metrics += [(f"final/{s}/format_rate", f"final {s} format rate") for s in splits]
    metrics += [(f"cold_start/{s}/format_rate", f"cold-start {s} format rate") for s in splits]
    metrics.append(("gf_end", "GF at the end of the cold start"))
    by_kind = {k: [v for v in variants if kinds[v] == k] for k in ("dpo", "sft", "none")}
    present = [k for k in ("dpo", "sft", "none") if by_kind[k]]
    lines = ["Variants by kind: " + "; ".join(f"{KIND_LABELS[k]}: " + ", ".join(f"`{v}`" for v in by_kind[k])
                                               for k in present) + ".",
             ("For each metric: the best variant of each kind (highest mean over seeds), compared pairwise; "
             "distinguishable = the means differ by more than one sample std of either variant."), ""]
    summary, details = [], []
    for key, label in metrics:
        best = {}
        for k in present:
            cands = [(mean_std(values(v, key))[0], v) for v in by_kind[k] if values(v, key)]
            if cands:
                best[k] = max(cands)[1]
        if not best:
            continue
        ranking = sorted(((mean_std(values(v, key))[0], v) for v in variants if values(v, key)), reverse=True)
        parts = [f"{KIND_LABELS[ka]} vs {KIND_LABELS[kb]}: "
                 + _compare_text(best[ka], values(best[ka], key), best[kb], values(best[kb], key))
                 for i, ka in enumerate(present) for kb in present[i + 1:] if ka in best and kb in best]
        text = f"- **{label}**: " + ("; ".join(parts) + ". " if parts else "")
        text += "Ranking: " + _ranking(ranking) + "."
        details.append(text)
        if key.startswith("final/") and key.endswith("/accuracy"):
            for i, ka in enumerate(present):
                for kb in present[i + 1:]:
                    if ka in best and kb in best:
                        diff, dist = compare_means(values(best[ka], key), values(best[kb], key))
                        summary.append((ka, kb, f"{label} {_summary_word(diff, dist)}"))
    pairs: dict[tuple[str, str], list[str]] = {}
    for ka, kb, text in summary:
        pairs.setdefault((ka, kb), []).append(text)
    for (ka, kb), texts in pairs.items():
        lines.append(f"- **{KIND_LABELS[ka]} vs {KIND_LABELS[kb]}** (best variant of each kind per metric): "
                     + "; ".join(texts) + ".")
    return lines + ["", "Details:", ""] + details
