"""The rollout memory plan (specs_jax.sampling.memory) and its place in scripts/plan_memory.py --stage grpo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from specs_jax.model import Qwen2_5_VLForConditionalGeneration, load_preset
from specs_jax.sampling.memory import rollout_memory

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def count_params(cfg) -> int:
    model = nnx.eval_shape(lambda: Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def test_tiny_plan_against_hand_arithmetic():
    cfg = load_preset("tiny", dtype="bfloat16")
    t = cfg.text
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2  # k and v, bf16
    kw = dict(prompts=8, group_size=4, prompt_len=64, max_new_tokens=192, devices=8, host_devices=4,
              param_bytes=10**6, resident_bytes=5 * 10**6, budget_bytes=GIB, rollout_mesh="2")
    plan = rollout_memory(cfg, max_slots=12, **kw)
    kv_split = 2 if t.num_key_value_heads % 2 == 0 else 1  # tensor=2 splits the KV heads when it can
    assert plan["rollout_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    assert plan["slots"] == 12 and plan["slots_per_group"] == 3  # max_slots, a multiple of the 4 groups
    assert plan["kv_cache_bytes"] == 3 * 256 * per_token // kv_split
    assert plan["prefill_cache_bytes"] == 2 * 64 * per_token // kv_split  # each of the 4 groups its 2 prompts
    odd = rollout_memory(cfg, max_slots=12, **{**kw, "prompts": 6})
    assert odd["prefill_cache_bytes"] == 6 * 64 * per_token // kv_split  # 4 groups do not divide 6: all on each
    assert plan["rollout_weights_bytes"] == 10**6 // 2
    assert plan["outputs_bytes"] == 32 * 192 * 9
    parts = ("resident_train_state", "rollout_weights", "kv_cache", "prefill_cache", "outputs", "transients")
    assert plan["total_bytes"] == sum(plan[f"{p}_bytes"] for p in parts) and plan["fits"]
    # a per-device KV budget of 5 slots' worth: 5 * 4 groups = 20 slots
    budget = 5 * 256 * per_token / GIB
    assert rollout_memory(cfg, kv_cache_gib=budget, **kw)["slots"] == 20
    assert not rollout_memory(cfg, max_slots=12, **{**kw, "budget_bytes": plan["total_bytes"] - 1})["fits"]


def test_7b_rollout_at_the_paper_settings_fits_95_gib_on_16_chips_with_256_plus_slots():
    cfg = load_preset("qwen2.5-vl-7b", dtype="bfloat16", param_dtype="float32")
    n = count_params(cfg)
    plan = rollout_memory(cfg, prompts=128, group_size=8, prompt_len=4096, max_new_tokens=10240, devices=16,
                          host_devices=4, param_bytes=2 * n, resident_bytes=12 * n // 16, budget_bytes=95 * GIB)
    assert plan["rollout_mesh"]["tensor"] == 1  # 15.5 GiB of bf16 weights fit a full copy per chip
    assert plan["slots"] >= 256 and plan["slots"] % 16 == 0
    assert plan["kv_cache_bytes"] == plan["slots_per_group"] * 14336 * 57344  # 56 KiB per token
    assert plan["fits"], plan


def test_a_budget_too_small_for_one_slot_is_refused():
    cfg = load_preset("qwen2.5-vl-7b", dtype="bfloat16")
    with pytest.raises(ValueError, match="over the budget kv_cache_gib"):
        rollout_memory(cfg, prompts=128, group_size=8, prompt_len=4096, max_new_tokens=10240, devices=16,
                       host_devices=4, param_bytes=16 * GIB, resident_bytes=0, budget_bytes=95 * GIB,
                       kv_cache_gib=0.1)


def test_script_prints_update_and_rollout_and_exits_on_both(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("base_config: " + str(ROOT / "configs" / "base.yaml") + "\n"
                      "model: {dtype: bfloat16}\ntrain: {batch_size: 4, max_length: 32}\n"
                      "optim: {grad_accum_steps: 2}\nrl: {group_size: 2, max_new_tokens: 16, max_slots: 8}\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "plan_memory.py"), "tiny", "--mesh", "data=2,fsdp=2,tensor=1",
           "--stage", "grpo", "--config", str(config), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["batch"] == 4 * 2 // 2 and plan["grad_accum"] == 2 and plan["seq_len"] == 32 + 16  # from the config
    assert plan["rollout"]["slots"] == 8 and plan["rollout"]["slot_tokens"] == 48
    assert plan["update"]["total_gib"] > 0 and plan["rollout"]["total_gib"] > 0 and plan["fits"]
    smaller = min(plan["update"]["total_gib"], plan["rollout"]["total_gib"])
    budget = (max(plan["update"]["total_gib"], plan["rollout"]["total_gib"]) + smaller) / 2
    out = subprocess.run([*cmd, "--budget-gib", str(budget)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 3, out.stderr[-3000:]
    assert not json.loads(out.stdout.strip().splitlines()[-1])["fits"]
    assert math.isfinite(plan["rollout"]["headroom_gib"])


def test_fit_slots_keeps_the_most_slots_whose_compiled_rollout_fits():
    from specs_jax.sampling.layout import rollout_mesh
    from specs_jax.sampling.memory import fit_slots, rollout_program_memory

    cfg = load_preset("tiny", dtype="float32")
    mesh = rollout_mesh(jax.devices()[:1], 1)
    shape = dict(prompts=4, group_size=2, prompt_len=32, max_new_tokens=96)
    peak = {s: rollout_program_memory(cfg, mesh, slots=s, **shape)["peak_bytes"] for s in (5, 6)}
    assert peak[5] < peak[6]  # every slot holds its cache and logits
    budget = (peak[5] + peak[6]) // 2 + 1000
    slots, program = fit_slots(cfg, mesh, most=8, budget_bytes=budget, resident_bytes=1000, **shape)
    assert slots == 5 and program["peak_bytes"] == peak[5]
    # everything fits: the most asked for; nothing fits: the most asked for too (reported as not fitting)
    assert fit_slots(cfg, mesh, most=8, budget_bytes=2**40, resident_bytes=0, **shape)[0] == 8
    assert fit_slots(cfg, mesh, most=8, budget_bytes=1, resident_bytes=0, **shape)[0] == 8
