"""Report of a SPECS pipeline run: ``report.md`` and PNG plots, read from the run's artefacts.

Two entry points, called by :mod:`specs_jax.pipeline.run` after the stages:

- :func:`write_report` ``(run_dir)``: one run (one seed). Reads ``timings.json``, the stages'
  ``<stage>/train/metrics.jsonl``, ``eval/<model>.json`` (``base``, ``grpo_zero``, ``cold_start``,
  ``final``), ``cold_start/gf.json``, ``eval/rbf.json``, ``pairs/pairs_summary.json`` and
  ``config.json``; writes ``report.md`` and ``plots/*.png``.
- :func:`write_ablation_report` ``(run_dir, seeds, variants)``: ``run_dir/seed<s>/`` per seed with
  ``eval/final_<v>.json``, ``eval/cold_start_<v>.json`` and ``cold_start_<v>/gf.json`` per variant;
  writes ``report.md`` (mean +- sample std over seeds), ``plots/ablation.png`` and ``plots/ablation_gf.png``.

Every artefact is optional: a missing (or unreadable) one gives "not available" in its section,
never an exception, so that a report is always written at the end of a long run. The numbers
(means, sample std, verdicts of the paper's claims, GF from accuracy gains, the ablation findings)
come from the pure functions of :mod:`specs_jax.pipeline.findings` (its docstring states the
conventions); this module reads the files and renders the markdown tables and the plots.
"""

from __future__ import annotations

import json
import math
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specs_jax.pipeline.findings import (
    DASH,
    DEFAULT_SPLITS,
    KIND_LABELS,
    NA,
    RL_CRITERION,
    ablation_findings,
    eval_metric,
    fmt_mean_std,
    fmt_num,
    gf_values,
    mean_std,
    rl_collapse,
    rl_start,
    run_claims,
)
from specs_jax.pipeline.image_use import MIN_ID_GAIN, blind_base
from specs_jax.training.config import deep_merge

__all__ = ["write_ablation_report", "write_report"]

MODELS = ("base", "grpo_zero", "cold_start", "final")
MODEL_LABELS = {"base": "base", "grpo_zero": "GRPO-zero", "cold_start": "cold start", "final": "final"}
STAGES = ("base", "grpo_zero", "cold_start", "grpo_final")
N_EXAMPLES = 3
DPI = 100


# ---------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """The JSON at ``path``, or ``None`` when it is missing or unreadable (a warning on stderr)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"report: cannot read {path}: {e}", file=sys.stderr)
        return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` sorted by step; the last record of a step wins (a resumed run
    appends), lines that do not parse (a kill mid-write) are skipped."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]


def series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that have a finite number under ``key``."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def _splits_of(evals: Iterable[Mapping | None]) -> list[str]:
    """Splits found in the evaluations: ``id_test``, ``ood_test`` first, then the others in order."""
    found: list[str] = []
    for e in evals:
        for s in (e or {}).get("splits", {}) or {}:
            if s not in found:
                found.append(s)
    return [s for s in DEFAULT_SPLITS if s in found] + [s for s in found if s not in DEFAULT_SPLITS]


def _pass_keys(evals: Iterable[Mapping | None], split: str) -> list[str]:
    keys = {k for e in evals for k in ((e or {}).get("splits") or {}).get(split, {}) if re.fullmatch(r"pass@\d+", k)}
    return sorted(keys, key=lambda k: int(k.split("@")[1]))


# ---------------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        text = fmt_num(x) if isinstance(x, float) else (DASH if x is None else str(x))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _code_block(text: str) -> str:
    """``text`` in a fenced block whose fence is longer than any backtick run inside it."""
    runs = [len(m) for m in re.findall(r"`+", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}text\n{text}\n{fence}"


def _inline_code(text: str) -> str:
    runs = [len(m) for m in re.findall(r"`+", text)]
    tick = "`" * (max(runs, default=0) + 1)
    return f"{tick} {text} {tick}" if runs else f"`{text}`"


def _image(title: str, path: Path | None) -> str:
    return f"![{title}](plots/{path.name})" if path is not None else f"Plot {NA}."


