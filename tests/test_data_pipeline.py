"""datasets + grain pipelines for RL prompts, SFT and preference pairs (specs_jax.data.pipeline)."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from specs_jax.data.pipeline import (
    PAIR_COLUMNS,
    Columns,
    DataConfig,
    load_rows,
    preference_batches,
    rl_batches,
    sft_batches,
)
from specs_jax.data.tokenizer import (
    ProcessorConfig,
    build_processor,
    model_token_fields,
)

CORPUS = [
    "You are a helpful assistant.",
    "What is the area of the triangle shown in the image? Answer with a number.",
    "<think>The base is 4 and the height is 3, so the area is 6.</think><answer>\\boxed{6}</answer>",
] * 20
BUCKETS = (64, 96, 128, 192)
EXPECTED_SKIPS = {"missing_image": 1, "unreadable_image": 1, "empty_answer": 1, "too_long": 1}
LONG_QUESTION = "Explain every step of the computation in detail. " * 12


@pytest.fixture(scope="module")
def processor():
    return build_processor(CORPUS, ProcessorConfig(vocab_size=512))


@pytest.fixture(scope="module")
def model_cfg(processor):
    from specs_jax.model import from_hf_dict, load_preset

    return from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)})


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An image folder with a jsonl metadata file: 11 usable rows and 4 bad ones."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (70, 90), (112, 84), (60, 120), (100, 100)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows = [{"question": f"What is {i} plus {i}?", "image": [f"img{i % 5}.png"], "answer": str(2 * i),
             "solution": f"{i} + {i} = {2 * i}"} for i in range(9)]
    rows.append({"question": "Compare the two pictures.", "image": ["img0.png", "img3.png"], "answer": "same",
                 "solution": "They match."})
    rows.append({"question": "What is 7 times 6?", "image": [], "answer": "42", "solution": "7*6=42"})
    rows.append({"question": "Missing picture?", "image": ["nowhere.png"], "answer": "1", "solution": ""})
    rows.append({"question": "Corrupt picture?", "image": ["corrupt.png"], "answer": "1", "solution": ""})
    rows.append({"question": "No answer here.", "image": ["img1.png"], "answer": "  ", "solution": ""})
    rows.append({"question": LONG_QUESTION, "image": ["img2.png"], "answer": "1", "solution": ""})
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root, rows


def _config(root, **options):
    defaults = {"batch_size": 3, "buckets": BUCKETS, "image_root": str(root), "drop_remainder": False,
                "read_threads": 2, "columns": Columns(solution="solution")}
    return DataConfig(**{**defaults, **options})


def test_rl_batches_skip_and_count_bad_rows(processor, model_cfg, image_folder):
    from specs_jax.model import prepare_inputs

    root, rows = image_folder
    it = rl_batches(load_rows(root / "metadata.jsonl"), processor, _config(root))
    batches = list(it)
    assert it.skipped == EXPECTED_SKIPS
    row_ids = np.concatenate([b["row_id"] for b in batches])
    assert sorted(row_ids.tolist()) == list(range(11))
    pad = processor.image_token_id
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape[1] in BUCKETS and ids.shape == mask.shape
        assert (mask[:, -1] == 1).all() and (np.diff(mask, axis=1) >= 0).all()  # left padding
        assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
        # image tokens of each row == merged patches of that row's images, in order
        grids = iter(batch["image_grid_thw"] if batch["image_grid_thw"] is not None else [])
        for row, row_id in zip(ids, batch["row_id"]):
            n_images = len(rows[row_id]["image"])
            merged = sum(int(np.prod(next(grids))) for _ in range(n_images)) // 4
            assert int((row == pad).sum()) == merged
        assert next(grids, None) is None
        assert batch["answer"] == [rows[i]["answer"] for i in batch["row_id"]]
        assert batch["solution"] == [rows[i]["solution"] for i in batch["row_id"]]
        assert batch["question"] == [rows[i]["question"] for i in batch["row_id"]]
        inputs = prepare_inputs(model_cfg, ids, mask, batch["pixel_values"], batch["image_grid_thw"])
        assert inputs.input_ids.shape == ids.shape


def test_a_pass_without_any_usable_row_is_an_error_not_a_hang(processor, image_folder):
    """Endless epochs (num_epochs=None) over rows that are all too long must stop with the reason."""
    root, _ = image_folder
    it = rl_batches(load_rows(root / "metadata.jsonl"), processor, _config(root, buckets=(8,), num_epochs=None))
    with pytest.raises(ValueError, match="no usable row in a whole pass over the 15 rows.*too_long"):
        next(it)


def test_buckets_are_the_smallest_fitting_length(processor, model_cfg, image_folder):
    from specs_jax.model import prepare_inputs

    root, rows = image_folder
    buckets = (40, 48, 56, 64, 192)
    config = _config(root, batch_size=1, buckets=buckets, shuffle=False)
    widths = set()
    for batch in list(rl_batches(load_rows(root / "metadata.jsonl"), processor, config)):
        longest = int(batch["attention_mask"].sum(1).max())
        width = batch["input_ids"].shape[1]
        assert width == min(b for b in buckets if b >= longest)
        widths.add(width)
        if not rows[batch["row_id"][0]]["image"]:  # a text-only batch has no vision inputs
            assert batch["pixel_values"] is None and batch["image_grid_thw"] is None
            prepare_inputs(model_cfg, batch["input_ids"], batch["attention_mask"], None, None)
    assert len(widths) >= 2


def test_order_is_deterministic_by_seed(processor, image_folder):
    root, _ = image_folder
    rows = load_rows(root / "metadata.jsonl")

    def order(seed):
        it = rl_batches(rows, processor, _config(root, seed=seed, num_epochs=2))
        return np.concatenate([b["row_id"] for b in it]).tolist()

    first = order(1)
    assert first == order(1)
    assert first != order(2)
    assert sorted(first[:11]) == sorted(first[11:]) == list(range(11))  # row ids are source indices
    assert first[:11] != first[11:]  # each epoch is shuffled differently
    unshuffled = rl_batches(rows, processor, _config(root, shuffle=False))
    assert np.concatenate([b["row_id"] for b in unshuffled]).tolist() == list(range(11))


def test_processes_together_see_the_rows_of_one_process_in_its_order(processor, image_folder):
    root, _ = image_folder
    rows = load_rows(root / "metadata.jsonl")
    good = np.concatenate([b["row_id"] for b in rl_batches(rows, processor, _config(root, shuffle=False))])
    rows = rows.select(sorted(good.tolist()))  # no skipped row: a skip is replaced within its process

    def row_ids(batch_size, **kw):
        config = _config(root, seed=5, num_epochs=2, batch_size=batch_size, drop_remainder=True, **kw)
        return [b["row_id"].tolist() for b in rl_batches(rows, processor, config)]

    one = row_ids(4)
    parts = [row_ids(2, shard_index=k, shard_count=2) for k in range(2)]
    assert len(one) == len(parts[0]) == len(parts[1]) == 2 * len(rows) // 4  # two epochs, global batches of 4
    assert [a + b for a, b in zip(*parts)] == one
    assert not set(parts[0][0]) & set(parts[1][0])


def test_resume_from_saved_state_reproduces_the_remaining_batches(processor, image_folder, tmp_path):
    import grain
    from etils import epath

    root, _ = image_folder
    rows = load_rows(root / "metadata.jsonl")
    config = _config(root, seed=3, num_epochs=2, batch_size=2, drop_remainder=True)
    it = rl_batches(rows, processor, config)
    for _ in range(4):
        next(it)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), it)  # JSON state file
    rest = list(it)
    resumed = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), rl_batches(rows, processor, config))
    again = list(resumed)
    assert len(again) == len(rest) > 0
    for a, b in zip(rest, again):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray):
                np.testing.assert_array_equal(a[key], b[key])
            else:
                assert a[key] == b[key]
    assert resumed.skipped == it.skipped == {k: 2 * v for k, v in EXPECTED_SKIPS.items()}


def test_sft_loss_mask_covers_exactly_the_response(processor, model_cfg, tmp_path):
    from specs_jax.model import prepare_inputs

    rng = np.random.default_rng(1)
    good = [Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image(),
                                  "response": datasets.Value("string")})
    data = {
        "question": [f"Question {i}?" for i in range(4)] + ["Bad image?", "No response?"],
        "image": good + [{"bytes": b"not a png", "path": None}, good[0]],
        "response": [f"<think>step {i}</think> <answer>\\boxed{{{i}}}</answer>" for i in range(4)] + ["x", ""],
    }
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    config = DataConfig(batch_size=2, buckets=BUCKETS, seed=0)
    it = sft_batches(load_rows(path), processor, config)
    batches = list(it)
    assert it.skipped == {"unreadable_image": 1, "empty_response": 1}
    tok = processor.tokenizer
    assert sum(len(b["row_id"]) for b in batches) == 4
    for batch in batches:
        ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        assert ids.shape[1] in BUCKETS and (mask[:, 0] == 1).all()  # right padding
        for row, m, l, row_id in zip(ids, mask, loss, batch["row_id"]):
            assert tok.decode(row[l == 1]) == data["response"][row_id] + "<|im_end|>"
            prompt = tok.decode(row[(m == 1) & (l == 0)])
            assert prompt.endswith(f"Question {row_id}?<|im_end|>\n<|im_start|>assistant\n")
            assert (l <= m).all() and np.flatnonzero(l).min() == np.flatnonzero(m & (l == 0)).max() + 1
        prepare_inputs(model_cfg, ids, mask, batch["pixel_values"], batch["image_grid_thw"])


def test_preference_batches_pair_chosen_and_rejected_on_one_prompt(processor, model_cfg, image_folder, tmp_path):
    from specs_jax.model import prepare_inputs

    root, _ = image_folder
    pairs = {
        "prompt": [f"What is {i} plus one?" for i in range(5)],
        "image": [str(root / f"img{i}.png") for i in range(4)] + [str(root / "gone.png")],
        "chosen": [f"<think>{i}+1</think><answer>\\boxed{{{i + 1}}}</answer>" for i in range(5)],
        "rejected": [f"{i}+1 Answer: \\boxed{{{i + 1}}}" for i in range(5)],
        "corruption_kind": ["tags_to_text"] * 5, "source_policy": ["grpo_zero"] * 5,
        "answer": [str(i + 1) for i in range(5)],
    }
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict(pairs).to_parquet(str(path))
    config = DataConfig(columns=PAIR_COLUMNS, batch_size=2, buckets=BUCKETS, drop_remainder=True)
    it = preference_batches(load_rows(path), processor, config)
    batches = list(it)
    assert it.skipped == {"missing_image": 1} and len(batches) == 2
    tok = processor.tokenizer
    for batch in batches:
        ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        n = len(batch["row_id"])
        assert ids.shape[0] == 2 * n and ids.shape[1] in BUCKETS
        for i, row_id in enumerate(batch["row_id"]):
            chosen, rejected = i, n + i
            assert tok.decode(ids[chosen][loss[chosen] == 1]) == pairs["chosen"][row_id] + "<|im_end|>"
            assert tok.decode(ids[rejected][loss[rejected] == 1]) == pairs["rejected"][row_id] + "<|im_end|>"
            prompt_c = ids[chosen][(mask[chosen] == 1) & (loss[chosen] == 0)]
            prompt_r = ids[rejected][(mask[rejected] == 1) & (loss[rejected] == 0)]
            np.testing.assert_array_equal(prompt_c, prompt_r)
        grid = batch["image_grid_thw"]
        np.testing.assert_array_equal(grid[:n], grid[n:])
        half = batch["pixel_values"].shape[0] // 2
        np.testing.assert_array_equal(batch["pixel_values"][:half], batch["pixel_values"][half:])
        prepare_inputs(model_cfg, ids, mask, batch["pixel_values"], grid)


def test_configuration_errors_name_the_problem(processor, image_folder, tmp_path):
    root, _ = image_folder
    rows = load_rows(root / "metadata.jsonl")
    with pytest.raises(ValueError, match="column 'query' \\(Columns.question\\) not found"):
        rl_batches(rows, processor, _config(root, columns=Columns(question="query")))
    with pytest.raises(ValueError, match="column 'response' \\(Columns.response\\) not found"):
        sft_batches(rows, processor, _config(root))
    with pytest.raises(ValueError, match="buckets must be strictly increasing"):
        DataConfig(buckets=(128, 64))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_rows(tmp_path / "missing.parquet")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_rows(tmp_path / "data.txt")


def test_the_data_package_exports_every_lazy_name():
    import specs_jax.data as data

    lazy = {n for names in data._LAZY.values() for n in names}
    assert set(data.__all__) == lazy | {"PairConfig", "PromptSamples", "build_pairs", "save_pairs"}
    assert all(getattr(data, n) is not None for n in data.__all__)  # each resolves (lazily or directly)
