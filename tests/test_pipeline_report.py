"""specs_jax.pipeline.report on fabricated run artefacts (no training): tables, plots, verdicts, ablation stats."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specs_jax.pipeline import report
from specs_jax.pipeline.findings import (
    claim_cold_start_format,
    claim_final_beats_grpo_zero,
    claim_gf_positive,
    compare_means,
    fmt_mean_std,
    fmt_num,
    gf_values,
    mean_std,
)
from specs_jax.pipeline.report import write_ablation_report, write_report

SPLITS = ("id_test", "ood_test")
LABELS = {"base": "base", "grpo_zero": "GRPO-zero", "cold_start": "cold start", "final": "final"}


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _eval(acc, fmt, passk=(1, 4, 8), examples=True):
    """An eval/<model>.json with greedy ``acc``/``fmt`` = (id, ood)."""
    splits = {}
    for i, s in enumerate(SPLITS):
        m = {"accuracy": acc[i], "format_rate": fmt[i], "sample_accuracy": acc[i] * 0.9,
             "sample_format_rate": fmt[i] * 0.9, "n_prompts": 64, "mean_length": 31.5}
        for k in passk:
            m[f"pass@{k}"] = min(1.0, acc[i] + 0.02 * k)
        splits[s] = m
    ex = {s: [{"question": f"What is shown? ({s} {j})", "answer": str(j),
               "response": f"<think>count ``` {j}</think> <answer>\\boxed{{{j}}}</answer> | pipe",
               "correct": True, "formatted": True} for j in range(4)] for s in SPLITS} if examples else {}
    return {"splits": splits, "examples": ex}


def _metrics(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rl_rows(n=6):
    rows = []
    for k in range(1, n + 1):
        r = {"step": k, "reward/mean": 0.1 * k, "reward/std": 0.3, "reward/format_rate": 0.05 * k,
             "reward/accuracy": 0.04 * k, "rollout/length_mean": 40 - k, "rollout/groups_kept": 4,
             "clip_ratio/low": 0.0, "time/rollout_s": 1.0, "time/update_s": 0.5, "perf/tokens_per_s": 100.0}
        if k != 3:  # a step where every group was filtered has no loss
            r["loss"] = 0.5 / k
        rows.append(r)
    return rows


def make_run(root: Path, *, acc=None, fmt=None, gf=(0.0, 0.05, 0.12), rbf=True, pairs=True, timings=True,
             cold_start=True, config=True, blank=(0.10, 0.12)) -> Path:
    """Fabricate the artefacts of one run directory. ``acc``/``fmt``: model -> (id, ood); ``blank``: the base
    model's (id, ood) greedy accuracy with blank images (``eval/image_use.json``; None: no such file)."""
    acc = {"base": (0.30, 0.20), "grpo_zero": (0.50, 0.40), "cold_start": (0.35, 0.25), "final": (0.70, 0.60),
           **(acc or {})}
    fmt = {"base": (0.10, 0.15), "grpo_zero": (0.80, 0.75), "cold_start": (0.90, 0.85), "final": (0.95, 0.90),
           **(fmt or {})}
    models = ["base", "grpo_zero", "final"] + (["cold_start"] if cold_start else [])
    for m in models:
        _dump(root / "eval" / f"{m}.json", _eval(acc[m], fmt[m]))
    _metrics(root / "base" / "train" / "metrics.jsonl",
             [{"step": k, "loss": 3.0 / k, "nll": 3.0 / k} for k in range(1, 11)])
    _metrics(root / "grpo_zero" / "train" / "metrics.jsonl", _rl_rows())
    _metrics(root / "grpo_final" / "train" / "metrics.jsonl", _rl_rows(5))
    if cold_start:
        _metrics(root / "cold_start" / "train" / "metrics.jsonl",
                 [{"step": k, "loss": 1.0 / k, "rewards/chosen": 0.01 * k, "rewards/rejected": -0.02 * k,
                   "rewards/margins": 0.03 * k, "rewards/accuracies": 0.5 + 0.05 * k, "logps/chosen": -20.0,
                   "logps/rejected": -30.0, "nll": 0.8 / k} for k in range(1, 8)])
        if gf is not None:
            n = len(gf)
            _dump(root / "cold_start" / "gf.json",
                  {"samples_seen": [16 * i for i in range(n)], "acc_id": [0.3 + 0.02 * i for i in range(n)],
                   "acc_ood": [0.2 + 0.01 * i for i in range(n)], "gf": list(gf)})
    if blank is not None:
        _dump(root / "eval" / "image_use.json",
              {"base": {split: {"real": acc["base"][i], "blank": blank[i], "nll_real": 0.41, "nll_blank": 0.52}
                        for i, split in enumerate(SPLITS)}})
    if rbf:
        _dump(root / "eval" / "rbf.json", {"grpo_zero": {"120": 1.81, "240": 1.85, "480": 1.9},
                                           "final": {"120": 1.77, "240": 1.79, "480": 1.96}})
    if pairs:
        _dump(root / "pairs" / "pairs_summary.json",
              {"prompts": 256, "prompts_with_pairs": 200, "pairs": 380,
               "by_kind": {"strip_all_tags": 60, "strip_answer": 61, "strip_think": 62, "think_to_end": 63,
                           "tags_to_text": 64, "none": 70},
               "by_source": {"grpo_zero": 310, "base": 70},
               "dropped": {"no_chosen": 56, "duplicate": 3, "judge": 0, "short": 20}, "config": {"seed": 0}})
    if timings:
        _dump(root / "timings.json", {"data": 1.5, "base": 60.0, "grpo_zero": 120.0, "pairs": 30.0,
                                      "cold_start": 45.0, "grpo_final": 120.0, "eval": 23.5})
    if config:
        _dump(root / "config.json", {
            "run_dir": str(root), "seed": 0, "synth": {"n_train": 512},
            "base": {"vocab_size": 1024, "train": {"train": {"steps": 300, "batch_size": 32}, "optim": {"lr": 3e-3}}},
            "common": {"model": {"dtype": "float32"}},
            "grpo_zero": {"train": {"steps": 40, "batch_size": 8}, "rl": {"group_size": 8, "max_new_tokens": 64},
                          "loss": {"name": "grpo"}},
            "cold_start": {"kind": "dpo", "train": {"steps": 40}, "loss": {"name": "dpo_hybrid",
                                                                           "kwargs": {"beta": 0.1}}},
            "grpo_final": {"train": {"steps": 40}}, "pairs": {"prompts": 256}, "eval": {"ks": [1, 4, 8]},
            "gf_points": 4, "rbf": [120, 240, 480], "ablation": {"seeds": [], "variants": {}}})
    return root


