"""Dataset formats of the paper's code and the peer trainers (specs_jax.data.formats): every format gives the
batches of the same rows in flat form; malformed rows are counted by reason; ``specs-jax data inspect``."""

import json

import numpy as np
import pytest
from format_fixtures import (
    FORMATS,
    ROWS,
    SYSTEM,
    keeps_system,
    make_images,
    rejected,
    response,
    write_flat,
    write_format,
)

from specs_jax.cli.main import main as cli
from specs_jax.data.formats import FORMATS as FORMAT_NAMES
from specs_jax.data.formats import canonical_row, detect_format, flat_rows, resolve_layout
from specs_jax.data.pipeline import (
    PAIR_COLUMNS,
    Columns,
    DataConfig,
    load_rows,
    preference_batches,
    rl_batches,
    sft_batches,
)
from specs_jax.data.tokenizer import ProcessorConfig, build_processor

MAKE = {"rl": rl_batches, "sft": sft_batches, "preference": preference_batches}
BUCKETS = (96, 128, 192, 256)


@pytest.fixture(scope="module")
def processor():
    corpus = ["How many shapes are in the picture? Compare with which one has more circles? What is 7 times 6?",
              "Look at the chart and name the tallest bar. Are these two pictures the same size?", SYSTEM,
              response(1), rejected(1)] * 10
    return build_processor(corpus, ProcessorConfig(vocab_size=512))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("format_images")
    return make_images(root)


def _config(images, **options) -> DataConfig:
    return DataConfig(**{"batch_size": 2, "buckets": BUCKETS, "shuffle": False, "drop_remainder": False,
                         "image_root": str(images[0].parent), "read_threads": 1, **options})


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray) or isinstance(b[key], np.ndarray):
                assert a[key].dtype == b[key].dtype, key
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            else:
                assert a[key] == b[key], key


