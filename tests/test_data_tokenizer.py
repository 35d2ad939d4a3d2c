"""The locally built Qwen2.5-VL tokenizer/image processor (specs_jax.data.tokenizer)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specs_jax.data.tokenizer import (
    FORMAT_TOKENS,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    ProcessorConfig,
    build_processor,
    load_processor,
    model_token_fields,
)

CORPUS = [
    "You are a helpful assistant.",
    "What is the area of the triangle shown in the image? Answer with a number.",
    "<think>The base is 4 and the height is 3, so the area is 6.</think><answer>\\boxed{6}</answer>",
    "How many circles are there? Count them carefully.",
] * 20

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the area?"}]}]


@pytest.fixture(scope="module")
def processor():
    return build_processor(CORPUS, ProcessorConfig(vocab_size=512))


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_special_tokens_follow_the_bpe_vocabulary_in_qwen_order(processor):
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    start = ids[0]
    assert ids == list(range(start, start + len(QWEN_SPECIAL_TOKENS)))
    # same offsets as in Qwen's vocabulary: <|endoftext|> 151643 ... <|image_pad|> 151655
    assert tok.convert_tokens_to_ids("<|image_pad|>") - start == 151655 - 151643
    assert 256 <= start <= 512
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert type(tok).__name__ == "Qwen2Tokenizer"


def test_format_tags_are_single_non_special_tokens(processor):
    tok = processor.tokenizer
    text = "<think>so 6</think> <answer>\\boxed{6}</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for tag in FORMAT_TOKENS:
        assert tok.convert_tokens_to_ids(tag) in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    plain = build_processor(CORPUS[:8], ProcessorConfig(vocab_size=300, format_tokens=False)).tokenizer
    assert len(plain("<think>", add_special_tokens=False)["input_ids"]) > 1
    assert plain.decode(plain(text)["input_ids"]) == text


def test_chat_template_is_qwen2_5_vl(processor):
    rendered = processor.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is the area?<|im_end|>\n<|im_start|>assistant\n"
    )
    trl = pytest.importorskip("trl")
    reference = Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja"
    assert QWEN2_5_VL_CHAT_TEMPLATE == reference.read_text()


def test_encode_expands_image_pads_to_merged_patch_counts(processor):
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True, tokenize=False)
    out = processor.encode(text, [_image(70, 90), _image(300, 40, 1)])
    grid = out["image_grid_thw"]
    assert grid.shape == (2, 3) and (grid[:, 0] == 1).all()
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    n_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_tokens == int(grid.prod(-1).sum()) // 4
    # images are resized within [min_pixels, max_pixels] = [56*56, 112*112]
    assert all(56 * 56 <= h * w * 14 * 14 <= 112 * 112 for _, h, w in grid)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens but 1 images"):
        processor.encode(text, [_image(70, 90)])


def test_round_trip_through_save_pretrained_offline(processor, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    loaded = load_processor(tmp_path)
    assert type(loaded.tokenizer) is type(processor.tokenizer)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    assert (loaded.tokenizer.eos_token, loaded.tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = loaded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    image = _image(80, 64)
    want, got = processor.encode(text, [image]), loaded.encode(text, [image])
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    response = "<think>a</think><answer>\\boxed{6}</answer>"
    assert loaded.tokenizer(response)["input_ids"] == processor.tokenizer(response)["input_ids"]
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        (tmp_path / "preprocessor_config.json").unlink()
        load_processor(tmp_path)


def test_model_token_fields_configure_a_matching_model(processor):
    from specs_jax.model import from_hf_dict, load_preset

    fields = model_token_fields(processor.tokenizer)
    tok = processor.tokenizer
    assert fields["vocab_size"] % 64 == 0 and len(tok) <= fields["vocab_size"] < len(tok) + 64
    assert fields["eos_token_id"] == tok.eos_token_id and fields["pad_token_id"] == tok.pad_token_id
    cfg = from_hf_dict({**load_preset("tiny").hf_config, **fields})
    assert cfg.image_token_id == processor.image_token_id
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.text.vocab_size == fields["vocab_size"]