def _guard(name: str, fn: Callable[[], list[str]]) -> list[str]:
    """Run a section renderer; an unexpected error yields a "not available" note, not a failed report."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the report must always be written
        traceback.print_exc(file=sys.stderr)
        return [f"{name}: {NA} (error while building this section: {type(e).__name__}: {e})."]


# ---------------------------------------------------------------------------------- plotting


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _curve_panels(path: Path, panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[Mapping], str]]]],
                  suptitle: str) -> Path | None:
    """One figure of line panels: ``(title, [(label, records, key), ...])``; ``None`` when no data at all."""
    data = [(title, [(label, *series(recs, key)) for label, recs, key in lines]) for title, lines in panels]
    data = [(title, [ln for ln in lines if ln[1]]) for title, lines in data]
    data = [d for d in data if d[1]]
    if not data:
        return None
    plt = _pyplot()
    ncols = min(len(data), 2)
    nrows = -(-len(data) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, data):
        for label, x, y in lines:
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=11)
    return _save(fig, path)


def _grouped_bars(ax, groups: Sequence[str], bars: Sequence[str], values: np.ndarray,
                  errors: np.ndarray | None = None) -> None:
    """``values[bar, group]``; NaN bars are left out."""
    width = 0.8 / max(len(bars), 1)
    x = np.arange(len(groups))
    for i, name in enumerate(bars):
        v = np.nan_to_num(values[i], nan=0.0)
        err = None if errors is None else np.nan_to_num(errors[i], nan=0.0)
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, v, width, yerr=err, capsize=3 if err is not None else 0,
               label=name)
    ax.set_xticks(x, groups, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------------------------- config summary


def _compact(x: Any) -> str:
    return json.dumps(x, separators=(", ", ": "), default=str)


def _config_lines(cfg: Mapping | None) -> list[str]:
    if not isinstance(cfg, Mapping):
        return [f"Pipeline config (config.json): {NA}."]
    common = cfg.get("common") or {}
    rows = []
    for stage in STAGES:
        section = (cfg.get("base") or {}).get("train", {}) if stage == "base" else cfg.get(stage)
        if section is None:
            continue
        merged = deep_merge(common, section or {})
        train, optim, loss, rl = (merged.get(k) or {} for k in ("train", "optim", "loss", "rl"))
        extra = []
        if stage == "cold_start":
            extra.append(f"kind {section.get('kind', 'dpo')}")
        if rl:
            extra.append(f"group {rl.get('group_size', DASH)}, max new tokens {rl.get('max_new_tokens', DASH)}")
        loss_text = loss.get("name", "default") + (f" {_compact(loss['kwargs'])}" if loss.get("kwargs") else "")
        rows.append([stage, *(str(x.get(k, "default")) for x, k in ((train, "steps"), (train, "batch_size"),
                                                                    (optim, "lr"))), loss_text, ", ".join(extra)])
    lines = ["Steps per stage (stage sections over `common`; `default`: the run-config default):", "",
             _table(["stage", "steps", "batch", "lr", "loss", "other"], rows), ""]
    for key in ("seed", "synth", "pairs", "eval", "gf_points", "rbf", "ablation"):
        if key in cfg:
            lines.append(f"- `{key}`: {_compact(cfg[key])}")
    return lines


# ---------------------------------------------------------------------------------- single run


def _timing_lines(timings: Mapping | None) -> list[str]:
    if not timings:
        return [f"Timings (timings.json): {NA}."]
    secs = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    total = sum(secs.values())
    rows = [[k, fmt_num(v, 1), fmt_num(v / 60, 2)] for k, v in secs.items()]
    rows.append(["**total**", fmt_num(total, 1), fmt_num(total / 60, 2)])
    return [_table(["stage", "seconds", "minutes"], rows), "", (f"Total time: {fmt_num(total, 1)} s "
            f"({fmt_num(total / 60, 1)} min).")]


def _eval_lines(evals: Mapping[str, Mapping | None], splits: Sequence[str], plots: Path) -> list[str]:
    present = [m for m in MODELS if evals.get(m) is not None]
    if not present:
        return [f"Evaluations (eval/*.json): {NA}."]
    missing = [m for m in MODELS if evals.get(m) is None]
    header = ["model"] + [f"{s} {what}" for s in splits for what in ("accuracy", "format rate")]
    rows = [[MODEL_LABELS[m]] + [eval_metric(evals[m], s, k) for s in splits for k in ("accuracy", "format_rate")]
            for m in present]
    lines = [("Greedy decoding (accuracy = correct answer in the last `\\boxed{}`, format rate = SPECS format "
             "holds):"), "", _table(header, rows), ""]
    if missing:
        lines += [f"Models without an evaluation ({NA}): " + ", ".join(MODEL_LABELS[m] for m in missing) + ".", ""]
    lines += [_image("greedy accuracy and format rate", _eval_plot(evals, present, splits, plots)), ""]
    lines += ["### pass@k (sampling)", ""]
    for split in splits:
        keys = _pass_keys((evals[m] for m in present), split)
        cols = ["sample_accuracy", "sample_format_rate", *keys, "n_prompts", "mean_length"]
        rows = [[MODEL_LABELS[m]] + [eval_metric(evals[m], split, k) if k != "n_prompts"
                                     else _int_or_none(eval_metric(evals[m], split, k)) for k in cols]
                for m in present]
        lines += [f"**{split}**", "", _table(["model", *cols], rows), ""]
    img = _passk_plot(evals, present, splits, plots)
    if img is not None:
        lines += [_image("pass@k", img), ""]
    return lines


def _int_or_none(x: float | None) -> int | None:
    return None if x is None else int(x)


def _eval_plot(evals, models, splits, plots: Path) -> Path | None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], (("accuracy", "greedy accuracy"), ("format_rate", "greedy format rate"))):
        vals = np.array([[eval_metric(evals[m], s, key) if eval_metric(evals[m], s, key) is not None else np.nan
                          for s in splits] for m in models], dtype=np.float64)
        _grouped_bars(ax, list(splits), [MODEL_LABELS[m] for m in models], vals)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=8)
    return _save(fig, plots / "eval_bars.png")


def _passk_plot(evals, models, splits, plots: Path) -> Path | None:
    if not any(_pass_keys((evals[m] for m in models), s) for s in splits):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for m in models:
            keys = _pass_keys([evals[m]], split)
            ks = [int(k.split("@")[1]) for k in keys]
            if ks:
                ax.plot(ks, [eval_metric(evals[m], split, k) for k in keys], marker="o", label=MODEL_LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title(f"pass@k, {split}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, plots / "pass_at_k.png")


def _curves_lines(run_dir: Path, plots: Path) -> list[str]:
    m = {s: read_metrics(run_dir / s / "train" / "metrics.jsonl") for s in STAGES}
    lines = ["### RL stages (GRPO-zero and final GRPO)", ""]
    rl = [("GRPO-zero", m["grpo_zero"]), ("final GRPO", m["grpo_final"])]
    img = _curve_panels(plots / "rl_curves.png", [
        ("reward mean", [(n, r, "reward/mean") for n, r in rl]),
        ("rollout accuracy", [(n, r, "reward/accuracy") for n, r in rl]),
        ("rollout format rate", [(n, r, "reward/format_rate") for n, r in rl]),
        ("rollout length (tokens)", [(n, r, "rollout/length_mean") for n, r in rl]),
    ], "GRPO training (per step, over the sampled rollouts)")
    lines += [_image("RL curves", img) if img else f"RL metrics (grpo_zero/grpo_final train/metrics.jsonl): {NA}.", ""]
    for label, recs in rl:
        if recs:
            last = recs[-1]
            lines.append(f"- {label}: {len(recs)} logged steps, last step {last['step']}: reward mean "
                         f"{fmt_num(last.get('reward/mean'))}, accuracy {fmt_num(last.get('reward/accuracy'))}, "
                         f"format rate {fmt_num(last.get('reward/format_rate'))}.")
    lines += ["", "### Cold start", ""]
    cs = m["cold_start"]
    if any("rewards/chosen" in r for r in cs):
        img = _curve_panels(plots / "cold_start_curves.png", [
            ("DPO implicit rewards", [("chosen", cs, "rewards/chosen"), ("rejected", cs, "rewards/rejected"),
                                      ("margin", cs, "rewards/margins")]),
            ("reward accuracy (chosen > rejected)", [("accuracy", cs, "rewards/accuracies")]),
            ("NLL of the chosen response (SFT term)", [("nll", cs, "nll")]),
            ("loss", [("loss", cs, "loss")]),
        ], "DPO-hybrid cold start")
    else:
        img = _curve_panels(plots / "cold_start_curves.png", [
            ("loss", [("loss", cs, "loss")]), ("NLL", [("nll", cs, "nll")])], "cold start (SFT)")
    lines += [_image("cold-start curves", img) if img else f"Cold-start metrics (cold_start/train/metrics.jsonl): {NA}.",
              ""]
    if cs and "rewards/chosen" in cs[-1]:
        last = cs[-1]
        lines.append(f"Last step {last['step']}: rewards/chosen {fmt_num(last.get('rewards/chosen'))}, rewards/rejected "
                     f"{fmt_num(last.get('rewards/rejected'))}, margin {fmt_num(last.get('rewards/margins'))}, "
                     f"accuracy {fmt_num(last.get('rewards/accuracies'))}, nll {fmt_num(last.get('nll'))}.")
        lines.append("")
    lines += ["### Base model SFT", ""]
    img = _curve_panels(plots / "base_sft.png", [("loss", [("loss", m["base"], "loss")]),
                                                 ("NLL", [("nll", m["base"], "nll")])], "base model SFT")
    lines += [_image("base SFT loss", img) if img else f"Base SFT metrics (base/train/metrics.jsonl): {NA}.", ""]
    return lines


def _gf_lines(curve: Mapping | None, plots: Path) -> list[str]:
    gf = gf_values(curve)
    if not gf:
        return [f"GF curve (cold_start/gf.json): {NA}."]
    seen = list(curve.get("samples_seen") or range(len(gf)))
    acc_id = list(curve.get("acc_id") or [None] * len(gf))
    acc_ood = list(curve.get("acc_ood") or [None] * len(gf))
    rows = [[int(n), _f(a), _f(o), _f(g)] for n, a, o, g in zip(seen, acc_id, acc_ood, gf)]
    lines = [("GF = (1+b²)·G_ood·G_id / (b²·G_id + G_ood), b = 2, gains over the starting model (row 0); "
             "GF = 0 when either gain is <= 0."), "", _table(["samples seen", "ID accuracy", "OOD accuracy", "GF"], rows),
             ""]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, ys in (("ID accuracy", acc_id), ("OOD accuracy", acc_ood), ("GF", gf)):
        pts = [(n, y) for n, y in zip(seen, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if label == "GF" else "-")
    ax.set_xlabel("cold-start samples seen")
    ax.set_title("Generalization Factor over the cold start", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lines += [_image("GF curve", _save(fig, plots / "gf_curve.png")), ""]
    return lines


def _f(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _image_use_lines(use: Mapping | None) -> list[str]:
    """Greedy accuracy and reference-solution NLL with the real vs blank images (``eval/image_use.json``)."""
    if not use:
        return [f"Image use (eval/image_use.json): {NA}."]
    rows = [[model, split, fmt_num(v["real"]), fmt_num(v["blank"]), f"{v['real'] - v['blank']:+.3f}",
             fmt_num(v["nll_real"], 4), fmt_num(v["nll_blank"], 4)]
            for model, by_split in use.items() for split, v in by_split.items()]
    return [_table(["model", "split", "accuracy, real images", "blank images", "real - blank", "solution NLL, real",
                    "blank"], rows), "",
            f"Greedy accuracy with the real images and with blank white images of the same size, and the mean "
            f"per-token NLL of the reference solutions (teacher-forced). A base model whose ID gain is below "
            f"{MIN_ID_GAIN} answers from the question text, and the findings above are then untestable."]


def _rbf_lines(rbf: Mapping | None) -> list[str]:
    if not rbf:
        return [f"RBF (eval/rbf.json): {NA}."]
    ns = sorted({n for v in rbf.values() if isinstance(v, Mapping) for n in v}, key=lambda n: int(n))
    label = {"grpo_zero": "GRPO-zero", "final": "final"}
    rows = [[label.get(m, m)] + [_f(v.get(n)) for n in ns] for m, v in rbf.items() if isinstance(v, Mapping)]
    return ["Rollout Branching Factor (mean nucleus size at p = 0.95 over the decoding steps of n rollouts):", "",
            _table(["policy", *(f"n = {n}" for n in ns)], rows)]


def _pairs_lines(summary: Mapping | None) -> list[str]:
    if not summary:
        return [f"Pair statistics (pairs/pairs_summary.json): {NA}."]
    lines = [_table(["prompts", "prompts with pairs", "pairs"],
                    [[summary.get("prompts"), summary.get("prompts_with_pairs"), summary.get("pairs")]]), ""]
    for key, title in (("by_kind", "corruption kind"), ("by_source", "source of the rejected response"),
                       ("dropped", "drop reason")):
        d = summary.get(key)
        if isinstance(d, Mapping) and d:
            lines += [_table([title, "count"], [[k, v] for k, v in d.items()]), ""]
        else:
            lines += [f"{title}: {NA}.", ""]
    if summary.get("config"):
        lines.append(f"Pair config: {_inline_code(_compact(summary['config']))}")
    return lines


def _example_lines(final: Mapping | None, splits: Sequence[str]) -> list[str]:
    examples = (final or {}).get("examples") or {}
    if not examples:
        return [f"Example responses (eval/final.json examples): {NA}."]
    lines = []
    for split in [*splits, *(s for s in examples if s not in splits)]:
        for i, ex in enumerate((examples.get(split) or [])[:N_EXAMPLES]):
            lines += [(f"**{split} #{i + 1}** — correct: {ex.get('correct')}, formatted: {ex.get('formatted')}, "
                      f"reference answer: {_inline_code(str(ex.get('answer')))}"), "", "Question:", "",
                      _code_block(str(ex.get("question", ""))), "", "Response:", "",
                      _code_block(str(ex.get("response", ""))), ""]
    return lines or [f"Example responses: {NA}."]


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png`` for one pipeline run; returns the report path."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    cfg = _read_json(run_dir / "config.json")
    evals = {m: _read_json(run_dir / "eval" / f"{m}.json") for m in MODELS}
    splits = _splits_of(evals.values()) or list(DEFAULT_SPLITS)
    curve = _read_json(run_dir / "cold_start" / "gf.json")
    kind = ((cfg or {}).get("cold_start") or {}).get("kind", "dpo") if isinstance(cfg, Mapping) else "dpo"

    out = [f"# SPECS pipeline report: `{run_dir.name}`", "",
           f"Stages: base model SFT -> GRPO-zero -> self-distilled pairs -> cold start "
           f"({KIND_LABELS.get(kind, kind)}) -> final GRPO -> evaluation. Splits: "
           + ", ".join(f"`{s}`" for s in splits) + ".", ""]
    use = _read_json(run_dir / "eval" / "image_use.json")
    blind = blind_base(use)
    if blind:
        out += [f"> **This run cannot test SPECS:** {blind}. See *Image use* below.", ""]
    for model, start, label in (("grpo_zero", "base", "GRPO-zero"),
                                ("final", rl_start(evals, "cold_start"), "The final GRPO")):
        if why := rl_collapse(evals, model, start):
            out += [f"> **{label} failed the RL stability criterion** ({RL_CRITERION}): {why}.", ""]
    out += ["## Findings", ""]
    out += _guard("Findings", lambda: [c.markdown(t) for t, c in
                                       zip("abc", run_claims(evals, splits, curve, untestable=blind))]
                  + ["", "A claim holds only with a strict improvement; each split is checked separately."])
    out += ["", "## Configuration", ""] + _guard("Configuration", lambda: _config_lines(cfg))
    out += ["", "## Evaluation", ""] + _guard("Evaluation", lambda: _eval_lines(evals, splits, plots))
    out += ["", "## Image use", ""] + _guard("Image use", lambda: _image_use_lines(use))
    out += ["", "## Training curves", ""] + _guard("Training curves", lambda: _curves_lines(run_dir, plots))
    out += ["", "## Generalization Factor (cold start)", ""] + _guard("GF", lambda: _gf_lines(curve, plots))
    out += ["", "## Rollout Branching Factor", ""] + _guard(
        "RBF", lambda: _rbf_lines(_read_json(run_dir / "eval" / "rbf.json")))
    out += ["", "## Self-distilled preference pairs", ""] + _guard(
        "Pairs", lambda: _pairs_lines(_read_json(run_dir / "pairs" / "pairs_summary.json")))
    out += ["", "## Example greedy responses of the final model", ""] + _guard(
        "Examples", lambda: _example_lines(evals.get("final"), splits))
    out += ["", "## Timings", ""] + _guard("Timings", lambda: _timing_lines(_read_json(run_dir / "timings.json")))
    path = run_dir / "report.md"
    path.write_text("\n".join(out).rstrip() + "\n")
    return path


# ---------------------------------------------------------------------------------- ablation


def _variant_kind(name: str, cfg: Mapping | None) -> str:
    """``dpo`` | ``sft`` | ``none`` of a variant: from config.json (variant over ``cold_start``), else its name."""
    if isinstance(cfg, Mapping):
        variants = (cfg.get("ablation") or {}).get("variants") or {}
        if name in variants and isinstance(variants[name], Mapping):
            default = (cfg.get("cold_start") or {}).get("kind", "dpo")
            return str(variants[name].get("kind", default))
    for kind in ("none", "sft", "dpo"):
        if name.lower().startswith(kind):
            return kind
    return "dpo"


def _variant_file(seed_dir: Path, prefix: str, variant: str, single: bool, suffix: str = ".json") -> Path:
    """``seed_dir/<prefix>_<variant><suffix>``; with one variant the pipeline uses ``<prefix><suffix>``."""
    path = seed_dir / f"{prefix}_{variant}{suffix}"
    if not path.exists() and single:
        plain = seed_dir / f"{prefix}{suffix}"
        if plain.exists():
            return plain
    return path


def _seed_values(seed_dir: Path, variant: str, single: bool, splits: Sequence[str]) -> dict[str, float]:
    """The numbers of one (seed, variant): ``final/<split>/<metric>``, ``cold_start/<split>/<metric>``, ``gf_end``."""
    vals: dict[str, float] = {}
    for model in ("final", "cold_start"):
        ev = _read_json(_variant_file(seed_dir / "eval", model, variant, single))
        for split in splits:
            for key in ((ev or {}).get("splits") or {}).get(split, {}):
                v = eval_metric(ev, split, key)
                if v is not None:
                    vals[f"{model}/{split}/{key}"] = v
    gf_dir = _variant_file(seed_dir, "cold_start", variant, single, suffix="")
    gf = gf_values(_read_json(gf_dir / "gf.json"))
    if gf:
        vals["gf_end"] = gf[-1]
    return vals


def _ablation_splits(run_dir: Path, seeds: Sequence[int], variants: Sequence[str], single: bool) -> list[str]:
    evals = [_read_json(_variant_file(run_dir / f"seed{s}" / "eval", "final", v, single)) for s in seeds
             for v in variants]
    evals += [_read_json(run_dir / f"seed{s}" / "eval" / "base.json") for s in seeds]
    return _splits_of(evals) or list(DEFAULT_SPLITS)


def _ablation_plot(variants: Sequence[str], data: Mapping[str, Mapping[int, Mapping[str, float]]],
                   splits: Sequence[str], plots: Path) -> Path:
    plt = _pyplot()
    groups = [(f"final/{s}/{k}", f"{s}\n{label}") for k, label in (("accuracy", "accuracy"), ("format_rate", "format"))
              for s in splits]
    groups.append(("gf_end", "GF (end of\ncold start)"))
    pass_groups = []
    for s in splits:
        keys = sorted({k.split("/")[-1] for d in data.values() for vals in d.values() for k in vals
                       if k.startswith(f"final/{s}/pass@")}, key=lambda k: int(k.split("@")[1]))
        pass_groups += [(f"final/{s}/{k}", f"{s}\n{k}") for k in keys]
    panels = [("final model (mean ± sample std over seeds)", groups)]
    if pass_groups:
        panels.append(("final model pass@k", pass_groups))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, grp) in zip(axes[0], panels):
        means = np.full((len(variants), len(grp)), np.nan)
        stds = np.full_like(means, np.nan)
        for i, v in enumerate(variants):
            for j, (key, _) in enumerate(grp):
                means[i, j], stds[i, j], _n = mean_std(d.get(key) for d in data[v].values())
        _grouped_bars(ax, [g[1] for g in grp], list(variants), means, stds)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(1.05, float(np.nanmax(means + np.nan_to_num(stds), initial=0)) * 1.05))
    axes[0][0].legend(fontsize=8, ncol=2)
    return _save(fig, plots / "ablation.png")


def _gf_curve_points(run_dir: Path, seeds: Sequence[int], variant: str, single: bool) -> dict[int, dict]:
    """``{samples seen: {"acc_id": [...], "acc_ood": [...], "gf": [...]}}`` (one value per seed that has the
    point) from the variant's ``cold_start_<variant>/gf.json`` of every seed."""
    points: dict[int, dict[str, list[float]]] = {}
    for s in seeds:
        curve = _read_json(_variant_file(run_dir / f"seed{s}", "cold_start", variant, single, suffix="") / "gf.json")
        gf = gf_values(curve)
        for i, n in enumerate((curve.get("samples_seen") or range(len(gf))) if gf else ()):
            p = points.setdefault(int(n), {"acc_id": [], "acc_ood": [], "gf": []})
            p["gf"].append(gf[i])
            for key in ("acc_id", "acc_ood"):
                if curve.get(key):
                    p[key].append(float(curve[key][i]))
    return dict(sorted(points.items()))


