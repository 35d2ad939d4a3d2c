"""The SPECS pipeline end to end on a micro config: every stage runs, every artefact is written, a
finished stage is not redone, and the stages hand their models to each other."""

from __future__ import annotations

import json

import pytest

from specs_jax.cli.main import main as cli
from specs_jax.pipeline import load_pipeline_config
from specs_jax.pipeline.config import ConfigError

# A base model that has memorised 8 formatted training answers, so that GRPO-zero has correct,
# formatted samples to build pairs from after a couple of steps.
MICRO = [
    "synth.n_train=8", "synth.n_id_test=4", "synth.n_ood_test=4", "synth.size=56",
    "base.architecture={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, vision_config: {out_hidden_size: 32, depth: 1}}",
    "base.vocab_size=400", "base.format_fraction=1.0",
    "base.train={train: {steps: 60, batch_size: 8, max_length: 128}, optim: {lr: 1.0e-2}}",
    "grpo_zero.train={steps: 2, batch_size: 4, max_length: 96}", "grpo_zero.rl.group_size=2",
    "grpo_zero.optim.lr=1.0e-5",
    "pairs={prompts: 8, samples: 2, temperature: 0.5, pairs_per_prompt: 1, base_rejected_prob: 0.5}",
    "cold_start.train={steps: 2, batch_size: 2, max_length: 192}",
    "grpo_final.train={steps: 2, batch_size: 4, max_length: 96}", "grpo_final.rl.group_size=2",
    "eval={max_examples: 4, num_samples: 2, ks: [1, 2], temperature: 1.0, max_new_tokens: 80, batch_size: 4}",
    "gf_points=2", "rbf=[4, 8]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert cli(["pipeline", "--config", "configs/specs_tiny.yaml", f"run_dir={out}", *MICRO]) == 0
    return out


def test_every_stage_leaves_its_artefacts(run_dir):
    for stage in ("data", "base", "grpo_zero", "pairs", "cold_start", "grpo_final", "eval"):
        assert (run_dir / stage / "DONE.json").is_file(), stage
    for stage in ("base", "grpo_zero", "cold_start", "grpo_final"):
        assert (run_dir / stage / "model" / "model.safetensors").is_file(), stage
        assert (run_dir / stage / "model" / "tokenizer_config.json").is_file(), stage
        lines = (run_dir / stage / "train" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == {"base": 60, "cold_start": 2}.get(stage, 2), stage
    evals = {m: json.loads((run_dir / "eval" / f"{m}.json").read_text())
             for m in ("base", "grpo_zero", "cold_start", "final")}
    for name, res in evals.items():
        for split in ("id_test", "ood_test"):
            metrics = res["splits"][split]
            assert metrics["n_prompts"] == 4
            assert all(0.0 <= metrics[k] <= 1.0 for k in ("accuracy", "format_rate", "pass@1", "pass@2")), name
    gf = json.loads((run_dir / "cold_start" / "gf.json").read_text())
    assert gf["samples_seen"][0] == 0 and len(gf["samples_seen"]) == len(gf["gf"]) >= 2
    pairs = json.loads((run_dir / "pairs" / "pairs_summary.json").read_text())
    assert pairs["pairs"] >= 1
    rbf = json.loads((run_dir / "eval" / "rbf.json").read_text())
    assert set(rbf) == {"grpo_zero", "final"} and all(v >= 1.0 for r in rbf.values() for v in r.values())
    report = (run_dir / "report.md").read_text()
    assert "ood_test" in report and list((run_dir / "plots").glob("*.png"))


def test_the_base_model_memorised_the_format(run_dir):
    """The base SFT learns (its loss falls) and the pairs come from formatted GRPO-zero samples."""
    lines = [json.loads(x) for x in (run_dir / "base" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    pairs = json.loads((run_dir / "pairs" / "pairs_summary.json").read_text())
    assert pairs["by_source"]["grpo_zero"] + pairs["by_source"]["base"] == pairs["pairs"]


def test_a_finished_run_is_not_redone(run_dir, capsys):
    stamps = {p: p.stat().st_mtime for p in run_dir.glob("*/DONE.json")}
    assert cli(["pipeline", "--config", "configs/specs_tiny.yaml", f"run_dir={run_dir}", *MICRO]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 7
    assert stamps == {p: p.stat().st_mtime for p in run_dir.glob("*/DONE.json")}


def test_bad_pipeline_configs_are_refused_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="grpo_zero.*optim.lrr"):
        load_pipeline_config("configs/specs_tiny.yaml", ["grpo_zero.optim.lrr=1"])
    with pytest.raises(ConfigError, match="cold_start.kind"):
        load_pipeline_config("configs/specs_tiny.yaml", ["cold_start.kind=ppo"])
    with pytest.raises(ConfigError, match="synth"):
        load_pipeline_config("configs/specs_tiny.yaml", ["synth.n_trian=3"])


def test_the_configs_in_the_repo_load():
    main = load_pipeline_config("configs/specs_tiny.yaml")
    assert list(main.variants) == ["specs"] and main.seeds == [0]
    ablation = load_pipeline_config("configs/specs_tiny_ablation.yaml")
    assert ablation.seeds == [0, 1, 2]
    assert {v["kind"] for v in ablation.variants.values()} == {"none", "sft", "dpo"}


def test_data_pairs_cli_builds_pairs_from_two_models(run_dir, tmp_path, capsys):
    """Stage 1 as a command (for full-size runs): the micro run's GRPO-zero and base models."""
    from specs_jax.data.pipeline import PAIR_COLUMNS, load_rows

    out = tmp_path / "pairs"
    assert cli(["data", "pairs", "--grpo-zero", str(run_dir / "grpo_zero" / "model"),
                "--base", str(run_dir / "base" / "model"), "--data", str(run_dir / "data" / "train.parquet"),
                "--out", str(out), "--samples", "2", "--temperature", "0.5", "--max-new-tokens", "80",
                "--dtype", "float32", "--system-prompt", load_pipeline_config("configs/specs_tiny.yaml").system_prompt]) == 0
    assert "pairs from 8 prompts" in capsys.readouterr().out
    pairs = load_rows(out / "pairs.parquet")
    assert len(pairs) >= 1
    for row in pairs:
        assert (out / row[PAIR_COLUMNS.image]).is_file()
        assert row["chosen"] != row["rejected"]


def test_image_use_is_measured_for_every_model(run_dir):
    use = json.loads((run_dir / "eval" / "image_use.json").read_text())
    assert set(use) == {"base", "grpo_zero", "cold_start", "final"}
    for by_split in use.values():
        assert set(by_split) == {"id_test", "ood_test"}
        for v in by_split.values():
            assert set(v) == {"real", "blank", "nll_real", "nll_blank"}
            assert 0 <= v["real"] <= 1 and 0 <= v["blank"] <= 1 and v["nll_real"] > 0 and v["nll_blank"] > 0
    evals = json.loads((run_dir / "eval" / "base.json").read_text())["splits"]
    assert use["base"]["id_test"]["real"] == evals["id_test"]["accuracy"]  # the evaluation's own greedy accuracy
    assert "## Image use" in (run_dir / "report.md").read_text()


def test_a_base_model_that_ignores_its_images_is_flagged(run_dir, tmp_path):
    """Zeroed vision features: real and blank images give the same answers and NLL, and the report says the run
    cannot test the paper's claims."""
    import shutil

    import jax.numpy as jnp

    from specs_jax.convert.io import load_model, save_model
    from specs_jax.data.pair_sampling import Policies
    from specs_jax.pipeline.image_use import blind_base, image_use
    from specs_jax.pipeline.report import write_report
    from specs_jax.pipeline.run import load_eval_rows

    model = load_model(run_dir / "base" / "model")
    last = model.model.visual.merger.mlp[2]
    last.weight[...], last.bias[...] = jnp.zeros_like(last.weight[...]), jnp.zeros_like(last.bias[...])
    blind = tmp_path / "blind"
    save_model(model, blind, fmt="hf")
    shutil.copytree(run_dir / "base" / "model", blind, dirs_exist_ok=True,  # the processor files
                    ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    cfg = load_pipeline_config("configs/specs_tiny.yaml", MICRO)
    use = image_use(Policies(blind, 80), {"base": blind}, load_eval_rows(cfg, run_dir / "data"), cfg.system_prompt, 128)
    for v in use["base"].values():
        assert v["real"] == v["blank"] and v["nll_real"] == pytest.approx(v["nll_blank"], abs=1e-6)
    assert "does not read its images" in blind_base(use)

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "eval" / "image_use.json").write_text(json.dumps(use))
    report = write_report(run).read_text()
    assert "This run cannot test SPECS" in report and report.count("**untestable**") == 3


def test_a_prebuilt_base_is_used_only_when_built_from_the_same_data_and_settings(run_dir, tmp_path, capsys):
    import shutil

    from specs_jax.pipeline.base_model import BUILD_FILE, file_sha256, prebuilt_mismatch
    from specs_jax.pipeline.run import prepare_shared

    shipped = run_dir / "base" / "model"  # every trained base records what it was built from
    build = json.loads((shipped / BUILD_FILE).read_text())
    assert build["sha256"]["model.safetensors"] == file_sha256(shipped / "model.safetensors")
    cfg = load_pipeline_config("configs/specs_tiny.yaml", [*MICRO, f"base.prebuilt={shipped}"])
    _, base = prepare_shared(cfg, tmp_path / "a")
    assert "the prebuilt base model" in capsys.readouterr().out
    assert (base / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "base" / "DONE.json").read_text())["prebuilt"] == str(shipped)
    assert not (tmp_path / "a" / "base" / "train").exists()  # nothing was trained
    # other settings, other data, a changed file: each named, and the base is trained instead
    assert "differ in base" in prebuilt_mismatch(shipped, {**build["key"], "base": {"vocab_size": 1}})
    assert "differ in train_rows" in prebuilt_mismatch(shipped, {**build["key"], "train_rows": "0"})
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert "config.json does not match its checksum" in prebuilt_mismatch(copy, build["key"])
    assert "has no build.json" in prebuilt_mismatch(tmp_path, build["key"])


def test_build_base_replaces_the_shipped_directory_only_when_complete(tmp_path):
    from specs_jax.pipeline import build_base
    from specs_jax.pipeline.base_model import prebuilt_mismatch

    dest = tmp_path / "shipped"
    dest.mkdir()
    (dest / "old.txt").write_text("the previous base")
    cfg = load_pipeline_config("configs/specs_tiny.yaml", [*MICRO, "base.train.train.steps=2"])
    summary = build_base(cfg, dest)
    assert summary["steps"] == 2 and not (dest / "old.txt").exists()
    build = json.loads((dest / "build.json").read_text())
    assert prebuilt_mismatch(dest, build["key"]) is None and (dest / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["shipped"]  # no scratch left behind


def test_the_rl_sweep_judges_each_rl_run_by_the_stability_criterion(run_dir, tmp_path, capsys):
    """Per candidate and seed: GRPO-zero from the base model, then GRPO continued from GRPO-zero's model, each
    judged against its own start; a candidate passes only when every run does."""
    import shutil

    from specs_jax.pipeline.findings import rl_collapse
    from specs_jax.pipeline.rl_sweep import sweep_rl, sweep_table

    out = tmp_path / "sweep"
    for stage in ("data", "base"):  # the run's data and base model, as the sweep would make them
        shutil.copytree(run_dir / stage, out / "shared" / stage)
    wild, still = ["grpo_zero.optim.lr=10.0"], ["grpo_zero.optim.lr=0.0"]
    result = sweep_rl("configs/specs_tiny.yaml", MICRO, [wild, still], [0], out)
    assert json.loads((out / "sweep.json").read_text()) == result
    base_eval = json.loads((out / "shared" / "base_eval.json").read_text())
    for cand, name in zip(result["candidates"], ("optim.lr=10.0", "optim.lr=0.0")):
        seed = out / name / "seed0"
        evals = {"base": base_eval, **{run: json.loads((seed / f"eval_{run}.json").read_text())
                                       for run in ("grpo_zero", "grpo_continued")}}
        runs = cand["runs"]["0"]
        assert runs["grpo_zero"]["fails"] == rl_collapse(evals, "grpo_zero", "base")
        assert runs["grpo_continued"]["fails"] == rl_collapse(evals, "grpo_continued", "grpo_zero")
        assert cand["passes"] == all(r["fails"] is None for r in runs.values())
    wild_run, still_run = (c["runs"]["0"] for c in result["candidates"])
    assert "format rate" in wild_run["grpo_zero"]["fails"]  # lr 10 destroys the model
    # lr 0 leaves the base model as it was, twice: the same greedy answers, so never an accuracy drop
    for run in ("grpo_zero", "grpo_continued"):
        assert still_run[run]["accuracy"] == result["base"]["accuracy"]
        assert still_run[run]["format_rate"] == result["base"]["format_rate"]
    assert result["chosen"] == (still if result["candidates"][1]["passes"] else None)
    table = sweep_table(result)
    assert table[-1].startswith("chosen: ") and sum("grpo_continued" in line for line in table) == 2
    stamps = {p: p.stat().st_mtime for p in out.glob("*/seed0/grpo_*/DONE.json")}
    assert len(stamps) == 4
    assert sweep_rl("configs/specs_tiny.yaml", MICRO, [wild, still], [0], out) == result  # resumed, not redone
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    with pytest.raises(ConfigError, match="base.vocab_size"):
        sweep_rl("configs/specs_tiny.yaml", MICRO, [["base.vocab_size=1"]], [0], out)


def test_a_fresh_validation_draw_measures_image_use_without_the_test_splits(run_dir, capsys):
    """`diagnose_image_use.py --fresh N`: N new questions per split (not the run's test questions, the same for the
    same data seed), any model directory as well as a stage; the run's own data seed is refused."""
    import importlib.util

    from specs_jax.data.pipeline import load_rows
    from specs_jax.pipeline.run import fresh_eval_rows

    cfg = load_pipeline_config(run_dir / "config.json", [])
    fresh = fresh_eval_rows(cfg, 6, 1000)
    for split, rows in fresh.items():
        test = load_rows(run_dir / "data" / f"{split}.parquet")
        assert len(rows) == 6 and set(rows["question"]) != set(test["question"][:6]), split
        assert set(rows["split"]) == {split}
        assert rows["question"] == fresh_eval_rows(cfg, 6, 1000)[split]["question"]
    with pytest.raises(ValueError, match="own test questions"):
        fresh_eval_rows(cfg, 6, cfg.seed)

    spec = importlib.util.spec_from_file_location("diagnose", "scripts/diagnose_image_use.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(run_dir), "--fresh", "3", "--models", "base", str(run_dir / "grpo_zero" / "model")])
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    rows = [ln for ln in lines if ln and ln[1] in ("id_test", "ood_test")]
    assert [(r[0], r[1]) for r in rows] == [(m, s) for m in ("base", str(run_dir / "grpo_zero" / "model"))
                                            for s in ("id_test", "ood_test")]
    for r in rows:  # greedy accuracies (real, blank) over 3 questions: multiples of 1/3
        assert all(abs(float(a) * 3 - round(float(a) * 3)) < 0.01 for a in r[2:4]), r
    with pytest.raises(SystemExit):
        script.main([str(run_dir), "--fresh", "3", "--models", "no_such_model"])
