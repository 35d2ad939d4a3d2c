"""OPSD and ViGOS algorithms of the RL trainer: teacher contexts, position alignment, routing, learning.

Rollouts are built from known texts (no sampling), on a tiny random model with a real processor
(locally trained BPE + Qwen2.5-VL chat template), so every check is deterministic.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from specs_jax.convert.io import abstract_model
from specs_jax.data.pipeline import Columns, DataConfig, collate, featurize
from specs_jax.data.tokenizer import (
    ProcessorConfig,
    build_processor,
    model_token_fields,
)
from specs_jax.losses import (
    VIGOS_PERCEPTION,
    VIGOS_REASONING,
    VIGOS_REFERENCE,
    opsd_loss,
    vigos_loss,
)
from specs_jax.model import from_hf_dict, load_preset
from specs_jax.sampling import Generation
from specs_jax.training.algorithm import get_algorithm
from specs_jax.training.config import from_dict, load_config
from specs_jax.training.distill import (
    OPSD,
    DistillBatch,
    ViGOS,
    vigos_routing,
)
from specs_jax.training.grpo import ScoredRollout
from specs_jax.training.sharding import make_mesh, make_rules
from specs_jax.training.state import create_state, model_from_params, state_shardings
from specs_jax.training.steps import StepContext, make_train_step

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SOLUTION_0 = "I count the red circles one by one and find 3 of them. \\boxed{3}"
SOLUTION_1 = "Adding 4 and 5 gives 9. \\boxed{9}"
VALID_0 = "<description>three red circles</description><think>count them: there are 3</think>\\boxed{3}"
VALID_1 = "<description>the numbers 4 and 5</description><think>4 + 5 = 9</think>\\boxed{9}"
INVALID_0 = "count them: there are 3 \\boxed{3}"
INVALID_1 = "<think>4 + 5 = 9</think> the answer is 9"
CORPUS = ["How many red circles are there?", "Add the numbers 4 and 5.", SOLUTION_0, SOLUTION_1, VALID_0, VALID_1,
          "Reference solution: Now solve the problem yourself:"] * 10
M = 32  # completion width (max_new_tokens)
GROUP = 2


@pytest.fixture(scope="module")
def processor():
    return build_processor(CORPUS, ProcessorConfig(vocab_size=300))


def numpy_model(cfg, seed: int):
    """A model filled from numpy (eager NNX initialisation takes seconds): N(0, 0.1) weights (large
    enough that the context changes the next-token distributions clearly), zero biases, unit norms."""
    graphdef, state = nnx.split(abstract_model(cfg))
    rs = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if "norm" in name or "ln_q" in name:
            var.set_value(np.ones(var.shape, np.float32))
        elif name.endswith("bias"):
            var.set_value(np.zeros(var.shape, np.float32))
        else:
            var.set_value(0.1 * rs.randn(*var.shape).astype(np.float32))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model(processor):
    return numpy_model(from_hf_dict({**load_preset("tiny").hf_config, **model_token_fields(processor.tokenizer)}), 0)


@pytest.fixture(scope="module")
def teacher_model(model):
    """A second model of the same structure: a teacher that is not the student."""
    return numpy_model(model.config, 1)


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def prompt_batch(processor, system: str | None = None, image: bool = True) -> dict:
    """Two RL prompts as ``rl_batches`` makes them: the first with an image (unless ``image=False``:
    smaller step programs to compile), the second text-only."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8))
    rows = [{"question": "How many red circles are there?", "image": [picture] if image else None, "answer": "3",
             "solution": SOLUTION_0},
            {"question": "Add the numbers 4 and 5.", "image": None, "answer": "9", "solution": SOLUTION_1}]
    config = DataConfig(columns=Columns(solution="solution"), buckets=(64, 128, 256), system_prompt=system)
    features = [featurize(row, i, "rl", processor, config) for i, row in enumerate(rows)]
    return collate(features, "rl", config.buckets, processor.tokenizer.pad_token_id)


