"""Every loss runs unchanged on an 8-device CPU mesh with the batch sharded, giving the unsharded value.

The check runs in a subprocess (this file as a script) because the host device count must be set
in XLA_FLAGS before jax is imported, and the rest of the suite runs on one device.
"""

import os
import subprocess
import sys

from cpu_devices import cpu_devices_env

N_DEVICES = 8


def test_losses_on_sharded_batch_match_unsharded():
    env = cpu_devices_env(N_DEVICES)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"devices={N_DEVICES}" in proc.stdout
    for name in ("dpo_hybrid", "dpo_hybrid-ipo", "grpo", "dr_grpo", "gspo", "cispo", "opsd", "vigos",
                 "token_logps_from_hidden", "token_logps_from_hidden-blocks", "no activation gathered"):
        assert f"ok {name}" in proc.stdout, proc.stdout


def _main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from specs_jax.losses import get_loss, token_logps_from_hidden

    assert len(jax.devices()) == N_DEVICES, jax.devices()
    print(f"devices={len(jax.devices())}")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    b, t, v, h = N_DEVICES, 5, 11, 4
    rng = np.random.default_rng(0)
    logps = -rng.exponential(size=(3, b, t)).astype(np.float32)
    mask = (np.arange(t)[None, :] < rng.integers(0, t + 1, size=b)[:, None]).astype(np.float32)
    logits = rng.normal(size=(4, b, t, v)).astype(np.float32)
    index = rng.integers(0, 3, size=(b, t)).astype(np.int32)
    adv = rng.normal(size=(b,)).astype(np.float32)
    hidden = rng.normal(size=(b, t, h)).astype(np.float32)
    weight = rng.normal(size=(v, h)).astype(np.float32)

    cases = {
        "dpo_hybrid": (lambda x: get_loss("dpo_hybrid")(x, logps[1], logps[2], logps[0], mask, mask)[0], logps[0]),
        "dpo_hybrid-ipo": (
            lambda x: get_loss("dpo_hybrid")(x, logps[1], logps[2], logps[0], mask, mask, loss_type="ipo")[0],
            logps[0],
        ),
        "grpo": (lambda x: get_loss("grpo")(x, logps[1], logps[2], adv, mask, dual_clip=3.0)[0], logps[0]),
        **{
            name: (
                lambda x, name=name, mode=mode: get_loss(name)(
                    x, logps[1], logps[2], adv, mask, sampler_is_mode=mode, sampler_logps=logps[2]
                )[0],
                logps[0],
            )
            for name, mode in (("dr_grpo", "token_truncate"), ("gspo", "sequence_mask"), ("cispo", "token_mask"))
        },
        "opsd": (lambda x: get_loss("opsd")(x, logits[1], mask, divergence="jsd")[0], logits[0]),
        "vigos": (lambda x: get_loss("vigos")(x, logits[1:], index, mask, token_clip=None)[0], logits[0]),
        "token_logps_from_hidden": (
            lambda x: jnp.sum(token_logps_from_hidden(x, weight, index, chunk_size=4) * mask),
            hidden,
        ),
        "token_logps_from_hidden-blocks": (  # 5 positions in blocks of 2 (the last one padded)
            lambda x: jnp.sum(token_logps_from_hidden(x, weight, index, chunk_size=4, seq_chunk=2) * mask),
            hidden,
        ),
    }
    for name, (fn, x) in cases.items():
        step = jax.jit(jax.value_and_grad(fn))
        value, grad = step(jax.device_put(x, jax.devices()[0]))
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
        value_s, grad_s = step(x_sharded)
        assert len(x_sharded.sharding.device_set) == N_DEVICES
        assert len(grad_s.sharding.device_set) == N_DEVICES, (name, grad_s.sharding)
        np.testing.assert_allclose(value_s, value, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(grad_s, grad, rtol=1e-5, atol=1e-6, err_msg=name)  # fp32 sums in another order across shards
        print(f"ok {name}")
    # the sequence blocks keep the rows sharded: no device gathers the hidden states (or a block of them)
    import re

    step = jax.jit(jax.grad(cases["token_logps_from_hidden-blocks"][0]))
    hlo = step.lower(jax.device_put(hidden, NamedSharding(mesh, P("data")))).compile().as_text()
    gathered = [shape for shape in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather", hlo)
                if np.prod([int(d) for d in shape.split(",") if d]) >= hidden.size // N_DEVICES * 2]
    assert not gathered, gathered
    print("ok no activation gathered")


if __name__ == "__main__":
    _main()
