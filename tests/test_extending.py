"""docs/extending.md works as written: its Python blocks run in order in an empty directory (a block
starting with ``# file: NAME`` is saved as that file), which registers a loss and a training kind from
outside the package and trains each for two steps; its command lines train them through the CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "extending.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # about a minute: runs every block of the guide in a fresh process
def test_python_blocks_run_in_order_from_an_empty_directory(tmp_path):
    ran = []
    for block in blocks("python"):
        first = block.splitlines()[0]
        if first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(block)
            continue
        proc = run([sys.executable, "-c", block], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ran.append(proc.stdout)
    assert len(ran) == 2
    simpo = re.search(r"simpo losses: \[(.*?)\]", ran[0]).group(1).split(", ")
    assert len(simpo) == 2 and float(simpo[1]) < float(simpo[0])  # two steps of a real optimisation
    assert "focal_sft losses:" in ran[1]
    assert (tmp_path / "runs" / "simpo" / "metrics.jsonl").is_file()


@pytest.mark.slow  # about a minute: trains each plugin kind through the CLI
def test_command_lines_train_the_plugin_kinds(tmp_path):
    for block in blocks("python"):
        first = block.splitlines()[0]
        if first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(block)
    simpo_cli = blocks("bash")[0].replace("\\\n", " ")
    argv = shlex.split(simpo_cli)
    argv[argv.index("--config") + 1] = str(ROOT / argv[argv.index("--config") + 1])
    proc = run([sys.executable, "-m", "specs_jax.cli.main", *argv[1:], "log.progress=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train simpo: steps 1..2" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "runs" / "simpo_cli" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and "margin" in lines[0]

    focal = re.search(r"`(specs-jax train sft --plugin my_sft.py .*?)`", DOC.read_text()).group(1)
    argv = shlex.split(focal)
    argv[argv.index("--config") + 1] = str(ROOT / argv[argv.index("--config") + 1])
    proc = run([sys.executable, "-m", "specs_jax.cli.main", *argv[1:], "train.steps=2",
                f"train.output_dir={tmp_path / 'focal_cli'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train sft: steps 1..2" in proc.stdout

    bad = run([sys.executable, "-m", "specs_jax.cli.main", "train", "simpo", "--config",
               str(ROOT / "configs/dpo_tiny.yaml")], tmp_path)
    assert bad.returncode == 2 and "unknown training kind 'simpo'" in bad.stderr  # without the plugin
