"""The specs-jax command line: init, convert, help and error exits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import specs_jax
from specs_jax.cli.main import main as cli


def test_init_writes_a_loadable_model_in_both_formats(tmp_path):
    assert cli(["init", str(tmp_path / "hf"), "--preset", "tiny"]) == 0
    assert cli(["init", str(tmp_path / "ck"), "--preset", "tiny", "--format", "orbax"]) == 0
    ids = np.arange(3, 15).reshape(2, 6)
    a, b = specs_jax.load_model(tmp_path / "hf")(ids), specs_jax.load_model(tmp_path / "ck")(ids)
    assert a.shape == (2, 6, 151936)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same seed, same weights


def test_help_and_unknown_preset():
    out = subprocess.run([sys.executable, "-m", "specs_jax.cli.main", "convert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "hf-to-orbax" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "specs_jax.cli.main", "init", "x", "--preset", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


def test_missing_source_is_a_clean_error(tmp_path, capsys):
    assert cli(["convert", "hf-to-orbax", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