def _ablation_gf_plot(curves: Mapping[str, Mapping[int, Mapping[str, list[float]]]], plots: Path) -> Path:
    """ID accuracy, OOD accuracy and GF over the cold start, one line per variant (mean ± sample std over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, (("acc_id", "ID accuracy"), ("acc_ood", "OOD accuracy"), ("gf", "GF"))):
        for variant, points in curves.items():
            xs = [n for n, p in points.items() if p[key]]
            stats = [mean_std(points[n][key]) for n in xs]
            ax.errorbar(xs, [m for m, _, _ in stats], yerr=np.nan_to_num([sd for _, sd, _ in stats]), marker="o",
                        capsize=3, label=variant)
        ax.set_title(f"{title} over the cold start", fontsize=10)
        ax.set_xlabel("cold-start samples seen")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, plots / "ablation_gf.png")


def write_ablation_report(run_dir: str | Path, seeds: Sequence[int], variants: Sequence[str]) -> Path:
    """Write ``run_dir/report.md``, ``run_dir/plots/ablation.png`` and ``ablation_gf.png`` (the cold starts' GF
    curves) for a cold-start ablation over seeds
    (``run_dir/seed<s>/``, one cold start and final GRPO per variant); returns the report path."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    seeds, variants = list(seeds), list(variants)
    single = len(variants) == 1
    cfg = _read_json(run_dir / "config.json")
    kinds = {v: _variant_kind(v, cfg) for v in variants}
    splits = _ablation_splits(run_dir, seeds, variants, single)
    data = {v: {s: _seed_values(run_dir / f"seed{s}", v, single, splits) for s in seeds} for v in variants}
    shared = {m: {s: _read_json(run_dir / f"seed{s}" / "eval" / f"{m}.json") for s in seeds}
              for m in ("base", "grpo_zero")}

    def vals(v: str, key: str) -> list[float]:
        return [d[key] for d in data[v].values() if key in d]

    def n_final(v: str) -> int:
        return sum(any(k.startswith("final/") for k in d) for d in data[v].values())

    out = [f"# SPECS cold-start ablation: `{run_dir.name}`", "",
           f"Seeds: {', '.join(map(str, seeds))}; variants: " + ", ".join(f"`{v}` ({KIND_LABELS.get(kinds[v], kinds[v])})"
                                                                        for v in variants)
           + ". Cells: mean ± sample std (ddof = 1) over the seeds that have the number; `(n=k)` marks a cell "
             "with fewer seeds than the row's count.", ""]
    blind = [f"seed {s}: {why}" for s in seeds
             if (why := blind_base(_read_json(run_dir / f"seed{s}" / "eval" / "image_use.json")))]
    if blind:
        out += ["> **This ablation cannot test SPECS:** " + "; ".join(blind) + ". Its findings below compare "
                "models that answer from the question text.", ""]
    collapsed = []
    for s in seeds:
        evals = {m: shared[m][s] for m in shared}
        eval_dir = run_dir / f"seed{s}" / "eval"
        for v in variants:
            evals[f"final_{v}"] = _read_json(_variant_file(eval_dir, "final", v, single))
            evals[f"cold_start_{v}"] = _read_json(_variant_file(eval_dir, "cold_start", v, single))
        runs = [("grpo_zero", "base", "GRPO-zero")] + [
            (f"final_{v}", rl_start(evals, f"cold_start_{v}"), f"`{v}` final") for v in variants]
        collapsed += [f"seed {s} {label}: {why}" for m, start, label in runs if (why := rl_collapse(evals, m, start))]
    if collapsed:
        out += [f"> **RL runs that failed the stability criterion** ({RL_CRITERION}): " + "; ".join(collapsed)
                + ".", ""]

    def findings() -> list[str]:
        if not any(n_final(v) for v in variants):
            return [f"Final-model evaluations (seed*/eval/final_<variant>.json): {NA}."]
        return ablation_findings(variants, kinds, data, splits)

    out += ["## Findings", ""] + _guard("Findings", findings)

    def final_table() -> list[str]:
        keys = [f"final/{s}/{k}" for k in ("accuracy", "format_rate") for s in splits]
        header = ["variant", "kind", "seeds", *(f"{k.split('/')[1]} {k.split('/')[2].replace('_', ' ')}" for k in keys)]
        rows = [[f"`{v}`", KIND_LABELS.get(kinds[v], kinds[v]), n_final(v)]
                + [fmt_mean_std(vals(v, k), n_final(v)) for k in keys] for v in variants]
        lines = ["### Final model (greedy)", "", _table(header, rows), ""]
        lines += ["### Final model pass@k (sampling)", ""]
        for s in splits:
            pk = sorted({k.split("/")[-1] for v in variants for d in data[v].values() for k in d
                         if k.startswith(f"final/{s}/pass@")}, key=lambda k: int(k.split("@")[1]))
            if not pk:
                lines += [f"**{s}**: {NA}.", ""]
                continue
            rows = [[f"`{v}`", n_final(v)] + [fmt_mean_std(vals(v, f"final/{s}/{k}"), n_final(v)) for k in pk]
                    for v in variants]
            lines += [f"**{s}**", "", _table(["variant", "seeds", *pk], rows), ""]
        return lines

    out += ["", "## Results", ""] + _guard("Final model", final_table)

    def cold_table() -> list[str]:
        keys = [f"cold_start/{s}/{k}" for k in ("format_rate", "accuracy") for s in splits]
        header = ["variant", "kind", *(f"{k.split('/')[1]} {k.split('/')[2].replace('_', ' ')}" for k in keys),
                  "GF at end"]
        rows = []
        for v in variants:
            if kinds[v] == "none":
                rows.append([f"`{v}`", "none"] + ["no cold start"] * (len(keys) + 1))
                continue
            n = len(seeds)
            rows.append([f"`{v}`", KIND_LABELS.get(kinds[v], kinds[v])]
                        + [fmt_mean_std(vals(v, k), n) for k in keys] + [fmt_mean_std(vals(v, "gf_end"), n)])
        ref = []
        for m, label in (("base", "base"), ("grpo_zero", "GRPO-zero")):
            evs = [e for e in shared[m].values() if e is not None]
            if evs:
                ref.append([label, len(evs)] + [fmt_mean_std([eval_metric(e, s, k) for e in evs], len(evs))
                                                for k in ("accuracy", "format_rate") for s in splits])
        lines = ["### Cold-start model", "", _table(header, rows), ""]
        lines += ["### Shared models (per seed, before the variants)", ""]
        if ref:
            lines += [_table(["model", "seeds", *(f"{s} {k}" for k in ("accuracy", "format rate") for s in splits)],
                             ref), ""]
        else:
            lines += [f"Base / GRPO-zero evaluations: {NA}.", ""]
        return lines

    out += _guard("Cold start", cold_table)

    def gf_curves() -> list[str]:
        curves = {v: _gf_curve_points(run_dir, seeds, v, single) for v in variants if kinds[v] != "none"}
        curves = {v: c for v, c in curves.items() if c}
        if not curves:
            return [f"Cold-start GF curves (seed*/cold_start_<variant>/gf.json): {NA}.", ""]
        rows = [[f"`{v}`", n] + [fmt_mean_std(p[k], len(seeds)) for k in ("acc_id", "acc_ood", "gf")]
                for v, points in curves.items() for n, p in points.items()]
        return ["### Cold-start GF curves", "",
                "The cold start's checkpoints, greedy accuracy and GF (gains over the model it starts from), mean ± "
                "sample std over seeds:", "",
                _table(["variant", "samples seen", "ID accuracy", "OOD accuracy", "GF"], rows), "",
                _image("GF curves", _ablation_gf_plot(curves, plots)), ""]

    out += _guard("GF curves", gf_curves)

    def per_seed() -> list[str]:
        cols = [f"final/{s}/accuracy" for s in splits] + [f"final/{s}/format_rate" for s in splits] + ["gf_end"]
        rows = [[s, f"`{v}`"] + [data[v][s].get(k) for k in cols] for s in seeds for v in variants]
        names = ["final " + " ".join(k.split("/")[1:]).replace("_rate", " rate") for k in cols[:-1]]
        return ["### Per seed", "", _table(["seed", "variant", *names, "GF at end of cold start"], rows), ""]

    out += _guard("Per seed", per_seed)
    out += ["## Plot", ""] + _guard("Plot", lambda: [_image("ablation", _ablation_plot(variants, data, splits, plots))])

    def timings() -> list[str]:
        rows = []
        for s in seeds:
            t = _read_json(run_dir / f"seed{s}" / "timings.json")
            if isinstance(t, Mapping):
                rows.append([s, sum(float(x) for x in t.values() if isinstance(x, (int, float))) / 60])
        if not rows:
            return [f"Timings (seed*/timings.json): {NA}."]
        total = sum(r[1] for r in rows)
        return [_table(["seed", "minutes"], [[s, fmt_num(m, 1)] for s, m in rows] + [["**total**", fmt_num(total, 1)]])]

    out += ["", "## Timings", ""] + _guard("Timings", timings)
    out += ["", "## Configuration", ""] + _guard("Configuration", lambda: _config_lines(cfg))
    path = run_dir / "report.md"
    path.write_text("\n".join(out).rstrip() + "\n")
    return path