def fake_rollout(processor, prompts: dict, texts: list[str]) -> ScoredRollout:
    """A rollout whose completions are ``texts`` (+ EOS), rows prompt-major, prompts re-padded on the
    left to the sampler's bucket width, as ``Sampler.generate_ids`` returns them."""
    tok = processor.tokenizer
    pad = tok.pad_token_id
    tokens, mask = np.full((len(texts), M), pad, np.int32), np.zeros((len(texts), M), bool)
    for r, text in enumerate(texts):
        ids = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"][:M]
        tokens[r, :len(ids)], mask[r, :len(ids)] = ids, True
    b = len(prompts["input_ids"])
    prompt_width = 1 << (int(prompts["attention_mask"].sum(1).max()) - 1).bit_length()  # the sampler's bucket
    pid, pmask = np.full((b, prompt_width), pad, np.int32), np.zeros((b, prompt_width), bool)
    for i in range(b):
        real = prompts["input_ids"][i][prompts["attention_mask"][i] > 0]
        pid[i, prompt_width - len(real):], pmask[i, prompt_width - len(real):] = real, True
    group = len(texts) // b
    gen = Generation(tokens, np.zeros(tokens.shape, np.float32), mask, list(texts), None,
                     np.repeat(pid, group, 0), np.repeat(pmask, group, 0))
    return ScoredRollout(gen, np.zeros(len(texts), np.float32), np.zeros(len(texts), np.float32))


def run_config(kind: str, **kwargs):
    return from_dict({"loss": {"name": kind, "kwargs": kwargs}, "rl": {"group_size": GROUP, "temperature": 1.0}})


def micro_batches(prepared) -> list:
    return [jax.tree.map(lambda x, a=a: x[a], prepared) for a in range(prepared.mask.shape[0])]


def micro_losses(algo, graphdef, params, prepared, extra, grad: bool = False):
    """The spec's contribution (and metrics) of each micro-batch, summed; optionally the gradient."""
    spec = algo.spec()
    totals = spec.totals(prepared)

    def contribution(p, micro):
        ctx = StepContext(totals, extra, jax.random.key(0))
        return spec.micro_loss(model_from_params(graphdef, p), micro, ctx)

    fn = jax.jit(jax.value_and_grad(contribution, has_aux=True) if grad else contribution)
    loss, metrics, grads = 0.0, {}, None
    for micro in micro_batches(prepared):
        out = fn(params, micro)
        (l, m), g = out if grad else (out, None)
        loss += float(l)
        metrics = {k: metrics.get(k, 0.0) + float(v) for k, v in m.items()}
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    return loss, metrics, grads


def completion_logits(model, ids, mask, seqs) -> np.ndarray:
    """Independent path: the model's full transformers-style forward, then the completion window
    (the prompt width is the row width minus M; the logit at column w-1 predicts token w)."""
    logits = np.asarray(model(ids, mask, seqs["pixel_values"], seqs["image_grid_thw"]))
    width = ids.shape[1] - M
    return logits[:, width - 1: width - 1 + M]


# ---------------------------------------------------------------------------------------- OPSD

def test_opsd_teacher_rows_hold_the_solution_and_the_same_completion(processor, model):
    algo = OPSD(run_config("opsd"), nnx.graphdef(model), model.config, processor)
    prompts = prompt_batch(processor)
    ro = fake_rollout(processor, prompts, [VALID_0, INVALID_0, VALID_1, INVALID_1])
    seqs = algo.sequences(prompts, ro)
    tok = processor.tokenizer
    gen = ro.generation
    width = seqs["teacher_input_ids"].shape[1] - M
    assert width >= 32 and width & (width - 1) == 0  # a power-of-two context width
    # the completion columns of student and teacher rows are the sampled tokens, attended where sampled
    np.testing.assert_array_equal(seqs["teacher_input_ids"][:, -M:], gen.tokens)
    np.testing.assert_array_equal(seqs["input_ids"][:, -M:], gen.tokens)
    np.testing.assert_array_equal(seqs["teacher_attention_mask"][:, -M:], gen.mask)
    np.testing.assert_array_equal(seqs["response_mask"], gen.mask)
    solutions = [SOLUTION_0, SOLUTION_0, SOLUTION_1, SOLUTION_1]
    for r in range(4):
        student = tok.decode(seqs["input_ids"][r, :-M][seqs["attention_mask"][r, :-M] > 0])
        teacher = tok.decode(seqs["teacher_input_ids"][r, :-M][seqs["teacher_attention_mask"][r, :-M] > 0])
        assert solutions[r] in teacher and solutions[r] not in student
        assert "Reference solution:" in teacher and teacher.rstrip().endswith(
            "Now solve the problem yourself:<|im_end|>\n<|im_start|>assistant")
        # same template, same system message, same images: the contexts agree up to the question's end
        question = "How many red circles are there?" if r < 2 else "Add the numbers 4 and 5."
        cut = student.index(question) + len(question)
        assert teacher[:cut] == student[:cut] and teacher.startswith("<|im_start|>system\nYou are a helpful assistant.")
        assert student.count("<|image_pad|>") == teacher.count("<|image_pad|>") == (4 if r < 2 else 0)

    # rows whose loss_mask the trainer zeroed (e.g. the accuracy filter) do not count
    seqs["loss_mask"][:2] = 0
    prepared = algo.prepare(seqs, 2)
    assert prepared.mask[0].sum() == 0 and prepared.mask[1].sum() == gen.mask[2:].sum()

    # falls back to the answer without a solution column
    no_solution = dict(prompts, solution=[None, None])
    teacher = tok.decode(algo.sequences(no_solution, ro)["teacher_input_ids"][0])
    assert "Reference solution:\n3\n\nNow solve" in teacher

    # a student prompt that the template cannot reproduce (unknown system prompt) is refused
    with pytest.raises(ValueError, match="same template"):
        terse = prompt_batch(processor, system="Be terse.")
        algo.sequences(terse, fake_rollout(processor, terse, [VALID_0, INVALID_0, VALID_1, INVALID_1]))


