"""Run configs (YAML + overrides, refusals naming the key), sharding rules, schedules, batch preparation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from specs_jax.training.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_base_yaml_lists_the_defaults():
    assert load_config(CONFIGS / "base.yaml") == RunConfig()


def test_stage_merges_over_base_and_overrides_win():
    cfg = load_config(CONFIGS / "dpo_tiny.yaml", ["optim.lr=2e-5", "loss.kwargs.beta=0.3", "train.steps=7",
                                                  "model.freeze_vision=true", "checkpoint.keep_best_metric=eval/loss"])
    assert cfg.optim.lr == 2e-5 and cfg.train.steps == 7 and cfg.model.freeze_vision is True
    assert cfg.loss.kwargs == {"beta": 0.3, "sft_weight": 1.0, "sft_norm": "sequence"}
    assert cfg.checkpoint.keep_best_metric == "eval/loss"
    assert cfg.optim.b2 == RunConfig().optim.b2  # untouched keys keep the base value


def test_dpo_7b_has_the_specs_cold_start_settings():
    cfg = load_config(CONFIGS / "dpo_7b.yaml")
    assert cfg.loss.name == "dpo_hybrid"
    assert cfg.loss.kwargs == {"beta": 0.1, "sft_weight": 1.0, "sft_norm": "sequence"}
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.max_length) == (1e-6, 64, 16384)
    assert cfg.model.preset == "qwen2.5-vl-7b" and cfg.model.reference == "batch"
    assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "float32")
    assert cfg.train.batch_size % cfg.optim.grad_accum_steps == 0


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1e-6"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["train.steps=abc"], "config key 'train.steps' expects int, got 'abc'"),
    (["train.steps=1.5"], "config key 'train.steps' expects int"),
    (["optim.lr=fast"], "config key 'optim.lr' expects float, got 'fast'"),
    (["model.freeze_vision=maybe"], "config key 'model.freeze_vision' expects bool"),
    (["optim.schedule=step"], "config key 'optim.schedule' must be one of"),
    (["train.batch_size=6", "optim.grad_accum_steps=4"], "not divisible by optim.grad_accum_steps=4"),
    (["mesh.tensor=0"], "config key 'mesh.tensor'"),
    (["data.image_grid=[1, 4]"], "config key 'data.image_grid'"),
    (["trainsteps"], "is not key=value"),
])
def test_bad_override_is_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "sft_tiny.yaml", overrides)
    assert message in str(e.value)


def test_bad_yaml_key_and_type_are_refused(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"base_config": str(CONFIGS / "base.yaml"), "train": {"stpes": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes' \(did you mean 'train.steps'\?\)"):
        load_config(path)
    path.write_text(yaml.safe_dump({"optim": {"max_grad_norm": [1]}}))
    with pytest.raises(ConfigError, match="config key 'optim.max_grad_norm' expects float"):
        load_config(path)
    path.write_text(yaml.safe_dump({"optim": 3}))
    with pytest.raises(ConfigError, match="config key 'optim' must be a mapping"):
        load_config(path)


def test_unknown_loss_option_is_refused():
    from specs_jax.training.algorithm import get_algorithm, resolve_loss

    with pytest.raises(ValueError, match=r"no option\(s\) \['betta'\]"):
        resolve_loss("dpo", "dpo_hybrid", get_algorithm("dpo").loss_inputs, {"betta": 0.1})


def test_a_loss_that_does_not_fit_the_kind_is_refused_with_the_ones_that_do():
    from specs_jax.training.algorithm import get_algorithm, resolve_loss

    with pytest.raises(ValueError, match=r"loss 'dpo_hybrid' takes .*`train grpo` passes.*'grpo'"):
        resolve_loss("grpo", "dpo_hybrid", get_algorithm("grpo").loss_inputs, {})
    with pytest.raises(ValueError, match="unknown training kind 'ppo'; known kinds: .*'vigos'"):
        get_algorithm("ppo")


def test_logical_to_spec_maps_rules_and_falls_back_to_replicated():
    from jax.sharding import AbstractMesh, PartitionSpec

    from specs_jax.training.sharding import logical_to_spec, make_rules

    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    rules = make_rules()
    assert logical_to_spec(("layers", "heads", "embed"), (2, 64, 64), mesh, rules) == PartitionSpec(None, "tensor",
                                                                                                    "fsdp")
    # 6 is not divisible by fsdp=4: that dimension stays replicated
    assert logical_to_spec(("vocab", "embed"), (10, 6), mesh, rules) == PartitionSpec("tensor", None)
    # a mesh axis is used once per array
    assert logical_to_spec(("embed", "embed"), (8, 8), mesh, rules) == PartitionSpec("fsdp", None)
    assert logical_to_spec(("batch", None), (8, 3), mesh, rules) == PartitionSpec("fsdp", None)  # data=1 dropped
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        make_rules({"mlp": "model"})
    with pytest.raises(ValueError, match="logical axis 'experts' has no mesh rule"):
        logical_to_spec(("experts",), (4,), mesh, rules)


def test_make_mesh_fills_and_refuses():
    import jax

    from specs_jax.training.sharding import make_mesh, process_batch_slice

    n = len(jax.devices())
    assert make_mesh(1, -1, 1).shape == {"data": 1, "fsdp": n, "tensor": 1}
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="needs"):
        make_mesh(1, n + 1, 1)
    assert process_batch_slice(64, 3, 8) == slice(24, 32)


def test_schedules():
    from specs_jax.training.config import OptimConfig
    from specs_jax.training.state import lr_schedule

    cos = lr_schedule(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), 14)
    assert [float(cos(s)) for s in (0, 2, 4)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(cos(9)) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert float(cos(14)) == pytest.approx(0.1)
    lin = lr_schedule(OptimConfig(lr=2.0, schedule="linear", min_lr_ratio=0.0), 10)
    assert [float(lin(s)) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    assert float(lr_schedule(OptimConfig(lr=3.0), 10)(7)) == 3.0


def test_split_and_join_frozen():
    from specs_jax.training.state import join_params, split_frozen

    params = {"model": {"visual": {"a": 1}, "language_model": {"b": 2}}, "lm_head": {"c": 3}}
    trained, frozen = split_frozen(params, True)
    assert "visual" not in trained["model"] and frozen == {"model": {"visual": {"a": 1}}}
    assert join_params(trained, frozen) == params
    assert split_frozen(params, False) == (params, {})


def test_micro_batches_carry_their_rows_images():
    from test_training_sharded import small_model_config

    from specs_jax.training.batches import prepare_dpo, prepare_sft
    from specs_jax.training.synthetic import random_dpo_batch, random_sft_batch

    cfg = small_model_config()
    batch = random_sft_batch(cfg, np.random.RandomState(0), 4, 24, image_grid=(1, 4, 4))
    stacked = prepare_sft(cfg, batch, 2)
    # 16 patches per row, each row's padded to the power-of-two budget 64
    assert stacked.labels.shape == (2, 2, 24) and stacked.inputs.vision.pixel_values.shape == (2, 2, 64, 1176)
    np.testing.assert_array_equal(stacked.inputs.vision.pixel_values[1, :, :16],
                                  batch["pixel_values"][32:].reshape(2, 16, -1))
    assert not stacked.inputs.vision.pixel_values[:, :, 16:].any()
    np.testing.assert_array_equal(stacked.labels[1, :, :-1], batch["input_ids"][2:, 1:])
    expected_mask = batch["loss_mask"][2:, 1:] * batch["attention_mask"][2:, 1:]
    np.testing.assert_array_equal(stacked.mask[1, :, :-1], expected_mask)
    assert not stacked.mask[..., -1].any()

    # 4 pairs = 8 rows (chosen 0-3, rejected 4-7); micro-batch 1 holds pairs 2, 3, each chosen row then its
    # rejected row: rows 2, 6, 3, 7
    pairs = random_dpo_batch(cfg, np.random.RandomState(1), 4, 24, image_grid=(1, 4, 4))
    assert pairs["input_ids"].shape == (8, 24) and pairs["pixel_values"].shape == (8 * 16, 1176)
    seq = prepare_dpo(cfg, pairs, 2)
    np.testing.assert_array_equal(seq.inputs.input_ids[1], pairs["input_ids"][[2, 6, 3, 7]])
    patches = pairs["pixel_values"].reshape(8, 16, -1)[[2, 6, 3, 7]]
    np.testing.assert_array_equal(seq.inputs.vision.pixel_values[1, :, :16], patches)
    # a pair shares its prompt (and image)
    prompt = int(pairs["loss_mask"][0].argmax())
    np.testing.assert_array_equal(pairs["input_ids"][:4, :prompt], pairs["input_ids"][4:, :prompt])
    with pytest.raises(ValueError, match="missing"):
        prepare_dpo(cfg, {"input_ids": pairs["input_ids"]}, 1)
    with pytest.raises(ValueError, match="2B rows"):
        prepare_dpo(cfg, {k: v[:3] for k, v in batch.items() if k in ("input_ids", "attention_mask", "loss_mask")}, 1)


def test_nan_guard_and_peak_flops():
    import jax

    from specs_jax.training.logging import NonFiniteLossError, check_finite, peak_flops_per_device

    check_finite(3, {"loss": 1.0, "grad_norm": 2.0})
    with pytest.raises(NonFiniteLossError, match="at step 12"):
        check_finite(12, {"loss": float("nan"), "grad_norm": 1.0})
    with pytest.raises(NonFiniteLossError, match="grad_norm"):
        check_finite(1, {"loss": 1.0, "grad_norm": float("inf")})
    assert peak_flops_per_device(jax.devices("cpu")[0]) is None

    class Fake:
        device_kind = "TPU v5 lite"

    assert peak_flops_per_device(Fake()) == 197e12
