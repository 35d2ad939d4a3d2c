"""On-policy self-distillation for the RL trainer: the ``opsd`` and ``vigos`` algorithms (METHOD.md 5).

Both plug into the shared rollout loop of :mod:`specs_jax.training.rl` (rollout -> rewards ->
update) as registered :class:`~specs_jax.training.algorithm.Algorithm` s: ``reference = True`` (the
trainer passes the frozen STARTING parameters as the step's ``extra``: they are every teacher),
``system_prompt``, :meth:`spec`, :meth:`sequences`, :meth:`prepare`, :meth:`shardings`. The SPECS rewards of the
rollout are computed by the trainer for logging only; the update is pure distillation.

Contexts (all rendered with ``tokenizer.apply_chat_template`` of the student's processor, the same
system message and the same images, see :func:`render_context`):

- student: the prompt the rollout was sampled from (image(s) + question);
- OPSD teacher: image(s) + question, then the privileged text ``"Reference solution:\\n<solution>"``
  (``solution`` column, falling back to ``answer``), then a transition line, in the user turn;
- ViGOS perception teacher: the student's own context (image + question, no privileged text);
- ViGOS privileged reasoning teacher: image + question + ``"Reference answer:\\n<answer>"`` +
  transition. It does NOT get the student's description as context: the privileged part of its
  context is built from the data only. Like every teacher it is run on the student's whole
  response, so when it scores a reasoning/answer token the student's description tokens are
  in its prefix as part of the response ("on the same student prefix"); they are never copied
  into the privileged context;
- ViGOS reference teacher (invalid rollouts): image + question + a format demonstration.

The system message is recovered per prompt: the first of (the trainer's rule: ``self.system_prompt``,
or ``cfg.data.system_prompt`` when that is ``None``; then the other one; then ``None``: the
template's default) whose rendering reproduces the student's prompt tokens exactly; if none does,
:meth:`sequences` raises instead of training on mismatched contexts (the failure METHOD.md warns
about).

Position alignment (the design). ``M`` = the rollout's completion width (``max_new_tokens``),
``Tp`` = the sampler's padded prompt width, ``Tk`` = a teacher's padded context width. Every row,
student or teacher, is a LEFT-padded context followed by the ``M`` completion columns::

    student row r:  [ pad .. prompt(r)            | y_0 .. y_{M-1} ]   width Ts = Tp + M
    teacher row r:  [ pad .. teacher context(r)   | y_0 .. y_{M-1} ]   width Tt = Tk + M

so in every kind of row the completion occupies the LAST ``M`` columns, and the logits that
predict ``y_0 .. y_{M-1}`` are those at columns ``T-M-1 .. T-2`` (the last context token predicts
``y_0``). :func:`response_logits` slices the decoder's hidden states ``[b, T, E]`` to that static
window ``[b, M, E]`` before the LM head, so only ``[b, M, V]`` (float32) logits exist per model:
student and teacher logits are aligned index for index with ``mask [b, M]`` (the sampler's
completion mask: tokens up to and including the first EOS). Teacher contexts are padded to a
power-of-two width (>= 32) and each micro-batch's image patches to a power-of-two count (>= 64,
a dummy image that no token refers to), so a run compiles few step programs. Memory per
micro-batch of ``b`` rows: ``[b, M, V]`` float32 logits for the student and for each teacher
(OPSD: 2 arrays, ViGOS: 4), plus the loss's softmax temporaries of the same shape.

Batch dict of :meth:`sequences` (``R`` rows, prompt-major as the sampler returns them):
``input_ids``, ``attention_mask``, ``loss_mask`` ``[R, Ts]`` (student rows, as
:func:`~specs_jax.training.grpo.rollout_sequences` builds them), ``pixel_values``,
``image_grid_thw`` (the rows' images, repeated per sample), ``response_mask [R, M]`` (the loss
counts the response tokens where ``loss_mask`` is also set: the trainer may zero rows, e.g. by the
accuracy filter), and per teacher context ``NAME_input_ids``, ``NAME_attention_mask``
``[R, Tk + M]`` (OPSD: ``teacher``;
ViGOS: ``reasoning``, ``reference``), for ViGOS also ``teacher_index [R, M]`` (int32, see
:func:`~specs_jax.losses.vigos_teacher_index`) and ``valid [R]`` (parsed format).
:meth:`prepare` turns it into a stacked :class:`DistillBatch` ``[accum, R/accum, ...]``.

Options (``loss.kwargs``). The loss function's keyword-only arguments (``opsd_loss``:
``divergence``, ``beta``, ``temperature``, ``top_k``, ``token_clip``; ``vigos_loss``:
``weights``, ``token_clip``, ``temperature``) are passed through; ``temperature`` defaults to
``rl.temperature`` (1.0 when sampling greedily): the logits of student and teachers are divided by
the sampling temperature, as in GRPO. Algorithm options, removed before the loss sees the kwargs:

- both: ``privileged`` -- ``solution`` (the ``solution`` column, or ``answer`` where it is empty;
  OPSD default), ``answer`` (ViGOS default: METHOD.md's "reference answer") or ``none`` (no
  privileged text); ``header`` -- the line before the privileged text (default
  ``Reference solution:`` / ``Reference answer:``; empty: none); ``transition`` -- the line after
  it (default :data:`DEFAULT_TRANSITION`; empty: none).
- ViGOS: ``answer_block`` (false: ``\\boxed{}`` after ``</think>``; true: ``<answer>...</answer>``),
  ``system_prompt`` (the student's format instruction, default :func:`vigos_system_prompt`),
  ``format_demo`` (the reference teacher's demonstration, default :func:`vigos_format_demo`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from specs_jax.data.pipeline import prompt_messages
from specs_jax.data.tokenizer import IMAGE_TOKEN, Processor
from specs_jax.losses import vigos_description_end, vigos_teacher_index
from specs_jax.model import ModelConfig, ModelInputs, prepare_inputs, row_patches
from specs_jax.model.layers import dense
from specs_jax.training.algorithm import Algorithm, register_algorithm
from specs_jax.training.batches import pow2_bucket, select_images, stack_micro
from specs_jax.training.config import RunConfig
from specs_jax.training.grpo import ScoredRollout, rollout_sequences
from specs_jax.training.sharding import agree_max, batch_spec
from specs_jax.training.state import model_from_params
from specs_jax.training.steps import LossSpec, StepContext

__all__ = [
    "DEFAULT_TRANSITION",
    "OPSD",
    "DistillBatch",
    "ViGOS",
    "description_token_count",
    "render_context",
    "response_logits",
    "vigos_format_demo",
    "vigos_routing",
    "vigos_system_prompt",
]

DEFAULT_TRANSITION = "Now solve the problem yourself:"
PRIVILEGED = ("solution", "answer", "none")
HEADERS = {"solution": "Reference solution:", "answer": "Reference answer:", "none": ""}
VIGOS_NAMES = ("perception", "reasoning", "reference")


def vigos_system_prompt(answer_block: bool = False) -> str:
    """The ViGOS student's format instruction (its system message)."""
    answer = ("then give the final answer between <answer> and </answer>" if answer_block
              else "then give the final answer as \\boxed{answer}")
    return ("You are a helpful assistant. First describe the image between <description> and </description>, "
            f"then reason step by step between <think> and </think>, {answer}.")


