"""A synthetic, verifiable visual-reasoning dataset with in- and out-of-distribution splits.

Every record is a small rendered image (white background, ``SynthConfig.size`` pixels square,
default 84) with a question whose answer is re-derivable from the record's metadata and, for
shapes and charts, from the pixels themselves. Three scenes:

- ``shapes``: flat-coloured circles, squares and triangles, one per cell of a 4x4 grid (cells
  drawn without replacement, a random size and offset inside the cell, at least one blank pixel
  on every side), so no two shapes touch and each one is one connected region of its colour.
- ``digits``: black digits 0-9 drawn as text, one per cell of a 3x3 grid.
- ``chart``: a bar chart, bars of distinct colours and distinct integer heights 1-10 standing
  on a common baseline.

Question templates (:data:`TEMPLATES`; answers are integers, ``yes``/``no`` or a colour name):

=====================  =======  =====================================================  ========
template               scene    question                                               splits
=====================  =======  =====================================================  ========
``count_colour_shape`` shapes   How many {colour} {shape}s are there?                  ID, OOD
``subtract_colour``    shapes   Subtract all {colour} shapes. How many shapes are...   ID, OOD
``compare_shapes``     shapes   Are there more {shape}s than {shape}s? Answer yes...   ID, OOD
``digit_sum``          digits   What is the sum of the numbers in the image?           ID, OOD
``chart_max``          chart    Which bar is the tallest? Answer with its colour.      ID, OOD
``subtract_shape``     shapes   Subtract all {shape}s. How many shapes are left?       OOD only
``chart_min``          chart    Which bar is the shortest? Answer with its colour.     OOD only
=====================  =======  =====================================================  ========

Split rule. ``train`` and ``id_test`` are in distribution (ID), ``ood_test`` is out of
distribution (OOD); every object has a (colour, kind) combination, kind one of circle, square,
triangle, digit, bar:

1. Held-out combinations :data:`HELD_OUT_COMBOS` = (red, circle), (green, square),
   (blue, triangle), (purple, square), (purple, bar): no ID image draws one; every OOD shapes
   or chart image draws at least one, and OOD ``count_colour_shape`` questions ask about one.
2. Object counts :data:`OBJECT_COUNTS`: ID images hold 3-8 shapes, 2-4 digits or 3-4 bars;
   OOD images hold 9-14 shapes, 5-6 digits or 5-6 bars, always more than any ID image of the
   same scene.
3. Templates: :data:`OOD_ONLY_TEMPLATES` (``subtract_shape``, ``chart_min``) are never used in
   ID; OOD uses all seven templates (ID templates on OOD images, plus the OOD-only ones).

Templates are assigned round-robin (record ``i`` of a split gets template ``i mod n``), so each
split's template counts differ by at most one. :func:`ood_reasons` tells which of the three rules
mark a record as OOD (empty for every ID record); :func:`record_combos` and
:func:`record_object_count` give the attributes it checks.

Records (:data:`FEATURES`): ``id``, ``question``, ``image`` (PNG bytes in a ``datasets.Image``
column), ``answer`` (string), ``solution`` (a short worked reasoning ending in
``\\boxed{answer}``: the privileged reference solution for OPSD and an SFT target),
``template``, ``split`` and ``metadata``, a JSON string ``{"scene", "size", "objects",
"target"}``: each object has ``kind``, ``colour`` and its geometry (shapes: top-left ``x``,
``y`` and side ``size``; digits: ``value``, ``font_size`` and the drawn ``box``; bars: ``x``,
``y``, ``width``, ``height`` in pixels and ``value``), and ``target`` names what the question
asks about. :func:`render_scene` redraws the image from the metadata, byte for byte.

Reproducibility: record ``i`` of split ``s`` draws from ``numpy.random.default_rng([seed, s,
i])``, so the same :class:`SynthConfig` gives byte-identical PNGs and parquet files.
:func:`synth_dataset` builds the ``datasets.DatasetDict``; :func:`save_synth` writes
``{split}.parquet`` (readable by :func:`specs_jax.data.pipeline.load_rows` with the default
:class:`~specs_jax.data.pipeline.Columns`) and ``summary.json``.
"""

from __future__ import annotations