@pytest.mark.parametrize("mode", ["rl", "sft", "preference"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_batches_of_its_flat_form(processor, images, tmp_path, fmt, mode):
    """Token ids, masks, image patches and grids, row ids and RL strings equal those of the flat rows; the rows
    include two images per prompt, placeholders in the middle of the text, a text-only prompt and system messages."""
    path = write_format(fmt, mode, tmp_path, images)
    flat = write_flat(mode, tmp_path, images, with_system=keeps_system(fmt))
    rows = load_rows(path)
    detected = resolve_layout(rows.column_names, "auto", None, rows.features, rows[0]).format
    assert detected == fmt.removesuffix("_jsonl")
    config = _config(images, system_prompt="Answer briefly.")
    got_it, want_it = MAKE[mode](rows, processor, config), MAKE[mode](load_rows(flat), processor, config)
    got, want = list(got_it), list(want_it)
    assert got_it.skipped == want_it.skipped == {}
    _assert_same_batches(got, want)
    assert sum(len(b["row_id"]) for b in got) == len(ROWS)
    named = MAKE[mode](load_rows(path), processor, _config(images, system_prompt="Answer briefly.",
                                                           format=fmt.removesuffix("_jsonl")))
    _assert_same_batches(list(named), want)


def test_images_sit_at_their_placeholders_in_order(processor, images, tmp_path):
    """Row 1: "Compare <image 1> with <image 2>: ..." (img1 is 70x90, img2 112x84: different token counts)."""
    path = write_format("mm_eureka", "rl", tmp_path, images)
    batch = next(rl_batches(load_rows(path), processor, _config(images, batch_size=5)))
    tok = processor.tokenizer
    row = list(batch["row_id"]).index(1)
    ids = batch["input_ids"][row][batch["attention_mask"][row] > 0]
    text = tok.decode(ids)
    start, end = "<|vision_start|>", "<|vision_end|>"
    assert f"user\nCompare {start}" in text and f"{end} with {start}" in text and f"{end}: which one" in text
    blocks = [piece.split(end)[0].count("<|image_pad|>") for piece in text.split(start)[1:]]
    grids = batch["image_grid_thw"]
    per_row = [len([p for p in r["parts"] if isinstance(p, int)]) for r in ROWS]
    first = sum(per_row[r] for r in batch["row_id"][:row])
    assert blocks == [int(g.prod()) // 4 for g in grids[first:first + 2]]
    assert blocks[0] != blocks[1]  # so the order is checked, not only the count
    assert batch["question"][row] == "Compare <image> with <image>: which one has more circles?"
    assert batch["question"][0] == "How many shapes are in the picture?"  # images first: the flat question


BAD_RECORDS = {
    # format: (mode, file suffix, [(record, reason)])
    "flat": ("rl", "jsonl", [
        ({"question": "Compare <image> and <image>.", "image": ["img0.png"], "answer": "1"}, "image_count_mismatch"),
        ({"question": "  ", "image": [], "answer": "1"}, "empty_question"),
        ({"question": "Where is it?", "image": ["nowhere.png"], "answer": "1"}, "missing_image"),
    ]),
    "mm_eureka": ("rl", "jsonl", [
        ({"message": "[{\"role\": \"user\", \"content\": [", "answer": "1"}, "bad_messages"),
        ({"message": json.dumps([{"role": "tool", "content": "x"}]), "answer": "1"}, "bad_messages"),
        ({"message": json.dumps([{"role": "user", "content": "<image> What is it?"}]), "answer": "1"},
         "image_count_mismatch"),
        ({"message": json.dumps([{"role": "user", "content": [{"type": "image", "image": "file:///nowhere.png"},
                                                              {"type": "text", "text": "What?"}]}]), "answer": "1"},
         "missing_image"),
        ({"message": json.dumps([{"role": "user", "content": "What is 2+2?"}]), "answer": ""}, "empty_answer"),
    ]),
    "easyr1": ("rl", "jsonl", [
        ({"problem": "<image><image> Which is larger?", "images": ["img0.png"], "answer": "1"}, "image_count_mismatch"),
        ({"problem": "No placeholder here?", "images": ["img0.png"], "answer": "1"}, "image_count_mismatch"),
        ({"problem": "", "images": [], "answer": "1"}, "empty_question"),
    ]),
    "verl": ("rl", "jsonl", [
        ({"prompt": [{"role": "assistant", "content": "hello"}], "images": [],
          "reward_model": {"style": "rule", "ground_truth": "1"}}, "bad_messages"),
        ({"prompt": [{"role": "user", "content": "<image> Count the dots."}], "images": [],
          "reward_model": {"style": "rule", "ground_truth": "1"}}, "image_count_mismatch"),
        ({"prompt": [{"role": "user", "content": "What is 2+2?"}], "images": [],
          "reward_model": {"style": "rule", "ground_truth": ""}}, "empty_answer"),
    ]),
    "trl": ("rl", "jsonl", [
        ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": "Same?"}]}],
          "images": ["img0.png"], "answer": "1"}, "image_count_mismatch"),
        ({"prompt": [{"role": "tool", "content": [{"type": "text", "text": "x"}]}], "images": [], "answer": "1"},
         "bad_messages"),
        ({"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}], "images": [],
          "answer": "1"}, "bad_messages"),
    ]),
    "sharegpt": ("preference", "json", [
        ({"conversations": [{"from": "observation", "value": "x"}], "images": [],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}, "bad_messages"),
        ({"conversations": [{"from": "human", "value": "<image> What is it?"}], "images": [],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}, "image_count_mismatch"),
        ({"conversations": [{"from": "human", "value": "What is it?"}], "images": ["img0.png"],
          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}, "image_count_mismatch"),
        ({"conversations": [{"from": "human", "value": "What is 2+2?"}], "images": [],
          "chosen": {"from": "gpt", "value": ""}, "rejected": {"from": "gpt", "value": "b"}}, "empty_response"),
    ]),
}


def _bad_file(fmt, images, tmp_path):
    """Good rows of ``fmt`` (image file names) with the format's bad rows inserted after the second."""
    mode, suffix, bad = BAD_RECORDS[fmt]
    good_path = (write_flat(mode, tmp_path, images, True) if fmt == "flat" else
                 write_format(fmt, mode, tmp_path, images, jsonl=True))
    good = (json.loads(good_path.read_text()) if suffix == "json" else
            [json.loads(line) for line in good_path.read_text().splitlines()])
    records = [*good[:2], *(r for r, _ in bad), *good[2:]]
    path = tmp_path / f"bad_{fmt}.{suffix}"
    path.write_text(json.dumps(records) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in records))
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return path, mode, expected, len(good)


