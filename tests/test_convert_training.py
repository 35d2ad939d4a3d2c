"""Any checkpoint of a training run back to HF, loaded and evaluated directly.

A run trains 3 steps on 8 CPU devices (mesh data=1 x fsdp=4 x tensor=2, frozen vision tower,
checkpoint every step); its step 2 then converts on one CPU device (this process) with
``specs-jax convert orbax-to-hf RUN/checkpoints/2 OUT``: transformers loads it with no missing or
unexpected keys and its logits equal those of the trainer's model at step 2 (fp32, 1e-5). The 8
devices need ``XLA_FLAGS`` before jax is imported, so the run happens in a subprocess (this file
run as a script) that leaves the run directory and the trainer's step-2 parameters and logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpu_devices import cpu_devices_env

ROOT = Path(__file__).resolve().parents[1]
GRID = (1, 8, 12)  # one image: 96 patches -> 24 merged tokens
CORPUS = ["How many red circles are there? There are 3 red circles.", "Add the numbers 4 and 5: 9.",
          "<think>count them</think><answer>\\boxed{3}</answer>"] * 20
PASSES = ["model.freeze_vision=true", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "checkpoint.every=1",
          "checkpoint.keep_last_n=2", "checkpoint.keep_best_metric=lr", "optim.warmup_steps=4",
          "train.batch_size=8", "train.max_length=48", "data.image_grid=[1, 4, 4]"]


def _inputs(cfg) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with one image, its patches)."""
    rs = np.random.RandomState(7)
    n_image = int(np.prod(GRID)) // 4
    ids = ([5, 6, 7, cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [cfg.vision_end_token_id]
           + list(rs.randint(10, 200, 9)))
    patches = rs.randn(int(np.prod(GRID)), cfg.vision.patch_dim).astype(np.float32)
    return np.array([ids], np.int32), patches


def make_run(out: Path) -> None:
    """(script) A model directory with a processor and generation config; 3 training steps on the
    8-device mesh from it; the trainer's step-2 parameters and logits."""
    import jax
    from test_training_sharded import random_model, run_config

    from specs_jax.convert.io import save_model, state_key
    from specs_jax.data.tokenizer import ProcessorConfig, build_processor, model_token_fields
    from specs_jax.model import from_hf_dict, load_preset
    from specs_jax.training.state import join_params, model_from_params
    from specs_jax.training.synthetic import SyntheticSource
    from specs_jax.training.trainer import Trainer

    assert len(jax.devices()) == 8, jax.devices()
    processor = build_processor(CORPUS, ProcessorConfig(vocab_size=300))
    fields = model_token_fields(processor.tokenizer)
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **fields})
    model_dir = save_model(random_model(cfg), out / "model", fmt="hf")
    processor.save_pretrained(model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": fields["bos_token_id"], "eos_token_id": fields["eos_token_id"],
         "pad_token_id": fields["pad_token_id"], "do_sample": False}))

    def fit(steps: int) -> Trainer:
        trainer = Trainer(run_config("sft", str(out / "run"), [f"model.path={model_dir}", f"train.steps={steps}",
                                                                  *PASSES]), "sft")
        trainer.fit(SyntheticSource(trainer.model_cfg, "sft", 8, 48, seed=3, image_grid=(1, 4, 4)))
        return trainer

    trainer = fit(2)  # steps 1-2; the run then resumes to step 3 as a longer run would
    params = jax.device_get(join_params(trainer.state.params, trainer.state.frozen))
    q = trainer.state.params["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["weight"]
    model = model_from_params(trainer.graphdef, jax.tree.map(np.asarray, params))
    ids, patches = _inputs(trainer.model_cfg)
    logits = np.asarray(model(ids, pixel_values=patches, image_grid_thw=np.array([GRID])))
    flat = {state_key(tuple(getattr(k, "key", k) for k in path)): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out / "step2.npz", logits=logits, **{f"param:{k}": v for k, v in flat.items()})
    (out / "run_info.json").write_text(json.dumps({"q_spec": str(q.sharding.spec), "devices": len(jax.devices()),
                                                   "step": int(trainer.state.step)}))
    trainer.close()
    fit(3).close()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("convert_training")
    env = cpu_devices_env(8)
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = np.load(out / "step2.npz")
    params = {k.split(":", 1)[1]: saved[k] for k in saved.files if k.startswith("param:")}
    return {"dir": out, "run": out / "run", "model": out / "model", "logits": saved["logits"], "params": params,
            "info": json.loads((out / "run_info.json").read_text())}


def tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def hf_expected(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The HF tensors (on-disk names) of a ``{state path: array}`` dict, stacked layers split."""
    from specs_jax.convert.io import disk_hf_name, hf_names

    out = {}
    for key, arr in params.items():
        names = hf_names(key, arr.shape)
        stacked = not (len(names) == 1 and names[0][0] == key)
        for i, (name, _) in enumerate(names):
            out[disk_hf_name(name)] = arr[i] if stacked else arr
    return out


def cli(*argv: str) -> int:
    from specs_jax.cli.main import main

    return main(list(argv))


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run["run"] / "metrics.jsonl").read_text().splitlines()]


def test_the_run_was_sharded_and_recorded_its_model(run):
    info = run["info"]
    assert info["devices"] == 8 and info["step"] == 2
    assert info["q_spec"] == "P(None, 'tensor', 'fsdp')"  # q_proj [layers, heads*dim, embed]: tensor x fsdp
    ckpts = run["run"] / "checkpoints"
    recorded = ckpts / "model"
    assert json.loads((recorded / "config.json").read_text()) == json.loads((run["model"] / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"):
        assert (recorded / name).read_bytes() == (run["model"] / name).read_bytes(), name
    record = json.loads((ckpts / "specs_jax_run.json").read_text())
    assert record["keep_best_metric"] == "lr" and record["best_mode"] == "min"


def test_step_converts_and_transformers_reproduces_the_trainer(run, tmp_path, capsys):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from specs_jax.cli.convert import missing_model_files
    from specs_jax.data.tokenizer import load_processor

    out = tmp_path / "hf"
    assert cli("convert", "orbax-to-hf", str(run["run"] / "checkpoints" / "2"), str(out)) == 0
    assert "note:" not in capsys.readouterr().out
    got, want = tensors(out), hf_expected(run["params"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].tobytes() == want[name].tobytes(), name
    assert missing_model_files(out) == []
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (run["model"] / name).read_bytes(), name
    assert load_processor(out).tokenizer.chat_template

    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert next(hf.parameters()).dtype == torch.float32
    cfg = json.loads((out / "config.json").read_text())
    ids, patches = _inputs(_model_config(out))
    with torch.no_grad():
        logits = hf.eval()(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(patches),
                           image_grid_thw=torch.tensor([GRID]),
                           mm_token_type_ids=torch.tensor((ids == cfg["image_token_id"]).astype(np.int64))).logits
    diff = float(np.abs(logits.numpy() - run["logits"]).max())
    print(f"transformers (converted step 2) vs trainer step-2 logits: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def _model_config(path):
    from specs_jax.model import load_config

    return load_config(path)


def test_bfloat16_output_is_the_cast_of_the_trained_parameters(run, tmp_path):
    import ml_dtypes

    out = tmp_path / "bf16"
    assert cli("convert", "orbax-to-hf", str(run["run"]), str(out), "--step", "2", "--dtype", "bfloat16") == 0
    got, want = tensors(out), hf_expected(run["params"])
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        assert got[name].dtype == ml_dtypes.bfloat16
        assert got[name].tobytes() == arr.astype(ml_dtypes.bfloat16).tobytes(), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_latest_and_best_pick_the_kept_checkpoints(run, tmp_path, capsys):
    ckpts = run["run"] / "checkpoints"
    lrs = {m["step"]: m["lr"] for m in _metrics(run)}  # the metric kept by its minimum: 0 at step 1 (warmup)
    best = min(lrs, key=lrs.get)
    assert best == 1  # kept only as the best, beside the last 2
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1, 2, 3]
    for step, expect in (("latest", 3), ("best", best)):
        out = tmp_path / step
        assert cli("convert", "orbax-to-hf", str(run["run"]), str(out), "--step", step) == 0
        assert f"orbax-to-hf of {ckpts / str(expect)})" in capsys.readouterr().out
        direct = tmp_path / f"direct{expect}"
        if not direct.exists():
            assert cli("convert", "orbax-to-hf", str(ckpts / str(expect)), str(direct)) == 0
        assert (out / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
    # the checkpoint directory itself works as the run reference too
    assert cli("convert", "orbax-to-hf", str(ckpts), str(tmp_path / "ck"), "--step", "best") == 0


def test_the_optimizer_state_is_never_read(run, tmp_path):
    """Converting and loading work with every step's optimizer state deleted."""
    import specs_jax

    copy = tmp_path / "run"
    shutil.copytree(run["run"] / "checkpoints", copy / "checkpoints")
    for step in (copy / "checkpoints").iterdir():
        if step.name.isdigit():
            shutil.rmtree(step / "opt_state")
    assert cli("convert", "orbax-to-hf", str(copy / "checkpoints" / "2"), str(tmp_path / "hf")) == 0
    got, want = tensors(tmp_path / "hf"), hf_expected(run["params"])
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    specs_jax.load_model(copy, step="latest")


def test_load_model_generate_and_eval_take_checkpoint_references(run, tmp_path, capsys):
    import specs_jax
    from PIL import Image

    ckpts = run["run"] / "checkpoints"
    cfg = _model_config(ckpts / "model")
    ids, patches = _inputs(cfg)
    for ref, step in ((ckpts / "2", None), (run["run"], 2), (run["run"], "2"), (ckpts, 2)):
        model = specs_jax.load_model(ref, step=step)
        logits = np.asarray(model(ids, pixel_values=patches, image_grid_thw=np.array([GRID])))
        np.testing.assert_allclose(logits, run["logits"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"steps .*; choose one with --step latest\|best\|N"):
        specs_jax.load_model(run["run"])

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8)).save(image)
    assert cli("generate", "--model", str(run["run"]), "--step", "latest", "--image", str(image), "--prompt",
               "How many circles?", "--max-new-tokens", "4") == 0
    capsys.readouterr()
    rows = [{"question": "How many red circles are there?", "image": ["img.png"], "answer": "3"},
            {"question": "Add the numbers 4 and 5.", "image": [], "answer": "9"}]
    (tmp_path / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    argv = ["eval", "--config", str(ROOT / "configs" / "base.yaml"), f"eval.splits.id_test={tmp_path / 'split.jsonl'}",
            f"data.image_root={tmp_path}", "eval.num_samples=2", "eval.ks=[1, 2]", "eval.max_new_tokens=4",
            "model.dtype=float32", "--model", str(run["run"]), "--step", "best", "--out", str(out), "--no-progress"]
    assert cli(*argv) == 0
    results = json.loads(out.read_text())
    lrs = {m["step"]: m["lr"] for m in _metrics(run)}
    assert results["model"] == str(ckpts / str(min(lrs, key=lrs.get)))
    assert results["splits"]["id_test"]["n_prompts"] == 2


def test_errors_name_the_problem_and_write_nothing(run, tmp_path, capsys):
    ckpts = run["run"] / "checkpoints"
    existing = ", ".join(sorted((p.name for p in ckpts.iterdir() if p.name.isdigit()), key=int))
    out = tmp_path / "out"

    def fails(*argv: str) -> str:
        assert cli("convert", "orbax-to-hf", *argv) == 2
        return capsys.readouterr().err

    # a step that does not exist, by path or by --step: the existing ones are listed
    assert f"no checkpoint at step 7; existing steps: {existing}" in fails(str(ckpts / "7"), str(out))
    assert f"no checkpoint at step 7; existing steps: {existing}" in fails(str(run["run"]), str(out), "--step", "7")
    assert "choose one with --step latest|best|N" in fails(str(run["run"]), str(out))
    assert "expected latest|best|N" in fails(str(run["run"]), str(out), "--step", "newest")
    # a run directory without checkpoints
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text("")
    assert "no training checkpoints" in fails(str(empty_run), str(out), "--step", "latest")
    (empty_run / "checkpoints").mkdir()
    assert "holds no checkpoints yet" in fails(str(empty_run), str(out), "--step", "latest")
    # best without checkpoint.keep_best_metric
    copy = tmp_path / "copy"
    shutil.copytree(ckpts, copy)
    record = json.loads((copy / "specs_jax_run.json").read_text())
    (copy / "specs_jax_run.json").write_text(json.dumps({**record, "keep_best_metric": None}))
    assert "needs the metric of checkpoint.keep_best_metric" in fails(str(copy), str(out), "--step", "best")
    # a checkpoint whose config does not match the model files
    other = json.loads((ckpts / "model" / "config.json").read_text())
    (copy / "model" / "config.json").write_text(json.dumps({**other, "intermediate_size": 96}))
    err = fails(str(copy / "2"), str(out))
    assert f"checkpoint {copy / '2'} does not match the model config {copy / 'model' / 'config.json'}" in err
    assert "tensor model.language_model.layers.0.mlp.up_proj.weight has shape (172, 64), expected (96, 64)" in err
    # ... or the model given with --model
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**other, "num_hidden_layers": 3}))
    err = fails(str(ckpts / "2"), str(out), "--model", str(tmp_path / "other"))
    assert "does not match the model config" in err and "missing tensor model.language_model.layers.2." in err
    # a run written before runs recorded their model: --model supplies it
    shutil.rmtree(copy / "model")
    assert "the run records no model" in fails(str(copy / "2"), str(out))
    assert cli("convert", "orbax-to-hf", str(copy / "2"), str(out), "--model", str(run["model"])) == 0
    assert (out / "tokenizer.json").is_file()
    shutil.rmtree(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "empty_run", "other"]  # nothing else written


