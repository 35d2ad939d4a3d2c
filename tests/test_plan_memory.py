"""scripts/plan_memory.py: AOT-compiled per-device memory plans of the train step on fake CPU devices.

The script sets the CPU device count before it imports jax, so it runs as a subprocess (the three
stages concurrently); the tests read its ``--json`` output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plan_memory.py"
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
MESH_ARG = ",".join(f"{k}={v}" for k, v in MESH.items())
STAGES = ("sft", "dpo", "grpo")


def run_script(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def plans() -> dict[str, dict]:
    """``{stage: plan}`` of the tiny preset on a data=2, fsdp=2, tensor=2 mesh (8 fake CPU devices)."""
    procs = {s: run_script("tiny", "--mesh", MESH_ARG, "--stage", s, "--seq-len", "32", "--json") for s in STAGES}
    out = {}
    for stage, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{stage}: exit {proc.returncode}\n{stderr[-3000:]}"
        out[stage] = json.loads(stdout.strip().splitlines()[-1])
    return out


def tiny_param_count() -> int:
    """Parameters of the tiny preset, counted on an abstract model in this process."""
    import jax
    import numpy as np
    from flax import nnx

    from specs_jax.model import Qwen2_5_VLForConditionalGeneration, load_preset

    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(load_preset("tiny"), rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.mark.parametrize("stage", STAGES)
def test_plan_numbers_positive(plans, stage):
    p = plans[stage]
    assert p["stage"] == stage and p["mesh"] == MESH and p["devices"] == 8
    for key in ("params_bytes", "optimizer_state_bytes", "batch_bytes", "argument_bytes", "output_bytes",
                "temp_bytes", "peak_bytes", "compile_seconds"):
        assert p[key] > 0, (key, p[key])
    assert p["peak_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
    assert p["total_bytes"] == p["peak_bytes"] + p["unread_input_bytes"]
    assert p["fits"] is True  # a tiny model in a 95 GiB budget
    # the donated state's outputs alias its inputs: (nearly) all of params + optimizer state
    assert p["alias_bytes"] >= p["params_bytes"] + p["optimizer_state_bytes"]
    # XLA's argument size is the sum of the parts the script computes from the shardings (+ step counter
    # and PRNG key), less the inputs jit pruned because the step never reads them (dpo: the reference's
    # vision tower in a text-only batch)
    parts = p["params_bytes"] + p["frozen_params_bytes"] + p["optimizer_state_bytes"] + p["reference_params_bytes"]
    assert parts + p["batch_bytes"] <= p["argument_bytes"] + p["unread_input_bytes"] <= parts + p["batch_bytes"] + 64
    assert p["unread_input_bytes"] < 0.05 * p["argument_bytes"]


def test_params_bytes_match_independent_count(plans):
    n = tiny_param_count()
    assert plans["sft"]["param_count"] == n
    shards = MESH["fsdp"] * MESH["tensor"]  # the data axis replicates parameters
    ideal = n * 4 / shards  # float32 master weights
    for p in plans.values():
        # norms, biases and vision weights are sharded over one axis only (or replicated): a few % more
        assert ideal <= p["params_bytes"] <= 1.05 * ideal, (p["params_bytes"], ideal)
        # Adam: two moments of the params' size and sharding (+ a replicated step counter)
        assert 2 * p["params_bytes"] <= p["optimizer_state_bytes"] <= 2 * p["params_bytes"] + 64


def test_reference_params_only_where_used(plans):
    sft, dpo, grpo = plans["sft"], plans["dpo"], plans["grpo"]
    assert sft["reference_params_bytes"] == 0 and grpo["reference_params_bytes"] == 0  # grpo: kl_coef=0
    assert dpo["reference_params_bytes"] == dpo["params_bytes"]
    assert dpo["argument_bytes"] > sft["argument_bytes"]
    held = lambda p: p["argument_bytes"] + p["unread_input_bytes"]
    assert held(dpo) - held(sft) >= dpo["reference_params_bytes"]
    assert dpo["total_bytes"] > sft["total_bytes"]
    # GRPO rows carry old log-probs [R, T] and advantages [R]
    assert grpo["batch_bytes"] > sft["batch_bytes"]


def test_bad_mesh_exits_nonzero_naming_the_part():
    proc = run_script("tiny", "--mesh", "data=3,foo=2", "--json")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "foo=2" in stderr and "foo" in stderr
    assert not stdout.strip()


@pytest.mark.parametrize("mesh, part", [("data=2,data=2", "data=2"), ("fsdp=0", "fsdp=0"), ("tensor", "tensor")])
def test_more_bad_meshes(mesh, part):
    proc = run_script("tiny", "--mesh", mesh)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and repr(part) in stderr, stderr


def test_help_explains_options():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT,
                         check=False)
    assert out.returncode == 0
    for option in ("--mesh", "--stage", "--seq-len", "--batch", "--grad-accum", "--dtype", "--param-dtype",
                   "--remat", "--mlp-tile", "--freeze-vision", "--image-patches", "--kl-coef", "--budget-gib", "--json", "FITS",
                   "--attention", "interpret mode"):
        assert option in out.stdout, option


def test_attention_backends_blockwise_needs_less_temp_memory_than_the_dense_reference():
    """At T = 2048 the dense-mask reference holds [rows, heads, T, T] scores in the backward; the
    blockwise kernel does not. Both plans name their backend and say what it stands for."""
    args = ("tiny", "--mesh", "data=1,fsdp=2,tensor=1", "--stage", "grpo", "--seq-len", "2048", "--json")
    procs = {a: run_script(*args, "--attention", a) for a in ("xla", "blockwise")}
    plans = {}
    for attention, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{attention}: exit {proc.returncode}\n{stderr[-3000:]}"
        plans[attention] = json.loads(stdout.strip().splitlines()[-1])
    assert plans["xla"]["attention"] == "xla" and "O(T^2)" in plans["xla"]["attention_note"]
    assert "O(T)" in plans["blockwise"]["attention_note"]
    # one row per device, the tiny preset's 4 heads: at least one fp32 [heads, T, T] array more
    heads, t = 4, 2048
    assert plans["xla"]["temp_bytes"] - plans["blockwise"]["temp_bytes"] >= heads * t * t * 4