def vigos_format_demo(answer_block: bool = False) -> str:
    """The reference teacher's format demonstration (appended to the question in its context)."""
    answer = "<answer>2</answer>" if answer_block else "\\boxed{2}"
    return ("Respond in exactly this format, for example:\n"
            "<description>The image shows two blue squares and a green triangle.</description>\n"
            f"<think>The question asks for the squares. I count two of them.</think>\n{answer}")


class DistillBatch(NamedTuple):
    """A (micro-)batch of distillation rows; stacked for a step, each leaf gets a leading axis.

    ``student``: prompt + response rows ``[b, Ts]`` with the rows' images. ``teachers``: one
    :class:`ModelInputs` ``[b, Tk + M]`` per teacher context (OPSD: the privileged teacher; ViGOS:
    the reasoning and the reference teachers; the perception teacher reads ``student``), with
    ``vision=None``: their rows show the student rows' images, taken from ``student.vision``.
    ``mask``: ``[b, M]`` float32, 1 on the response tokens. ``index``: ViGOS ``[b, M]`` int32
    teacher index, ``None`` for OPSD. The response is in the last ``M`` columns of every row.
    """

    student: ModelInputs
    teachers: tuple[ModelInputs, ...]
    mask: np.ndarray
    index: np.ndarray | None = None


def response_logits(model: nnx.Module, inputs: ModelInputs, length: int) -> jax.Array:
    """``[b, length, V]`` float32 logits predicting the last ``length`` tokens of each row.

    The decoder runs on the whole row; its hidden states are sliced to the columns
    ``T - length - 1 .. T - 2`` BEFORE the LM head, so no logits exist over the context.
    """
    hidden = model.hidden_states(inputs)
    t = hidden.shape[1]
    window = hidden[:, t - length - 1: t - 1]
    weight = model.lm_head_weight().astype(window.dtype)
    return dense(window, weight, preferred_element_type=jnp.float32)


