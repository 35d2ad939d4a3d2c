"""Dataset formats: each supported layout's rows -> one canonical in-memory row (:class:`Example`).

The batch builders of :mod:`specs_jax.data.pipeline` read only :class:`Example` s, so a row gives
exactly the same batch (token ids, image patches, masks) in every format it can be written in.

Formats (``DataConfig.format`` / ``data.format``; ``auto`` detects from the columns, see
:func:`detect_format`):

==============  ===================================================================================
``flat``        specs-jax's own: ``question``, ``image`` (one cell or a list), ``answer``
                [, ``solution``, ``response``, ``chosen``, ``rejected``, ``system``]; the column of
                each role is :class:`~specs_jax.data.pipeline.Columns` (``data.columns``).
``mm_eureka``   MM-EUREKA / OpenRLHF jsonl: ``message`` is a JSON string of chat messages whose
                content parts are ``{"type": "image", "image": PATH}`` and ``{"type": "text", ...}``
                (paths may be ``file://`` URIs), ``answer``. The older InternVL layout
                (``conversations`` + ``image_urls``) is read as well.
``easyr1``      EasyR1: ``problem`` (or ``prompt``) with ``<image>`` placeholders, ``images`` (paths
                or image bytes), ``answer``.
``verl``        verl: ``prompt`` (chat messages, ``<image>`` placeholders in their text),
                ``images``, answer in ``reward_model.ground_truth``.
``trl``         TRL conversational: ``prompt`` or ``messages`` (chat messages whose content is a
                string or a list of ``{"type": "image"}`` / ``{"type": "text"}`` parts), ``image`` or
                ``images``; ``completion`` for SFT; ``chosen`` / ``rejected`` as message lists (or
                strings) for preferences.
``sharegpt``    LLaMA-Factory ShareGPT: ``conversations`` (``{"from": "human"|"gpt"|"system",
                "value": ...}``, ``<image>`` placeholders), ``images``, ``system``; preferences add
                ``chosen`` / ``rejected`` (``{"from": "gpt", "value": ...}``).
==============  ===================================================================================

Images are placed where the prompt puts them: ``{"type": "image"}`` parts and ``<image>``
placeholders take the next image of the image column, in order; a part with an inline image
(``"image": PATH``) brings its own. Where a prompt has no placeholder at all, ``flat``,
``mm_eureka`` and ``trl`` put the images before the text of the first user message (specs-jax's
and TRL's layout); ``easyr1``, ``verl`` and ``sharegpt`` require one placeholder per image, as their
trainers do. Any other count mismatch is a bad row, reason ``image_count_mismatch``.

Messages: roles ``system``, ``user`` (``human``), ``assistant`` (``gpt``). A leading system
message (or the ``system`` column) is the data's system message; it wins over
``DataConfig.system_prompt`` unless ``DataConfig.override_data_system``. The prompt is every
message up to the last user message; for SFT without a response column, a final assistant
message is the response. Malformed messages (unparseable JSON, unknown role, no user message,
an image in an assistant message) are bad rows, reason ``bad_messages``.

:func:`resolve_layout` gives the format and the column of each role (``data.columns`` overrides a
non-flat format's default names, role by role); :func:`canonical_row` turns one row into an
:class:`Example` or raises :class:`BadRow`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("flat", "mm_eureka", "easyr1", "verl", "trl", "sharegpt")
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("question", "image", "answer", "solution", "response", "chosen", "rejected", "system")
LENIENT = ("flat", "mm_eureka", "trl")  # no placeholder at all: images before the first user text
MESSAGE_FORMATS = ("mm_eureka", "verl", "trl", "sharegpt")  # the prompt column holds chat messages

# Default column names of each format, role -> candidates (the first present in the data is used).
DEFAULT_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "mm_eureka": {"question": ("message", "conversations"), "image": ("images", "image_urls", "image"),
                  "answer": ("answer",), "solution": ("solution",), "response": ("response",),
                  "chosen": ("chosen",), "rejected": ("rejected",), "system": ("system",)},
    "easyr1": {"question": ("problem", "prompt"), "image": ("images", "image"), "answer": ("answer",),
               "solution": ("solution",), "response": ("response",), "chosen": ("chosen",),
               "rejected": ("rejected",), "system": ("system",)},
    "verl": {"question": ("prompt",), "image": ("images", "image"), "answer": ("reward_model", "answer"),
             "solution": ("solution",), "response": ("response",), "chosen": ("chosen",),
             "rejected": ("rejected",), "system": ("system",)},
    "trl": {"question": ("prompt", "messages"), "image": ("images", "image"),
            "answer": ("answer", "solution", "ground_truth"), "solution": ("solution",),
            "response": ("completion", "response"), "chosen": ("chosen",), "rejected": ("rejected",),
            "system": ("system",)},
    "sharegpt": {"question": ("conversations", "messages"), "image": ("images", "image"), "answer": ("answer",),
                 "solution": ("solution",), "response": ("response",), "chosen": ("chosen",),
                 "rejected": ("rejected",), "system": ("system",)},
}
REQUIRED = {"rl": ("question", "answer"), "sft": ("question", "response"),
            "preference": ("question", "chosen", "rejected")}

_ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
               "model": "assistant", "bot": "assistant"}


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is one of ``pipeline.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Example:
    """One row in canonical form.

    ``turns``: the prompt's chat messages without the system message, every user message's
    content a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts (images in
    placeholder order), the last message a user message. ``images``: one image cell per image
    part, in order. ``system``: the data's system message (``None``: none). ``question``: the last
    user message's text, images written as ``<image>`` unless they all come before its text (the
    flat layout of the same prompt). The other fields are ``None`` when the mode does not use them.
    """

    turns: tuple[dict[str, Any], ...]
    images: tuple[Any, ...]
    system: str | None
    question: str
    answer: str | None = None
    solution: str | None = None
    response: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def messages(self, system_prompt: str | None = None, override_data_system: bool = False) -> list[dict[str, Any]]:
        """The chat messages to render: the data's system message (or ``system_prompt`` when the data has
        none or ``override_data_system``; ``None``: the template's default), then :attr:`turns`."""
        system = system_prompt if override_data_system or self.system is None else self.system
        head = [] if system is None else [{"role": "system", "content": system}]
        return head + [dict(m) for m in self.turns]