def _verdict(text: str, tag: str) -> str:
    m = re.search(rf"\*\*\({tag}\) [^*]*\*\*: \*\*(holds|does not hold|not available|untestable)\*\*", text)
    assert m, f"no verdict line for ({tag})"
    return m.group(1)


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


# ---------------------------------------------------------------------------------- pure functions


def test_pure_functions():
    assert fmt_num(0.5) == "0.500" and fmt_num(None) == "—" and fmt_num(math.nan) == "—"
    vals = [0.61, 0.7, 0.64]
    m, s, n = mean_std(vals)
    assert n == 3 and m == pytest.approx(np.mean(vals)) and s == pytest.approx(np.std(vals, ddof=1))
    assert mean_std([0.4, None])[1] != mean_std([0.4, None])[1]  # NaN std with one value
    assert mean_std([]) [2] == 0
    assert fmt_mean_std([0.4]) == "0.400" and fmt_mean_std([]) == "—"
    assert fmt_mean_std([0.4, 0.6], n_total=3).endswith("(n=2)")
    assert compare_means([0.5, 0.52], [0.3, 0.31]) == (pytest.approx(0.205), True)
    assert compare_means([0.5, 0.7], [0.45, 0.65])[1] is False
    assert compare_means([0.5], [0.3, 0.31])[1] is None
    assert gf_values({"gf": [0, 0.1]}) == [0.0, 0.1]
    # GF recomputed from the accuracies when gf.json has no gf list (b = 2, gains over entry 0)
    g = gf_values({"samples_seen": [0, 10], "acc_id": [0.2, 0.3], "acc_ood": [0.1, 0.3]})
    assert g[0] == 0 and g[1] == pytest.approx(5 * 0.2 * 0.1 / (4 * 0.1 + 0.2))
    assert gf_values(None) is None


