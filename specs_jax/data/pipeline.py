"""Datasets + grain input pipelines: RL prompts, SFT sequences and DPO preference pairs.

Public API (consumed by ``specs_jax.training``)::

    rows = load_rows("train.parquet")                        # datasets.Dataset (parquet/jsonl/json/csv)
    processor = load_processor("runs/tiny-base")             # specs_jax.data.tokenizer
    config = DataConfig(batch_size=8, buckets=(128, 256, 512), seed=0)
    it = rl_batches(rows, processor, config)                  # or sft_batches / preference_batches
    for batch in it:                                          # dict of numpy arrays (below)
        ...
        log(it.skipped)                                       # {"missing_image": 2, ...} so far
    state = it.get_state()                                    # JSON-able; it.set_state(state) resumes

Sources (:func:`load_rows`): a parquet, jsonl/json or csv file, or a ``datasets.Dataset``. An
image folder is a metadata file (jsonl/csv/parquet) whose image column holds file names, with
``DataConfig.image_root`` set to the folder: relative image paths resolve against it (or
against the working directory when it is ``None``). An image cell is a path, a
``datasets.Image`` value (bytes and/or path), a PIL image, a list of those, or empty/None for a
text-only row. :class:`Columns` maps the roles (question, image, answer, solution, response,
chosen, rejected, system) to column names; :data:`PAIR_COLUMNS` matches ``specs_jax.data.pairs``.

Formats: besides this flat layout the rows may be in the layouts of MM-EUREKA/OpenRLHF, EasyR1,
verl, TRL or LLaMA-Factory ShareGPT (``DataConfig.format``, ``"auto"``: detected from the
columns). Every row is first turned into one canonical row (:mod:`specs_jax.data.formats`: chat
messages with image parts in placeholder order, the images, the targets), so every format gives
exactly the batches of the same rows in flat form.

Prompts are the processor's chat template: a system message (the data's own, else
``DataConfig.system_prompt``, else the template's default; ``override_data_system`` makes the
config's win), then the user message with one image entry per image, where the prompt places
it (flat: at the question's ``<image>`` placeholders, or all before the question when it has
none), then the assistant header (``add_generation_prompt``). A response is its text followed by
the eos token ``<|im_end|>`` (the template's newline after it is not part of the target:
generation stops at eos).

Batches (``B`` rows, ``L`` a bucket length, ``P`` image patches, ``D = 3*2*14*14``):

- :func:`rl_batches`: ``input_ids`` ``[B, L]`` int32 LEFT-padded prompts, ``attention_mask``
  ``[B, L]`` int32, ``pixel_values`` ``[P, D]`` float32 and ``image_grid_thw`` ``[n_images, 3]``
  int64 (both ``None`` when no row of the batch has an image), ``row_id`` ``[B]`` int64 (index in
  the source), ``question``, ``answer`` and ``solution`` (lists of ``B`` strings; ``solution`` entries are
  ``None`` when ``Columns.solution`` is ``None``).
- :func:`sft_batches`: RIGHT-padded prompt + response, with ``loss_mask`` ``[B, L]`` int32 = 1
  exactly on the response tokens (eos included), aligned with ``input_ids`` (the logit at
  position ``t - 1`` predicts token ``t``); plus ``pixel_values``, ``image_grid_thw``,
  ``row_id``.
- :func:`preference_batches`: ``2B`` RIGHT-padded rows, chosen rows ``0..B-1`` then rejected
  rows ``B..2B-1`` (same prompts in the same order), ``loss_mask`` on each row's response;
  ``pixel_values``/``image_grid_thw`` hold the chosen rows' images then the same again for
  the rejected rows, so the whole batch is one forward pass; ``row_id`` ``[B]``.

Every batch feeds ``specs_jax.model.prepare_inputs(cfg, input_ids, attention_mask,
pixel_values, image_grid_thw)`` for a model configured with
:func:`~specs_jax.data.tokenizer.model_token_fields`.

Order and resumption: the source is shuffled with ``seed`` by grain (each epoch differently) and
repeated ``num_epochs`` times: that is the global order, the same for any number of processes.
Process ``shard_index`` of ``shard_count`` takes its ``batch_size`` rows of each global batch of
``batch_size * shard_count`` rows, so the processes together see exactly the rows, in the same
order, that one process sees (as long as no row is skipped: a skipped row is replaced by the next
row of the same process). Rows are then processed (``read_threads`` threads) and batched. The iterator is a
``grain.DatasetIterator``: ``get_state()``/``set_state()`` (or grain's checkpoint handler)
resume exactly where it stopped, skip counts included.

Lengths: each batch is padded to the smallest of ``DataConfig.buckets`` that fits its longest
row, so the text side takes one shape per bucket (the number of image patches per batch still
varies with the images' sizes and is not bucketed). Bad rows are skipped and counted per reason
in ``iterator.skipped`` (:data:`SKIP_REASONS`), never raised: a missing or unreadable image, an
empty question/answer/response, a count mismatch between image placeholders and images,
malformed chat messages, or a sequence (RL: the prompt; SFT/preference: prompt + the longest
response) longer than the largest bucket. A wrong column name is a configuration error
and raises when the pipeline is built.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import grain
import numpy as np
from PIL import Image

from specs_jax.data.formats import (
    FORMATS,
    BadRow,
    Example,
    Layout,
    canonical_row,
    check_layout,
    prompt_messages,
    resolve_layout,
)
from specs_jax.data.tokenizer import Processor

__all__ = ["MODES", "PAIR_COLUMNS", "SKIP_REASONS", "BadRow", "BatchIterator", "Columns", "DataConfig", "Example",
           "Layout", "batches", "collate", "encode_messages", "encode_prompt", "encode_response", "featurize",
           "layout_of", "load_image", "load_rows", "preference_batches", "prompt_messages", "rl_batches",
           "sft_batches"]

MODES = ("rl", "sft", "preference")
SKIP_REASONS = ("missing_image", "unreadable_image", "empty_question", "empty_answer", "empty_response", "too_long",
                "image_count_mismatch", "bad_messages")


@dataclass(frozen=True)
class Skipped:
    """Placeholder for a bad row inside the pipeline (counted and dropped before batching)."""

    row_id: int
    reason: str


@dataclass(frozen=True)
class Columns:
    """Column name of each role. ``image``/``answer``/``solution``/``system`` may be ``None`` (absent).

    ``answer`` is required by RL prompts, ``response`` by SFT, ``chosen``/``rejected`` by
    preference data; ``question`` by all. ``system`` (a per-row system message) is used when the
    column exists. For a format other than flat, a role set to a non-default name renames that
    format's column (:func:`specs_jax.data.formats.resolve_layout`).
    """

    question: str = "question"
    image: str | None = "image"
    answer: str | None = "answer"
    solution: str | None = None
    response: str = "response"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str | None = "system"


PAIR_COLUMNS = Columns(question="prompt")
"""Columns of the pair datasets written by :func:`specs_jax.data.pairs.save_pairs`."""


@dataclass(frozen=True)
class DataConfig:
    """Options of the batch pipelines (module docstring).

    ``buckets``: increasing padded lengths; the largest is the length limit.
    ``num_epochs``: passes over the data (``None``: endless). ``drop_remainder``: drop a last
    batch smaller than ``batch_size``. ``image_root``: directory of relative image paths.
    ``system_prompt``: optional system message (``None``: the template's default); a system
    message in the data wins over it unless ``override_data_system``.
    ``format``: the rows' layout, ``"auto"`` (detected from the columns) or one of
    :data:`~specs_jax.data.formats.FORMATS` (:mod:`specs_jax.data.formats`).
    """

    columns: Columns = field(default_factory=Columns)
    batch_size: int = 8
    buckets: tuple[int, ...] = (128, 256, 512, 1024)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = True
    system_prompt: str | None = None
    image_root: str | None = None
    shard_index: int = 0
    shard_count: int = 1
    read_threads: int = 2
    prefetch: int = 16
    format: str = "auto"
    override_data_system: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"format must be auto or one of {FORMATS}, got {self.format!r}")
        buckets = tuple(self.buckets)
        if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be strictly increasing positive lengths, got {self.buckets}")
        object.__setattr__(self, "buckets", buckets)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {self.shard_index}, {self.shard_count}")


# ----------------------------------------------------------------------------- sources (I/O)

_READERS = {
    ".parquet": datasets.Dataset.from_parquet,
    ".jsonl": datasets.Dataset.from_json,
    ".json": datasets.Dataset.from_json,
    ".csv": datasets.Dataset.from_csv,
}


def load_rows(source: str | Path | datasets.Dataset) -> datasets.Dataset:
    """Read a data file (or take a ``datasets.Dataset``) with image columns left undecoded.

    Image features are cast to ``datasets.Image(decode=False)`` so a corrupt image becomes a
    skipped row when it is read, not an error here.
    """
    if isinstance(source, datasets.Dataset):
        rows = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"unsupported data file {path}: expected one of {sorted(_READERS)}")
        rows = reader(str(path))  # a json column mixing strings and lists (chat contents) reads as datasets.Json
    for name, feature in rows.features.items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            rows = rows.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return rows


def _image_source(value: str) -> tuple[bytes | None, str]:
    """``(bytes or None, path)`` of a string image reference: a path, a ``file://`` URI or a base64
    ``data:`` URI; remote URLs are refused (nothing is downloaded)."""
    if value.startswith("data:"):
        import base64

        try:
            return base64.b64decode(value.split(",", 1)[1]), "data URI"
        except (IndexError, ValueError) as error:
            raise BadRow("unreadable_image", f"bad data URI: {error}") from error
    if value.startswith(("http://", "https://")):
        raise BadRow("missing_image", f"{value}: remote images are not downloaded; fetch them and use local paths")
    if value.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return None, unquote(urlparse(value).path)
    return None, value


def load_image(value: Any, image_root: str | None) -> Image.Image:
    """Open one image cell as RGB; raise :class:`BadRow` when it is missing or unreadable.

    A cell is a PIL image, a ``{"bytes", "path"}`` dict (``datasets.Image``), a path, a ``file://``
    URI or a base64 ``data:`` URI."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data, path = None, value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    if data is None and isinstance(path, str):
        data, path = _image_source(path)
    if data is None:
        if not path:
            raise BadRow("missing_image", "empty image reference")
        file = Path(path)
        if not file.is_absolute() and image_root is not None:
            file = Path(image_root) / file
        if not file.is_file():
            raise BadRow("missing_image", str(file))
        data = file.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises several types for corrupt data
        raise BadRow("unreadable_image", f"{path or 'bytes'}: {error}") from error


# ----------------------------------------------------------------------------- pure processing

def encode_messages(processor: Processor, messages: list[dict[str, Any]],
                    images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """Render chat ``messages`` with the chat template (assistant header added) and tokenise them with
    ``images``, one per image part in order (``Processor.encode`` outputs)."""
    text = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor.encode(text, images)


def encode_prompt(
    processor: Processor, question: str, images: Sequence[Image.Image], system_prompt: str | None = None
) -> dict[str, np.ndarray]:
    """Render a flat prompt (:func:`prompt_messages`) with the chat template and tokenise it."""
    return encode_messages(processor, prompt_messages(question, len(images), system_prompt), images)


def encode_response(processor: Processor, response: str) -> np.ndarray:
    """Token ids of ``response`` followed by the eos token, int32 ``[T]``."""
    tokenizer = processor.tokenizer
    return np.asarray(tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"], np.int32)


def layout_of(row: dict[str, Any], config: DataConfig) -> Layout:
    """The :class:`~specs_jax.data.formats.Layout` of a single row (its keys and values) under ``config``."""
    return resolve_layout(list(row), config.format, config.columns, sample=row)


def featurize(row: dict[str, Any], row_id: int, mode: str, processor: Processor, config: DataConfig,
              layout: Layout | None = None) -> dict[str, Any]:
    """One source row -> features of ``mode``; raises :class:`BadRow` for an unusable row.

    The row is first put in canonical form (:func:`~specs_jax.data.formats.canonical_row` under
    ``layout``, default: the row's own), so every format gives the same features. Features:
    ``row_id``, ``sequences`` (token arrays: the prompt for RL, prompt + response for SFT, prompt +
    chosen and prompt + rejected for preference), ``loss_masks`` (aligned, 1 on response tokens),
    ``pixel_values``, ``image_grid_thw``, and for RL the ``question``, ``answer`` and ``solution`` strings.
    """
    example = canonical_row(row, layout or layout_of(row, config), mode)
    if mode == "rl":
        responses: list[np.ndarray] = []
    elif mode == "sft":
        responses = [encode_response(processor, example.response)]
    else:
        responses = [encode_response(processor, example.chosen), encode_response(processor, example.rejected)]
    images = [load_image(cell, config.image_root) for cell in example.images]
    prompt = encode_messages(processor, example.messages(config.system_prompt, config.override_data_system), images)
    prompt_ids = prompt["input_ids"]
    length = len(prompt_ids) + max((len(r) for r in responses), default=0)
    if length > config.buckets[-1]:
        raise BadRow("too_long", f"{length} tokens > largest bucket {config.buckets[-1]}")
    features = {"row_id": row_id, "pixel_values": prompt["pixel_values"], "image_grid_thw": prompt["image_grid_thw"]}
    if mode == "rl":
        return {**features, "sequences": [prompt_ids], "loss_masks": [np.zeros(len(prompt_ids), np.int32)],
                "question": example.question, "answer": example.answer, "solution": example.solution}
    sequences = [np.concatenate([prompt_ids, r]) for r in responses]
    masks = [np.concatenate([np.zeros(len(prompt_ids), np.int32), np.ones(len(r), np.int32)]) for r in responses]
    return {**features, "sequences": sequences, "loss_masks": masks}


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= length``."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def collate(rows: Sequence[dict[str, Any]], mode: str, buckets: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Pad featurized rows into one batch (module docstring); RL rows are left-padded."""
    n_seq = len(rows[0]["sequences"])
    sequences = [row["sequences"][k] for k in range(n_seq) for row in rows]
    masks = [row["loss_masks"][k] for k in range(n_seq) for row in rows]
    width = bucket_length(max(len(s) for s in sequences), buckets)
    input_ids = np.full((len(sequences), width), pad_id, np.int32)
    attention_mask = np.zeros((len(sequences), width), np.int32)
    loss_mask = np.zeros((len(sequences), width), np.int32)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        span = slice(width - len(seq), width) if mode == "rl" else slice(0, len(seq))
        input_ids[i, span], attention_mask[i, span], loss_mask[i, span] = seq, 1, mask
    has_images = any(len(row["image_grid_thw"]) for row in rows)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": np.concatenate([row["pixel_values"] for row in rows] * n_seq) if has_images else None,
        "image_grid_thw": np.concatenate([row["image_grid_thw"] for row in rows] * n_seq) if has_images else None,
        "row_id": np.array([row["row_id"] for row in rows], np.int64),
    }
    if mode == "rl":
        batch.update({key: [row[key] for row in rows] for key in ("question", "answer", "solution")})
    else:
        batch["loss_mask"] = loss_mask
    return batch


# ----------------------------------------------------------------------------- grain stages

class BatchIterator(grain.DatasetIterator):
    """Drops :class:`Skipped` rows (counting them in :attr:`skipped`) and collates batches.

    State: the parent's state plus the skip counts, so a restored iterator continues with the
    same batches and the same counts.
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
                 collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]], n_rows: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._collate = collate_fn
        self._n_rows = n_rows  # rows of one pass (this shard): that many skips in a row means none is usable
        self._skipped: Counter = Counter()
        self._skip_run = 0

    @property
    def skipped(self) -> dict[str, int]:
        """Bad rows met so far, per reason."""
        return dict(self._skipped)

    def __next__(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        while len(rows) < self._batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                if rows and not self._drop_remainder:
                    break
                raise
            if isinstance(item, Skipped):
                self._skipped[item.reason] += 1
                self._skip_run += 1
                if self._skip_run >= self._n_rows:
                    raise ValueError(f"no usable row in a whole pass over the {self._n_rows} rows: every row was "
                                     f"skipped (so far {dict(self._skipped)}; too_long: raise the length buckets)")
            else:
                self._skip_run = 0
                rows.append(item)
        return self._collate(rows)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = Counter(state["skipped"])

    @staticmethod
    def rescale_state(states: list[dict[str, Any]], count: int) -> dict[str, Any]:
        """The state, in a job of ``count`` processes, of the position that ``states`` (one per process of the job
        that saved it) describe. Each process's position is its index into its share of the rows, ``k * B / n``
        after ``k`` global batches of ``B`` rows over ``n`` processes, so it carries over when no process skipped a
        row (then all are at the same index) and ``count`` divides the rows consumed."""
        first = states[0]
        if any(s != first for s in states) or first["skipped"] or set(first["parent"]) != {"next_index"}:
            raise ValueError(f"the checkpoint's data position was saved by {len(states)} processes that had skipped "
                             f"bad rows ({[s['skipped'] for s in states]}), so it does not carry over to {count} "
                             f"processes; resume with {len(states)} processes")
        rows = first["parent"]["next_index"] * len(states)  # rows of the global order consumed
        if rows % count:
            raise ValueError(f"the checkpoint's data position ({rows} rows) does not split over {count} processes")
        return {"parent": {"next_index": rows // count}, "skipped": {}}


class _ProcessSlice(grain.MapDataset):
    """Process ``index`` of ``count``'s rows of the global order: global batch ``k`` is the parent's elements
    ``[k * B, (k + 1) * B)`` (``B = batch * count``) and this process takes its ``batch`` of them,
    ``[k * B + index * batch, k * B + (index + 1) * batch)``. So ``count`` processes together see exactly the
    rows, in the same order, that one process with batches of ``B`` sees."""

    def __init__(self, parent: grain.MapDataset, batch: int, count: int, index: int):
        super().__init__(parent)
        self._batch, self._count, self._index = batch, count, index

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        k, r = divmod(j, self._batch)
        return self._parent[(k * self._count + self._index) * self._batch + r]

    def __str__(self) -> str:
        return f"_ProcessSlice(batch={self._batch}, count={self._count}, index={self._index})"


class _Batch(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool,
                 collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]], n_rows: int):
        super().__init__(parent)
        self._args = (batch_size, drop_remainder, collate_fn, n_rows)

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), *self._args)


def _layout(rows: datasets.Dataset, mode: str, config: DataConfig) -> Layout:
    """The rows' layout under ``config``, checked for ``mode`` (a configuration error raises)."""
    sample = rows[0] if len(rows) else None
    layout = resolve_layout(rows.column_names, config.format, config.columns, rows.features, sample)
    check_layout(layout, rows.column_names, mode)
    return layout


def batches(rows: datasets.Dataset, processor: Processor, config: DataConfig, mode: str) -> BatchIterator:
    """The batch iterator of ``mode`` (one of :data:`MODES`); see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layout = _layout(rows, mode, config)
    pad_id = processor.tokenizer.pad_token_id

    def process(row_id: int, row: dict[str, Any]) -> dict[str, Any] | Skipped:
        try:
            return featurize(row, row_id, mode, processor, config, layout)
        except BadRow as bad:
            return Skipped(row_id, bad.reason)

    n_rows = len(rows)  # indices of later epochs run past the source length: reduce them to row ids
    ds = grain.MapDataset.source(rows).map_with_index(lambda i, row: (i % n_rows, row))
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    if config.shard_count > 1:
        ds = _ProcessSlice(ds, config.batch_size, config.shard_count, config.shard_index)
    n_shard = max(n_rows // config.shard_count, 1)
    ds = ds.map(lambda item: process(*item))
    options = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch)
    batched = _Batch(ds.to_iter_dataset(options), config.batch_size, config.drop_remainder,
                     lambda items: collate(items, mode, config.buckets, pad_id), n_shard)
    return iter(batched)


def rl_batches(rows: datasets.Dataset, processor: Processor, config: DataConfig) -> BatchIterator:
    """Left-padded prompt batches for GRPO/OPSD rollouts."""
    return batches(rows, processor, config, "rl")


def sft_batches(rows: datasets.Dataset, processor: Processor, config: DataConfig) -> BatchIterator:
    """Right-padded prompt + response batches with a response-only ``loss_mask``."""
    return batches(rows, processor, config, "sft")


def preference_batches(rows: datasets.Dataset, processor: Processor, config: DataConfig) -> BatchIterator:
    """Chosen-then-rejected batches sharing prompts and images, for DPO."""
    return batches(rows, processor, config, "preference")