@dataclass(frozen=True)
class Layout:
    """A resolved format: its name, the column of each role (``None``: absent) and how it was chosen."""

    format: str
    columns: Mapping[str, str | None]
    detected: str = ""


# ----------------------------------------------------------------------------- layout


def _is_text(feature_or_value: Any) -> bool | None:
    """True for a string column/value, False for a list/struct one, None when unknown (e.g. all null)."""
    if feature_or_value is None:
        return None
    if isinstance(feature_or_value, str):
        return True
    if isinstance(feature_or_value, (list, tuple, dict)):
        return False
    dtype = getattr(feature_or_value, "dtype", None)
    if dtype is not None and not isinstance(dtype, type):
        return None if str(dtype) == "null" else str(dtype) in ("string", "large_string")
    return False


def _kinds(names: Sequence[str], features: Mapping[str, Any] | None, sample: Mapping[str, Any] | None) -> dict:
    kinds = {}
    for name in names:
        kind = _is_text(features.get(name)) if features is not None and name in features else None
        if kind is None and sample is not None:
            kind = _is_text(sample.get(name))
        kinds[name] = kind
    return kinds


def detect_format(names: Sequence[str], features: Mapping[str, Any] | None = None,
                  sample: Mapping[str, Any] | None = None, flat_question: str = "question") -> tuple[str, str]:
    """``(format, why)`` from the column names (and column types: ``features`` or a ``sample`` row).

    In order: ``message`` or ``image_urls`` -> mm_eureka; ``conversations`` -> sharegpt;
    ``reward_model`` -> verl; ``problem`` -> easyr1; a ``prompt`` / ``messages`` / ``chosen`` column
    of chat messages -> trl; the flat question column -> flat; a ``prompt`` text column with an
    ``images`` column -> easyr1 (its default key), without one -> flat with ``prompt`` as the question.
    Anything else -> flat (whose column check then names what is missing).
    """
    present = set(names)
    kinds = _kinds(names, features, sample)
    if "message" in present:
        return "mm_eureka", "column 'message': MM-EUREKA / OpenRLHF JSON chat messages"
    if "image_urls" in present:
        return "mm_eureka", "column 'image_urls': MM-EUREKA, InternVL layout"
    if "conversations" in present:
        return "sharegpt", "column 'conversations': LLaMA-Factory ShareGPT"
    if "reward_model" in present:
        return "verl", "column 'reward_model': verl"
    if "problem" in present:
        return "easyr1", "column 'problem': EasyR1"
    for name in ("prompt", "messages", "chosen"):
        if name in present and kinds.get(name) is False:
            return "trl", f"column {name!r} holds chat messages: TRL conversational"
    if flat_question in present:
        return "flat", f"column {flat_question!r}: flat"
    if "prompt" in present and "images" in present:
        return "easyr1", "columns 'prompt' (text) and 'images': EasyR1"
    if "prompt" in present:
        return "flat", "column 'prompt' (text, no 'images'): flat with prompt as the question"
    return "flat", "no known format's columns: flat"