def test_claims():
    assert claim_cold_start_format({"id_test": 0.1, "ood_test": 0.1}, {"id_test": 0.9, "ood_test": 0.8}).holds
    assert claim_cold_start_format({"id_test": 0.1, "ood_test": 0.9}, {"id_test": 0.9, "ood_test": 0.8}).holds is False
    assert claim_cold_start_format({"id_test": 0.5}, {"id_test": 0.5}, ["id_test"]).holds is False  # tie
    assert claim_cold_start_format({}, None).holds is None
    c = claim_final_beats_grpo_zero({"id_test": 0.7, "ood_test": None}, {"id_test": 0.5, "ood_test": 0.4})
    assert c.holds is None and c.verdict == "not available"
    assert claim_final_beats_grpo_zero({"id_test": 0.7, "ood_test": 0.3},
                                       {"id_test": 0.5, "ood_test": 0.4}).verdict == "does not hold"
    assert claim_gf_positive({"gf": [0.0, 0.2]}).holds and claim_gf_positive({"gf": [0.0, 0.0]}).holds is False


# ---------------------------------------------------------------------------------- single run


def test_write_report(tmp_path):
    run = make_run(tmp_path / "run")
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    for png in ("rl_curves", "cold_start_curves", "base_sft", "eval_bars", "pass_at_k", "gf_curve"):
        _assert_png(run / "plots" / f"{png}.png")
        assert f"](plots/{png}.png)" in text
    for split in SPLITS:
        assert split in text
    # the greedy table: each model's row holds the fabricated numbers, formatted as the report formats them
    acc = {"base": (0.30, 0.20), "grpo_zero": (0.50, 0.40), "cold_start": (0.35, 0.25), "final": (0.70, 0.60)}
    fmt = {"base": (0.10, 0.15), "grpo_zero": (0.80, 0.75), "cold_start": (0.90, 0.85), "final": (0.95, 0.90)}
    for m, label in LABELS.items():
        row = f"| {label} | {fmt_num(acc[m][0])} | {fmt_num(fmt[m][0])} | {fmt_num(acc[m][1])} | {fmt_num(fmt[m][1])} |"
        assert row in text, row
    # pass@k tables per split with every pass@ key, RBF, pairs, timings
    assert "| final | 0.630 | 0.855 | 0.720 | 0.780 | 0.860 | 64 | 31.500 |" in text
    assert "pass@1 | pass@4 | pass@8" in text
    assert "| GRPO-zero | 1.810 | 1.850 | 1.900 |" in text
    assert "| strip_all_tags | 60 |" in text and "| base | 70 |" in text and "| no_chosen | 56 |" in text
    assert "Total time: 400.0 s" in text
    assert "| grpo_zero | 40 | 8 |" in text  # config summary
    # examples in fenced blocks longer than the ``` inside the response
    assert "````text\n<think>count ``` 0</think>" in text
    assert _verdict(text, "a") == "holds" and _verdict(text, "b") == "holds" and _verdict(text, "c") == "holds"
    assert "GF = 0.120" in text
    assert "| base | id_test | 0.300 | 0.100 | +0.200 | 0.4100 | 0.5200 |" in text  # image use
    assert "cannot test SPECS" not in text  # the base gains 0.2 >= 0.15 from its images
    assert "not available" not in text


