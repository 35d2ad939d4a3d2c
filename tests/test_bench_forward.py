"""scripts/bench_forward.py's profile summary: where a jitted program's time goes, by operation kind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp


def _bench_forward():
    path = Path(__file__).parents[1] / "scripts" / "bench_forward.py"
    spec = importlib.util.spec_from_file_location("bench_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_ops_splits_the_time_by_kind_and_names_the_costliest_operations():
    bench = _bench_forward()
    fn = jax.jit(lambda a, b: jnp.exp(a @ b).T @ jnp.sin(a))
    a, b = jnp.ones((512, 256)), jnp.ones((256, 512))
    profile = bench.profile_ops(lambda: jax.block_until_ready(fn(a, b)), fn.lower(a, b).compile().as_text(), top=3)
    kinds = profile["kinds"]
    assert kinds["matmuls (dot fusions)"] > 0 and abs(sum(kinds.values()) - 1.0) < 1e-6
    assert 1 <= len(profile["ops"]) <= 3 and profile["ms_per_step"] > 0
    shares = [share for _, share, _, _ in profile["ops"]]
    assert shares == sorted(shares, reverse=True)
    assert any(shape.startswith("f32[512") for _, _, shape, _ in profile["ops"])  # from the compiled program's text
    lines = bench.profile_lines(profile)
    assert any("matmuls (dot fusions)" in ln for ln in lines) and "costliest operations" in lines[len(kinds)]