def resolve_layout(names: Sequence[str], fmt: str = "auto", columns: Any = None,
                   features: Mapping[str, Any] | None = None, sample: Mapping[str, Any] | None = None) -> Layout:
    """The :class:`Layout` of data with columns ``names``.

    ``columns`` is a :class:`~specs_jax.data.pipeline.Columns`: the flat layout's mapping, and for
    another format the roles it sets to a non-default name override that format's default column.
    With ``fmt="auto"`` and any non-default role in ``columns``, the format is flat (``data.columns``
    describes the flat layout; name another format explicitly to rename its columns).
    """
    from specs_jax.data.pipeline import Columns

    columns = Columns() if columns is None else columns
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected auto or one of {FORMATS}")
    defaults = Columns()
    custom = {role: getattr(columns, role) for role in ROLES if getattr(columns, role) != getattr(defaults, role)}
    auto = fmt == "auto"
    if auto:
        if custom:
            fmt, why = "flat", f"data.columns {custom}: flat"
        else:
            fmt, why = detect_format(names, features, sample, columns.question)
    else:
        why = "named in the config"
    present = set(names)
    if fmt == "flat":
        mapping = {role: getattr(columns, role) for role in ROLES}
        if auto and not custom:  # detected: the usual alternative names, and no image column for text-only data
            if mapping["question"] not in present and "prompt" in present:
                mapping["question"] = "prompt"
            if mapping["image"] not in present:
                mapping["image"] = "images" if "images" in present else None
        if mapping["system"] not in present and "system" not in custom:
            mapping["system"] = None  # the default system column is optional
        return Layout("flat", mapping, why)
    mapping = {}
    for role in ROLES:
        if role in custom:
            mapping[role] = custom[role]
        else:
            mapping[role] = next((c for c in DEFAULT_COLUMNS[fmt][role] if c in present), None)
    if fmt == "trl" and mapping["solution"] == mapping["answer"]:
        mapping["solution"] = None
    return Layout(fmt, mapping, why)


def check_layout(layout: Layout, names: Sequence[str], mode: str) -> None:
    """Raise ``ValueError`` when ``mode`` cannot be fed from ``layout`` (a configuration error)."""
    present = set(names)
    if layout.format == "flat":
        for role in REQUIRED[mode]:
            if layout.columns[role] is None:
                raise ValueError(f"{mode} data needs a {role!r} column, but Columns.{role} is None")
        for role in (*REQUIRED[mode], "image", "solution", "system"):
            name = layout.columns[role]
            if name is not None and name not in present:
                raise ValueError(f"column {name!r} (Columns.{role}) not found; columns: {list(names)}")
        return
    for role, name in layout.columns.items():
        if name is not None and name not in present:
            raise ValueError(f"column {name!r} ({layout.format} format, role {role}) not found; columns: {list(names)}")
    need = list(REQUIRED[mode])
    if mode == "sft" and layout.format in MESSAGE_FORMATS:
        need.remove("response")  # may be the prompt's final assistant message
    if mode == "preference" and layout.format == "trl":
        need.remove("question")  # implicit prompt: the chosen conversation's messages before the response
    missing = [role for role in need if layout.columns[role] is None]
    if missing:
        wanted = {role: DEFAULT_COLUMNS[layout.format][role] for role in missing}
        raise ValueError(f"{mode} data in the {layout.format} format needs column(s) {wanted} "
                         f"(or data.columns naming them); columns: {list(names)}")


