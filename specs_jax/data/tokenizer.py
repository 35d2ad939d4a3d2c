"""A Qwen2.5-VL tokenizer and image processor built locally, with no network access.

:func:`build_processor` trains a byte-level BPE (the ``tokenizers`` library, Qwen2's
pre-tokenizer regex and NFC normaliser, all 256 byte symbols in the base alphabet) on a text
corpus and wraps it as transformers' ``Qwen2Tokenizer`` with:

- Qwen2.5-VL's special tokens, appended after the BPE vocabulary in Qwen's order
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ..., ``<|vision_start|>``,
  ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>``), so each
  special id is ``bpe_size + k`` with the same offsets ``k`` as in Qwen's vocabulary;
- eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, as in Qwen2.5-VL-Instruct;
- ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` as NON-special added tokens when
  ``ProcessorConfig.format_tokens`` (default): each tag is one token a tiny model can learn,
  and decoding keeps them even with ``skip_special_tokens=True``. With ``format_tokens=False``
  they are plain text, as in the real Qwen2.5-VL tokenizer;
- Qwen2.5-VL's chat template (:data:`QWEN2_5_VL_CHAT_TEMPLATE`, verbatim).

The image processor is transformers' Qwen2-VL image processor (PIL backend) with small
``min_pixels``/``max_pixels`` for CPU runs.

:meth:`Processor.save_pretrained` writes the layout of the published Qwen2.5-VL repositories
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
``preprocessor_config.json`` naming ``Qwen2_5_VLProcessor``). :func:`load_processor` reads it,
or a real Qwen2.5-VL checkpoint directory, with ``AutoTokenizer`` and ``AutoImageProcessor``
only. It does not go through ``AutoProcessor``: transformers 5 cannot build a
``Qwen2_5_VLProcessor`` without ``torchvision`` (its required video processor needs it), and
specs-jax does not depend on torch. The chat template is the processor's as transformers
resolves it (``chat_template.json``, else ``chat_template.jinja``, else the ``chat_template`` of
``processor_config.json``: :func:`processor_chat_template`), else the tokenizer's
(``tokenizer_config.json``). The EOS ids of ``generation_config.json`` (Qwen2.5-VL-Instruct lists
``<|im_end|>`` and ``<|endoftext|>``) are kept in :attr:`Processor.eos_token_ids`; the sampler
stops at them too. :meth:`Processor.encode` does the processor's one
text-side step, expanding each ``<|image_pad|>`` to ``t*h*w / merge_size**2`` copies.

:func:`model_token_fields` gives the ``config.json`` fields (token ids, vocab size) a model needs
to match a tokenizer, e.g. ``from_hf_dict({**load_preset("tiny").hf_config, **fields})``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENDOFTEXT = "<|endoftext|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_END = "<|im_end|>"
QWEN_SPECIAL_TOKENS = (
    ENDOFTEXT, "<|im_start|>", IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>",
    IMAGE_TOKEN, VIDEO_TOKEN,
)
"""Qwen2.5-VL's special tokens in vocabulary order (ids 151643..151656 in Qwen's tokenizer)."""
FORMAT_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2.5-VL-Instruct's chat template, verbatim (also stored in trl/chat_templates/qwen2_5_vl.jinja).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ProcessorConfig:
    """Options of :func:`build_processor`.

    - ``vocab_size``: BPE vocabulary size including the 256 byte symbols, before the special
      and format tokens (the BPE stops early when the corpus has fewer merges to offer).
    - ``min_pixels`` / ``max_pixels``: image area bounds of the Qwen2-VL ``smart_resize``
      (sides become multiples of 28); the defaults give 56-112 px images, 4-16 image tokens.
    - ``format_tokens``: add ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` as single
      non-special tokens (module docstring).
    - ``model_max_length``: the tokenizer's ``model_max_length``.
    """

    vocab_size: int = 1024
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    format_tokens: bool = True
    model_max_length: int = 4096

    def __post_init__(self) -> None:
        if self.vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {self.vocab_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")


@dataclass(frozen=True)
class Processor:
    """A Qwen2.5-VL tokenizer (with its chat template) and Qwen2-VL image processor."""

    tokenizer: Any
    image_processor: Any
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id (the sampler stops at them)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the tokenizer, chat template and image processor files to ``path``."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        return path

    def encode(self, text: str, images: Sequence[Any] = ()) -> dict[str, np.ndarray]:
        """Tokenise a rendered chat ``text`` with one ``<|image_pad|>`` per image, in order.

        Returns ``input_ids`` ``[T]`` (int32) with each image's pad expanded to its merged patch
        count, and for ``images`` ``pixel_values`` ``[patches, C*2*14*14]`` (float32) and
        ``image_grid_thw`` ``[n_images, 3]`` (int64); without images these two have 0 rows.
        """
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"text has {len(pieces) - 1} {IMAGE_TOKEN} tokens but {len(images)} images were given")
        patch_dim = 3 * self.image_processor.temporal_patch_size * self.image_processor.patch_size**2
        pixel_values = np.zeros((0, patch_dim), np.float32)
        grid = np.zeros((0, 3), np.int64)
        if images:
            out = self.image_processor(images=list(images), return_tensors="np")
            pixel_values = np.asarray(out["pixel_values"], np.float32)
            grid = np.asarray(out["image_grid_thw"], np.int64).reshape(-1, 3)
        counts = grid.prod(-1) // self.image_processor.merge_size**2
        expanded = "".join(piece + IMAGE_TOKEN * int(n) for piece, n in zip(pieces, counts)) + pieces[-1]
        ids = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        return {"input_ids": np.asarray(ids, np.int32), "pixel_values": pixel_values, "image_grid_thw": grid}


def train_tokenizer(corpus: Iterable[str], config: ProcessorConfig = ProcessorConfig()):
    """Train the byte-level BPE on ``corpus`` and return a ``Qwen2Tokenizer`` (module docstring)."""
    from tokenizers import AddedToken, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Qwen2Tokenizer().backend_tokenizer  # Qwen2's normaliser, pre-tokeniser and decoder
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    bpe = json.loads(backend.to_str())["model"]
    vocab = {token: index for token, index in bpe["vocab"].items() if token != ENDOFTEXT}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("trained BPE vocabulary ids are not contiguous")
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m) for m in bpe["merges"]], model_max_length=config.model_max_length,
    )  # adds <|endoftext|> (unk/eos/pad) right after the BPE vocabulary
    tokenizer.add_special_tokens({"extra_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    if config.format_tokens:
        tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in FORMAT_TOKENS])
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    if ids != list(range(len(vocab), len(vocab) + len(QWEN_SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} do not follow the BPE vocabulary of size {len(vocab)}")
    return tokenizer


def build_processor(corpus: Iterable[str], config: ProcessorConfig = ProcessorConfig()) -> Processor:
    """Train the tokenizer on ``corpus`` and pair it with a small-image Qwen2-VL image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
    )
    image_processor.processor_class = "Qwen2_5_VLProcessor"  # as in Qwen's preprocessor_config.json
    return Processor(train_tokenizer(corpus, config), image_processor)


def processor_chat_template(path: str | Path) -> str | None:
    """The chat template a transformers processor loads from ``path`` (``chat_template.json``, else
    ``chat_template.jinja``, else ``processor_config.json``'s; the ``"default"`` one of several), or ``None``."""
    from transformers.processing_utils import ProcessorMixin

    processor_dict, _ = ProcessorMixin.get_processor_dict(str(path), local_files_only=True)
    template = processor_dict.get("chat_template")
    if isinstance(template, dict):
        template = template.get("default")
    return template


def generation_eos_ids(path: str | Path) -> tuple[int, ...]:
    """``eos_token_id`` of ``path/generation_config.json`` as a tuple (empty without the file or the key)."""
    if not (Path(path) / "generation_config.json").is_file():
        return ()
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def load_processor(path: str | Path) -> Processor:
    """Load a :class:`Processor` from a local directory (ours or a Qwen2.5-VL checkpoint), offline; a
    training checkpoint (``RUN``, ``RUN/checkpoints/STEP``) gives the processor of the run's model.

    The chat template: the processor's (:func:`processor_chat_template`), else the tokenizer's
    (``tokenizer_config.json`` / ``chat_template.jinja``); none at all is an error. ``eos_token_ids``:
    :func:`generation_eos_ids`.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from specs_jax.convert.training import checkpoint_files_dir

    path, hint = Path(path), ""
    if not (path / "tokenizer_config.json").is_file() and (recorded := checkpoint_files_dir(path)) is not None:
        path, hint = Path(os.fspath(recorded)), " (the run's model had no tokenizer files, e.g. a model preset)"
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"no {name} in processor directory {path}{hint}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    template = processor_chat_template(path)
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.chat_template is None:
        raise ValueError(f"no chat template in {path}: none in chat_template.json, chat_template.jinja, "
                         "processor_config.json or tokenizer_config.json")
    return Processor(tokenizer, image_processor, generation_eos_ids(path))


def model_token_fields(tokenizer, pad_vocab_to: int = 64) -> dict[str, int]:
    """HF ``config.json`` fields that make a (flat-layout) Qwen2.5-VL config match ``tokenizer``.

    ``vocab_size`` is ``len(tokenizer)`` rounded up to a multiple of ``pad_vocab_to`` (Qwen pads
    its embedding table the same way); ``bos_token_id`` is ``<|endoftext|>`` as in Qwen's configs.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in QWEN_SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen2.5-VL special tokens {missing}")
    ids = {token: vocab[token] for token in QWEN_SPECIAL_TOKENS}
    return {
        "vocab_size": math.ceil(len(tokenizer) / pad_vocab_to) * pad_vocab_to,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "image_token_id": ids[IMAGE_TOKEN],
        "video_token_id": ids[VIDEO_TOKEN],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
    }
