"""``specs-jax generate`` and ``Sampler.generate`` on a tiny model with a locally built processor."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from specs_jax.cli.main import main as cli
from specs_jax.convert.io import save_model
from specs_jax.data.tokenizer import ProcessorConfig, build_processor, load_processor, model_token_fields
from specs_jax.model import Qwen2_5_VLForConditionalGeneration, from_hf_dict, load_preset
from specs_jax.sampling import Sampler, SamplerConfig, SamplingParams

CORPUS = ["How many red circles are there? There are 3 red circles.", "Add the numbers 4 and 5: 9.",
          "<think>count them</think><answer>\\boxed{3}</answer>"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_with_processor") / "model"
    processor = build_processor(CORPUS, ProcessorConfig(vocab_size=300))
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)})
    save_model(Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), path, fmt="hf")
    processor.save_pretrained(path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 84, 3), np.uint8)).save(path.parent / "img.png")
    return path


def test_generate_cli_prints_responses(model_dir, capsys):
    image = str(model_dir.parent / "img.png")
    assert cli(["generate", "--model", str(model_dir), "--image", image, "--prompt", "How many circles?",
                "--max-new-tokens", "6", "--temperature", "1.0", "-n", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2


def test_generate_cli_bad_image_is_a_clean_error(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert cli(["generate", "--model", str(model_dir), "--image", str(bad), "--prompt", "hi"]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_sampler_generate_from_chat_prompts_matches_generate_ids(model_dir):
    from specs_jax import load_model

    processor = load_processor(model_dir)
    model = load_model(model_dir)
    sampler = Sampler(model, processor, SamplerConfig(max_new_tokens=5))
    image = Image.open(model_dir.parent / "img.png")
    out = sampler.generate(["Add 4 and 5.", "How many?"], [[], [image]], n=2, params=SamplingParams(temperature=0))
    assert out.tokens.shape == (4, 5) and len(out.texts) == 4
    assert sampler.eos_ids == (processor.tokenizer.eos_token_id,)
    # the chat prompt with its image expanded to merged patch tokens, left-padded
    n_image_tokens = int((out.prompt_ids[2] == processor.image_token_id).sum())
    grid = processor.image_processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    assert n_image_tokens == int(np.prod(grid)) // 4
    np.testing.assert_array_equal(out.tokens[0], out.tokens[1])  # greedy: both samples of a prompt agree
