"""Sharded (8-device CPU mesh data=2 x fsdp=2 x tensor=2) training steps equal single-device steps
(loss and updated parameters, fp32, two steps; SFT, DPO-hybrid, and the GRPO, OPSD and ViGOS updates; the
GRPO update also with the decoder MLP over tiles of positions, model.mlp_tile); gradient accumulation over 2
micro-batches equals
one big batch; a frozen vision tower stays bit-identical.

The 8 devices need ``XLA_FLAGS`` before jax is imported, so the checks run in a subprocess
(this file run as a script) and the tests read its JSON report.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpu_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parents[1]


def small_model_config(dtype: str = "float32"):
    """models/tiny.json with a 256-token vocabulary (special ids moved into it)."""
    from specs_jax.model import from_hf_dict
    from specs_jax.model.config import PRESET_DIR

    hf = json.loads((PRESET_DIR / "tiny.json").read_text())
    hf.update(vocab_size=256, image_token_id=255, video_token_id=254, vision_start_token_id=253,
              vision_end_token_id=252, bos_token_id=1, eos_token_id=2)
    return from_hf_dict(hf, dtype=dtype)


@functools.cache
def small_model():
    """One random model per process (the Trainer copies its parameters)."""
    return random_model(small_model_config())


def random_model(cfg):
    """A model filled from numpy (eager NNX initialisation takes seconds): N(0, 0.02) weights, zero
    biases, unit norm weights."""
    import numpy as np
    from flax import nnx

    from specs_jax.convert.io import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg))
    rs = np.random.RandomState(0)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if "norm" in name or "ln_q" in name:
            value = np.ones(var.shape, np.float32)
        elif name.endswith("bias"):
            value = np.zeros(var.shape, np.float32)
        else:
            value = 0.02 * rs.randn(*var.shape).astype(np.float32)
        var.set_value(value)
    return nnx.merge(graphdef, state)


def run_config(kind: str, out: str, overrides: list[str]):
    from specs_jax.training.config import load_config

    base = [f"train.output_dir={out}", "model.dtype=float32", "optim.lr=1e-2", "optim.eps=1e-3",
            "optim.max_grad_norm=0.5", "train.batch_size=8", "log.progress=false", "log.tensorboard=false"]
    if kind == "dpo":
        base.append("loss.kwargs={beta: 0.5, sft_weight: 1.0, sft_norm: token}")
    return load_config(None, base + overrides)


def _flat(tree) -> dict:
    import jax
    import numpy as np

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _train(kind: str, out: str, overrides: list[str], batches: list[dict], mesh=None) -> tuple[list, dict, dict]:
    """(losses, initial params, final params) of Trainer.train_step over ``batches``."""
    from specs_jax.training.state import join_params
    from specs_jax.training.trainer import Trainer

    trainer = Trainer(run_config(kind, out, overrides), kind, small_model(), mesh=mesh)
    initial = _flat(join_params(trainer.state.params, trainer.state.frozen))
    losses = [trainer.train_step(b)["loss"] for b in batches]
    final = join_params(trainer.state.params, trainer.state.frozen)
    q = final["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["weight"]
    trainer.close()
    return losses, initial, {**_flat(final), "__q_spec": str(q.sharding.spec)}


def main(out_dir: str) -> None:
    import jax
    import numpy as np

    from specs_jax.training.sharding import make_mesh
    from specs_jax.training.synthetic import random_dpo_batch, random_sft_batch

    assert len(jax.devices()) == 8, jax.devices()
    cfg = small_model_config()
    single = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sharded = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    report: dict = {"devices": len(jax.devices())}

    def compare(name, a, b):
        la, _, pa = a
        lb, _, pb = b
        report[name] = {
            "losses": [la, lb],
            "max_param_diff": max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa if not k.startswith("__")),
            "q_spec": [pa["__q_spec"], pb["__q_spec"]],
        }

    # SFT text-only with a frozen vision tower; DPO with one image per pair and the vision tower trained
    for kind, make, grid in (("sft", random_sft_batch, None), ("dpo", random_dpo_batch, (1, 4, 4))):
        rs = np.random.RandomState(0)
        batches = [make(cfg, rs, 8, 24, image_grid=grid) for _ in range(2)]
        extra = ["model.freeze_vision=true"] if kind == "sft" else []
        runs = {
            "sharded": _train(kind, f"{out_dir}/{kind}_s", sharded + extra, batches),
            "single": _train(kind, f"{out_dir}/{kind}_1", extra, batches, mesh=single),
            "accum": _train(kind, f"{out_dir}/{kind}_a", extra + ["optim.grad_accum_steps=2"], batches, mesh=single),
        }
        compare(f"{kind}_sharded_vs_single", runs["sharded"], runs["single"])
        compare(f"{kind}_accum2_vs_accum1", runs["accum"], runs["single"])
        _, initial, final = runs["sharded"]
        changed = {k: bool(np.any(initial[k] != final[k])) for k in initial}
        report[f"{kind}_changed"] = {"vision": [changed[k] for k in changed if "'visual'" in k],
                                     "text": [changed[k] for k in changed if "'visual'" not in k]}
    # RL kinds: rl.num_iterations=2 updates on a fixed rollout batch (GRPO with the KL reference, OPSD and
    # ViGOS with their frozen teachers), through RLTrainer.update: the algorithm's own prepare and shardings
    rs = np.random.RandomState(1)
    seqs = {"grpo": grpo_batch(cfg, rs), "opsd": opsd_batch(cfg, rs), "vigos": vigos_batch(cfg, rs)}
    for kind, options in (("grpo", "{kl_coef: 0.05}"), ("opsd", "{divergence: jsd, beta: 0.5}"),
                          ("vigos", "{token_clip: 1.0}")):
        extra = [f"loss.name={kind}", f"loss.kwargs={options}", "rl.num_iterations=2"]
        single_run = _update(kind, f"{out_dir}/{kind}_1", extra, seqs[kind], mesh=single)
        compare(f"{kind}_sharded_vs_single", _update(kind, f"{out_dir}/{kind}_s", sharded + extra, seqs[kind]),
                single_run)
        if kind == "grpo":  # the same weights with the decoder MLP over tiles of 8 positions, sharded
            tiled = random_model(cfg.replace(mlp_tile=8))
            compare("grpo_mlp_tile_sharded_vs_single", _update(kind, f"{out_dir}/{kind}_t", sharded + extra,
                                                               seqs[kind], model=tiled), single_run)
    Path(out_dir, "report.json").write_text(json.dumps(report))


def grpo_batch(cfg, rs) -> dict:
    """A GRPO step batch: random rows with one image each, old log-probs and advantages."""
    from specs_jax.training.synthetic import random_sft_batch

    batch = random_sft_batch(cfg, rs, 8, 24, image_grid=(1, 4, 4))
    return {**batch, "old_logps": -3 * rs.rand(8, 24).astype("float32"), "advantages": rs.randn(8).astype("float32")}


def opsd_batch(cfg, rs, completion: int = 8) -> dict:
    """An OPSD step batch (text only): student rows = prompt + completion, teacher rows = a longer
    privileged context + the same completion columns (specs_jax.training.distill layout)."""
    import numpy as np

    from specs_jax.training.synthetic import random_sft_batch

    student = random_sft_batch(cfg, rs, 8, 24)
    tokens = student["input_ids"][:, -completion:]
    loss_mask = np.zeros_like(student["attention_mask"])
    loss_mask[:, -completion:] = 1
    context = rs.randint(3, 200, (8, 32)).astype(np.int32)
    return {"input_ids": student["input_ids"], "attention_mask": np.ones_like(loss_mask), "loss_mask": loss_mask,
            "response_mask": np.ones((8, completion), np.int32),
            "teacher_input_ids": np.concatenate([context, tokens], 1),
            "teacher_attention_mask": np.ones((8, 32 + completion), np.int32)}


def vigos_batch(cfg, rs, completion: int = 8) -> dict:
    """A ViGOS step batch: the OPSD layout with two teacher contexts (reasoning, reference) and a
    per-token routing ``teacher_index`` (0 perception, 1 reasoning, 2 reference)."""
    import numpy as np

    batch = opsd_batch(cfg, rs, completion)
    reasoning_ids, reasoning_mask = batch.pop("teacher_input_ids"), batch.pop("teacher_attention_mask")
    reference = rs.randint(3, 200, (8, 16)).astype(np.int32)
    return {**batch, "reasoning_input_ids": reasoning_ids, "reasoning_attention_mask": reasoning_mask,
            "reference_input_ids": np.concatenate([reference, reasoning_ids[:, -completion:]], 1),
            "reference_attention_mask": np.ones((8, 16 + completion), np.int32),
            "teacher_index": rs.randint(0, 3, (8, completion)).astype(np.int32)}


def _update(kind: str, out: str, overrides: list[str], seqs: dict, mesh=None, model=None) -> tuple[list, dict, dict]:
    """(losses, initial params, final params) of two RLTrainer.update calls on ``seqs`` (default model:
    :func:`small_model`)."""
    from types import SimpleNamespace

    from specs_jax.training.rl import RLTrainer
    from specs_jax.training.state import join_params

    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=2))
    trainer = RLTrainer(run_config(kind, out, overrides), kind, processor, model or small_model(), mesh=mesh)
    initial = _flat(join_params(trainer.state.params, trainer.state.frozen))
    losses = [trainer.update(seqs)["loss"] for _ in range(2)]
    final = join_params(trainer.state.params, trainer.state.frozen)
    q = final["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["weight"]
    trainer.close()
    return losses, initial, {**_flat(final), "__q_spec": str(q.sharding.spec)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded")
    env = cpu_devices_env(8)
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "opsd", "vigos", "grpo_mlp_tile"])
def test_sharded_step_equals_single_device(report, kind):
    r = report[f"{kind}_sharded_vs_single"]
    assert report["devices"] == 8
    assert r["losses"][0] == pytest.approx(r["losses"][1], rel=1e-5, abs=1e-6)
    assert r["max_param_diff"] < 1e-6
    # the sharded run really is sharded: q_proj [layers, heads*dim, embed] over (None, tensor, fsdp)
    assert r["q_spec"] == ["P(None, 'tensor', 'fsdp')", "P(None, None, None)"]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_grad_accumulation_equals_big_batch(report, kind):
    r = report[f"{kind}_accum2_vs_accum1"]
    assert r["losses"][0] == pytest.approx(r["losses"][1], rel=1e-5, abs=1e-6)
    assert r["max_param_diff"] < 1e-6


def test_frozen_vision_is_bit_identical(report):
    sft, dpo = report["sft_changed"], report["dpo_changed"]
    assert sft["vision"] and not any(sft["vision"])  # freeze_vision=true: every vision param unchanged
    assert all(sft["text"])  # ... while every text param moved
    assert any(dpo["vision"])  # without freezing, the vision tower trains


if __name__ == "__main__":
    main(sys.argv[1])