def render_context(processor: Processor, user_text: str, image_tokens: Sequence[int],
                   system_prompt: str | None) -> np.ndarray:
    """Token ids ``[T]`` of a chat prompt: ``apply_chat_template`` of :func:`prompt_messages`
    (optional system message, one user turn with the images first, then ``user_text``) with the
    assistant header, each image's ``<|image_pad|>`` expanded to ``image_tokens[i]`` copies
    (what :meth:`Processor.encode` does, without re-processing the images)."""
    tokenizer = processor.tokenizer
    text = tokenizer.apply_chat_template(prompt_messages(user_text, len(image_tokens), system_prompt),
                                         add_generation_prompt=True, tokenize=False)
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"rendered prompt has {len(pieces) - 1} {IMAGE_TOKEN} tokens for {len(image_tokens)} images")
    expanded = "".join(p + IMAGE_TOKEN * int(n) for p, n in zip(pieces, image_tokens)) + pieces[-1]
    return np.asarray(tokenizer(expanded, add_special_tokens=False)["input_ids"], np.int32)


def description_token_count(decode, ids: Sequence[int], end: int) -> int:
    """Number of leading tokens of ``ids`` that start before character ``end`` of ``decode(ids)``.

    Token ``t`` starts at ``len(decode(ids[:t]))`` (monotone in ``t``), so this is the smallest
    ``t >= 1`` with ``len(decode(ids[:t])) >= end``: a binary search, ``O(log T)`` decodes.
    """
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo


