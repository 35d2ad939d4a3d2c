"""The sampler runs on params sharded over an 8-device CPU mesh (the trainer's mesh) without gathering them, and
continuous batching there equals static batching on one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from cpu_devices import cpu_devices_env

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from flax import nnx
    from hf_fixtures import random_hf_model, tiny_config
    import specs_jax
    from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams
    from specs_jax.training.sharding import make_mesh, make_rules, param_shardings

    assert len(jax.devices()) == 8, jax.devices()
    path = tempfile.mkdtemp()
    random_hf_model(tiny_config(), seed=3).save_pretrained(path)
    model = specs_jax.load_model(path)
    ids = np.random.default_rng(0).integers(3, 290, (4, 9))
    args = dict(n=2, params=SamplingParams(temperature=0.8, top_k=20), seed=4, decode=False)
    ref = Sampler(model, None, SamplerConfig(max_new_tokens=6), eos_ids=[2], pad_id=0).generate_ids(ids, **args)
    caps = [2, 6, 4, 3]  # rows end early: 3 slots refill while samples are pending
    ref_caps = Sampler(model, None, SamplerConfig(max_new_tokens=6), eos_ids=[2], pad_id=0).generate_ids(
        ids, max_tokens=caps, **args)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(state, mesh, make_rules())
    nnx.update(model, jax.device_put(state, nnx.State(shardings) if not isinstance(shardings, nnx.State) else shardings))
    sharded_before = {str(p): v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    n_split = sum(not s.is_fully_replicated for s in sharded_before.values())
    assert n_split > 10, n_split
    out = Sampler(model, None, SamplerConfig(max_new_tokens=6), eos_ids=[2], pad_id=0).generate_ids(ids, **args)
    after = {str(p): v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert after == sharded_before
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logps, ref.logps, atol=1e-5)
    cont = Sampler(model, None, SamplerConfig(max_new_tokens=6, max_slots=3), eos_ids=[2], pad_id=0).generate_ids(
        ids, max_tokens=caps, **args)
    assert len(set(ref_caps.mask.sum(1).tolist())) > 1
    np.testing.assert_array_equal(cont.tokens, ref_caps.tokens)
    np.testing.assert_array_equal(cont.mask, ref_caps.mask)
    np.testing.assert_allclose(cont.logps, ref_caps.logps, atol=1e-5)
    print("ok", n_split)
""")


def test_sampler_on_sharded_params_equals_unsharded_and_continuous_equals_static():
    env = cpu_devices_env(8)
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("ok")
