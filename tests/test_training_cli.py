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
        # any checkpoint of the run converts after the fact: the last one equals the --export-hf output
        exported = (tmp_path / "hf" / "model.safetensors").read_bytes()
        assert main(["convert", "orbax-to-hf", str(out / "checkpoints" / "3"), str(tmp_path / "step3")]) == 0
        assert main(["convert", "orbax-to-hf", str(out), str(tmp_path / "latest"), "--step", "latest"]) == 0
        assert main(["convert", "orbax-to-hf", str(out), str(tmp_path / "step2"), "--step", "2"]) == 0
        assert (tmp_path / "step3" / "model.safetensors").read_bytes() == exported
        assert (tmp_path / "latest" / "model.safetensors").read_bytes() == exported
        assert (tmp_path / "step2" / "model.safetensors").read_bytes() != exported


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


def test_dpo_trains_on_preference_files_through_the_data_pipeline(tmp_path, capsys):
    """data.source=files: preference rows (jsonl + image folder) -> specs_jax.data.pipeline -> DPO."""
    from PIL import Image
    from test_training_sharded import random_model

    from specs_jax.convert.io import save_model
    from specs_jax.data.tokenizer import ProcessorConfig, build_processor, model_token_fields
    from specs_jax.model import from_hf_dict, load_preset

    good = "<think>The base is 4 and the height is 3, so the area is 6.</think><answer>\\boxed{6}</answer>"
    bad = "The base is 4 and the height is 3, so the area is 6. Answer: \\boxed{6}"
    processor = build_processor(["What is the area of the triangle?", good, bad] * 20, ProcessorConfig(vocab_size=512))
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)})
    model_dir = save_model(random_model(cfg), tmp_path / "model", fmt="hf")
    processor.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"question": f"What is the area of triangle {i}?", "image": [f"img{i}.png"], "chosen": good,
                     "rejected": bad})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "run"
    argv = ["train", "dpo", "--config", str(CONFIGS / "dpo_tiny.yaml"), f"model.path={model_dir}",
            "data.source=files", f"data.train_path={tmp_path / 'pairs.jsonl'}", f"data.image_root={tmp_path}",
            "data.buckets=[64, 128]", "train.batch_size=2", "train.steps=2", f"train.output_dir={out}"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["tokens"] > 0 for m in lines)
    state = json.loads(next((out / "checkpoints" / "2" / "data").glob("*")).read_text())
    assert "parent" in state["processes"][0]  # the grain iterator's position is checkpointed, per process