def test_a_run_from_a_preset_says_what_is_missing(tmp_path, capsys):
    """A run of a preset (or of a model built in code) records its config but has no tokenizer files:
    the weights and config are written, and the note names what could not be."""
    from test_training_sharded import small_model

    from specs_jax.data.tokenizer import load_processor
    from specs_jax.training.checkpoint import Checkpointer
    from specs_jax.training.config import OptimConfig
    from specs_jax.training.sharding import make_mesh, make_rules
    from specs_jax.training.state import create_state, make_optimizer, state_shardings

    model = small_model()
    tx = make_optimizer(OptimConfig(), 1)
    state = create_state(model, tx, state_shardings(model, tx, True, make_mesh(1, 1, 1), make_rules()), True, 0)
    # as the Trainer does for model.path=null (and no data.processor)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", model=model.config, model_files=None)
    ck.save(state, {})
    ck.close()
    assert cli("convert", "orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--step", "latest") == 0
    printed = capsys.readouterr().out
    assert "no tokenizer, processor, chat template, generation config" in printed
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    got, want = tensors(tmp_path / "hf"), hf_expected(_model_params(model))
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    with pytest.raises(FileNotFoundError, match="the run's model had no tokenizer files"):
        load_processor(tmp_path / "run")


def _model_params(model) -> dict[str, np.ndarray]:
    from specs_jax.convert.io import model_params

    return {k: np.asarray(v) for k, v in model_params(model).items()}


