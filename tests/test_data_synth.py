"""Synthetic visual-reasoning dataset (specs_jax.data.synth) and `specs-jax data synth`.

Answers are re-derived independently: shapes and bars from the rendered pixels (connected
components per colour, written here without scipy), digits from the metadata and the drawn ink.
"""

import io
import json
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from specs_jax.cli.main import build_parser
from specs_jax.cli.main import main as cli
from specs_jax.data.pipeline import Columns, DataConfig, load_rows, rl_batches
from specs_jax.data.synth import (
    COLOURS,
    HELD_OUT_COMBOS,
    OBJECT_COUNTS,
    OOD_ONLY_TEMPLATES,
    SPLITS,
    TEMPLATES,
    SynthConfig,
    ood_reasons,
    render_scene,
    save_synth,
    synth_dataset,
)
from specs_jax.data.tokenizer import ProcessorConfig, build_processor
from specs_jax.rewards import accuracy_reward, specs_reward

CONFIG = SynthConfig(n_train=70, n_id_test=14, n_ood_test=70, seed=3)


@pytest.fixture(scope="module")
def dataset():
    return synth_dataset(CONFIG)


@pytest.fixture(scope="module")
def saved(dataset, tmp_path_factory):
    return save_synth(dataset, tmp_path_factory.mktemp("synth"))


def _records(dataset, splits=SPLITS):
    """Rows of ``splits`` with the image as PNG bytes and the parsed metadata under ``meta``."""
    return [dict(r, meta=json.loads(r["metadata"])) for s in splits
            for r in dataset[s].cast_column("image", datasets.Image(decode=False))]


