"""Several processes on this CPU form one job (gloo collectives, ``mesh.coordinator_address``): 2 processes x 4
devices train exactly as 1 process x 8 devices (the same rows in the same order, the same losses and final
parameters), and a job whose processes disagree, or whose batch does not split over them, stops with an error
naming the numbers. Each run is the ``specs-jax train`` command a user types, one per process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from cpu_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, devices: int, out: Path) -> list[subprocess.CompletedProcess]:
    """Run ``specs-jax ARGS`` as ``processes`` local processes of ``devices`` CPU devices each."""
    env = cpu_devices_env(devices)
    extra = [[]]
    if processes > 1:
        port = free_port()
        extra = [[f"mesh.coordinator_address=127.0.0.1:{port}", f"mesh.num_processes={processes}",
                  f"mesh.process_id={i}", "mesh.heartbeat_timeout_s=30"] for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "-m", "specs_jax.cli.main", *args, f"train.output_dir={out}", *e],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e in extra]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def train_args(kind: str, hf: Path) -> list[str]:
    """SFT or DPO-hybrid on synthetic rows with one image each (the tiny configs' ``data.image_grid``)."""
    config = {"sft": "sft_tiny", "dpo": "dpo_tiny"}[kind]
    return ["train", kind, "--export-hf", str(hf), "--config", f"configs/{config}.yaml", "train.steps=3",
            "train.batch_size=8", "optim.grad_accum_steps=1", "mesh.data=2", "mesh.fsdp=4",
            "checkpoint.async_save=false", "log.tensorboard=false"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_train_as_one(kind, tmp_path):
    one = launch(train_args(kind, tmp_path / "hf1"), 1, 8, tmp_path / "one")
    two = launch(train_args(kind, tmp_path / "hf2"), 2, 4, tmp_path / "two")
    for r in (*one, *two):
        assert r.returncode == 0, r.stderr[-3000:]
    assert f"train {kind}: steps 1..3" in two[0].stdout and "train" not in two[1].stdout  # process 0 reports
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["step"] for x in b] == [1, 2, 3]
    np.testing.assert_allclose([x["loss"] for x in b], [x["loss"] for x in a], rtol=0, atol=1e-5)
    np.testing.assert_allclose([x["grad_norm"] for x in b], [x["grad_norm"] for x in a], rtol=1e-5)
    p1, p2 = load_file(tmp_path / "hf1" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert p1.keys() == p2.keys()
    worst = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    args = [*train_args("sft", tmp_path / "hf"), "train.batch_size=3", "mesh.data=1", "mesh.fsdp=-1"]
    runs = launch(args, 2, 1, tmp_path / "out")
    for r in runs:
        assert r.returncode == 2
        assert "global batch 3 is not divisible by the 2 processes" in r.stderr


@pytest.mark.slow
def test_processes_with_different_configs_stop_with_the_difference_named(tmp_path):
    port = free_port()
    env = cpu_devices_env(1)
    procs = [subprocess.Popen([sys.executable, "-m", "specs_jax.cli.main", *train_args("sft", tmp_path / "hf"),
                               "mesh.data=1", "mesh.fsdp=-1", f"optim.lr={lr}", f"train.output_dir={tmp_path / 'o'}",
                               f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
                               f"mesh.process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, lr in enumerate(["1e-3", "2e-3"])]
    for p in procs:
        _, stderr = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 2
        assert "processes of this job disagree on ['config']" in stderr


@pytest.mark.slow
def test_a_dead_process_stops_the_others_and_the_job_resumes_exactly(tmp_path):
    import time

    args = [*train_args("sft", tmp_path / "hf"), "train.steps=6", "checkpoint.every=2", "optim.schedule=constant",
            "optim.warmup_steps=0"]  # the killed run's longer step count must not change the learning rates
    args.remove("--export-hf")
    args.remove(str(tmp_path / "hf"))
    straight = launch([*args], 1, 8, tmp_path / "straight")
    assert straight[0].returncode == 0, straight[0].stderr[-3000:]

    port = free_port()
    env = cpu_devices_env(4)
    run = tmp_path / "killed"
    procs = [subprocess.Popen([sys.executable, "-m", "specs_jax.cli.main", *args, "train.steps=40",
                               f"train.output_dir={run}", f"mesh.coordinator_address=127.0.0.1:{port}",
                               "mesh.num_processes=2", f"mesh.process_id={i}", "mesh.heartbeat_timeout_s=10"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.monotonic() + TIMEOUT
    while not (run / "checkpoints" / "2").is_dir() or not (run / "metrics.jsonl").is_file() or \
            len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.5)
    procs[1].kill()
    killed = time.monotonic()
    _, stderr = procs[0].communicate(timeout=TIMEOUT)
    assert procs[0].returncode != 0
    assert time.monotonic() - killed < 180  # bounded: the heartbeat timeout plus the shutdown barrier
    assert "another task died" in stderr or "heartbeat" in stderr.lower()
    procs[1].communicate()

    resumed = launch([*args, "train.steps=6"], 2, 4, run)  # the same command again: resumes its checkpoint
    for r in resumed:
        assert r.returncode == 0, r.stderr[-3000:]
    by_step = {x["step"]: x["loss"] for x in metrics(run)}  # the resumed steps overwrite the killed run's
    want = {x["step"]: x["loss"] for x in metrics(tmp_path / "straight")}
    np.testing.assert_allclose([by_step[k] for k in range(1, 7)], [want[k] for k in range(1, 7)], atol=1e-5)


@pytest.fixture(scope="module")
def rl_world(tmp_path_factory):
    """(data dir, model dir with its processor): the micro pipeline's data and base model of ``test_pipeline``,
    which memorised formatted answers, so that GRPO samples get rewards that differ within groups."""
    from test_pipeline import MICRO

    from specs_jax.pipeline import load_pipeline_config
    from specs_jax.pipeline.run import prepare_shared

    return prepare_shared(load_pipeline_config(ROOT / "configs/specs_tiny.yaml", MICRO),
                          tmp_path_factory.mktemp("rl"))


def rl_args(kind: str, world, hf: Path) -> list[str]:
    """GRPO (images, the accuracy filter on, 2 updates per rollout) or OPSD on the micro pipeline's base
    model: 4 prompts per step, 16 (GRPO) / 8 (OPSD) rollout rows over the 8 devices."""
    data, model = world
    args = ["train", kind, "--export-hf", str(hf), "--config", f"configs/{kind}_tiny.yaml", "train.steps=3",
            f"model.path={model}", f"data.train_path={data / 'train.parquet'}", "train.batch_size=4", "mesh.data=2",
            "mesh.fsdp=4", "checkpoint.async_save=false", "log.tensorboard=false", "log.progress=false"]
    if kind == "grpo":
        # band [0.1, 1]: step 1 (no correct sample yet) keeps no group on any process and skips its updates
        args += ["rl.accuracy_filter=[0.1,1.0]", "rl.num_iterations=2", "rl.group_size=4"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "opsd"])
def test_two_processes_roll_out_and_train_as_one(kind, rl_world, tmp_path):
    one = launch(rl_args(kind, rl_world, tmp_path / "hf1"), 1, 8, tmp_path / "one")
    two = launch(rl_args(kind, rl_world, tmp_path / "hf2"), 2, 4, tmp_path / "two")
    for r in (*one, *two):
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["step"] for x in b] == [1, 2, 3]
    shared = sorted({k for x in a for k in x if k.startswith(("loss", "grad_norm", "reward/", "rollout/"))})
    assert {"loss", "reward/mean", "rollout/groups_kept"} <= set(shared)
    for k in shared:  # the same samples, rewards and losses: every process's rows, gathered
        np.testing.assert_allclose([x.get(k, np.nan) for x in b], [x.get(k, np.nan) for x in a], rtol=0, atol=1e-5,
                                   err_msg=k)
    assert any(x.get("loss", 0) != 0 for x in a), a  # rewards differed within some group: the updates did something
    if kind == "grpo":  # the filter dropped every group of step 1 and some of the later ones
        assert "loss" not in a[0] and [x["rollout/groups_kept"] for x in a][1:] != [1.0, 1.0]
    p1, p2 = load_file(tmp_path / "hf1" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    worst = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process_exactly(rl_world, tmp_path):
    """N -> M: the checkpoint of a 2-process job (file data, each process at its own index of its share of the
    rows) continues in a 1-process job with the rows and losses an uninterrupted 1-process run has."""
    data, model = rl_world
    args = ["train", "sft", "--config", "configs/sft_tiny.yaml", f"model.path={model}", "data.source=files",
            f"data.train_path={model.parent / 'sft.parquet'}", "data.buckets=[256]", "train.batch_size=4",
            "optim.schedule=constant", "optim.warmup_steps=0", "mesh.data=1", "mesh.fsdp=4", "checkpoint.every=2",
            "checkpoint.async_save=false", "log.tensorboard=false", "log.progress=false"]
    straight = launch([*args, "train.steps=4"], 1, 4, tmp_path / "straight")
    first = launch([*args, "train.steps=2"], 2, 2, tmp_path / "moved")
    second = launch([*args, "train.steps=4"], 1, 4, tmp_path / "moved")
    for r in (*straight, *first, *second):
        assert r.returncode == 0, r.stderr[-3000:]
    want = {x["step"]: x["loss"] for x in metrics(tmp_path / "straight")}
    got = {x["step"]: x["loss"] for x in metrics(tmp_path / "moved")}
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[k] for k in range(1, 5)], [want[k] for k in range(1, 5)], atol=1e-5)


@pytest.mark.slow
def test_two_processes_evaluate_as_one(rl_world, tmp_path):
    """`specs-jax eval` on 2 processes: each runs every other batch (with its one-process seed) on its own copy of
    the model; process 0 writes the gathered results, equal to one process's."""
    data, model = rl_world
    args = ["eval", "--model", str(model), "--no-progress", "--config", "configs/grpo_tiny.yaml",
            f"eval.splits.id_test={data / 'id_test.parquet'}", f"eval.splits.train={data / 'train.parquet'}",
            "eval.max_examples=8", "eval.batch_size=2", "eval.num_samples=2", "eval.ks=[1,2]"]
    one = launch(args, 1, 1, tmp_path / "one")
    two = launch(args, 2, 1, tmp_path / "two")
    for r in (*one, *two):
        assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in two[0].stdout and "wrote" not in two[1].stdout
    a = json.loads((tmp_path / "one" / "eval.json").read_text())
    b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert a["splits"] == b["splits"] and a["examples"] == b["examples"]
    assert a["splits"]["train"]["n_prompts"] == 8 and a["splits"]["train"]["sample_accuracy"] > 0
