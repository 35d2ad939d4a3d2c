"""Checkpoints: kill-and-resume continues with exactly the losses of an uninterrupted run; keep last N
+ best; HF export; the NaN/Inf guard names the step and saves nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_training_sharded import run_config, small_model

from specs_jax.training.logging import NonFiniteLossError
from specs_jax.training.state import join_params
from specs_jax.training.synthetic import SyntheticSource
from specs_jax.training.trainer import Trainer

STEPS = 6


class Killed(Exception):
    pass


class DiesAfter:
    """A data source that raises (like a killed job) when batch ``n + 1`` is requested."""

    def __init__(self, source: SyntheticSource, n: int):
        self.source, self.n = source, n

    def __iter__(self):
        for i, batch in enumerate(self.source):
            if i == self.n:
                raise Killed
            yield batch

    def get_state(self):
        return self.source.get_state()

    def set_state(self, state):
        self.source.set_state(state)


def _trainer(out, overrides):
    model = small_model()
    overrides = [f"train.steps={STEPS}", "train.batch_size=4", "optim.schedule=cosine", "optim.warmup_steps=2",
                 "optim.weight_decay=0.1", "log.progress=false", *overrides]
    trainer = Trainer(run_config("sft", str(out), overrides), "sft", model)
    return trainer, SyntheticSource(model.config, "sft", 4, 16, seed=3)


def _params(trainer):
    return jax.tree.leaves(jax.device_get(join_params(trainer.state.params, trainer.state.frozen)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run checkpointing every step (keep last 2 + best by max loss)."""
    out = tmp_path_factory.mktemp("straight")
    trainer, data = _trainer(out, ["checkpoint.every=1", "checkpoint.keep_last_n=2",
                                   "checkpoint.keep_best_metric=loss", "checkpoint.best_mode=max"])
    history = trainer.fit(data)
    yield trainer, history
    trainer.close()


def test_kill_and_resume_is_exact(straight, tmp_path):
    _, history = straight
    first, data = _trainer(tmp_path, ["checkpoint.every=3"])
    with pytest.raises(Killed):
        first.fit(DiesAfter(data, 3))
    assert first.checkpointer.all_steps() == [3]
    first.close()

    resumed, fresh_data = _trainer(tmp_path, ["checkpoint.every=3"])  # fresh objects, fresh data source
    tail = resumed.fit(fresh_data)
    assert fresh_data.next == STEPS
    assert [m["loss"] for m in tail] == [m["loss"] for m in history[3:]]
    assert [m["lr"] for m in tail] == [m["lr"] for m in history[3:]]
    for a, b in zip(_params(resumed), _params(straight[0])):
        np.testing.assert_array_equal(a, b)
    resumed.close()


def test_keeps_last_n_and_best(straight):
    trainer, history = straight
    best = 1 + int(np.argmax([m["loss"] for m in history]))
    assert trainer.checkpointer.all_steps() == sorted({STEPS - 1, STEPS, best})


def test_best_survives_a_resume(straight, tmp_path):
    """The metrics ranking the checkpoints are stored with them, so a resumed run still keeps the best
    checkpoint of before the interruption (and `--step best` finds it)."""
    from specs_jax.convert.training import resolve

    _, history = straight
    # ranked by a metric known in advance: the learning rate under warmup is lowest at step 1
    options = ["checkpoint.every=1", "checkpoint.keep_last_n=1", "checkpoint.keep_best_metric=lr"]
    first, data = _trainer(tmp_path, options)
    with pytest.raises(Killed):
        first.fit(DiesAfter(data, 4))
    first.close()
    resumed, fresh_data = _trainer(tmp_path, options)
    resumed.fit(fresh_data)
    resumed.close()
    best = 1 + int(np.argmin([m["lr"] for m in history]))
    assert best == 1  # saved before the interruption
    assert resumed.checkpointer.all_steps() == [best, STEPS]
    assert resolve(tmp_path, "best").step == best


def test_export_hf_round_trips(straight, tmp_path):
    from specs_jax import load_model
    from specs_jax.convert.io import model_params
    from specs_jax.training.checkpoint import export_hf

    trainer, _ = straight
    export_hf(trainer.checkpointer.directory, trainer.model_cfg, tmp_path / "hf")
    loaded = model_params(load_model(tmp_path / "hf"))
    expected = jax.device_get(join_params(trainer.state.params, trainer.state.frozen))
    flat = {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(expected)}
    assert set(flat) == set(loaded)
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(loaded[k]), v, err_msg=k)


def test_nan_guard_names_step_and_saves_nothing(straight):
    trainer, _ = straight
    saved = trainer.checkpointer.all_steps()
    params = trainer.state.params
    emb = params["model"]["language_model"]["embed_tokens"]["weight"]
    params["model"]["language_model"]["embed_tokens"]["weight"] = emb.at[0].set(np.nan)
    trainer.state = trainer.state._replace(params=params)
    batch = next(SyntheticSource(trainer.model_cfg, "sft", 4, 16, seed=3))
    batch["input_ids"][:, :4] = 0  # the poisoned token
    with pytest.raises(NonFiniteLossError, match=f"step {STEPS + 1}"):
        trainer.train_step(batch)
    trainer.checkpointer.wait()
    assert trainer.checkpointer.all_steps() == saved