# ----------------------------------------------------------------------------- values


def _json(value: Any, strict: bool = True) -> Any:
    """A JSON string of a list/dict decoded (MM-EUREKA's ``message``; nested cells of mixed-type files).
    A string that is not JSON is a ``bad_messages`` row when ``strict``, else returned unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            if strict:
                raise BadRow("bad_messages", f"not valid JSON: {error}") from error
    return value


def _answer_text(value: Any, decode: bool = False) -> str | None:
    """An answer cell as text: a string or number as is; a list, its first element; a dict (verl's
    ``reward_model``), its ``ground_truth``. ``decode``: the cell may be such a dict as a JSON string."""
    if decode:
        value = _json(value, strict=False)
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v is not None), None)
    if isinstance(value, Mapping):
        value = value.get("ground_truth")
    if value is None or isinstance(value, (Mapping, list, tuple)):
        return None
    return str(value)


def _image_cells(value: Any) -> list[Any]:
    value = _json(value, strict=False)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def split_placeholders(text: str) -> list[dict[str, Any]]:
    """``"A <image> B"`` -> text ``"A "``, image, text ``" B"`` parts (empty texts dropped)."""
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _part(part: Any) -> tuple[dict[str, Any], Any]:
    """One content part -> (clean part, inline image or None)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}, None
    if not isinstance(part, Mapping):
        raise BadRow("bad_messages", f"content part {part!r} is neither a dict nor a string")
    kind = part.get("type")
    inline = part.get("image")
    url = part.get("image_url")
    if isinstance(url, Mapping):
        url = url.get("url")
    if kind in ("image", "image_url") or inline is not None or url is not None:
        return {"type": "image"}, inline if inline is not None else url
    if kind in ("video", "video_url") or part.get("video") is not None:
        raise BadRow("bad_messages", "video content is not supported")
    text = part.get("text")
    if kind not in (None, "text") or text is None:
        raise BadRow("bad_messages", f"content part of type {kind!r} without text")
    return {"type": "text", "text": str(text)}, None


def _messages(raw: Any, source: str) -> list[tuple[str, Any]]:
    """Chat messages -> ``[(role, content)]`` (content: a string or a list of parts)."""
    raw = _json(raw)
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise BadRow("bad_messages", f"{source} is not a non-empty list of chat messages")
    out = []
    for message in raw:
        if not isinstance(message, Mapping):
            raise BadRow("bad_messages", f"{source}: message {message!r} is not a dict")
        role = message.get("role") or message.get("from")  # columnar files fill absent keys with None
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if role not in _ROLE_NAMES:
            raise BadRow("bad_messages", f"{source}: role {role!r} is not supported (system, user/human, "
                                         f"assistant/gpt)")
        if content is None:
            raise BadRow("bad_messages", f"{source}: a {role} message has no content")
        out.append((_ROLE_NAMES[role], content))
    return out


def _text_of(content: Any, where: str) -> str:
    """The text of a system/assistant message (parts joined); images are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, (list, tuple)) else [content]:
        clean, _ = _part(part)
        if clean["type"] == "image":
            raise BadRow("bad_messages", f"an image in {where} is not supported")
        texts.append(clean["text"])
    return "".join(texts)


def _response_text(value: Any, where: str) -> str | None:
    """A response cell: a string, or chat messages whose last one is the assistant's."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple, Mapping)):
        return str(value)
    if isinstance(value, str):
        decoded = _json(value, strict=False)
        if not isinstance(decoded, (list, Mapping)) or not decoded or not all(
                isinstance(m, Mapping) and ("role" in m or "from" in m) for m in
                (decoded if isinstance(decoded, list) else [decoded])):
            return value  # plain text (that may happen to start with a bracket)
        value = decoded
    messages = _messages(value, where)
    role, content = messages[-1]
    if role != "assistant":
        raise BadRow("bad_messages", f"{where}: the last message is from {role}, not the assistant")
    return _text_of(content, where)


