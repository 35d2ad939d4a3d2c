"""Checkpoints as published: the chat template in any of its three files, generation_config.json's EOS ids,
and sharded safetensors (model-0000k-of-0000n + model.safetensors.index.json) written and read."""

import json
import re

import numpy as np
import pytest

from specs_jax.cli.main import main as cli
from specs_jax.data.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE, ProcessorConfig, build_processor, load_processor

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the area?"}]}]
OTHER_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: plain{% endfor %}"


@pytest.fixture(scope="module")
def processor():
    corpus = ["What is the area of the triangle?", "<think>4 times 3 over 2</think><answer>\\boxed{6}</answer>"] * 20
    return build_processor(corpus, ProcessorConfig(vocab_size=400))


def _layout(processor, path, where: str):
    """Save ``processor`` and move its chat template to ``where``: tokenizer_config.json, chat_template.json,
    chat_template.jinja (as saved) or nowhere."""
    processor.save_pretrained(path)
    jinja = path / "chat_template.jinja"
    assert jinja.read_text() == QWEN2_5_VL_CHAT_TEMPLATE
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    if where != "chat_template.jinja":
        jinja.unlink()
    if where == "tokenizer_config.json":
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    elif where == "chat_template.json":  # as processors save it (the published Qwen2.5-VL repositories)
        (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    return path


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.json", "chat_template.jinja"])
def test_the_chat_template_loads_from_each_of_its_three_files(processor, tmp_path, where):
    loaded = load_processor(_layout(processor, tmp_path, where))
    assert loaded.tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    want = processor.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == want


def test_the_processor_template_wins_as_in_transformers_and_none_is_refused(processor, tmp_path):
    path = _layout(processor, tmp_path / "both", "chat_template.json")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": OTHER_TEMPLATE}))
    assert load_processor(path).tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    (path / "chat_template.jinja").write_text(OTHER_TEMPLATE)  # beside the legacy json, transformers reads the json
    assert load_processor(path).tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="no chat template in .*chat_template.json, chat_template.jinja"):
        load_processor(_layout(processor, tmp_path / "none", "nowhere"))


def test_generation_config_eos_ids_stop_the_sampler_unless_overridden(processor, tmp_path):
    from specs_jax.convert.io import abstract_model
    from specs_jax.data.tokenizer import model_token_fields
    from specs_jax.model import from_hf_dict, load_preset
    from specs_jax.sampling import Sampler

    tok = processor.tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    path = processor.save_pretrained(tmp_path)
    assert load_processor(path).eos_token_ids == ()
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext], "do_sample": True}))
    loaded = load_processor(path)
    assert loaded.eos_token_ids == (im_end, endoftext)
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(tok)})
    model = abstract_model(cfg)  # the sampler's EOS set needs only the config
    assert set(Sampler(model, loaded).eos_ids) == {im_end, endoftext}
    assert Sampler(model, processor).eos_ids == (im_end,)  # no generation_config: the config's and tokenizer's
    assert Sampler(model, loaded, eos_ids=[endoftext]).eos_ids == (endoftext,)


def _tensors(path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_sharded_export_loads_in_transformers_and_round_trips_bit_exactly(tmp_path):
    """A sharded HF directory (as the published Qwen2.5-VL repositories: model-0000k-of-0000n.safetensors +
    model.safetensors.index.json) -> Orbax -> HF sharded again with --max-shard-size: the index lists every
    tensor, transformers loads it with nothing missing, and every tensor is bit-identical."""
    from hf_fixtures import hf_logits, image_row, pixels, random_hf_model, tiny_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = random_hf_model(tiny_config())
    src = tmp_path / "src"
    hf.save_pretrained(src, max_shard_size="150KB")
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert cli(["convert", "hf-to-orbax", str(src), str(tmp_path / "orbax")]) == 0  # reads the sharded input
    assert cli(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--max-shard-size",
                "150KB"]) == 0
    out = tmp_path / "hf"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    before, after = _tensors(src), _tensors(out)
    assert sorted(index["weight_map"]) == sorted(after) == sorted(before)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in after.values())
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in index["weight_map"].values())
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].tobytes() == after[name].tobytes(), name
    assert max((out / s).stat().st_size for s in shards) <= 150_000 + 4096  # + header

    reloaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    grids = [(1, 8, 12)]
    ids = np.array([image_row(grids, [[5, 6], [7, 8]])])
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids, None, pixels(grids), grids),
                                  hf_logits(hf, ids, None, pixels(grids), grids))
    assert cli(["convert", "hf-to-orbax", str(out), str(tmp_path / "orbax2")]) == 0  # and the export reads back
    assert cli(["convert", "orbax-to-hf", str(tmp_path / "orbax2"), str(tmp_path / "single")]) == 0
    assert sorted(p.name for p in (tmp_path / "single").glob("*.safetensors")) == ["model.safetensors"]
    again = _tensors(tmp_path / "single")
    assert all(again[k].tobytes() == before[k].tobytes() for k in before)


def test_bad_max_shard_size_is_a_clean_error(tmp_path, capsys):
    assert cli(["convert", "orbax-to-hf", str(tmp_path), str(tmp_path / "out"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots': expected a size such as 4GB" in capsys.readouterr().err
