"""specs_jax.evaluation and ``specs-jax eval``.

The metric tests drive :func:`evaluate_split` with a scripted sampler whose responses are chosen per
prompt (correct or not, formatted or not), so every number is known in advance; pass@k is checked by
brute force over all k-subsets of each prompt's samples. The CLI test runs a tiny random model with
a locally built processor on synthetic splits.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from specs_jax.cli.main import main as cli
from specs_jax.convert.io import save_model
from specs_jax.data.synth import SynthConfig, save_synth, synth_dataset
from specs_jax.data.tokenizer import (
    ProcessorConfig,
    build_processor,
    model_token_fields,
)
from specs_jax.evaluation import evaluate, evaluate_model, evaluate_split, split_metrics
from specs_jax.model import (
    Qwen2_5_VLForConditionalGeneration,
    from_hf_dict,
    load_preset,
)
from specs_jax.sampling import Generation, SamplerConfig
from specs_jax.training.config import EvalConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_SAMPLES = 4
MAX_LEN = 8


@pytest.fixture(scope="module")
def data():
    return synth_dataset(SynthConfig(n_train=0, n_id_test=7, n_ood_test=5, seed=1))


@pytest.fixture(scope="module")
def processor(data):
    corpus = [t for split in ("id_test", "ood_test") for t in [*data[split]["question"], *data[split]["solution"]]]
    return build_processor(corpus * 3, ProcessorConfig(vocab_size=300))


def _text(answer: str, correct: bool, formatted: bool) -> str:
    boxed = f"\\boxed{{{answer if correct else 'wrong'}}}"
    return f"<think>look</think><answer>{boxed}</answer>" if formatted else f"The answer is {boxed}."


def greedy_kind(i: int) -> tuple[bool, bool]:
    """(correct, formatted) of prompt i's greedy response."""
    return [(True, True), (True, False), (False, True), (False, False)][i % 4]


def sample_kind(i: int, j: int) -> tuple[bool, bool]:
    """(correct, formatted) of prompt i's sample j: the first i % (N+1) samples are correct."""
    return j < i % (N_SAMPLES + 1), j % 2 == 0


def greedy_length(i: int) -> int:
    return i % 5 + 1


