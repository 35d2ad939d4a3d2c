"""The rollout weight layout: its choice, and on an 8-device CPU mesh the same samples as one device with no
weight collective in the compiled rollout (the trainer's FSDP layout all-gathers weights)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from specs_jax.sampling.layout import parse_rollout_mesh, rollout_tensor_size

from cpu_devices import cpu_devices_env

GIB = 2**30


def test_parse_rollout_mesh():
    assert parse_rollout_mesh("auto") == "auto" and parse_rollout_mesh("trainer") == "trainer"
    assert parse_rollout_mesh(4) == 4 and parse_rollout_mesh("2") == 2
    for bad in (0, "0", "tensor", -1, True, 1.5):
        with pytest.raises(ValueError, match="rl.rollout_mesh must be"):
            parse_rollout_mesh(bad)


def test_rollout_tensor_size_is_the_smallest_split_that_fits():
    # 15 GiB of weights on 95 GiB chips: a full copy per chip (15 <= 0.4 * 95)
    assert rollout_tensor_size(15 * GIB, 95 * GIB, 16, 4) == 1
    # 145 GiB (72B in bf16): 145 / 4 = 36.3 <= 38 but 145 / 2 > 38
    assert rollout_tensor_size(145 * GIB, 95 * GIB, 16, 4) == 4
    assert rollout_tensor_size(145 * GIB, None, 16, 4) == 1  # unknown device memory (CPU)
    with pytest.raises(ValueError, match="does not fit .* set rl.rollout_mesh=trainer"):
        rollout_tensor_size(145 * GIB, 95 * GIB, 16, 2)


SCRIPT = textwrap.dedent("""
    import collections, re, sys, tempfile
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from flax import nnx
    from hf_fixtures import random_hf_model, tiny_config
    import specs_jax
    from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams
    from specs_jax.sampling.layout import reshard, rollout_mesh, rollout_shardings
    from specs_jax.training.sharding import make_mesh, make_rules, param_shardings

    path = tempfile.mkdtemp()
    random_hf_model(tiny_config(), seed=3).save_pretrained(path)
    model = specs_jax.load_model(path)
    ids = np.random.default_rng(0).integers(3, 290, (8, 9))  # 8 prompts: each of 8 (K=1) or 4 (K=2) groups its own
    args = dict(n=4, params=SamplingParams(temperature=1.0), seed=2, decode=False, max_tokens=[2, 6, 3, 5, 1, 6, 4, 2])
    ref = Sampler(model, None, SamplerConfig(max_new_tokens=6), eos_ids=[2], pad_id=0).generate_ids(ids, **args)

    params = nnx.state(model, nnx.Param)
    trainer = jax.device_put(nnx.to_pure_dict(params), param_shardings(params, make_mesh(fsdp=8), make_rules()))
    sampler = Sampler(model, None, SamplerConfig(max_new_tokens=6, max_slots=8), eos_ids=[2], pad_id=0)

    def collective_sizes(weights, mesh):
        inputs, _ = sampler._pad_batch(ids, None, None, None)
        with jax.set_mesh(mesh):
            text = sampler._jitted.lower(nnx.State(weights), inputs, jax.random.key(0), np.int32(32),
                                         np.full(32, 6, np.int32), max_new_tokens=6, n=4, slots=8,
                                         params=SamplingParams(), top_probs=0).compile().as_text()
        shapes = re.findall(r"= \\w+\\[([\\d,]*)\\][^ ]* (?:all-gather|all-reduce|reduce-scatter|all-to-all)\\(", text)
        return [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]

    # the smallest weight matrix of a decoder layer: k_proj [kv_heads * head_dim, hidden]
    smallest_weight = int(np.prod(model.model.language_model.layers.self_attn.k_proj.weight.shape[1:]))
    assert max(collective_sizes(trainer, make_mesh(fsdp=8))) >= smallest_weight  # FSDP: weights are gathered
    for tensor in (1, 2):
        mesh = rollout_mesh(jax.devices(), tensor)
        weights = reshard(trainer, rollout_shardings(model, mesh, make_rules()), model.config.dtype)
        if tensor == 1:
            sizes = collective_sizes(weights, mesh)
            assert max(sizes) < smallest_weight, (sizes, smallest_weight)  # only per-token values move
        with jax.set_mesh(mesh):
            out = sampler.generate_ids(ids, weights=weights, **args)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logps, ref.logps, atol=1e-5)

    # each data group holds the prefill of its own prompts only: per device, 1/8 of all prompts' keys/values
    from specs_jax.sampling.engine import kv_bytes_per_token
    from specs_jax.sampling.memory import rollout_program_memory
    shape = dict(prompts=32, group_size=1, prompt_len=512, max_new_tokens=8, slots=8)
    split = rollout_program_memory(model.config, rollout_mesh(jax.devices(), 1), **shape)["peak_bytes"]
    whole = rollout_program_memory(model.config, rollout_mesh(jax.devices()[:1], 1), **shape)["peak_bytes"]
    prefill_all = 32 * 512 * kv_bytes_per_token(model.config)
    assert split < whole - 0.75 * prefill_all, (split, whole, prefill_all)
    print("ok")
""")


def test_rollout_layout_on_8_devices_samples_the_same_without_weight_collectives():
    env = cpu_devices_env(8)
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