@pytest.mark.parametrize("fmt", list(BAD_RECORDS))
def test_malformed_rows_are_counted_by_reason(processor, images, tmp_path, fmt):
    path, mode, expected, n_good = _bad_file(fmt, images, tmp_path)
    rows = load_rows(path)
    assert resolve_layout(rows.column_names, sample=rows[0]).format == fmt
    it = MAKE[mode](rows, processor, _config(images))
    batches = list(it)
    assert it.skipped == expected
    assert sum(len(b["row_id"]) for b in batches) == n_good


def test_a_system_message_in_the_data_wins_unless_overridden(processor, images, tmp_path):
    rows = load_rows(write_format("sharegpt", "rl", tmp_path, images))
    layout = resolve_layout(rows.column_names)
    with_system, without = canonical_row(rows[1], layout, "rl"), canonical_row(rows[0], layout, "rl")
    assert with_system.system == SYSTEM and without.system is None
    assert with_system.messages("Config prompt.")[0] == {"role": "system", "content": SYSTEM}
    assert with_system.messages("Config prompt.", override_data_system=True)[0]["content"] == "Config prompt."
    assert without.messages("Config prompt.")[0]["content"] == "Config prompt."
    assert without.messages(None)[0]["role"] == "user"  # no system message: the template's default

    def decoded(**options):
        batch = next(rl_batches(rows, processor, _config(images, batch_size=5, **options)))
        return [processor.tokenizer.decode(r[m > 0]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]

    texts = decoded(system_prompt="Config prompt.")
    assert f"system\n{SYSTEM}<|im_end|>" in texts[1] and "system\nConfig prompt.<|im_end|>" in texts[0]
    texts = decoded(system_prompt="Config prompt.", override_data_system=True)
    assert all("system\nConfig prompt.<|im_end|>" in t for t in texts) and not any(SYSTEM in t for t in texts)


def test_detection_explicit_formats_and_renamed_columns(images, tmp_path):
    assert detect_format(["message", "answer"])[0] == "mm_eureka"
    assert detect_format(["conversations", "image_urls", "answer"])[0] == "mm_eureka"
    assert detect_format(["conversations", "chosen", "rejected", "images"])[0] == "sharegpt"
    assert detect_format(["data_source", "prompt", "images", "reward_model"])[0] == "verl"
    assert detect_format(["problem", "images", "answer"])[0] == "easyr1"
    assert detect_format(["prompt", "images", "answer"], sample={"prompt": "x <image>"})[0] == "easyr1"
    assert detect_format(["prompt", "images", "solution"], sample={"prompt": [{"role": "user"}]})[0] == "trl"
    assert detect_format(["question", "image", "answer"])[0] == "flat"
    # the pairs file of `specs-jax data pairs`: flat with `prompt` as the question, with or without data.columns
    pairs = ["prompt", "image", "chosen", "rejected", "corruption_kind", "source_policy", "answer"]
    for columns in (None, PAIR_COLUMNS):
        layout = resolve_layout(pairs, "auto", columns, sample={"prompt": "x", "chosen": "y"})
        assert (layout.format, layout.columns["question"], layout.columns["image"]) == ("flat", "prompt", "image")
    # data.columns describes the flat layout under auto; with a named format it renames that format's columns
    assert resolve_layout(["problem", "images", "answer"], "auto", Columns(question="problem", image="images")).format \
        == "flat"
    renamed = resolve_layout(["query", "pics", "gt"], "easyr1", Columns(question="query", image="pics", answer="gt"))
    assert (renamed.format, renamed.columns["question"], renamed.columns["image"], renamed.columns["answer"]) == (
        "easyr1", "query", "pics", "gt")
    with pytest.raises(ValueError, match="format must be auto or one of"):
        DataConfig(format="alpaca")
    with pytest.raises(ValueError, match=r"rl data in the sharegpt format needs column\(s\) \{'answer'"):
        rl_batches(load_rows(write_format("sharegpt", "preference", tmp_path, images)), None, _config(images))
    from specs_jax.training.config import CHOICES

    assert CHOICES["data.format"] == ("auto", *FORMAT_NAMES)


def test_flat_rows_turn_any_format_into_the_flat_layout(processor, images, tmp_path):
    rows = load_rows(write_format("mm_eureka", "rl", tmp_path, images))
    flat, dropped = flat_rows(rows)
    assert dropped == {} and flat.column_names == ["question", "image", "system", "answer", "solution"]
    assert flat[1]["question"] == "Compare <image> with <image>: which one has more circles?"
    assert [c["path"] for c in flat[1]["image"]] == [str(images[1]), str(images[2])]  # file:// URIs made paths
    config = _config(images)
    _assert_same_batches(list(rl_batches(flat, processor, config)), list(rl_batches(rows, processor, config)))


def test_pairs_written_as_sharegpt_train_like_the_parquet(processor, images, tmp_path):
    """`specs-jax data pairs --sharegpt`: the LLaMA-Factory file gives the parquet's preference batches."""
    from specs_jax.data.pairs import PairConfig, PromptSamples, build_pairs, save_pairs, save_sharegpt

    good = "<think>count</think><answer>\\boxed{3}</answer>"
    samples = [PromptSamples(prompt=f"How many shapes are there in picture {i}?", answer="3",
                             grpo_zero=[good, good.replace("count", "look")], image=images[i % 4].name if i < 3 else None)
               for i in range(4)]
    dataset, summary = build_pairs(samples, PairConfig(pairs_per_prompt=2, base_rejected_prob=0.0))
    out = tmp_path / "pairs"
    parquet = save_pairs(dataset, summary, out)
    path = save_sharegpt(dataset, out, system_prompt=SYSTEM)
    records = json.loads(path.read_text())
    assert records[0]["conversations"][0]["value"].startswith("<image>How many shapes")
    assert records[0]["chosen"]["from"] == "gpt" and records[0]["system"] == SYSTEM
    info = json.loads((out / "dataset_info.json").read_text())["specs_pairs"]
    assert info == {"file_name": "pairs_sharegpt.json", "formatting": "sharegpt", "ranking": True,
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                "images": "images", "system": "system"}}
    config = _config(images, system_prompt=SYSTEM)
    want = list(preference_batches(load_rows(parquet), processor, DataConfig(**{**config.__dict__,
                                                                                "columns": PAIR_COLUMNS})))
    got = list(preference_batches(load_rows(path), processor, config))
    _assert_same_batches(got, want)


