"""DPO reference options: log-probs precomputed once per dataset give the same step as a frozen
reference computed in every step; mismatched batches are refused; evaluation is the step's loss."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_training_sharded import run_config, small_model

from specs_jax.training.state import join_params
from specs_jax.training.synthetic import random_dpo_batch
from specs_jax.training.trainer import Trainer


def test_precomputed_reference_equals_per_batch_reference(tmp_path):
    model = small_model()
    batches = [random_dpo_batch(model.config, np.random.RandomState(i), 4, 16) for i in range(2)]
    per_batch = Trainer(run_config("dpo", str(tmp_path / "a"), ["train.batch_size=4"]), "dpo", model)
    precomputed = Trainer(run_config("dpo", str(tmp_path / "b"), ["train.batch_size=4", "model.reference=precomputed"]),
                          "dpo", model)
    with_ref = list(precomputed.precompute_reference(batches))
    assert with_ref[0]["ref_logps"].shape == (8, 16)

    with pytest.raises(ValueError, match="model.reference=precomputed but the batch has no ref_logps"):
        precomputed.train_step(batches[0])
    with pytest.raises(ValueError, match="set model.reference=precomputed"):
        per_batch.train_step(with_ref[0])
    with pytest.raises(ValueError, match="batch of 2 pairs .* train.batch_size=4"):
        per_batch.train_step(random_dpo_batch(model.config, np.random.RandomState(9), 2, 16))

    before = per_batch.evaluate(batches[:1])  # evaluation = the training loss without the update
    for plain, ref in zip(batches, with_ref):
        a, b = per_batch.train_step(plain), precomputed.train_step(ref)
        if plain is batches[0]:
            assert before["eval/loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert a["rewards/margins"] != 0.0  # the second step sees a moved policy against the fixed reference
    pa = jax.tree.leaves(join_params(per_batch.state.params, per_batch.state.frozen))
    pb = jax.tree.leaves(join_params(precomputed.state.params, precomputed.state.frozen))
    assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(pa, pb)) < 1e-6
    per_batch.close()
    precomputed.close()