def test_a_base_that_ignores_its_images_makes_the_findings_untestable(tmp_path):
    run = make_run(tmp_path / "run", blank=(0.25, 0.20))  # ID gain 0.05 < 0.15
    text = write_report(run).read_text()
    assert "> **This run cannot test SPECS:** the base model does not read its images" in text
    assert [_verdict(text, t) for t in "abc"] == ["untestable"] * 3
    assert "Measured: id_test: accuracy final 0.700 > GRPO-zero 0.500" in text  # the measurement stays


def test_findings_flip(tmp_path):
    # final below GRPO-zero on OOD, cold start no better formatted than base on ID, GF 0 at the end
    run = make_run(tmp_path / "run", acc={"final": (0.70, 0.35)}, fmt={"cold_start": (0.10, 0.85)},
                   gf=(0.0, 0.05, 0.0))
    text = write_report(run).read_text()
    assert _verdict(text, "a") == "does not hold"
    assert _verdict(text, "b") == "does not hold"
    assert _verdict(text, "c") == "does not hold"
    assert "ood_test: accuracy final 0.350 <= GRPO-zero 0.400 (does not hold)" in text
    assert "id_test: accuracy final 0.700 > GRPO-zero 0.500 (holds)" in text


def test_missing_optional_artefacts(tmp_path):
    run = make_run(tmp_path / "run", rbf=False, pairs=False, timings=False, cold_start=False, config=False,
                   blank=None)
    (run / "eval" / "grpo_zero.json").write_text("{not json")  # unreadable counts as missing
    (run / "grpo_final" / "train" / "metrics.jsonl").write_text("")
    text = write_report(run).read_text()
    assert "RBF (eval/rbf.json): not available" in text
    assert "Image use (eval/image_use.json): not available" in text
    assert "Pair statistics (pairs/pairs_summary.json): not available" in text
    assert "Timings (timings.json): not available" in text
    assert "GF curve (cold_start/gf.json): not available" in text
    assert "Cold-start metrics (cold_start/train/metrics.jsonl): not available" in text
    assert _verdict(text, "a") == "not available" and _verdict(text, "b") == "not available"
    assert _verdict(text, "c") == "not available"
    assert not (run / "plots" / "gf_curve.png").exists()
    _assert_png(run / "plots" / "rl_curves.png")  # GRPO-zero alone still plots
    # an empty run directory still yields a report
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "Evaluations (eval/*.json): not available" in text


# ---------------------------------------------------------------------------------- ablation

SEEDS = [0, 1, 2]
VARIANTS = ["none", "sft", "dpo_lambda0", "dpo_lambda1"]
BASE_ID = {"none": 0.50, "sft": 0.60, "dpo_lambda0": 0.55, "dpo_lambda1": 0.70}
OFFSETS = [0.0, 0.03, -0.02]


def _abl_numbers(v, s):
    """Final (id acc, ood acc), (id fmt, ood fmt); cold start fmt; GF end of variant v, seed index s."""
    a = BASE_ID[v] + OFFSETS[s]
    return (a, a - 0.1), (0.8 + 0.01 * s, 0.7 + 0.02 * s), (0.6 + 0.05 * s, 0.5), 0.1 * (s + 1) * BASE_ID[v]


def make_ablation(root: Path) -> Path:
    for i, s in enumerate(SEEDS):
        d = root / f"seed{s}"
        _dump(d / "eval" / "base.json", _eval((0.3, 0.2), (0.1, 0.1)))
        _dump(d / "eval" / "grpo_zero.json", _eval((0.5, 0.4), (0.8, 0.7)))
        _dump(d / "timings.json", {"data": 1.0, "eval": 59.0})
        for v in VARIANTS:
            acc, fmt, cs_fmt, gf = _abl_numbers(v, i)
            _dump(d / "eval" / f"final_{v}.json", _eval(acc, fmt))
            if v != "none":
                _dump(d / "eval" / f"cold_start_{v}.json", _eval((0.3, 0.2), cs_fmt))
                _dump(d / f"cold_start_{v}" / "gf.json",
                      {"samples_seen": [0, 32], "acc_id": [0.3, 0.4], "acc_ood": [0.2, 0.3], "gf": [0.0, gf]})
    _dump(root / "config.json", {"cold_start": {"kind": "dpo"},
                                 "ablation": {"seeds": SEEDS, "variants": {"none": {"kind": "none"},
                                                                           "sft": {"kind": "sft"},
                                                                           "dpo_lambda0": {}, "dpo_lambda1": {}}}})
    return root


