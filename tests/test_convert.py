"""HF <-> Orbax conversion: exact round trip, transformers reload, bad checkpoints refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import specs_jax
from hf_fixtures import hf_logits, image_row, pixels, random_hf_model, tiny_config
from specs_jax.cli.main import main as cli
from specs_jax.convert import CheckpointError, hf_to_orbax, orbax_to_hf
from specs_jax.convert.safetensors_io import read_header, read_tensor, write_file
from specs_jax.model import ConfigError


def tensors(path) -> dict[str, np.ndarray]:
    """All tensors of an HF directory, read with the reference ``safetensors`` package."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_round_trip_is_bit_exact_and_reloads_in_transformers(hf_model_dir, tmp_path):
    src, hf = hf_model_dir
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    assert cli(["convert", "hf-to-orbax", str(src), str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert cli(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    before, after = tensors(src), tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].tobytes() == after[name].tobytes(), name
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()

    reloaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    grids = [(1, 8, 12)]
    ids = np.array([image_row(grids, [[5, 6], [7, 8]])])
    pix = pixels(grids)
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids, None, pix, grids), hf_logits(hf, ids, None, pix, grids))


def test_load_model_from_orbax_equals_load_from_hf(hf_model_dir, tmp_path):
    src, _ = hf_model_dir
    hf_to_orbax(src, tmp_path / "ck")
    ids = np.random.RandomState(3).randint(3, 290, (2, 7))
    np.testing.assert_array_equal(np.asarray(specs_jax.load_model(tmp_path / "ck")(ids)),
                                  np.asarray(specs_jax.load_model(src)(ids)))


def test_sharded_and_legacy_named_checkpoints_load(tmp_path):
    hf = random_hf_model(tiny_config())
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = np.random.RandomState(0).randint(3, 290, (1, 8))
    ref = hf_logits(hf, ids)
    assert np.abs(np.asarray(specs_jax.load_model(tmp_path / "sharded")(ids)) - ref).max() <= 1e-4

    # save_pretrained writes model.* / visual.*; a file keyed by module names loads too.
    module_named = tmp_path / "module_named"
    module_named.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", module_named)
    renamed = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
               for k, v in tensors(tmp_path / "sharded").items()}
    assert "model.language_model.norm.weight" in renamed and "model.visual.merger.ln_q.weight" in renamed
    write_file(module_named / "model.safetensors", renamed.items())
    assert np.abs(np.asarray(specs_jax.load_model(module_named)(ids)) - ref).max() <= 1e-4


def test_dtype_cast_on_conversion(hf_model_dir, tmp_path):
    src, _ = hf_model_dir
    hf_to_orbax(src, tmp_path / "ck", dtype="bfloat16")
    orbax_to_hf(tmp_path / "ck", tmp_path / "hf")
    assert {str(v.dtype) for v in tensors(tmp_path / "hf").values()} == {"bfloat16"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert next(model.parameters()).dtype == torch.bfloat16


def _edited_copy(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    header = read_header(dst / "model.safetensors")
    arrays = {name: read_tensor(info) for name, info in header.items()}
    edit(arrays)
    write_file(dst / "model.safetensors", arrays.items())


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing tensor model\.language_model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(96, 48\)\)"),
    ("extra", r"unexpected tensor model\.language_model\.extra\.weight \(shape \(3, 4\)\)"),
    ("shape", r"tensor model\.language_model\.norm\.weight has shape \(47,\), expected \(48,\)"),
])
def test_bad_checkpoints_are_refused_and_nothing_is_written(hf_model_dir, tmp_path, case, match, capsys):
    src, _ = hf_model_dir
    edits = {
        "missing": lambda a: a.pop("model.layers.1.mlp.up_proj.weight"),
        "extra": lambda a: a.__setitem__("model.extra.weight", np.zeros((3, 4), np.float32)),
        "shape": lambda a: a.__setitem__("model.norm.weight", np.ones(47, np.float32)),
    }
    _edited_copy(src, tmp_path / "bad", edits[case])
    with pytest.raises(CheckpointError, match=match):
        hf_to_orbax(tmp_path / "bad", tmp_path / "out")
    with pytest.raises(CheckpointError, match=match):
        specs_jax.load_model(tmp_path / "bad")
    assert cli(["convert", "hf-to-orbax", str(tmp_path / "bad"), str(tmp_path / "out")]) == 2
    assert "does not match its config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temporary directory left behind


def test_other_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="model_type='llama'.*supports only 'qwen2_5_vl'"):
        specs_jax.load_model(tmp_path)


def test_existing_output_is_not_clobbered(hf_model_dir, tmp_path):
    src, _ = hf_model_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        hf_to_orbax(src, out)
    assert (out / "keep.txt").read_text() == "precious"
    hf_to_orbax(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "specs_jax.json").is_file()
