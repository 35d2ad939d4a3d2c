#!/usr/bin/env python
"""Measure the peak RSS of checkpoint conversion on generated checkpoints of at least 1 GB.

``--case hf``: writes a random Qwen2.5-VL-architecture HF checkpoint (fp32 safetensors by default,
~2.1 GB), then runs ``specs-jax convert hf-to-orbax`` and ``specs-jax convert orbax-to-hf`` each in a
fresh process and reports the child's peak resident set size (``ru_maxrss``) against the checkpoint
size, together with the RSS of a process that only imports the same libraries (the fixed cost of
Python + JAX + Orbax). Target: peak RSS under 1.5x the checkpoint size. Also checks that the
round trip is bit-exact.

``--case training``: writes a training checkpoint as ``specs-jax train`` does (``Checkpointer``:
parameters with a frozen vision tower, AdamW moments mu and nu, step, RNG; ~3x the parameters on
disk), then converts that step with ``specs-jax convert orbax-to-hf RUN/checkpoints/1 OUT --dtype D``
for D = bfloat16 and float32. Target: peak RSS within 1.5x of the parameters' size in the output
dtype (the moments are never read). Checks that every written tensor is the parameter cast to D.

    python scripts/bench_convert_memory.py                                # both cases, 2.1 GB fp32 params
    python scripts/bench_convert_memory.py --case hf --dtype bfloat16 --layers 48   # 2.1 GB bf16
    python scripts/bench_convert_memory.py --case training                # 2.1 GB params, 6.4 GB checkpoint
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# VmHWM (this process image's peak RSS; unlike ru_maxrss it does not inherit the parent's peak
# across fork+exec).
MEASURE = """
import re, sys
from specs_jax.cli.main import main
import orbax.checkpoint, jax  # same imports as a conversion
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
sys.exit(code)
"""


def model_config(args):
    from specs_jax.model import from_hf_dict

    hf = json.loads((Path(__file__).resolve().parents[1] / "models" / "tiny.json").read_text())
    hf.update(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
              num_attention_heads=args.hidden // 128, num_key_value_heads=2, vocab_size=args.vocab,
              tie_word_embeddings=False, torch_dtype=args.dtype,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    hf["vision_config"].update(out_hidden_size=args.hidden)
    return hf, from_hf_dict(hf)


def make_checkpoint(path: Path, args) -> int:
    """Write a random checkpoint tensor by tensor (never more than one tensor in memory)."""
    import jax.numpy as jnp

    from specs_jax.convert.io import hf_plan, param_specs, write_hf_weights

    hf, cfg = model_config(args)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    rng = np.random.default_rng(0)
    dtype = np.dtype(jnp.dtype(args.dtype))
    plan = hf_plan(cfg, {key: dtype for key in param_specs(cfg)})
    # 256 MB shards, one state entry generated at a time.
    write_hf_weights(path, plan, lambda key: rng.standard_normal(param_specs(cfg)[key].shape, np.float32).astype(dtype),
                     max_shard_bytes=256 * 1024**2)
    return sum(int(np.prod(t.shape)) * dtype.itemsize for t in plan)


def _random(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The generated value of parameter ``key`` (reproducible per key, to check the output)."""
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") ^ len(key)
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def make_training_checkpoint(run: Path, args) -> tuple[int, dict[str, int]]:
    """Save step 1 of a run with :class:`specs_jax.training.checkpoint.Checkpointer`, as the trainer
    does: float32 parameters (vision tower frozen) and AdamW's mu and nu. The moments share the
    parameters' buffers (they cost disk, not this process's memory: their values are never read back).
    Returns (number of parameters, {item: bytes on disk})."""
    import jax
    import jax.numpy as jnp

    from specs_jax.convert.io import _to_jax, param_specs
    from specs_jax.training.checkpoint import Checkpointer
    from specs_jax.training.config import OptimConfig
    from specs_jax.training.state import TrainState, make_optimizer, split_frozen

    _, cfg = model_config(args)
    params: dict = {}
    n = 0
    for key, spec in param_specs(cfg).items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _to_jax(_random(key, spec.shape))
        n += int(np.prod(spec.shape))
    trained, frozen = split_frozen(params, freeze_vision=True)
    tx = make_optimizer(OptimConfig(), 10)
    abstract = jax.eval_shape(tx.init, trained)
    leaves = dict(jax.tree_util.tree_leaves_with_path(trained))

    def fill(path, leaf):
        names = [getattr(k, "name", None) for k in path]
        for moment in ("mu", "nu"):
            if moment in names:
                return leaves[path[names.index(moment) + 1:]]
        return jnp.zeros(leaf.shape, leaf.dtype)

    opt_state = jax.tree_util.tree_map_with_path(fill, abstract)
    state = TrainState(jnp.ones((), jnp.int32), trained, frozen, opt_state, jax.random.PRNGKey(0))
    ck = Checkpointer(run / "checkpoints", model=cfg, model_files=None, async_save=False)
    ck.save(state, {"batches_consumed": 1})
    ck.close()
    step = run / "checkpoints" / "1"
    sizes = {item: sum(f.stat().st_size for f in (step / item).rglob("*") if f.is_file())
             for item in ("params", "opt_state")}
    return n, sizes


