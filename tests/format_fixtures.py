"""Data files in every supported format, written from one list of logical rows (no hub access).

:func:`write_format` writes the rows in one format (as that format's trainer stores them: jsonl,
json or parquet; images as files, ``file://`` URIs or embedded bytes) and :func:`write_flat` the
same rows in specs-jax's flat layout, so the batches of the two can be compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

PH = "<image>"
SYSTEM = "You are a careful counter. Think before you answer."
SIZES = [(56, 56), (70, 90), (112, 84), (60, 120)]

# Logical rows: the question as a list of text pieces and image indices (images where they appear).
ROWS = [
    {"parts": [0, "How many shapes are in the picture?"], "answer": "3", "system": None},
    {"parts": ["Compare ", 1, " with ", 2, ": which one has more circles?"], "answer": "left", "system": SYSTEM},
    {"parts": ["What is 7 times 6?"], "answer": "42", "system": None},
    {"parts": ["Look at the chart ", 3, " and name the tallest bar."], "answer": "red", "system": None},
    {"parts": [0, 2, "Are these two pictures the same size?"], "answer": "no", "system": SYSTEM},
]
FORMATS = ("mm_eureka", "easyr1", "verl", "trl", "trl_jsonl", "sharegpt")
SYSTEM_FORMATS = ("mm_eureka", "verl", "trl", "trl_jsonl", "sharegpt")  # formats with a per-row system message


def response(i: int) -> str:
    return f"<think>step {i}: count them.</think><answer>\\boxed{{{ROWS[i]['answer']}}}</answer>"


def rejected(i: int) -> str:
    return f"step {i}: count them. Answer: \\boxed{{{ROWS[i]['answer']}}}"


def make_images(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate(SIZES):
        path = root / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def images_of(row: dict) -> list[int]:
    return [p for p in row["parts"] if isinstance(p, int)]


def text_with_placeholders(row: dict) -> str:
    return "".join(PH if isinstance(p, int) else p for p in row["parts"])


def flat_question(row: dict) -> str:
    """The flat question: plain text when every image comes first, else with placeholders."""
    parts = row["parts"]
    first_text = next(i for i, p in enumerate(parts) if isinstance(p, str))
    if all(isinstance(p, str) for p in parts[first_text:]):
        return "".join(parts[first_text:])
    return text_with_placeholders(row)


def content_parts(row: dict, inline=None) -> list[dict]:
    out = []
    for p in row["parts"]:
        if isinstance(p, int):
            out.append({"type": "image", "image": inline(p)} if inline else {"type": "image"})
        else:
            out.append({"type": "text", "text": p})
    return out


def _bytes_cell(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": None}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _targets(record: dict, i: int, mode: str, style: str = "text") -> dict:
    if mode == "rl":
        record["answer"] = ROWS[i]["answer"]
    elif mode == "preference":
        if style == "trl":
            record["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": response(i)}]}]
            record["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": rejected(i)}]}]
        elif style == "sharegpt":
            record["chosen"] = {"from": "gpt", "value": response(i)}
            record["rejected"] = {"from": "gpt", "value": rejected(i)}
        else:
            record["chosen"], record["rejected"] = response(i), rejected(i)
    return record


def keeps_system(fmt: str) -> bool:
    return fmt in SYSTEM_FORMATS


def write_format(fmt: str, mode: str, out: Path, images: list[Path], rows=None, jsonl: bool = False) -> Path:
    """Write ``rows`` (default :data:`ROWS`) in format ``fmt`` for ``mode`` into ``out``; returns the file.
    ``jsonl``: the parquet formats (easyr1, verl, trl) as jsonl with image file names instead."""
    rows = ROWS if rows is None else rows
    embed = (lambda k: _bytes_cell(images[k])) if not jsonl else (lambda k: images[k].name)
    records = []
    for i, row in enumerate(rows):
        system = row["system"] if keeps_system(fmt) else None
        if fmt == "mm_eureka":  # jsonl, `message` a JSON string, images inline as file:// URIs
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": content_parts(row, lambda k: f"file://{images[k]}")}]
            if mode == "sft":
                messages.append({"role": "assistant", "content": response(i)})
            records.append(_targets({"id": str(i), "message": json.dumps(messages)}, i, mode))
        elif fmt == "easyr1":  # parquet, `problem` with placeholders, `images` as bytes
            record = {"problem": text_with_placeholders(row), "images": [embed(k) for k in images_of(row)]}
            if mode == "sft":
                record["response"] = response(i)
            records.append(_targets(record, i, mode))
        elif fmt == "verl":  # parquet, `prompt` chat messages with placeholders, answer in reward_model
            prompt = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": text_with_placeholders(row)}]
            record = {"data_source": "fixture", "prompt": prompt,
                      "images": [embed(k) for k in images_of(row)], "ability": "math",
                      "reward_model": {"style": "rule", "ground_truth": row["answer"]},
                      "extra_info": {"index": i}}
            if mode == "sft":
                record["response"] = response(i)
            records.append(_targets(record, i, mode))
        elif fmt == "trl":  # parquet, structured content parts, `images` as bytes
            sys_msg = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
            record = {"prompt": sys_msg + [{"role": "user", "content": content_parts(row)}],
                      "images": [embed(k) for k in images_of(row)]}
            if mode == "sft":
                record["completion"] = [{"role": "assistant", "content": [{"type": "text", "text": response(i)}]}]
            records.append(_targets(record, i, mode, "trl"))
        elif fmt == "trl_jsonl":  # jsonl, `messages` mixing string and part-list contents, image paths
            sys_msg = [{"role": "system", "content": system}] if system else []
            messages = sys_msg + [{"role": "user", "content": content_parts(row)}]
            if mode == "sft":
                messages.append({"role": "assistant", "content": response(i)})
            key = "messages" if mode == "sft" else "prompt"
            record = {key: messages, "images": [str(images[k]) for k in images_of(row)]}
            records.append(_targets(record, i, mode, "trl"))
        elif fmt == "sharegpt":  # json array, `conversations` with placeholders, relative image paths
            conv = [{"from": "human", "value": text_with_placeholders(row)}]
            if mode == "sft":
                conv.append({"from": "gpt", "value": response(i)})
            record = {"conversations": conv, "images": [images[k].name for k in images_of(row)]}
            if system:
                record["system"] = system
            records.append(_targets(record, i, mode, "sharegpt"))
        else:
            raise ValueError(fmt)
    if fmt in ("easyr1", "verl", "trl") and not jsonl:
        path = out / f"{fmt}_{mode}.parquet"
        dataset = datasets.Dataset.from_list(records)
        dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
        dataset.to_parquet(str(path))
        return path
    if fmt == "sharegpt":
        path = out / f"{fmt}_{mode}.json"
        path.write_text(json.dumps(records, indent=1))
        return path
    return _write_jsonl(out / f"{fmt}_{mode}.jsonl", records)


def write_flat(mode: str, out: Path, images: list[Path], with_system: bool, name: str = "flat", rows=None) -> Path:
    """The same rows in the flat layout (relative image paths: use ``image_root=images[0].parent``)."""
    rows = ROWS if rows is None else rows
    records = []
    for i, row in enumerate(rows):
        record = {"question": flat_question(row), "image": [images[k].name for k in images_of(row)],
                  "system": row["system"] if with_system else None}
        if mode == "sft":
            record["response"] = response(i)
        records.append(_targets(record, i, mode))
    return _write_jsonl(out / f"{name}_{mode}.jsonl", records)
