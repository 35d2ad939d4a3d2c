"""``specs-jax data inspect``: what the model will see from a data file, before any training.

:func:`inspect_rows` puts every row through the same steps as the batch pipelines (format
detection, the canonical row of :mod:`specs_jax.data.formats`, image loading and, with a
processor, tokenisation and the bucket limit) and collects the detected format, the column of
each role, row and image counts, the bad rows by reason (with the first example of each) and the
first usable prompt rendered with the chat template. :func:`format_report` prints it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from specs_jax.data.formats import BadRow, canonical_row, check_layout, resolve_layout
from specs_jax.data.pipeline import MODES, DataConfig, encode_messages, encode_response, load_image, load_rows
from specs_jax.data.tokenizer import IMAGE_TOKEN, QWEN2_5_VL_CHAT_TEMPLATE, Processor

MODE_ORDER = ("preference", "rl", "sft")  # the mode shown when none is asked for: the first the columns allow
MODE_NAMES = {"rl": "rl (prompts with answers: train grpo / opsd / vigos, eval)",
              "sft": "sft (prompt + response: train sft)",
              "preference": "preference (prompt + chosen + rejected: train dpo)"}


def _modes(layout, names) -> list[str]:
    ok = []
    for mode in MODES:
        try:
            check_layout(layout, names, mode)
        except ValueError:
            continue
        ok.append(mode)
    return ok


def _render(messages: list[dict[str, Any]], processor: Processor | None) -> str:
    if processor is not None:
        return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
                                        add_generation_prompt=True)
    return rendered[0]


def _describe_image(cell: Any, image: Any) -> str:
    if isinstance(cell, dict):
        source = cell.get("path") or f"{len(cell.get('bytes') or b'')} bytes"
    elif isinstance(cell, str):
        source = cell if len(cell) < 120 else cell[:60] + "..."
    else:
        source = type(cell).__name__
    return f"{source} ({image.width}x{image.height} px)"


def inspect_rows(source: str | Path | datasets.Dataset, config: DataConfig = DataConfig(), mode: str | None = None,
                 processor: Processor | None = None, limit: int = 0, show_row: int | None = None) -> dict[str, Any]:
    """The report of :func:`format_report` as a dict (module docstring); ``limit``: first N rows (0: all);
    ``show_row``: the row to render (default: the first usable one)."""
    rows = load_rows(source)
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    names = rows.column_names
    layout = resolve_layout(names, config.format, config.columns, rows.features, rows[0] if len(rows) else None)
    modes = _modes(layout, names)
    if mode is None:
        mode = next((m for m in MODE_ORDER if m in modes), None)
        if mode is None:
            check_layout(layout, names, "rl")  # raises the configuration error that names the missing column
    elif mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    else:
        check_layout(layout, names, mode)
    bad: Counter = Counter()
    first_bad: dict[str, str] = {}
    usable = images = with_images = most = with_system = 0
    longest = 0
    example_row = None
    for i, row in enumerate(rows):
        try:
            example = canonical_row(row, layout, mode)
            loaded = [load_image(cell, config.image_root) for cell in example.images]
            if processor is not None:
                messages = example.messages(config.system_prompt, config.override_data_system)
                prompt = encode_messages(processor, messages, loaded)
                responses = {"rl": [], "sft": [example.response],
                             "preference": [example.chosen, example.rejected]}[mode]
                length = len(prompt["input_ids"]) + max((len(encode_response(processor, r)) for r in responses),
                                                        default=0)
                if length > config.buckets[-1]:
                    raise BadRow("too_long", f"{length} tokens > largest bucket {config.buckets[-1]}")
                longest = max(longest, length)
        except BadRow as error:
            bad[error.reason] += 1
            first_bad.setdefault(error.reason, f"row {i}: {error.detail or error.reason}")
            continue
        usable += 1
        images += len(loaded)
        with_images += bool(loaded)
        most = max(most, len(loaded))
        with_system += example.system is not None
        if (example_row is None and show_row is None) or i == show_row:
            example_row = (i, example, loaded)
    report: dict[str, Any] = {
        "file": str(source) if not isinstance(source, datasets.Dataset) else "<dataset>",
        "rows": len(rows), "format": layout.format, "detected": layout.detected,
        "columns": {role: col for role, col in layout.columns.items() if col is not None and col in names},
        "modes": modes, "mode": mode, "usable": usable, "bad": dict(bad), "bad_examples": first_bad,
        "images": images, "rows_with_images": with_images, "max_images_per_row": most,
        "rows_with_system_message": with_system, "longest_tokens": longest if processor is not None else None,
        "example": None, "show_row": show_row,
    }
    if example_row is not None:
        i, example, loaded = example_row
        messages = example.messages(config.system_prompt, config.override_data_system)
        text = _render(messages, processor)
        notes = []
        if processor is not None:
            grid = encode_messages(processor, messages, loaded)["image_grid_thw"]
            merge = processor.image_processor.merge_size ** 2
            counts = [int(g.prod()) // merge for g in grid]
            pieces = text.split(IMAGE_TOKEN)
            text = "".join(p + f"{IMAGE_TOKEN}x{n}" for p, n in zip(pieces, counts)) + pieces[-1]
            notes = [f"image {k + 1}: {_describe_image(c, im)}, grid {'x'.join(map(str, g.tolist()))}, {n} tokens"
                     for k, (c, im, g, n) in enumerate(zip(example.images, loaded, grid, counts))]
        else:
            notes = [f"image {k + 1}: {_describe_image(c, im)}" for k, (c, im) in enumerate(zip(example.images, loaded))]
        target = {"rl": ("answer", example.answer), "sft": ("response", example.response),
                  "preference": ("chosen", example.chosen)}[mode]
        report["example"] = {"row": i, "rendered": text, "images": notes, "system_from_data": example.system is not None,
                             "target": target}
        if mode == "preference":
            report["example"]["rejected"] = example.rejected
    return report


def format_report(report: dict[str, Any], processor_path: str | None = None) -> str:
    """The report as the text ``specs-jax data inspect`` prints."""
    lines = [f"file:     {report['file']}",
             f"format:   {report['format']}  (auto: {report['detected']})"
             if report["detected"] != "named in the config" else f"format:   {report['format']}  (named)",
             "columns:  " + ", ".join(f"{role} <- {col}" + (".ground_truth" if col == "reward_model" else "")
                                      for role, col in report["columns"].items()),
             "modes:    " + (", ".join(report["modes"]) or "none"),
             f"mode:     {MODE_NAMES[report['mode']]}",
             f"rows:     {report['rows']} read, {report['usable']} usable, {sum(report['bad'].values())} bad",
             f"images:   {report['images']} in the usable rows ({report['rows_with_images']} rows with images, "
             f"at most {report['max_images_per_row']} per row)",
             f"system:   {report['rows_with_system_message']} usable rows bring their own system message"]
    if report["longest_tokens"] is not None:
        lines.append(f"tokens:   longest usable row {report['longest_tokens']}")
    if report["bad"]:
        lines.append("bad rows by reason:")
        for reason, count in sorted(report["bad"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {count}  (first: {report['bad_examples'][reason]})")
    example = report["example"]
    if example is None:
        lines.append("no usable row to render" + ("" if report.get("show_row") is None else
                                                  f" (row {report['show_row']} is bad or out of range)"))
        return "\n".join(lines)
    how = f"the chat template of {processor_path}" if processor_path else "Qwen2.5-VL's chat template (no --processor)"
    which = "first usable prompt" if report.get("show_row") is None else "prompt"
    lines += ["", f"{which} (row {example['row']}), rendered with {how}:", "-" * 72,
              example["rendered"].rstrip("\n"), "-" * 72]
    lines += [f"  {note}" for note in example["images"]]
    name, value = example["target"]
    lines.append(f"  {name}: {value!r}")
    if "rejected" in example:
        lines.append(f"  rejected: {example['rejected']!r}")
    return "\n".join(lines)