import functools
import io
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLITS = ("train", "id_test", "ood_test")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
    "orange": (250, 130, 20),
}
"""Fill colours of shapes and bars (exact RGB values; images are drawn without anti-aliasing)."""
DIGIT_COLOUR = "black"
SHAPES = ("circle", "square", "triangle")
HELD_OUT_COMBOS = frozenset({("red", "circle"), ("green", "square"), ("blue", "triangle"), ("purple", "square"),
                             ("purple", "bar")})
"""(colour, kind) combinations drawn only in OOD images (split rule 1)."""
OBJECT_COUNTS: dict[str, dict[str, tuple[int, int]]] = {
    "shapes": {"id": (3, 8), "ood": (9, 14)},
    "digits": {"id": (2, 4), "ood": (5, 6)},
    "chart": {"id": (3, 4), "ood": (5, 6)},
}
"""Inclusive ranges of objects per image, per scene and distribution (split rule 2)."""
SHAPE_GRID = 4  # at 112 px a cell is 28 px: one merged image token of Qwen2.5-VL (14-px patches, 2x2 merge)
DIGIT_GRID = 3
MAX_BAR_VALUE = 10
MIN_SIZE, MAX_SIZE, SIZE_STEP = 56, 112, 28


@dataclass(frozen=True)
class SynthConfig:
    """Options of :func:`synth_dataset`: rows per split, the seed and the image side in pixels
    (a multiple of 28 between 56 and 112, so Qwen2-VL's resize keeps it unchanged)."""

    n_train: int = 1000
    n_id_test: int = 200
    n_ood_test: int = 200
    seed: int = 0
    size: int = 84

    def __post_init__(self) -> None:
        for name in ("n_train", "n_id_test", "n_ood_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (MIN_SIZE <= self.size <= MAX_SIZE and self.size % SIZE_STEP == 0):
            raise ValueError(f"size must be a multiple of {SIZE_STEP} in [{MIN_SIZE}, {MAX_SIZE}], got {self.size}")

    def rows(self, split: str) -> int:
        """Number of records of ``split``."""
        return {"train": self.n_train, "id_test": self.n_id_test, "ood_test": self.n_ood_test}[split]


@dataclass(frozen=True)
class Question:
    """A question about a scene, its answer, a worked solution and what it asks about."""

    question: str
    answer: str
    solution: str
    target: dict[str, Any]


# ----------------------------------------------------------------------------- scenes (pure)

def _count(rng: np.random.Generator, scene: str, ood: bool) -> int:
    low, high = OBJECT_COUNTS[scene]["ood" if ood else "id"]
    return int(rng.integers(low, high + 1))


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def shape_scene(rng: np.random.Generator, ood: bool, size: int) -> dict[str, Any]:
    """Non-touching shapes on a :data:`SHAPE_GRID` grid (module docstring, split rules 1-2)."""
    allowed = [(c, s) for c in COLOURS for s in SHAPES if ood or (c, s) not in HELD_OUT_COMBOS]
    held_out = sorted(combo for combo in HELD_OUT_COMBOS if combo[1] in SHAPES)
    n = _count(rng, "shapes", ood)
    combos = [_pick(rng, held_out) if ood and i == 0 else _pick(rng, allowed) for i in range(n)]
    cell = size // SHAPE_GRID
    margin = (size - cell * SHAPE_GRID) // 2
    cells = sorted(int(c) for c in rng.choice(SHAPE_GRID * SHAPE_GRID, size=n, replace=False))
    objects = []
    for (colour, kind), index in zip(combos, cells):
        side = int(rng.integers((cell + 1) // 2, cell - 1))  # leaves >= 1 blank pixel around the shape
        row, col = divmod(index, SHAPE_GRID)
        x = margin + col * cell + 1 + int(rng.integers(cell - 1 - side))
        y = margin + row * cell + 1 + int(rng.integers(cell - 1 - side))
        objects.append({"kind": kind, "colour": colour, "x": x, "y": y, "size": side})
    return {"scene": "shapes", "size": size, "objects": objects}


@functools.lru_cache(maxsize=None)
def _font(font_size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=font_size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("digit scenes need Pillow built with FreeType (ImageFont.load_default(size=...))")
    return font


def digit_scene(rng: np.random.Generator, ood: bool, size: int) -> dict[str, Any]:
    """Digits on a :data:`DIGIT_GRID` grid, listed in reading order (row by row)."""
    n = _count(rng, "digits", ood)
    cell = size // DIGIT_GRID
    font_size = cell * 2 // 3
    font = _font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (size, size)))
    objects = []
    for index in sorted(int(c) for c in rng.choice(DIGIT_GRID * DIGIT_GRID, size=n, replace=False)):
        value = int(rng.integers(10))
        row, col = divmod(index, DIGIT_GRID)
        jitter = cell // 8
        x = col * cell + cell // 2 + int(rng.integers(-jitter, jitter + 1))
        y = row * cell + cell // 2 + int(rng.integers(-jitter, jitter + 1))
        box = [int(v) for v in draw.textbbox((x, y), str(value), font=font, anchor="mm")]
        objects.append({"kind": "digit", "colour": DIGIT_COLOUR, "value": value, "x": x, "y": y,
                        "font_size": font_size, "box": box})
    return {"scene": "digits", "size": size, "objects": objects}


def chart_scene(rng: np.random.Generator, ood: bool, size: int) -> dict[str, Any]:
    """A bar chart with distinct colours and distinct heights, left to right."""
    n = _count(rng, "chart", ood)
    held_out = sorted(c for c, kind in HELD_OUT_COMBOS if kind == "bar")
    others = [c for c in COLOURS if c not in held_out]
    shuffled = [str(c) for c in rng.permutation(others)]
    chosen = shuffled[: n - 1] + [_pick(rng, held_out)] if ood else shuffled[:n]
    colours = [chosen[int(i)] for i in rng.permutation(n)]
    values = [int(v) for v in rng.choice(np.arange(1, MAX_BAR_VALUE + 1), size=n, replace=False)]
    margin = size // 14
    span = size - 2 * margin
    slot = span // n
    objects = []
    for i, (colour, value) in enumerate(zip(colours, values)):
        height = value * span // MAX_BAR_VALUE
        objects.append({"kind": "bar", "colour": colour, "value": value, "x": margin + i * slot + 1,
                        "y": size - margin - height, "width": slot - 2, "height": height})
    return {"scene": "chart", "size": size, "objects": objects}


def render_scene(scene: Mapping[str, Any]) -> Image.Image:
    """Draw a scene (the record's metadata) on a white RGB canvas, without anti-aliasing for
    shapes and bars."""
    size = scene["size"]
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        kind = obj["kind"]
        if kind == "digit":
            draw.text((obj["x"], obj["y"]), str(obj["value"]), fill=DIGIT_COLOUR, font=_font(obj["font_size"]),
                      anchor="mm")
            continue
        fill = COLOURS[obj["colour"]]
        if kind == "bar":
            x, y = obj["x"], obj["y"]
            draw.rectangle([x, y, x + obj["width"] - 1, y + obj["height"] - 1], fill=fill)
            continue
        x, y, last = obj["x"], obj["y"], obj["size"] - 1
        if kind == "circle":
            draw.ellipse([x, y, x + last, y + last], fill=fill)
        elif kind == "square":
            draw.rectangle([x, y, x + last, y + last], fill=fill)
        elif kind == "triangle":
            draw.polygon([(x + last // 2, y), (x, y + last), (x + last, y + last)], fill=fill)
        else:
            raise ValueError(f"unknown object kind {kind!r}")
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of ``image`` (deterministic: no timestamps or text chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- questions (pure)

def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _inventory(objects: Sequence[Mapping[str, Any]]) -> str:
    """``"2 red circles, 1 blue square and 3 green triangles"``, in palette then shape order."""
    counts = Counter((o["colour"], o["kind"]) for o in objects)
    order = sorted(counts, key=lambda c: (list(COLOURS).index(c[0]), SHAPES.index(c[1])))
    return _join([_plural(counts[c], f"{c[0]} {c[1]}") for c in order])


def _boxed(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def count_colour_shape(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """Count the shapes of one (colour, shape); OOD asks about a held-out combination."""
    present = sorted({(o["colour"], o["kind"]) for o in objects})
    if ood:
        present = [c for c in present if c in HELD_OUT_COMBOS]
    colour, shape = _pick(rng, present)
    k = sum(o["colour"] == colour and o["kind"] == shape for o in objects)
    return Question(
        f"How many {colour} {shape}s are there?", str(k),
        f"The image shows {_plural(len(objects), 'shape')}: {_inventory(objects)}. "
        f"Counting the {colour} {shape}s gives {k}. {_boxed(str(k))}",
        {"colour": colour, "shape": shape})


def subtract_colour(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """Remove every shape of one colour present in the image and count the rest."""
    colour = _pick(rng, sorted({o["colour"] for o in objects}, key=list(COLOURS).index))
    n, k = len(objects), sum(o["colour"] == colour for o in objects)
    return Question(
        f"Subtract all {colour} shapes. How many shapes are left?", str(n - k),
        f"The image shows {_plural(n, 'shape')}: {_inventory(objects)}. "
        f"Removing the {k} {colour} {'shape' if k == 1 else 'shapes'} leaves {n} - {k} = {n - k}. "
        f"{_boxed(str(n - k))}",
        {"colour": colour})


def subtract_shape(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """Remove every shape of one kind present in the image and count the rest (OOD only)."""
    shape = _pick(rng, sorted({o["kind"] for o in objects}, key=SHAPES.index))
    n, k = len(objects), sum(o["kind"] == shape for o in objects)
    return Question(
        f"Subtract all {shape}s. How many shapes are left?", str(n - k),
        f"The image shows {_plural(n, 'shape')}: {_inventory(objects)}. "
        f"Removing the {_plural(k, shape)} leaves {n} - {k} = {n - k}. {_boxed(str(n - k))}",
        {"shape": shape})


def compare_shapes(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """Whether one shape kind outnumbers another (strictly)."""
    first, second = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=2, replace=False))
    a, b = (sum(o["kind"] == s for o in objects) for s in (first, second))
    answer = "yes" if a > b else "no"
    relation = "greater than" if a > b else ("equal to" if a == b else "less than")
    return Question(
        f"Are there more {first}s than {second}s? Answer yes or no.", answer,
        f"The image shows {_inventory(objects)}. I count {_plural(a, first)} and {_plural(b, second)}; "
        f"{a} is {relation} {b}, so the answer is {answer}. {_boxed(answer)}",
        {"shapes": [first, second]})


def digit_sum(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """The sum of the digits drawn."""
    values = [o["value"] for o in objects]
    total = str(sum(values))
    return Question(
        "What is the sum of the numbers in the image?", total,
        f"Reading row by row, the numbers are {_join([str(v) for v in values])}. "
        f"Their sum is {' + '.join(str(v) for v in values)} = {total}. {_boxed(total)}",
        {})


def _chart_extreme(objects: list[dict[str, Any]], tallest: bool) -> Question:
    pick = max if tallest else min
    bar = pick(objects, key=lambda o: o["value"])
    word = "tallest" if tallest else "shortest"
    bars = _join([f"{o['colour']} ({o['value']})" for o in objects])
    return Question(
        f"Which bar is the {word}? Answer with its colour.", bar["colour"],
        f"From left to right, the bar heights are {bars}. The {word} is the {bar['colour']} bar "
        f"with height {bar['value']}. {_boxed(bar['colour'])}",
        {"extreme": "max" if tallest else "min"})


def chart_max(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """The colour of the tallest bar."""
    return _chart_extreme(objects, tallest=True)


def chart_min(objects: list[dict[str, Any]], rng: np.random.Generator, ood: bool) -> Question:
    """The colour of the shortest bar (OOD only)."""
    return _chart_extreme(objects, tallest=False)


SceneFn = Callable[[np.random.Generator, bool, int], dict[str, Any]]
QuestionFn = Callable[[list[dict[str, Any]], np.random.Generator, bool], Question]
SCENES: dict[str, SceneFn] = {"shapes": shape_scene, "digits": digit_scene, "chart": chart_scene}
TEMPLATES: dict[str, tuple[str, QuestionFn]] = {
    "count_colour_shape": ("shapes", count_colour_shape),
    "subtract_colour": ("shapes", subtract_colour),
    "compare_shapes": ("shapes", compare_shapes),
    "digit_sum": ("digits", digit_sum),
    "chart_max": ("chart", chart_max),
    "subtract_shape": ("shapes", subtract_shape),
    "chart_min": ("chart", chart_min),
}
"""Template name -> (scene, question function)."""
OOD_ONLY_TEMPLATES = ("subtract_shape", "chart_min")
"""Templates never used in ID (split rule 3)."""
ID_TEMPLATES = tuple(t for t in TEMPLATES if t not in OOD_ONLY_TEMPLATES)


def split_templates(split: str) -> tuple[str, ...]:
    """Templates used in ``split``, in round-robin order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return tuple(TEMPLATES) if split == "ood_test" else ID_TEMPLATES


# ----------------------------------------------------------------------------- records

def make_record(config: SynthConfig, split: str, index: int) -> dict[str, Any]:
    """Record ``index`` of ``split`` (module docstring), with the image as PNG bytes."""
    templates = split_templates(split)
    template = templates[index % len(templates)]
    ood = split == "ood_test"
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    scene_kind, question_fn = TEMPLATES[template]
    scene = SCENES[scene_kind](rng, ood, config.size)
    q = question_fn(scene["objects"], rng, ood)
    metadata = {**scene, "target": q.target}
    return {"id": f"{split}-{index:06d}", "question": q.question,
            "image": {"bytes": png_bytes(render_scene(scene)), "path": None}, "answer": q.answer,
            "solution": q.solution, "template": template, "split": split, "metadata": json.dumps(metadata)}


def record_combos(record: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The (colour, kind) combinations of the objects drawn in ``record``'s image."""
    return frozenset((o["colour"], o["kind"]) for o in json.loads(record["metadata"])["objects"])


def record_object_count(record: Mapping[str, Any]) -> int:
    """Number of objects drawn in ``record``'s image."""
    return len(json.loads(record["metadata"])["objects"])


def ood_reasons(record: Mapping[str, Any]) -> frozenset[str]:
    """Which split rules make ``record`` out of distribution: ``held_out_combo`` (rule 1),
    ``count`` (rule 2), ``template`` (rule 3). Empty exactly for in-distribution records."""
    scene = json.loads(record["metadata"])["scene"]
    reasons = set()
    if record_combos(record) & HELD_OUT_COMBOS:
        reasons.add("held_out_combo")
    if record_object_count(record) > OBJECT_COUNTS[scene]["id"][1]:
        reasons.add("count")
    if record["template"] in OOD_ONLY_TEMPLATES:
        reasons.add("template")
    return frozenset(reasons)


FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "question": datasets.Value("string"),
    "image": datasets.Image(),
    "answer": datasets.Value("string"),
    "solution": datasets.Value("string"),
    "template": datasets.Value("string"),
    "split": datasets.Value("string"),
    "metadata": datasets.Value("string"),
})


def synth_dataset(config: SynthConfig = SynthConfig()) -> datasets.DatasetDict:
    """The ``train``, ``id_test`` and ``ood_test`` splits of ``config`` (module docstring)."""
    splits = {}
    for split in SPLITS:
        rows = [make_record(config, split, i) for i in range(config.rows(split))]
        columns = {name: [row[name] for row in rows] for name in FEATURES}
        splits[split] = datasets.Dataset.from_dict(columns, features=FEATURES)
    return datasets.DatasetDict(splits)


def summarize(dataset: datasets.DatasetDict) -> dict[str, Any]:
    """Rows and rows per template of each split, and the split rule (JSON-able)."""
    return {
        "splits": {name: {"rows": len(split), "templates": dict(sorted(Counter(split["template"]).items()))}
                   for name, split in dataset.items()},
        "split_rule": {
            "held_out_combos": sorted(list(c) for c in HELD_OUT_COMBOS),
            "object_counts": {scene: {k: list(v) for k, v in ranges.items()} for scene, ranges in
                              OBJECT_COUNTS.items()},
            "ood_only_templates": list(OOD_ONLY_TEMPLATES),
        },
    }


def save_synth(dataset: datasets.DatasetDict, out_dir: str | Path) -> Path:
    """Write ``{split}.parquet`` for each split and ``summary.json`` (:func:`summarize`) into
    ``out_dir`` (created if needed, same-named files replaced); return ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in dataset.items():
        split.to_parquet(str(out / f"{name}.parquet"))
    (out / "summary.json").write_text(json.dumps(summarize(dataset), indent=2) + "\n")
    return out