def test_remote_paths_are_resolved_without_mangling(run, tmp_path, monkeypatch):
    """``gs://`` references go through etils.epath (mocked here onto a local copy of the run): the
    step is resolved, the record read and the path handed on intact."""
    from etils import epath
    from etils.epath import testing as epath_testing

    from specs_jax.convert import training

    monkeypatch.chdir(tmp_path)
    local = tmp_path / "gs:" / "bucket" / "run"  # what the mocked backend maps gs://bucket/run to
    shutil.copytree(run["run"] / "checkpoints", local / "checkpoints")
    with epath_testing.mock_epath():
        ref = training.resolve("gs://bucket/run", "latest")
        assert isinstance(ref.directory, epath.Path) and str(ref.step_dir) == "gs://bucket/run/checkpoints/3"
        step2 = training.resolve("gs://bucket/run/checkpoints/2")
        assert str(step2.params_dir) == "gs://bucket/run/checkpoints/2/params"
        lrs = {m["step"]: m["lr"] for m in _metrics(run)}
        assert training.resolve("gs://bucket/run", "best").step == min(lrs, key=lrs.get)
        assert str(ref.model_dir) == "gs://bucket/run/checkpoints/model"
        assert training.resolve_reference("gs://bucket/run", "2") == "gs://bucket/run/checkpoints/2"
        with pytest.raises(FileNotFoundError, match="existing steps"):
            training.resolve("gs://bucket/run/checkpoints/9")


def test_export_hf_writes_the_run_model_files(run, tmp_path):
    from specs_jax.training.checkpoint import export_hf

    out = export_hf(run["run"] / "checkpoints", None, tmp_path / "hf", step=2)
    got, want = tensors(out), hf_expected(run["params"])
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    make_run(Path(sys.argv[1]))