def test_write_ablation_report(tmp_path):
    root = make_ablation(tmp_path / "abl")
    path = write_ablation_report(root, SEEDS, VARIANTS)
    text = path.read_text()
    _assert_png(root / "plots" / "ablation.png")
    assert "](plots/ablation.png)" in text
    for v in VARIANTS:
        assert f"`{v}`" in text
        ids = [_abl_numbers(v, i)[0][0] for i in range(3)]
        oods = [_abl_numbers(v, i)[0][1] for i in range(3)]
        fmts = [_abl_numbers(v, i)[1][0] for i in range(3)]
        cells = [f"{np.mean(x):.3f} ± {np.std(x, ddof=1):.3f}" for x in (ids, oods, fmts)]
        assert fmt_mean_std(ids) == cells[0]
        assert f"| 3 | {cells[0]} | {cells[1]} | {cells[2]} |" in text, (v, cells)
        passk = [min(1.0, a + 0.16) for a in ids]
        assert f"{np.mean(passk):.3f} ± {np.std(passk, ddof=1):.3f}" in text
        if v != "none":
            gfs = [_abl_numbers(v, i)[3] for i in range(3)]
            cs = [_abl_numbers(v, i)[2][0] for i in range(3)]
            assert f"{np.mean(gfs):.3f} ± {np.std(gfs, ddof=1):.3f}" in text
            assert f"{np.mean(cs):.3f} ± {np.std(cs, ddof=1):.3f}" in text
    _assert_png(root / "plots" / "ablation_gf.png")  # the GF curves: one row per variant and samples-seen point
    assert "](plots/ablation_gf.png)" in text
    for v in VARIANTS[1:]:
        gfs = [_abl_numbers(v, i)[3] for i in range(3)]
        assert f"| `{v}` | 0 | 0.300 ± 0.000 | 0.200 ± 0.000 | 0.000 ± 0.000 |" in text
        assert f"| `{v}` | 32 | 0.400 ± 0.000 | 0.300 ± 0.000 | {np.mean(gfs):.3f} ± {np.std(gfs, ddof=1):.3f} |" in text
    assert "| `none` | 0 |" not in text
    # findings: DPO best (dpo_lambda1, 0.70) vs SFT (0.60): 0.1 apart with std ~0.025 -> distinguishable;
    # SFT (0.60) vs none (0.50) as well; the ranking is computed from the means
    line = next(ln for ln in text.splitlines() if ln.startswith("- **final id_test accuracy**"))
    assert "DPO-hybrid vs SFT: `dpo_lambda1`" in line and "higher by 0.100, distinguishable" in line
    assert "Ranking: `dpo_lambda1` 0.703 > `sft` 0.603 > `dpo_lambda0` 0.553 > `none` 0.503." in line
    assert "not distinguishable" not in line


def test_ablation_within_std_and_missing(tmp_path):
    root = make_ablation(tmp_path / "abl")
    # make sft's OOD accuracy close to dpo_lambda1's: within one std -> not distinguishable
    for i, s in enumerate(SEEDS):
        p = root / f"seed{s}" / "eval" / "final_sft.json"
        ev = json.loads(p.read_text())
        ev["splits"]["ood_test"]["accuracy"] = [0.62, 0.55, 0.63][i]
        p.write_text(json.dumps(ev))
    (root / "seed2" / "eval" / "final_dpo_lambda0.json").unlink()  # a missing seed: n=2 in that row
    (root / "seed1" / "timings.json").unlink()
    text = write_ablation_report(root, SEEDS, VARIANTS).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("- **final ood_test accuracy**"))
    assert "DPO-hybrid vs SFT" in line and "within one std: not distinguishable" in line
    assert "| `dpo_lambda0` | DPO-hybrid | 2 |" in text
    # an ablation directory without any artefact: the report says so instead of failing
    empty = tmp_path / "empty"
    text = write_ablation_report(empty, [0, 1], ["none", "dpo"]).read_text()
    assert "not available" in text
    _assert_png(empty / "plots" / "ablation.png")