def test_inspect_prints_format_counts_bad_rows_and_the_rendered_prompt(processor, images, tmp_path, capsys):
    path, _, expected, n_good = _bad_file("mm_eureka", images, tmp_path)
    assert cli(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:   mm_eureka  (auto: column 'message'" in out
    assert "columns:  question <- message, answer <- answer" in out
    assert f"rows:     {n_good + 5} read, {n_good} usable, 5 bad" in out
    assert "bad_messages: 2  (first: row 2: not valid JSON" in out
    assert "image_count_mismatch: 1  (first: row 4: 1 image placeholder(s) in the prompt, 0 image(s)" in out
    assert "<|vision_start|><|image_pad|><|vision_end|>How many shapes are in the picture?<|im_end|>" in out
    model = tmp_path / "proc"
    processor.save_pretrained(model)
    assert cli(["data", "inspect", str(path), "--processor", str(model), "--row", "1", "--max-length", "4096"]) == 0
    out = capsys.readouterr().out
    assert "prompt (row 1), rendered with the chat template of" in out
    assert "Compare <|vision_start|><|image_pad|>x6<|vision_end|> with <|vision_start|><|image_pad|>x12<|vision_end|>" \
        in out
    assert "image 1: file://" in out and "grid 1x4x6, 6 tokens" in out
    assert cli(["data", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == expected and report["format"] == "mm_eureka" and report["images"] == 6


@pytest.fixture(scope="module")
def model_dir(processor, tmp_path_factory):
    """A tiny random Qwen2.5-VL (HF) whose vocabulary matches ``processor``, with the processor files."""
    from test_training_sharded import random_model

    from specs_jax.convert.io import save_model
    from specs_jax.data.tokenizer import model_token_fields
    from specs_jax.model import from_hf_dict, load_preset

    cfg = from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)})
    path = save_model(random_model(cfg), tmp_path_factory.mktemp("model") / "base", fmt="hf")
    processor.save_pretrained(path)
    return path


@pytest.mark.slow  # ~40 s each: the README's commands end to end (the batches are checked above)
def test_train_grpo_from_an_mm_eureka_jsonl(model_dir, images, tmp_path):
    """The README's command: `specs-jax train grpo --config configs/grpo_tiny.yaml model.path=... data.train_path=
    train.jsonl` (MM-EUREKA rows: file:// image paths inside the JSON messages, so no data.image_root)."""
    from pathlib import Path

    data = write_format("mm_eureka", "rl", tmp_path, images)
    out = tmp_path / "grpo"
    config = Path(__file__).resolve().parents[1] / "configs" / "grpo_tiny.yaml"
    assert cli(["train", "grpo", "--config", str(config), f"model.path={model_dir}", f"data.train_path={data}",
                "data.buckets=[128, 256]", "train.steps=1", "train.batch_size=2", "rl.group_size=2",
                "rl.max_new_tokens=8", f"train.output_dir={out}", "log.progress=false"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and np.isfinite(metrics[0]["loss"])


@pytest.mark.slow  # ~40 s each: the README's commands end to end (the batches are checked above)
def test_train_dpo_hybrid_from_a_llama_factory_pair_file(model_dir, images, tmp_path):
    """`specs-jax train dpo --config configs/dpo_tiny.yaml model.path=... data.source=files
    data.train_path=pairs.json data.image_root=DIR` on a LLaMA-Factory ShareGPT preference file."""
    from pathlib import Path

    data = write_format("sharegpt", "preference", tmp_path, images)
    out = tmp_path / "dpo"
    config = Path(__file__).resolve().parents[1] / "configs" / "dpo_tiny.yaml"
    assert cli(["train", "dpo", "--config", str(config), f"model.path={model_dir}", "data.source=files",
                f"data.train_path={data}", f"data.image_root={images[0].parent}", "data.buckets=[128, 256]",
                "train.steps=2", "train.batch_size=2", "optim.grad_accum_steps=1", f"train.output_dir={out}"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)


def test_pairs_cli_takes_prompts_in_any_format(images, tmp_path):
    """`specs-jax data pairs --data FILE`: prompts of another format are put in flat form first."""
    import argparse

    from specs_jax.cli.data import _prompt_rows

    flat = load_rows(write_flat("rl", tmp_path, images, with_system=True))
    flat = flat.remove_columns("system")
    assert _prompt_rows(flat, argparse.Namespace(format="auto")) is flat  # the flat layout is used as it is
    rows = _prompt_rows(load_rows(write_format("sharegpt", "rl", tmp_path, images)), argparse.Namespace(format="auto"))
    assert rows["question"] == [r["question"] for r in flat]
    assert [[c["path"] for c in cells] for cells in rows["image"]] == [[c for c in cells] for cells in flat["image"]]
    assert rows["answer"] == flat["answer"] and rows["system"] == [None, SYSTEM, None, None, SYSTEM]