def _pixels(record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(record["image"]["bytes"])).convert("RGB"))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask (min-label propagation), as [n, 2] pixel arrays."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(labels, 1, constant_values=none)
        neighbours = [p[1 + dy:h + 1 + dy, 1 + dx:w + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(neighbours), none)
        if (new == labels).all():
            break
        labels = new
    return [np.argwhere(labels == value) for value in np.unique(labels[mask])]


def _shape_of(pixels: np.ndarray) -> str:
    """square (fills its box), triangle (top row narrower than the bottom row) or circle."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    if len(pixels) == box:
        return "square"
    top, bottom = (ys == ys.min()).sum(), (ys == ys.max()).sum()
    return "triangle" if top < bottom else "circle"


def _seen_shapes(image: np.ndarray) -> list[tuple[str, str]]:
    """(colour, shape) of every connected blob; every non-white pixel must be a palette colour."""
    non_white = (image != 255).any(-1)
    found, covered = [], np.zeros_like(non_white)
    for name, rgb in COLOURS.items():
        mask = (image == rgb).all(-1)
        covered |= mask
        found += [(name, _shape_of(c)) for c in _components(mask)]
    assert (covered == non_white).all(), "pixels outside the palette (anti-aliasing or overlap)"
    return found


def _answer_from_pixels(question: str, image: np.ndarray) -> str:
    if m := re.fullmatch(r"Which bar is the (tallest|shortest)\? Answer with its colour\.", question):
        heights = {name: (image == rgb).all(-1).sum(0).max() for name, rgb in COLOURS.items()}
        heights = {name: h for name, h in heights.items() if h > 0}
        return (max if m[1] == "tallest" else min)(heights, key=heights.get)
    shapes = _seen_shapes(image)
    if m := re.fullmatch(r"How many (\w+) (\w+)s are there\?", question):
        return str(sum(s == (m[1], m[2]) for s in shapes))
    if m := re.fullmatch(r"Subtract all (\w+) shapes\. How many shapes are left\?", question):
        return str(sum(colour != m[1] for colour, _ in shapes))
    if m := re.fullmatch(r"Subtract all (\w+)s\. How many shapes are left\?", question):
        return str(sum(shape != m[1] for _, shape in shapes))
    if m := re.fullmatch(r"Are there more (\w+)s than (\w+)s\? Answer yes or no\.", question):
        count = {k: sum(shape == k for _, shape in shapes) for k in (m[1], m[2])}
        return "yes" if count[m[1]] > count[m[2]] else "no"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("size", [56, 84, 112])
def test_answers_match_the_pixels(size):
    data = synth_dataset(SynthConfig(n_train=35, n_id_test=0, n_ood_test=35, seed=size, size=size))
    for record in _records(data, ("train", "ood_test")):
        image = _pixels(record)
        assert image.shape == (size, size, 3)
        if record["meta"]["scene"] == "digits":
            continue
        assert _answer_from_pixels(record["question"], image) == record["answer"], record["id"]
        if record["meta"]["scene"] == "shapes":  # every drawn object is its own blob
            assert sorted(_seen_shapes(image)) == sorted((o["colour"], o["kind"]) for o in record["meta"]["objects"])


def test_digit_answers_and_ink(dataset):
    digit_records = [r for r in _records(dataset) if r["meta"]["scene"] == "digits"]
    assert len(digit_records) >= 20
    for record in digit_records:
        digits = record["meta"]["objects"]
        assert str(sum(d["value"] for d in digits)) == record["answer"]
        assert record["question"] == "What is the sum of the numbers in the image?"
        ink = (_pixels(record) < 128).all(-1)
        inside = np.zeros_like(ink)
        for d in digits:
            x0, y0, x1, y1 = d["box"]
            assert ink[y0:y1, x0:x1].any(), "a listed digit was not drawn"
            inside[y0:y1, x0:x1] = True
        assert not (ink & ~inside).any(), "ink outside the listed digits"
        redrawn = io.BytesIO()
        render_scene(record["meta"]).save(redrawn, format="PNG")
        assert redrawn.getvalue() == record["image"]["bytes"]


def test_ood_split_rule(dataset):
    records = _records(dataset)
    in_dist = [r for r in records if r["split"] != "ood_test"]
    ood = [r for r in records if r["split"] == "ood_test"]

    def combos(r):
        return {(o["colour"], o["kind"]) for o in r["meta"]["objects"]}

    id_pairs = {(r["template"], c) for r in in_dist for c in combos(r)}
    assert not any(c in HELD_OUT_COMBOS for _, c in id_pairs)
    id_max = {scene: max((len(r["meta"]["objects"]) for r in in_dist if r["meta"]["scene"] == scene))
              for scene in OBJECT_COUNTS}
    assert id_max == {scene: ranges["id"][1] for scene, ranges in OBJECT_COUNTS.items()}
    for r in ood:
        scene = r["meta"]["scene"]
        assert len(r["meta"]["objects"]) > id_max[scene]
        if scene != "digits":  # every OOD shapes/chart image has a (template, combo) pair never seen in ID
            assert {(r["template"], c) for c in combos(r)} - id_pairs
            assert combos(r) & HELD_OUT_COMBOS
        if r["template"] == "count_colour_shape":
            target = r["meta"]["target"]
            assert (target["colour"], target["shape"]) in HELD_OUT_COMBOS
    id_templates = {r["template"] for r in in_dist}
    ood_templates = {r["template"] for r in ood}
    assert ood_templates == set(TEMPLATES) and id_templates == set(TEMPLATES) - set(OOD_ONLY_TEMPLATES)
    assert all(ood_reasons(r) == frozenset() for r in in_dist)
    assert all("count" in ood_reasons(r) for r in ood)
    assert {r["template"] for r in ood if "template" in ood_reasons(r)} == set(OOD_ONLY_TEMPLATES)


def test_solutions_earn_the_reward(dataset):
    for record in _records(dataset):
        answer, solution = record["answer"], record["solution"]
        assert solution.endswith(f"\\boxed{{{answer}}}")
        assert accuracy_reward(solution, answer) == 1.0
        cut = solution.rindex("\\boxed")
        formatted = f"<think>{solution[:cut].strip()}</think> <answer>{solution[cut:]}</answer>"
        assert specs_reward(formatted, answer) == 1.5
        wrong = {"yes": "no", "no": "yes"}.get(answer) or (str(int(answer) + 1) if answer.isdigit() else
                                                           next(c for c in COLOURS if c != answer))
        assert accuracy_reward(solution, wrong) == 0.0


def test_same_seed_same_bytes_other_seed_differs(saved, tmp_path):
    again = save_synth(synth_dataset(CONFIG), tmp_path / "again")
    names = sorted(p.name for p in saved.iterdir())
    assert names == ["id_test.parquet", "ood_test.parquet", "summary.json", "train.parquet"]
    for name in names:
        assert (saved / name).read_bytes() == (again / name).read_bytes(), name
    other = synth_dataset(SynthConfig(n_train=CONFIG.n_train, n_id_test=0, n_ood_test=0, seed=CONFIG.seed + 1))
    first = synth_dataset(SynthConfig(n_train=CONFIG.n_train, n_id_test=0, n_ood_test=0, seed=CONFIG.seed))
    images = [[r["image"]["bytes"] for r in _records(d, ("train",))] for d in (first, other)]
    assert sum(a != b for a, b in zip(*images)) >= CONFIG.n_train - 1
    summary = json.loads((saved / "summary.json").read_text())
    assert summary["splits"]["ood_test"]["rows"] == CONFIG.n_ood_test
    assert summary["splits"]["train"]["templates"] == {t: 14 for t in set(TEMPLATES) - set(OOD_ONLY_TEMPLATES)}
    assert summary["splits"]["ood_test"]["templates"] == {t: 10 for t in TEMPLATES}


def test_saved_dataset_feeds_rl_batches(dataset, saved):
    rows = load_rows(saved / "train.parquet")
    processor = build_processor(list(dataset["train"]["question"]) + list(dataset["train"]["solution"]),
                                ProcessorConfig(vocab_size=512))
    it = rl_batches(rows, processor, DataConfig(batch_size=8, buckets=(64, 128), read_threads=1))
    seen = []
    for batch in it:
        assert batch["input_ids"].shape[0] == 8
        assert (batch["image_grid_thw"] == [1, 6, 6]).all()  # 84 px = 6x6 patches of 14 px
        for row_id, question, answer in zip(batch["row_id"], batch["question"], batch["answer"]):
            assert (question, answer) == (rows[int(row_id)]["question"], rows[int(row_id)]["answer"])
            seen.append(int(row_id))
    assert it.skipped == {} and len(seen) == len(rows) // 8 * 8 and len(set(seen)) == len(seen)
    with_solutions = rl_batches(rows, processor, DataConfig(batch_size=4, buckets=(64, 128), read_threads=1,
                                                            columns=Columns(solution="solution")))
    batch = next(with_solutions)
    assert batch["solution"] == [rows[int(i)]["solution"] for i in batch["row_id"]]


def test_cli_writes_the_splits_and_explains_them(tmp_path, capsys):
    assert cli(["data", "synth", "--out", str(tmp_path), "--n-train", "5", "--n-id-test", "2",
                "--n-ood-test", "7", "--size", "56"]) == 0
    for split, n in (("train", 5), ("id_test", 2), ("ood_test", 7)):
        rows = load_rows(tmp_path / f"{split}.parquet")
        assert len(rows) == n and set(rows["split"]) == {split}
    assert cli(["data", "synth", "--out", str(tmp_path), "--size", "70"]) == 2
    assert "size must be a multiple of 28" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "synth", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for colour, kind in HELD_OUT_COMBOS:
        assert f"{colour} {kind}" in help_text
    for template in OOD_ONLY_TEMPLATES:
        assert template in help_text
    for scene, ranges in OBJECT_COUNTS.items():
        assert "{}-{}".format(*ranges["ood"]) in help_text


def test_config_is_validated():
    with pytest.raises(ValueError, match="size"):
        SynthConfig(size=140)
    with pytest.raises(ValueError, match="n_train"):
        SynthConfig(n_train=-1)