def test_single_variant_ablation_uses_plain_names(tmp_path):
    """With one variant the pipeline names the dirs cold_start/, grpo_final/, eval/final.json."""
    root = tmp_path / "abl"
    for s in (0, 1):
        make_run(root / f"seed{s}", acc={"final": (0.7 + 0.1 * s, 0.6)})
    text = write_ablation_report(root, [0, 1], ["specs"]).read_text()
    vals = [0.7, 0.8]
    assert f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" in text
    assert report.fmt_num(0.12) in text  # GF at the end from cold_start/gf.json


def test_rl_runs_that_collapse_or_lose_the_format_are_flagged(tmp_path):
    stable = make_run(tmp_path / "stable", fmt={"grpo_zero": (0.95, 0.90), "final": (0.95, 0.90)})
    assert "stability criterion" not in write_report(stable).read_text()
    # GRPO-zero below the format bar; the final GRPO collapsed far below its start, the cold start's 0.35
    bad = make_run(tmp_path / "bad", acc={"final": (0.02, 0.60)},
                   fmt={"grpo_zero": (0.85, 0.90), "final": (0.95, 0.90)})
    text = write_report(bad).read_text()
    criterion = "(greedy ID format rate >= 0.9, ID accuracy at most 0.05 below the model the RL run started from)"
    assert (f"> **GRPO-zero failed the RL stability criterion** {criterion}: id_test format rate 0.850 < 0.9."
            in text)
    assert (f"> **The final GRPO failed the RL stability criterion** {criterion}: id_test accuracy 0.020, more than "
            "0.05 below its start's (cold_start) 0.350.") in text
    # a final GRPO below the base model (0.30) but not below the cold start it started from (0.10): the drop is
    # the cold start's, not the RL run's
    after_weak_start = make_run(tmp_path / "weak", acc={"cold_start": (0.10, 0.10), "final": (0.12, 0.60)},
                                fmt={"grpo_zero": (0.95, 0.90), "final": (0.95, 0.90)})
    assert "stability criterion" not in write_report(after_weak_start).read_text()
    # without a cold start the final GRPO started from the base model (0.30)
    no_cold = make_run(tmp_path / "none", acc={"final": (0.12, 0.60)}, cold_start=False,
                       fmt={"grpo_zero": (0.95, 0.90), "final": (0.95, 0.90)})
    assert "0.05 below its start's (base) 0.300" in write_report(no_cold).read_text()

def test_ablation_judges_each_final_grpo_against_its_own_cold_start(tmp_path):
    root = make_ablation(tmp_path / "abl")
    for v in ("sft", "none"):  # sft's cold start has ID accuracy 0.30; `none` starts from the base model (0.30)
        p = root / "seed0" / "eval" / f"final_{v}.json"
        ev = json.loads(p.read_text())
        ev["splits"]["id_test"]["accuracy"] = 0.2
        p.write_text(json.dumps(ev))
    text = write_ablation_report(root, SEEDS, VARIANTS).read_text()
    # (make_ablation's finals are also below the format bar: 0.80)
    assert ("seed 0 `sft` final: id_test format rate 0.800 < 0.9; id_test accuracy 0.200, more than 0.05 below its "
            "start's (cold_start_sft) 0.300") in text
    assert ("seed 0 `none` final: id_test format rate 0.800 < 0.9; id_test accuracy 0.200, more than 0.05 below its "
            "start's (base) 0.300") in text
    assert "seed 1 `sft` final: id_test format rate 0.810 < 0.9;" in text  # seed 1 kept its cold start's accuracy
