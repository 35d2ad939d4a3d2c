"""``specs-jax train``: the tiny configs train end to end (loss falls on a fixed batch); bad configs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specs_jax.cli.main import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_tiny_config_trains_and_loss_falls_on_a_fixed_batch(kind, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", kind, "--config", str(CONFIGS / f"{kind}_tiny.yaml"), "train.steps=3",
            f"train.output_dir={out}", "data.num_batches=1", "checkpoint.every=2", "train.eval_every=2",
            "data.eval_batches=1"]
    if kind == "sft":  # bf16 compute with fp32 master weights, exported as HF at the end
        argv += ["model.dtype=bfloat16", "--export-hf", str(tmp_path / "hf")]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert all(m["perf/tokens_per_s"] > 0 for m in lines)
    assert "eval/loss" in lines[1] and "eval/loss" not in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert any((out / "tensorboard").iterdir())
    assert f"train {kind}: steps 1..3" in capsys.readouterr().out
    if kind == "sft":
        from safetensors.numpy import load_file

        weights = load_file(tmp_path / "hf" / "model.safetensors")
        assert weights and {w.dtype for w in weights.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-6", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("train.steps=abc", "config key 'train.steps' expects int, got 'abc'"),
])
def test_malformed_config_is_refused_naming_the_key(override, message, tmp_path, capsys):
    argv = ["train", "sft", "--config", str(CONFIGS / "sft_tiny.yaml"), override, f"train.output_dir={tmp_path}"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sft_refuses_loss_options(tmp_path, capsys):
    argv = ["train", "sft", "--config", str(CONFIGS / "sft_tiny.yaml"), "loss.kwargs.beta=0.1",
            f"train.output_dir={tmp_path}"]
    assert main(argv) == 2
    assert "loss.kwargs" in capsys.readouterr().err