class ScriptedSampler:
    """Answers prompt i (in call order) with the responses of :func:`greedy_kind` / :func:`sample_kind`
    and checks that its inputs are prompt i's chat-template tokens with one image."""

    config = SamplerConfig()

    def __init__(self, processor, rows):
        self.tokenizer, self.rows = processor.tokenizer, rows
        self.calls: list[dict] = []
        self.seen = {"greedy": 0, "sampled": 0}

    def generate_ids(self, ids, mask, pixels, grid, *, n, params, seed, weights):
        kind = "greedy" if params.temperature == 0 else "sampled"
        first = self.seen[kind]
        b = len(ids)
        self.seen[kind] += b
        self.calls.append({"kind": kind, "n": n, "temperature": params.temperature, "seed": seed,
                           "weights": weights, "rows": b})
        assert grid.shape == (b, 3) and len(pixels) == int(np.prod(grid, axis=1).sum())
        for r in range(b):
            prompt = self.tokenizer.decode(ids[r][mask[r].astype(bool)])
            assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
            assert self.rows[first + r]["question"] in prompt
        texts, lengths = [], []
        for r in range(b):
            i, answer = first + r, self.rows[first + r]["answer"]
            if kind == "greedy":
                texts.append(_text(answer, *greedy_kind(i)))
                lengths.append(greedy_length(i))
            else:
                texts += [_text(answer, *sample_kind(i, j)) for j in range(n)]
                lengths += [MAX_LEN] * n
        out_mask = np.arange(MAX_LEN)[None, :] < np.asarray(lengths)[:, None]
        tokens = np.where(out_mask, 7, 0).astype(np.int32)
        return Generation(tokens, np.zeros(tokens.shape, np.float32), out_mask, texts)


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of the k-subsets of the samples that hold a correct one."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_evaluate_split_metrics_are_those_the_responses_imply(data, processor):
    rows = data["id_test"]
    cfg = EvalConfig(max_examples=6, num_samples=N_SAMPLES, ks=[1, 2, 4], temperature=0.7, batch_size=4)
    sampler, weights = ScriptedSampler(processor, rows), {"sentinel": object()}
    progress = []
    metrics, responses = evaluate_split(sampler, rows, processor, cfg, split="id", weights=weights, seed=3,
                                        on_batch=progress.append)
    assert progress == [4, 2]

    n = 6  # max_examples: the first 6 of 7 rows, in order
    assert [r["row_id"] for r in responses] == list(range(n))
    assert [r["question"] for r in responses] == list(rows["question"])[:n]
    assert [r["answer"] for r in responses] == list(rows["answer"])[:n]
    assert [(r["correct"], r["formatted"]) for r in responses] == [greedy_kind(i) for i in range(n)]
    assert responses[0]["response"] == _text(rows[0]["answer"], True, True)

    expected = {
        "accuracy": np.mean([greedy_kind(i)[0] for i in range(n)]),
        "format_rate": np.mean([greedy_kind(i)[1] for i in range(n)]),
        "mean_length": np.mean([greedy_length(i) for i in range(n)]),
        "sample_accuracy": np.mean([sample_kind(i, j)[0] for i in range(n) for j in range(N_SAMPLES)]),
        "sample_format_rate": 0.5,
        **{f"pass@{k}": np.mean([brute_pass_at_k([sample_kind(i, j)[0] for j in range(N_SAMPLES)], k)
                                 for i in range(n)]) for k in (1, 2, 4)},
    }
    assert set(metrics) == {*expected, "n_prompts", "n_samples", "n_skipped"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert (metrics["n_prompts"], metrics["n_samples"], metrics["n_skipped"]) == (n, n * N_SAMPLES, 0)
    # by hand: greedy rows 0, 1, 4, 5 are correct; prompts 0 and 5 have no correct sample, the others >= 1
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["pass@4"] == pytest.approx(4 / 6)

    # a batch of 4 then a partial batch of 2; greedy then sampled each time, the given weights every call
    assert [(c["kind"], c["rows"], c["n"]) for c in sampler.calls] == [
        ("greedy", 4, 1), ("sampled", 4, N_SAMPLES), ("greedy", 2, 1), ("sampled", 2, N_SAMPLES)]
    assert all(c["weights"] is weights for c in sampler.calls)
    assert {c["temperature"] for c in sampler.calls if c["kind"] == "sampled"} == {0.7}
    seeds = [c["seed"] for c in sampler.calls if c["kind"] == "sampled"]
    assert len(set(seeds)) == 2  # each batch draws different samples


def test_unusable_rows_are_skipped_and_counted(data, processor):
    rows = data["id_test"].select(range(4)).map(lambda row, i: {"answer": "" if i == 1 else row["answer"]},
                                                with_indices=True)
    cfg = EvalConfig(num_samples=N_SAMPLES, ks=[1], batch_size=2)
    progress = []
    metrics, responses = evaluate_split(ScriptedSampler(processor, [rows[0], rows[2], rows[3]]), rows, processor, cfg,
                                        split="id", on_batch=progress.append)
    assert [r["row_id"] for r in responses] == [0, 2, 3]
    assert (metrics["n_prompts"], metrics["n_skipped"], sum(progress)) == (3, 1, 4)


def test_evaluate_model_runs_every_split_and_keeps_examples(data, processor, monkeypatch):
    made = []

    def make_sampler(model, proc, config):
        assert config.max_new_tokens == 16
        # one sampler for both splits: its call count runs on from the id rows into the ood rows
        made.append(ScriptedSampler(proc, [*data["id_test"], *data["ood_test"]]))
        return made[-1]

    monkeypatch.setattr(evaluate, "Sampler", make_sampler)
    cfg = EvalConfig(num_samples=N_SAMPLES, ks=[1, 4], max_new_tokens=16, batch_size=3)
    out = evaluate_model(None, processor, {"id": data["id_test"], "ood": data["ood_test"]}, cfg, progress=False,
                         num_examples=2)
    assert len(made) == 1
    assert list(out["splits"]) == ["id", "ood"] and list(out["examples"]) == ["id", "ood"]
    assert out["splits"]["id"]["n_prompts"] == 7 and out["splits"]["ood"]["n_prompts"] == 5
    assert [e["row_id"] for e in out["examples"]["ood"]] == [0, 1]
    assert out["splits"]["id"]["accuracy"] == pytest.approx(np.mean([greedy_kind(i)[0] for i in range(7)]))
    assert out["splits"]["ood"]["accuracy"] == pytest.approx(np.mean([greedy_kind(i)[0] for i in range(7, 12)]))


def test_split_metrics_refuses_an_empty_or_inconsistent_split():
    with pytest.raises(ValueError, match="'ood' has no usable prompts"):
        split_metrics("ood", [], [], [], [], ks=[1], n_skipped=3)
    samples = [{"split": "s", "prompt_id": 0, "correct": True, "formatted": True}]
    with pytest.raises(ValueError, match="cover 1 prompts, greedy 2"):
        split_metrics("s", [True, False], [True, True], [1, 2], samples, ks=[1])


@pytest.fixture(scope="module")
def run_files(data, processor, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)})
    model_dir = save_model(Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), root / "model", fmt="hf")
    processor.save_pretrained(model_dir)
    return model_dir, save_synth(data, root / "synth")


def test_eval_cli_writes_every_split_and_metric(run_files, tmp_path, capsys):
    model_dir, synth = run_files
    out = tmp_path / "results.json"
    argv = ["eval", "--config", str(CONFIGS / "base.yaml"), f"eval.splits.id_test={synth / 'id_test.parquet'}",
            f"eval.splits.ood_test={synth / 'ood_test.parquet'}", "eval.max_examples=3", "eval.num_samples=2",
            "eval.ks=[1, 2]", "eval.max_new_tokens=4", "eval.batch_size=4", "model.dtype=float32",
            "--model", str(model_dir), "--out", str(out), "--no-progress"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "pass@2" in printed and "ood_test" in printed
    results = json.loads(out.read_text())
    assert list(results["splits"]) == ["id_test", "ood_test"]
    for name, metrics in results["splits"].items():
        for key in ("accuracy", "format_rate", "sample_accuracy", "sample_format_rate", "pass@1", "pass@2"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        assert metrics["n_prompts"] == 3 and metrics["n_samples"] == 6
        assert 1 <= metrics["mean_length"] <= 4
        assert [e["row_id"] for e in results["examples"][name]] == [0, 1, 2]
    assert results["eval"]["num_samples"] == 2 and results["model"] == str(model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_eval_cli_errors_name_the_problem(run_files, tmp_path, capsys):
    model_dir, synth = run_files
    base = ["eval", "--config", str(CONFIGS / "base.yaml"), f"train.output_dir={tmp_path}"]
    missing = tmp_path / "nope.parquet"
    assert cli([*base, f"eval.splits.id_test={synth / 'id_test.parquet'}", f"eval.splits.ood={missing}",
                "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "eval.splits.ood" in err
    assert cli([*base, "--model", str(model_dir)]) == 2
    assert "no evaluation splits" in capsys.readouterr().err
    assert cli([*base, f"eval.splits.id_test={synth / 'id_test.parquet'}"]) == 2
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()