def check_training_output(out: Path, dtype: str) -> bool:
    """Every tensor written is the generated parameter cast to ``dtype`` (bit-exact), none missing."""
    import jax.numpy as jnp

    from specs_jax.convert.io import hf_names, hf_tensor_index, param_specs
    from specs_jax.convert.safetensors_io import read_tensor
    from specs_jax.model import load_config

    index = hf_tensor_index(out)  # {module name: tensor}
    to = np.dtype(jnp.dtype(dtype))
    seen = 0
    for key, spec in param_specs(load_config(out)).items():
        names = hf_names(key, spec.shape)
        stacked = not (len(names) == 1 and names[0][0] == key)
        value = _random(key, spec.shape)
        for i, (name, _) in enumerate(names):
            want = (value[i] if stacked else value).astype(to)
            if read_tensor(index[name]).tobytes() != want.tobytes():
                return False
            seen += 1
    return seen == len(index)


def peak_rss(*cli_args: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cli_args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


def bench_hf(work: Path, args) -> None:
    size = make_checkpoint(work / "hf", args)
    gb = size / 1024**3
    print(f"checkpoint: {gb:.2f} GiB of {args.dtype} tensors ({args.layers} layers, hidden {args.hidden})")
    base = peak_rss()
    to_orbax = peak_rss("convert", "hf-to-orbax", str(work / "hf"), str(work / "orbax"))
    to_hf = peak_rss("convert", "orbax-to-hf", str(work / "orbax"), str(work / "hf_back"))
    for name, rss in (("imports only", base), ("hf-to-orbax", to_orbax), ("orbax-to-hf", to_hf)):
        print(f"{name:>13}: peak RSS {rss / 1024**3:5.2f} GiB = {rss / size:4.2f}x checkpoint "
              f"({(rss - base) / size:4.2f}x above the imports)")
    from specs_jax.convert.io import hf_tensor_index
    from specs_jax.convert.safetensors_io import read_tensor

    a, b = hf_tensor_index(work / "hf"), hf_tensor_index(work / "hf_back")
    exact = a.keys() == b.keys() and all(read_tensor(a[k]).tobytes() == read_tensor(b[k]).tobytes() for k in a)
    print(f"round trip bit-exact: {exact}")


def bench_training(work: Path, args) -> None:
    import time

    start = time.perf_counter()
    n, sizes = make_training_checkpoint(work / "run", args)
    total = sum(sizes.values())
    print(f"training checkpoint: {n / 1e6:.0f}M float32 parameters; on disk params {sizes['params'] / 1024**3:.2f} GiB "
          f"+ optimizer moments {sizes['opt_state'] / 1024**3:.2f} GiB = {total / 1024**3:.2f} GiB "
          f"(written in {time.perf_counter() - start:.0f}s)")
    base = peak_rss()
    print(f"{'imports only':>24}: peak RSS {base / 1024**3:5.2f} GiB")
    for dtype in ("bfloat16", "float32"):
        out = work / f"hf_{dtype}"
        start = time.perf_counter()
        rss = peak_rss("convert", "orbax-to-hf", str(work / "run" / "checkpoints" / "1"), str(out), "--dtype", dtype)
        seconds = time.perf_counter() - start
        params = n * (2 if dtype == "bfloat16" else 4)
        ratio = rss / params
        print(f"{'orbax-to-hf --dtype ' + dtype:>24}: peak RSS {rss / 1024**3:5.2f} GiB = {ratio:4.2f}x the parameters "
              f"in {dtype} ({params / 1024**3:.2f} GiB; {(rss - base) / params:4.2f}x above the imports), "
              f"{rss / total:4.2f}x the checkpoint, {seconds:.0f}s: {'within' if ratio <= 1.5 else 'OVER'} 1.5x")
        print(f"{'':>24}  every tensor the {dtype} cast of the parameter: {check_training_output(out, dtype)}")
        shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["hf", "training", "all"], default="all")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="HF checkpoint dtype (--case hf)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        if args.case in ("hf", "all"):
            bench_hf(work / "hf_case", args)
        if args.case in ("training", "all"):
            bench_training(work / "training_case", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
