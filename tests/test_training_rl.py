"""RL training kinds on a real tiny setting (synthetic data, a processor trained here, a tiny model):
`train grpo` runs through the CLI and learns, the online accuracy filter masks whole groups,
a filtered-out step leaves the weights alone, and kill-and-resume reproduces the uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from specs_jax.cli.main import main as cli
from specs_jax.convert.io import save_model
from specs_jax.data.pipeline import DataConfig, load_rows, rl_batches
from specs_jax.data.synth import SynthConfig, save_synth, synth_dataset
from specs_jax.data.tokenizer import ProcessorConfig, build_processor, load_processor, model_token_fields
from specs_jax.model import Qwen2_5_VLForConditionalGeneration, from_hf_dict, load_preset
from specs_jax.training.config import load_config
from specs_jax.training.rl import RLTrainer, accuracy_filter_mask, rollout_seed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("rl"))


def make_world(root):
    """(data dir, model dir with its processor) of a tiny random model sized to a synthetic corpus."""
    ds = synth_dataset(SynthConfig(n_train=32, n_id_test=4, n_ood_test=4, size=56))
    save_synth(ds, root / "data")
    processor = build_processor(list(ds["train"]["question"]) + list(ds["train"]["solution"]),
                                ProcessorConfig(vocab_size=300))
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)})
    save_model(Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), root / "model", fmt="hf")
    processor.save_pretrained(root / "model")
    return root / "data", root / "model"


def overrides(world, out, *extra):
    data, model = world
    return [f"model.path={model}", f"data.train_path={data / 'train.parquet'}", f"train.output_dir={out}",
            "log.progress=false", "log.tensorboard=false", *extra]


def test_accuracy_filter_keeps_groups_inside_the_band():
    correct = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], bool)  # group accuracy 1, 0, .25, .5
    keep = accuracy_filter_mask(correct, 4, [0.1, 0.9])
    assert keep.tolist() == [False] * 8 + [True] * 8
    assert accuracy_filter_mask(correct, 4, []).all()
    assert accuracy_filter_mask(correct, 4, [0.0, 0.25]).tolist() == [False] * 4 + [True] * 8 + [False] * 4


def test_rollout_seeds_differ_per_step_and_run():
    seeds = {rollout_seed(s, k) for s in range(3) for k in range(1, 50)}
    assert len(seeds) == 147


def test_train_grpo_cli_runs_and_logs_rollout_metrics(world, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert cli(["train", "grpo", "--config", "configs/grpo_tiny.yaml",
                *overrides(world, out, "train.steps=3", "rl.max_new_tokens=12")]) == 0
    assert "train grpo: steps 1..3, reward/mean" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for x in lines:
        assert 0 <= x["reward/format_rate"] <= 1 and 0 <= x["reward/accuracy"] <= 1
        assert x["rollout/length_mean"] <= 12 and x["time/rollout_s"] > 0
    assert (out / "checkpoints").is_dir()


def test_grpo_needs_its_loss_and_files(world, tmp_path, capsys):
    assert cli(["train", "grpo", "--config", "configs/grpo_tiny.yaml", "loss.name=dpo_hybrid",
                *overrides(world, tmp_path)]) == 2
    assert "losses that fit (config loss.name)" in capsys.readouterr().err
    assert cli(["train", "grpo", "--config", "configs/grpo_tiny.yaml", "loss.kwargs.eps_lo=0.1",
                *overrides(world, tmp_path)]) == 2
    assert "eps_lo" in capsys.readouterr().err


def _trainer(world, out, *extra) -> tuple[RLTrainer, object]:
    cfg = load_config("configs/grpo_tiny.yaml", overrides(world, out, "rl.max_new_tokens=10", *extra))
    processor = load_processor(world[1])
    trainer = RLTrainer(cfg, "grpo", processor)
    data = rl_batches(load_rows(cfg.data.train_path), processor,
                      DataConfig(batch_size=cfg.train.batch_size, buckets=(cfg.train.max_length,), seed=0,
                                 num_epochs=None, system_prompt=trainer.system_prompt))
    return trainer, data


def test_all_filtered_step_moves_only_the_counter(world, tmp_path):
    # every group has accuracy 0 for a random model: the band [0.5, 1] filters them all
    trainer, data = _trainer(world, tmp_path, "rl.accuracy_filter=[0.5, 1.0]", "rl.num_iterations=2")
    before = nnx.to_pure_dict(nnx.State(trainer.state.params))
    metrics = trainer.train_step(next(iter(data)))
    assert metrics["rollout/groups_kept"] == 0.0 and "loss" not in metrics
    assert int(trainer.state.step) == 2 and trainer.loop_step == 1
    after = nnx.to_pure_dict(nnx.State(trainer.state.params))
    assert all(np.array_equal(a, b) for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(t))
                                                       for t in (before, after))))
    trainer.close()


@pytest.mark.slow  # about 40 s; the 1-process and multi-process kill-and-resume tests cover the loop too
def test_kill_and_resume_is_exact(world, tmp_path):
    def run(out, steps, every):
        trainer, data = _trainer(world, out, f"train.steps={steps}", f"checkpoint.every={every}",
                                 "checkpoint.async_save=false", "rl.num_iterations=2")
        history = trainer.fit(data)
        trainer.close()
        return history

    straight = run(tmp_path / "a", 4, 4)
    first = run(tmp_path / "b", 2, 2)  # "killed" after step 2 ...
    resumed = run(tmp_path / "b", 4, 2)  # ... and restarted with the full step count
    assert len(first) == 2 and len(resumed) == 2
    keys = ("reward/mean", "loss", "ratio", "grad_norm")
    for a, b in zip(straight, first + resumed):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


@pytest.mark.parametrize("name, options", [
    ("dr_grpo", "{sampler_is_mode: token_truncate, kl_coef: 0.0}"),
    pytest.param("gspo", "{kl_coef: 0.0}", marks=pytest.mark.slow),
    pytest.param("cispo", "{kl_coef: 0.0, sampler_is_mode: sequence_mask, sampler_is_clip_min: 0.5}",
                 marks=pytest.mark.slow),
])
def test_grpo_variants_train_through_the_cli(world, tmp_path, capsys, name, options):
    out = tmp_path / name
    assert cli(["train", "grpo", "--config", "configs/grpo_tiny.yaml", f"loss.name={name}", f"loss.kwargs={options}",
                *overrides(world, out, "train.steps=2", "rl.max_new_tokens=8")]) == 0
    assert "train grpo: steps 1..2" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    if "sampler_is_mode" in options:
        assert any("sampler_is/mean" in x for x in lines)


def test_dr_grpo_scales_no_rewards_and_importance_sampling_recomputes_old_logps(world, tmp_path):
    import jax

    from specs_jax.training.steps import sequence_logps
    from specs_jax.training.state import join_params, model_from_params

    trainer, data = _trainer(world, tmp_path, "loss.name=dr_grpo", "loss.kwargs={sampler_is_mode: token_truncate}")
    assert trainer.scale_rewards == "none" and trainer.algorithm.reference  # dr_grpo keeps grpo's kl_coef default
    collected = trainer.collect(next(iter(data)))
    seqs = collected.seqs
    np.testing.assert_array_equal(seqs["sampler_logps"], seqs["old_logps"])  # the sampler's, as collected
    prepared = trainer._refresh(trainer.prepare(seqs, 1))
    model = model_from_params(trainer.graphdef, join_params(trainer.state.params, trainer.state.frozen))
    micro = jax.tree.map(lambda x: x[0], prepared)
    ours = np.asarray(sequence_logps(model, micro, trainer.cfg.rl.temperature))
    mask = np.asarray(micro.mask) > 0
    np.testing.assert_allclose(np.asarray(micro.rows["old_logps"])[mask], ours[mask], atol=1e-6)  # the trainer's
    np.testing.assert_allclose(np.asarray(micro.rows["sampler_logps"])[mask], ours[mask], atol=1e-3)
    trainer.close()