@dataclass
class _Prompt:
    turns: list[dict[str, Any]]
    slots: list[Any]  # per image part, in order: its inline image, or None (filled from the image column)
    system: str | None
    response: str | None  # a final assistant message, when there is one


def _prompt(messages: list[tuple[str, Any]], system: str | None) -> _Prompt:
    """Clean turns (image parts not yet filled), the data's system message and a final assistant message."""
    if messages and messages[0][0] == "system":
        text = _text_of(messages[0][1], "a system message")
        system = text if text.strip() else system
        messages = messages[1:]
    response = None
    while messages and messages[-1][0] == "assistant":
        response = _text_of(messages[-1][1], "an assistant message") if response is None else response
        messages = messages[:-1]
    if not any(role == "user" for role, _ in messages):
        raise BadRow("bad_messages", "no user message")
    turns: list[dict[str, Any]] = []
    slots: list[Any] = []
    for role, content in messages:
        if role != "user":
            turns.append({"role": role, "content": _text_of(content, f"a {role} message")})
            continue
        parts = []
        for part in (split_placeholders(content) if isinstance(content, str) else
                     content if isinstance(content, (list, tuple)) else [content]):
            clean, inline = _part(part)
            parts.append(clean)
            if clean["type"] == "image":
                slots.append(inline)
        turns.append({"role": "user", "content": parts})
    return _Prompt(turns, slots, system, response)


def _fill_images(prompt: _Prompt, column_images: list[Any], fmt: str, image_column: str | None) -> list[Any]:
    """The image of every image part, in order (module docstring for the placeholder rules)."""
    open_slots = sum(s is None for s in prompt.slots)
    if open_slots == len(column_images):
        fill = iter(column_images)
        return [next(fill) if s is None else s for s in prompt.slots]
    if not prompt.slots and fmt in LENIENT:
        first = next(t for t in prompt.turns if t["role"] == "user")
        first["content"] = [{"type": "image"} for _ in column_images] + first["content"]
        return list(column_images)
    where = f"column {image_column!r}" if image_column else "the row (no image column)"
    raise BadRow("image_count_mismatch", f"{open_slots} image placeholder(s) in the prompt, "
                                         f"{len(column_images)} image(s) in {where}")


def question_text(parts: Iterable[Mapping[str, Any]]) -> str:
    """A user message's text in flat form: images as ``<image>``, omitted when all come before the text."""
    parts = list(parts)
    first_text = next((i for i, p in enumerate(parts) if p["type"] == "text"), len(parts))
    leading = all(p["type"] == "text" for p in parts[first_text:])
    return "".join(p["text"] if p["type"] == "text" else ("" if leading else IMAGE_PLACEHOLDER) for p in parts)


def _required(value: str | None, column: str | None, reason: str) -> str:
    if value is None or not value.strip():
        raise BadRow(reason, f"column {column!r} is empty" if column else "no such column")
    return value