def test_opsd_loss_and_gradient_vanish_when_the_teacher_sees_the_student_context(processor, model):
    """With no privileged text and no transition the teacher's context is the student's; at the start
    (student = frozen teacher) the divergence is 0 and so is its gradient."""
    graphdef, params = nnx.graphdef(model), params_of(model)
    prompts = prompt_batch(processor, image=False)
    ro = fake_rollout(processor, prompts, [VALID_0, INVALID_0, VALID_1, INVALID_1])
    same = OPSD(run_config("opsd", privileged="none", transition="", divergence="jsd", beta=0.5), graphdef,
                model.config, processor)
    seqs = same.sequences(prompts, ro)
    student_ctx = [seqs["input_ids"][r][seqs["attention_mask"][r] > 0] for r in range(4)]
    teacher_ctx = [seqs["teacher_input_ids"][r][seqs["teacher_attention_mask"][r] > 0] for r in range(4)]
    for s, t in zip(student_ctx, teacher_ctx):
        np.testing.assert_array_equal(s, t)
    loss, metrics, grads = micro_losses(same, graphdef, params, same.prepare(seqs, 1), params, grad=True)
    assert abs(loss) < 1e-6 and abs(metrics["divergence"]) < 1e-6
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
    # (with the privileged solution in its context the same start model disagrees with itself: the
    # first loss of test_opsd_train_steps_reduce_the_divergence)


def test_opsd_spec_equals_a_direct_full_forward_computation(processor, model, teacher_model):
    """Sum of the micro-batch contributions (2 micro-batches: one with the image, one text-only) ==
    opsd_loss on the completion slices of the model's full logits (student) and of a different
    model's logits on the teacher rows."""
    graphdef = nnx.graphdef(model)
    kwargs = {"divergence": "jsd", "beta": 0.5, "temperature": 1.1, "token_clip": 0.5}
    algo = OPSD(run_config("opsd", **kwargs), graphdef, model.config, processor)
    prompts = prompt_batch(processor)
    ro = fake_rollout(processor, prompts, [VALID_0, INVALID_0, VALID_1, INVALID_1])
    seqs = algo.sequences(prompts, ro)
    prepared = algo.prepare(seqs, 2)
    assert isinstance(prepared, DistillBatch) and prepared.mask.shape == (2, 2, M)
    assert prepared.student.vision.pixel_values.shape[:3] == (2, 2, 64)  # every row padded to one patch budget
    loss, metrics, _ = micro_losses(algo, graphdef, params_of(model), prepared, params_of(teacher_model))

    student = completion_logits(model, seqs["input_ids"], seqs["attention_mask"], seqs)
    teacher = completion_logits(teacher_model, seqs["teacher_input_ids"], seqs["teacher_attention_mask"], seqs)
    expected, exp_metrics = opsd_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(ro.generation.mask),
                                      **kwargs)
    assert float(expected) > 1e-3
    np.testing.assert_allclose(loss, float(expected), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["divergence"], float(exp_metrics["divergence"]), rtol=2e-4)
    np.testing.assert_allclose(metrics["clip_fraction"], float(exp_metrics["clip_fraction"]), atol=1e-6)
    assert metrics["tokens"] == ro.generation.mask.sum()