def vigos_routing(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray,
                  answer_block: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(teacher_index [R, M] int32, valid [R] bool)`` of sampled responses.

    Each row's response (``tokens[r][mask[r]]``, decoded without special tokens) is parsed with
    :func:`~specs_jax.losses.vigos_description_end`; the tokens starting before the end of
    ``</description>`` of a valid row go to the perception teacher, the later ones (EOS included)
    to the reasoning teacher, every token of an invalid row to the reference teacher
    (:func:`~specs_jax.losses.vigos_teacher_index`). The character start of each token is found
    only where it matters: ``starts`` holds 0 for the description tokens and the description end
    for the others, which :func:`vigos_teacher_index` compares exactly as it would the true offsets.
    """
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    starts = np.zeros(tokens.shape, np.int64)
    ends: list[int | None] = []
    for r in range(len(tokens)):
        ids = tokens[r][np.asarray(mask[r]).astype(bool)].tolist()
        end = vigos_description_end(decode(ids), answer_block=answer_block) if ids else None
        ends.append(end)
        if end is not None:
            n = description_token_count(decode, ids, end)
            starts[r] = np.where(np.arange(tokens.shape[1]) < n, 0, end)
    return vigos_teacher_index(starts, ends), np.array([e is not None for e in ends])


def _rows_of(batch: Mapping[str, Any], key: str, n: int) -> list:
    value = batch.get(key)
    return [None] * n if value is None else list(value)


class _Distill(Algorithm):
    """Shared machinery of :class:`OPSD` and :class:`ViGOS` (module docstring)."""

    data = "rl"
    internal = ("num_items_in_batch",)
    batch_unit = "prompts"
    summary_metric = "reward/mean"
    teacher_names: tuple[str, ...] = ()

    def __init__(self, cfg: RunConfig, graphdef: nnx.GraphDef, model_cfg: ModelConfig, processor: Processor):
        super().__init__(cfg, graphdef, model_cfg, processor)
        kwargs = self.loss_kwargs
        if "temperature" not in kwargs:
            kwargs["temperature"] = cfg.rl.temperature if cfg.rl.temperature > 0 else 1.0
        if isinstance(kwargs.get("weights"), list):
            kwargs["weights"] = tuple(kwargs["weights"])
        if self.options["privileged"] not in PRIVILEGED:
            raise ValueError(f"loss.kwargs.privileged must be one of {list(PRIVILEGED)}, got "
                             f"{self.options['privileged']!r}")
        if self.options["header"] is None:
            self.options["header"] = HEADERS[self.options["privileged"]]
        self.pad_id = processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = processor.tokenizer.eos_token_id

    @property
    def reference(self) -> bool:
        return True  # the frozen starting parameters are every teacher

    # ------------------------------------------------------------------ contexts
    def privileged_text(self, question: str, answer: str | None, solution: str | None) -> str:
        """The user text of the privileged teacher: question, header + reference, transition."""
        kind = self.options["privileged"]
        reference = {"solution": solution or answer, "answer": answer, "none": None}[kind] or ""
        parts = [question]
        if reference.strip():
            header = self.options["header"]
            parts.append(f"{header}\n{reference}" if header else reference)
        if self.options["transition"]:
            parts.append(self.options["transition"])
        return "\n\n".join(parts)

    def teacher_texts(self, question: str, answer: str | None, solution: str | None) -> dict[str, str]:
        """User text of each teacher context, by name (:attr:`teacher_names`)."""
        raise NotImplementedError

    def _image_tokens(self, prompts: Mapping[str, Any], b: int) -> list[int]:
        _, grid = select_images(self.model_cfg, prompts, np.array([b]))
        if grid is None:
            return []
        return [int(n) for n in np.asarray(grid).prod(-1) // self.model_cfg.vision.spatial_merge_size**2]

    def _student_system(self, student_ids: np.ndarray, question: str, image_tokens: list[int]) -> str | None:
        own = self.cfg.data.system_prompt if self.system_prompt is None else self.system_prompt  # the trainer's rule
        candidates = []
        for s in (own, self.system_prompt, self.cfg.data.system_prompt, None):
            if s not in candidates:
                candidates.append(s)
        for s in candidates:
            if np.array_equal(render_context(self.processor, question, image_tokens, s), student_ids):
                return s
        raise ValueError(
            f"{self.kind}: the student's prompt tokens are not the chat template's rendering of its question with any "
            f"of the system prompts {candidates}; the teacher contexts must come from the same template as the "
            f"student's. Student prompt: {self.processor.tokenizer.decode(student_ids)!r}")

    def _context_rows(self, contexts: list[np.ndarray], gen) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad one context per row to a power-of-two width (the same on every process) and append the
        completion columns."""
        (longest,) = agree_max(max(len(c) for c in contexts))
        width = pow2_bucket(longest, 32)
        ids = np.full((len(contexts), width), self.pad_id, np.int32)
        attn = np.zeros((len(contexts), width), np.int32)
        for r, c in enumerate(contexts):
            ids[r, width - len(c):], attn[r, width - len(c):] = c, 1
        return (np.concatenate([ids, np.asarray(gen.tokens, np.int32)], 1),
                np.concatenate([attn, np.asarray(gen.mask, np.int32)], 1))

    def sequences(self, prompts: Mapping[str, Any], ro: ScoredRollout) -> dict:
        """Host batch dict of one update (module docstring): student rows, teacher rows, masks."""
        gen = ro.generation
        n_prompts, n_rows = len(prompts["input_ids"]), len(gen.tokens)
        if n_rows % n_prompts:
            raise ValueError(f"{n_rows} rollout rows are not a whole number of samples of {n_prompts} prompts")
        group = n_rows // n_prompts
        out = rollout_sequences(self.model_cfg, prompts, ro, group)
        out.pop("old_logps"), out.pop("advantages")
        out["response_mask"] = np.asarray(gen.mask, np.int32)
        questions = list(prompts["question"])
        answers = _rows_of(prompts, "answer", n_prompts)
        solutions = _rows_of(prompts, "solution", n_prompts)
        contexts: dict[str, list[np.ndarray]] = {name: [] for name in self.teacher_names}
        for b in range(n_prompts):
            r = b * group
            student = np.asarray(gen.prompt_ids[r])[np.asarray(gen.prompt_mask[r]).astype(bool)]
            image_tokens = self._image_tokens(prompts, b)
            system = self._student_system(student, questions[b], image_tokens)
            texts = self.teacher_texts(questions[b], answers[b], solutions[b])
            for name in self.teacher_names:
                ids = render_context(self.processor, texts[name], image_tokens, system)
                contexts[name] += [ids] * group
        for name in self.teacher_names:
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = self._context_rows(contexts[name], gen)
        return out

    # ------------------------------------------------------------------ step inputs
    def prepare(self, seqs: Mapping[str, Any], accum: int) -> DistillBatch:
        """Batch dict -> :class:`DistillBatch` stacked ``[accum, R/accum, ...]``; every row's image patches padded
        to one power-of-two budget that all processes agree on."""
        n_rows = len(seqs["input_ids"])
        if n_rows % accum:
            raise ValueError(f"batch of {n_rows} rollout rows is not divisible by grad_accum_steps={accum}")
        splits = np.split(np.arange(n_rows), accum)
        images = [select_images(self.model_cfg, seqs, rows) for rows in splits]
        counts = row_patches(self.model_cfg, seqs["input_ids"], seqs["attention_mask"], seqs.get("image_grid_thw"))
        (most,) = agree_max(counts.max(initial=0))  # one patch budget per row for every process
        patches = pow2_bucket(most) if most else None
        parts = []
        for rows, (pixels, grid) in zip(splits, images):
            # teacher rows show the same images as their student rows: positions from them, vision from the student
            teachers = tuple(
                prepare_inputs(self.model_cfg, seqs[f"{name}_input_ids"][rows], seqs[f"{name}_attention_mask"][rows],
                               pixels, grid)._replace(vision=None)
                for name in self.teacher_names)
            if patches is not None and pixels is None:  # a micro-batch without images among ones with: padding only
                pixels = np.zeros((0, self.model_cfg.vision.patch_dim), np.float32)
                grid = np.zeros((0, 3), np.int64)
            student = prepare_inputs(self.model_cfg, seqs["input_ids"][rows], seqs["attention_mask"][rows], pixels,
                                     grid, patch_bucket=patches, image_rows_only=False)
            index = None if "teacher_index" not in seqs else np.asarray(seqs["teacher_index"][rows], np.int32)
            response = np.asarray(seqs["response_mask"][rows]) > 0
            # the trainer may zero rows of loss_mask (e.g. the accuracy filter): those tokens do not count
            counted = np.asarray(seqs["loss_mask"][rows])[:, -response.shape[1]:] > 0
            parts.append(DistillBatch(student, teachers, (response & counted).astype(np.float32), index))
        return stack_micro(parts)

    def shardings(self, prepared: DistillBatch, mesh: Mesh) -> DistillBatch:
        """Rows (axis 1; axis 2 of positions ``[A, 3, b, T]``) over ``(data, fsdp)``, the rows' images with them."""
        n, p = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
        if (prepared.mask.shape[1] * p) % n:
            raise ValueError(f"micro-batch of {prepared.mask.shape[1]} rows per process x {p} process(es) is not "
                             f"divisible by the data x fsdp mesh size {n}")
        def rows(axis: int, x) -> NamedSharding:
            return NamedSharding(mesh, batch_spec(x.ndim, axis))

        def inputs(x: ModelInputs) -> ModelInputs:
            vision = None if x.vision is None else jax.tree.map(lambda v: rows(1, v), x.vision)
            return ModelInputs(rows(1, x.input_ids), rows(2, x.positions), rows(1, x.attention_mask), vision)

        return DistillBatch(inputs(prepared.student), tuple(inputs(t) for t in prepared.teachers),
                            rows(1, prepared.mask), None if prepared.index is None else rows(1, prepared.index))

    # ------------------------------------------------------------------ loss
    def _teacher(self, ctx: StepContext) -> nnx.Module:
        if ctx.extra is None:
            raise ValueError(f"{self.kind} needs the frozen starting parameters (the teacher) as the step's extra")
        return model_from_params(self.graphdef, ctx.extra)

    @staticmethod
    def _teacher_logits(teacher: nnx.Module, inputs: ModelInputs, micro: DistillBatch) -> jax.Array:
        inputs = inputs._replace(vision=micro.student.vision)
        return jax.lax.stop_gradient(response_logits(teacher, inputs, micro.mask.shape[1]))


@register_algorithm("opsd")
class OPSD(_Distill):
    """OPSD: the frozen start model, given the reference solution and a transition line in its
    context, teaches the student on the student's own response (``opsd_loss``, module docstring).
    Step metrics: ``divergence`` (token mean, unclipped), ``clip_fraction`` (with ``token_clip``),
    ``tokens``."""

    default_loss = "opsd"
    loss_inputs = ("student_logits", "teacher_logits", "mask")
    teacher_names = ("teacher",)
    algo_options: ClassVar[dict[str, Any]] = {"privileged": "solution", "header": None, "transition": DEFAULT_TRANSITION}

    def teacher_texts(self, question, answer, solution):
        return {"teacher": self.privileged_text(question, answer, solution)}

    def spec(self) -> LossSpec:
        """Token mean of the per-token divergence over the whole batch: each micro-batch adds its
        token sum divided by the batch's response-token count."""

        def totals(batch: DistillBatch) -> dict[str, jax.Array]:
            return {"tokens": jnp.sum(batch.mask)}

        def micro_loss(model, micro: DistillBatch, ctx: StepContext):
            teacher_model = self._teacher(ctx)
            student = response_logits(model, micro.student, micro.mask.shape[1])
            teacher = self._teacher_logits(teacher_model, micro.teachers[0], micro)
            total = jnp.maximum(ctx.totals["tokens"], 1.0)
            loss, metrics = self.loss_fn(student, teacher, micro.mask, num_items_in_batch=total, **self.loss_kwargs)
            share = jnp.sum(micro.mask) / total
            return loss, {**{k: share * v for k, v in metrics.items()}, "tokens": jnp.sum(micro.mask)}

        return LossSpec(totals, micro_loss)


@register_algorithm("vigos")
class ViGOS(_Distill):
    """ViGOS: three teachers (perception, privileged reasoning, reference; all the frozen start
    model, differing only in context) routed per token by the parse of the student's response
    (``vigos_loss``, module docstring). Step metrics: ``divergence``, ``clip_fraction``,
    ``divergence/{perception,reasoning,reference}`` (mean over the tokens routed there),
    ``tokens/{...}`` (share of the response tokens routed there), ``tokens``."""

    default_loss = "vigos"
    loss_inputs = ("student_logits", "teacher_logits", "teacher_index", "mask")
    teacher_names = ("reasoning", "reference")
    extra_forwards = 3  # perception (the student's own context), reasoning and reference teachers
    algo_options: ClassVar[dict[str, Any]] = {"privileged": "answer", "header": None, "transition": DEFAULT_TRANSITION,
                     "answer_block": False, "system_prompt": None, "format_demo": None}

    def __init__(self, cfg: RunConfig, graphdef: nnx.GraphDef, model_cfg: ModelConfig, processor: Processor):
        super().__init__(cfg, graphdef, model_cfg, processor)
        block = bool(self.options["answer_block"])
        self.system_prompt = self.options["system_prompt"] or vigos_system_prompt(block)
        if self.options["format_demo"] is None:
            self.options["format_demo"] = vigos_format_demo(block)

    def teacher_texts(self, question, answer, solution):
        return {"reasoning": self.privileged_text(question, answer, solution),
                "reference": f"{question}\n\n{self.options['format_demo']}"}

    def sequences(self, prompts: Mapping[str, Any], ro: ScoredRollout) -> dict:
        out = super().sequences(prompts, ro)
        gen = ro.generation
        out["teacher_index"], out["valid"] = vigos_routing(self.processor.tokenizer, np.asarray(gen.tokens),
                                                           np.asarray(gen.mask), bool(self.options["answer_block"]))
        return out

    def spec(self) -> LossSpec:
        """Token mean over the whole batch of the routed, weighted, clipped divergences; per-teacher
        metrics are weighted by each micro-batch's share of that teacher's tokens."""

        def routed(mask, index, k):
            return mask * (index == k).astype(mask.dtype)

        def totals(batch: DistillBatch) -> dict[str, jax.Array]:
            out = {"tokens": jnp.sum(batch.mask)}
            for k, name in enumerate(VIGOS_NAMES):
                out[f"tokens/{name}"] = jnp.sum(routed(batch.mask, batch.index, k))
            return out

        def micro_loss(model, micro: DistillBatch, ctx: StepContext):
            teacher_model = self._teacher(ctx)
            student = response_logits(model, micro.student, micro.mask.shape[1])
            perception = jax.lax.stop_gradient(response_logits(teacher_model, micro.student, micro.mask.shape[1]))
            reasoning, reference = (self._teacher_logits(teacher_model, t, micro) for t in micro.teachers)
            teachers = jnp.stack([perception, reasoning, reference])
            total = jnp.maximum(ctx.totals["tokens"], 1.0)
            loss, metrics = self.loss_fn(student, teachers, micro.index, micro.mask, num_items_in_batch=total,
                                         **self.loss_kwargs)
            n = jnp.sum(micro.mask)
            out = {"tokens": n}
            for key, value in metrics.items():
                name = key.partition("/")[2]
                if key.startswith("divergence/"):  # mean over this teacher's tokens
                    k = VIGOS_NAMES.index(name)
                    weight = jnp.sum(routed(micro.mask, micro.index, k)) / jnp.maximum(ctx.totals[f"tokens/{name}"], 1.0)
                else:  # token means and token shares
                    weight = n / total
                out[key] = weight * value
            return loss, out

        return LossSpec(totals, micro_loss)