def canonical_row(row: Mapping[str, Any], layout: Layout, mode: str) -> Example:
    """One source row -> :class:`Example`; raises :class:`BadRow` (module docstring for the rules).

    Checks in the flat pipeline's order: the prompt (``bad_messages``, ``empty_question``), the
    mode's targets (``empty_answer`` / ``empty_response``), then the images (``image_count_mismatch``).
    """
    col, fmt = layout.columns, layout.format
    raw = row.get(col["question"]) if col["question"] is not None else None
    if fmt in ("flat", "easyr1") and not isinstance(raw, (list, tuple)):
        if raw is None or not str(raw).strip():
            raise BadRow("empty_question", f"column {col['question']!r} is empty")
        messages = [("user", str(raw))]
    elif raw is None and mode == "preference" and fmt == "trl":
        messages = _messages(row.get(col["chosen"]), f"column {col['chosen']!r}")  # implicit prompt
    else:
        messages = _messages(raw, f"column {col['question']!r}")
    system = _answer_text(row.get(col["system"])) if col["system"] is not None else None
    prompt = _prompt(messages, system if system is not None and system.strip() else None)
    question = question_text(prompt.turns[-1]["content"])
    if not question.replace(IMAGE_PLACEHOLDER, "").strip():
        raise BadRow("empty_question", f"the prompt in column {col['question']!r} has no text")
    answer = solution = response = chosen = rejected = None
    if mode == "rl":
        where = f"{col['answer']}.ground_truth" if col["answer"] == "reward_model" else col["answer"]
        answer = _required(_answer_text(row.get(col["answer"]), decode=fmt == "verl")
                           if col["answer"] is not None else None, where, "empty_answer")
        if col["solution"] is not None:
            solution = _answer_text(row.get(col["solution"]))
    elif mode == "sft":
        if col["response"] is not None:
            response = _required(_response_text(row.get(col["response"]), f"column {col['response']!r}"),
                                 col["response"], "empty_response")
        elif prompt.response is None or not prompt.response.strip():
            raise BadRow("empty_response", "no response column and no final assistant message")
        else:
            response = prompt.response
    else:
        chosen, rejected = (_required(_response_text(row.get(col[r]), f"column {col[r]!r}"), col[r],
                                      "empty_response") for r in ("chosen", "rejected"))
    images = _image_cells(row.get(col["image"])) if col["image"] is not None else []
    images = _fill_images(prompt, images, fmt, col["image"])
    return Example(tuple(prompt.turns), tuple(images), prompt.system, question, answer, solution, response,
                   chosen, rejected)


def prompt_messages(question: str, n_images: int, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat messages of a flat prompt: optional system message, one user message whose images sit at
    the question's ``<image>`` placeholders when it has exactly ``n_images`` of them, else before its text."""
    parts = split_placeholders(question)
    if sum(p["type"] == "image" for p in parts) != n_images or not n_images:
        parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return system + [{"role": "user", "content": parts}]


def flat_record(example: Example) -> dict[str, Any]:
    """The flat-layout row of a single-turn :class:`Example` (question with ``<image>`` placeholders
    where the images are not all first; ``image`` the list of cells; ``system`` the data's)."""
    if len(example.turns) != 1:
        raise ValueError("only single-turn prompts have a flat form")
    return {"question": example.question, "image": list(example.images), "system": example.system,
            **{k: getattr(example, k) for k in ("answer", "solution", "response", "chosen", "rejected")}}


def flat_rows(rows: Any, fmt: str = "auto", columns: Any = None, mode: str = "rl") -> tuple[Any, dict[str, int]]:
    """``(dataset, dropped)``: the usable single-turn rows of a ``datasets.Dataset`` of any format in flat
    form (``question`` with ``<image>`` placeholders where needed, ``image`` a list of image cells,
    ``system``, and the ``mode``'s targets), and the rows left out per reason (``multi_turn`` for
    prompts with several turns). Images are not opened here."""
    import datasets

    layout = resolve_layout(rows.column_names, fmt, columns, rows.features, rows[0] if len(rows) else None)
    check_layout(layout, rows.column_names, mode)
    targets = {"rl": ("answer", "solution"), "sft": ("response",), "preference": ("chosen", "rejected")}[mode]
    records, dropped = [], {}
    for row in rows:
        try:
            example = canonical_row(row, layout, mode)
        except BadRow as bad:
            dropped[bad.reason] = dropped.get(bad.reason, 0) + 1
            continue
        if len(example.turns) != 1:
            dropped["multi_turn"] = dropped.get("multi_turn", 0) + 1
            continue
        record = flat_record(example)
        record["image"] = [_plain_path(c) for c in record["image"]]
        records.append({k: record[k] for k in ("question", "image", "system", *targets)})
    string = datasets.Value("string")
    features = datasets.Features({"question": string, "image": datasets.List(datasets.Image(decode=False)),
                                  "system": string, **{t: string for t in targets}})
    return datasets.Dataset.from_list(records, features=features), dropped


def _plain_path(cell: Any) -> Any:
    """A ``file://`` URI as a plain path (other cells unchanged)."""
    if isinstance(cell, str) and cell.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(cell).path)
    return cell