def test_opsd_train_steps_reduce_the_divergence(processor, model):
    graphdef = nnx.graphdef(model)
    algo = OPSD(run_config("opsd", divergence="jsd", beta=0.5), graphdef, model.config, processor)
    prompts = prompt_batch(processor, image=False)
    ro = fake_rollout(processor, prompts, [VALID_0, INVALID_0, VALID_1, INVALID_1])
    prepared = algo.prepare(algo.sequences(prompts, ro), 2)
    mesh = make_mesh(1, 1, 1)
    tx = optax.adam(1e-3)
    shardings = state_shardings(model, tx, False, mesh, make_rules())
    state = create_state(model, tx, shardings, False, seed=0)
    extra = jax.device_put(params_of(model), shardings.params)  # the frozen start model
    batch_sh = algo.shardings(prepared, mesh)
    step = make_train_step(graphdef, algo.spec(), tx, optax.constant_schedule(1e-3), shardings, batch_sh,
                           shardings.params)
    batch = jax.device_put(prepared, batch_sh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, extra)
        losses.append(float(metrics["loss"]))
    print("opsd loss per step", losses)
    assert losses[0] > 1e-2  # the privileged context changes the start model's predictions
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------- ViGOS

def vigos_setup(processor, model, **kwargs):
    algo = ViGOS(run_config("vigos", **kwargs), nnx.graphdef(model), model.config, processor)
    prompts = prompt_batch(processor, system=algo.system_prompt)  # the trainer tokenises with it
    ro = fake_rollout(processor, prompts, [VALID_0, INVALID_0, VALID_1, INVALID_1])
    return algo, prompts, ro, algo.sequences(prompts, ro)


def test_vigos_routes_description_reasoning_and_invalid_tokens(processor, model):
    algo, prompts, ro, seqs = vigos_setup(processor, model)
    tok = processor.tokenizer
    gen = ro.generation
    np.testing.assert_array_equal(seqs["valid"], [True, False, True, False])
    index = seqs["teacher_index"]
    for r, (text, description) in enumerate([(VALID_0, "three red circles"), (None, None),
                                             (VALID_1, "the numbers 4 and 5"), (None, None)]):
        ids = gen.tokens[r][gen.mask[r]]
        routed = index[r][gen.mask[r]]
        if text is None:  # invalid rollout: every token to the reference teacher
            assert (routed == VIGOS_REFERENCE).all()
            continue
        n = int((routed == VIGOS_PERCEPTION).sum())
        assert (routed[:n] == VIGOS_PERCEPTION).all() and (routed[n:] == VIGOS_REASONING).all()
        assert tok.decode(ids[:n]) == f"<description>{description}</description>"
        assert tok.decode(ids[n:]).startswith("<think>") and tok.decode(ids[n:]).endswith("<|im_end|>")

    # contexts: perception = the student's prompt; reasoning = question + reference answer, without the
    # student's description; reference = question + format demonstration; all with the student's system message
    student = tok.decode(seqs["input_ids"][0, :-M][seqs["attention_mask"][0, :-M] > 0])
    reasoning = tok.decode(seqs["reasoning_input_ids"][0, :-M][seqs["reasoning_attention_mask"][0, :-M] > 0])
    reference = tok.decode(seqs["reference_input_ids"][0, :-M][seqs["reference_attention_mask"][0, :-M] > 0])
    for context in (student, reasoning, reference):
        assert context.startswith(f"<|im_start|>system\n{algo.system_prompt}<|im_end|>")
        assert context.count("<|image_pad|>") == 4 and "three red circles" not in context
    assert "Reference answer:\n3\n\nNow solve the problem yourself:" in reasoning and SOLUTION_0 not in reasoning
    assert "Respond in exactly this format" in reference and "Reference answer" not in reference
    assert "Reference answer" not in student and "Respond in exactly" not in student
    for name in ("reasoning", "reference"):
        np.testing.assert_array_equal(seqs[f"{name}_input_ids"][:, -M:], gen.tokens)

    # with the <answer> block option a \boxed{} answer after </think> is a broken format
    block = ViGOS(run_config("vigos", answer_block=True), nnx.graphdef(model), model.config, processor)
    assert "<answer>" in block.system_prompt
    answer_ro = fake_rollout(processor, prompts, [VALID_0, VALID_0.replace("\\boxed{3}", "<answer>3</answer>")] * 2)
    index, valid = vigos_routing(tok, answer_ro.generation.tokens, answer_ro.generation.mask, answer_block=True)
    np.testing.assert_array_equal(valid, [False, True, False, True])
    assert (index[0] == VIGOS_REFERENCE).all() and (index[1][:3] == VIGOS_PERCEPTION).all()


def test_vigos_spec_equals_a_direct_three_teacher_computation(processor, model, teacher_model):
    graphdef = nnx.graphdef(model)
    algo, _, ro, seqs = vigos_setup(processor, model, temperature=1.1)
    prepared = algo.prepare(seqs, 2)
    loss, metrics, _ = micro_losses(algo, graphdef, params_of(model), prepared, params_of(teacher_model))

    student = completion_logits(model, seqs["input_ids"], seqs["attention_mask"], seqs)
    teachers = np.stack([
        completion_logits(teacher_model, seqs["input_ids"], seqs["attention_mask"], seqs),  # perception
        completion_logits(teacher_model, seqs["reasoning_input_ids"], seqs["reasoning_attention_mask"], seqs),
        completion_logits(teacher_model, seqs["reference_input_ids"], seqs["reference_attention_mask"], seqs),
    ])
    mask = ro.generation.mask
    expected, exp_metrics = vigos_loss(jnp.asarray(student), jnp.asarray(teachers), jnp.asarray(seqs["teacher_index"]),
                                       jnp.asarray(mask), temperature=1.1)  # weights 1, 1, 2, clip 0.05
    assert float(expected) > 1e-3
    np.testing.assert_allclose(loss, float(expected), rtol=2e-4, atol=1e-6)
    for key in ("divergence", "clip_fraction", "divergence/perception", "divergence/reasoning",
                "divergence/reference", "tokens/perception", "tokens/reasoning", "tokens/reference"):
        np.testing.assert_allclose(metrics[key], float(exp_metrics[key]), rtol=2e-4, atol=1e-6, err_msg=key)
    invalid_tokens = mask[~seqs["valid"]].sum()
    np.testing.assert_allclose(metrics["tokens/reference"], invalid_tokens / mask.sum(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["opsd", "vigos"])
def test_extra_forwards_counts_the_frozen_model_forwards_of_the_loss(kind, processor, model, monkeypatch):
    """``extra_forwards`` (the MFU's FLOP count) is the number of frozen-model forwards in a micro-batch's loss."""
    import specs_jax.training.distill as distill

    graphdef = nnx.graphdef(model)
    if kind == "opsd":
        algo = OPSD(run_config("opsd"), graphdef, model.config, processor)
        prompts = prompt_batch(processor)
        seqs = algo.sequences(prompts, fake_rollout(processor, prompts, [VALID_0, INVALID_0, VALID_1, INVALID_1]))
    else:
        algo, _, _, seqs = vigos_setup(processor, model)
    prepared = algo.prepare(seqs, 1)
    spec = algo.spec()
    calls = []
    real = distill.response_logits
    monkeypatch.setattr(distill, "response_logits", lambda m, inputs, length: calls.append(m) or real(m, inputs, length))
    micro = next(iter(micro_batches(prepared)))
    spec.micro_loss(model, micro, StepContext(spec.totals(prepared), params_of(model), jax.random.key(0)))
    assert len(calls) == 1 + algo.extra_forwards == (2 if kind == "opsd" else 4)


# ---------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["opsd_tiny", "vigos_tiny", "opsd_7b", "vigos_7b"])
def test_configs_load_and_their_options_are_accepted(name, processor, model):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    kind = name.split("_")[0]
    assert cfg.loss.name == kind and cfg.model.reference == "batch"
    algo = get_algorithm(kind)(cfg, nnx.graphdef(model), model.config, processor)
    assert algo.reference
    if name.endswith("7b"):
        assert cfg.rl.top_p == 0.95 and cfg.rl.top_k == 20 and algo.loss_kwargs["temperature"] == 1.1
    if name == "opsd_7b":
        assert algo.loss_kwargs["divergence"] == "jsd" and algo.loss_kwargs["beta"] == 0.5
    if name == "vigos_7b":
        assert cfg.optim.lr == 5e-6 and cfg.optim.max_grad_norm == 0.1
        assert algo.loss_kwargs["weights"] == (1.0, 1.0, 2.0) and algo.loss_kwargs["token_clip"] == 0.05


def test_unknown_options_are_refused_by_name(processor, model):
    with pytest.raises(ValueError, match="bta"):
        OPSD(run_config("opsd", bta=0.5), nnx.graphdef(model), model.config, processor)
    with pytest.raises(ValueError, match="divergence"):  # an opsd option is not a vigos one
        ViGOS(run_config("vigos", divergence="jsd"), nnx.graphdef(model), model.config, processor)
    with pytest.raises(ValueError, match="privileged"):
        OPSD(run_config("opsd", privileged="hint"), nnx.graphdef(model), model.config, processor)
    with pytest.raises(ValueError, match="grpo"):
        OPSD(from_dict({"loss": {"name": "grpo"}}), nnx.graphdef(model), model.config, processor)
