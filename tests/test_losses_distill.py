"""opsd_loss against TRL's GKDTrainer.generalized_jsd_loss; ViGOS routing and segment parsing."""

import os

import jax
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# trl is a test dependency: a missing trl must fail this module, never skip it.
from trl.experimental.gkd import GKDTrainer

from specs_jax.losses import (
    VIGOS_PERCEPTION,
    VIGOS_REASONING,
    VIGOS_REFERENCE,
    opsd_loss,
    vigos_description_end,
    vigos_loss,
    vigos_teacher_index,
)

B, T, V = 3, 6, 17


def _logits(seed: int, *lead: int, scale: float = 2.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=(*lead, B, T, V))).astype(np.float32)


def _mask() -> np.ndarray:
    mask = np.ones((B, T), np.float32)
    mask[1, 4:] = 0.0  # padding
    mask[2, :] = 0.0  # a fully masked row
    mask[2, 1] = 1.0
    return mask


def _trl(
    student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, beta: float, temperature: float
) -> tuple[float, np.ndarray]:
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    labels = torch.where(torch.tensor(mask) > 0, 1, -100)
    loss = GKDTrainer.generalized_jsd_loss(
        s, torch.tensor(teacher, dtype=torch.float64), labels=labels, beta=beta, temperature=temperature
    )
    loss.backward()
    return loss.item(), s.grad.numpy()


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax p || softmax q) over the last axis, float64."""
    lp = torch.log_softmax(torch.tensor(p_logits, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.tensor(q_logits, dtype=torch.float64), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
def test_jsd_matches_trl_gkd(beta, temperature):
    student, teacher, mask = _logits(0), _logits(1), _mask()
    exp_loss, exp_grad = _trl(student, teacher, mask, beta, temperature)
    fn = jax.jit(
        jax.value_and_grad(
            lambda s: opsd_loss(s, teacher, mask, divergence="jsd", beta=beta, temperature=temperature), has_aux=True
        )
    )
    (loss, metrics), grad = fn(student)
    np.testing.assert_allclose(loss, exp_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["divergence"], exp_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, exp_grad, rtol=1e-4, atol=1e-7)


def test_named_divergences_are_the_kl_directions_and_the_jsd_endpoints():
    student, teacher, mask = _logits(2), _logits(3), _mask()
    forward = np.sum(_kl(teacher, student) * mask) / mask.sum()  # KL(T || S)
    reverse = np.sum(_kl(student, teacher) * mask) / mask.sum()  # KL(S || T)
    assert abs(forward - reverse) > 1e-2
    np.testing.assert_allclose(opsd_loss(student, teacher, mask, divergence="forward_kl")[0], forward, rtol=1e-5)
    np.testing.assert_allclose(opsd_loss(student, teacher, mask, divergence="reverse_kl")[0], reverse, rtol=1e-5)
    np.testing.assert_allclose(_trl(student, teacher, mask, 0.0, 1.0)[0], forward, rtol=1e-6)
    np.testing.assert_allclose(_trl(student, teacher, mask, 1.0, 1.0)[0], reverse, rtol=1e-6)


def test_token_clip_and_top_k():
    student, teacher, mask = _logits(4), _logits(5), _mask()
    per_token = _kl(student, teacher)
    valid = np.sort(per_token[mask > 0])
    clip = float(valid[len(valid) // 2] + valid[len(valid) // 2 + 1]) / 2  # between two tokens: no ties
    loss, metrics = opsd_loss(student, teacher, mask, token_clip=clip)
    np.testing.assert_allclose(loss, np.sum(np.minimum(per_token, clip) * mask) / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], np.sum((per_token > clip) * mask) / mask.sum(), rtol=1e-6)
    # a clipped token gets no gradient
    grad = jax.grad(lambda s: opsd_loss(s, teacher, mask, token_clip=clip)[0])(student)
    clipped = (per_token > clip) & (mask > 0)
    assert not np.any(np.asarray(grad)[clipped]) and np.all(np.any(np.asarray(grad)[~clipped & (mask > 0)], -1))

    k = 5
    top = np.argsort(-student, axis=-1)[..., :k]
    expected = _kl(np.take_along_axis(student, top, -1), np.take_along_axis(teacher, top, -1))
    loss, _ = opsd_loss(student, teacher, mask, top_k=k)
    np.testing.assert_allclose(loss, np.sum(expected * mask) / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(
        opsd_loss(student, teacher, mask, top_k=V)[0], opsd_loss(student, teacher, mask)[0], rtol=1e-6
    )


def test_teacher_gets_no_gradient_and_bad_arguments_are_named():
    student, teacher, mask = _logits(6), _logits(7), _mask()
    assert not np.any(np.asarray(jax.grad(lambda t: opsd_loss(student, t, mask)[0])(teacher)))
    with pytest.raises(ValueError, match="divergence"):
        opsd_loss(student, teacher, mask, divergence="tv")
    with pytest.raises(ValueError, match="teacher_logits"):
        opsd_loss(student, teacher[:, :2], mask)
    with pytest.raises(ValueError, match="beta"):
        opsd_loss(student, teacher, mask, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="top_k"):
        opsd_loss(student, teacher, mask, top_k=V + 1)


def test_vigos_routes_each_token_to_its_teacher():
    student, teachers, mask = _logits(8), _logits(9, 3), _mask()
    index = np.array([[0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1]], np.int32)
    weights = (1.0, 0.5, 2.0)
    per_teacher = [_kl(teachers[0], student), _kl(teachers[1], student), _kl(student, teachers[2])]
    chosen = np.choose(index, per_teacher)
    for clip in (None, 0.3):
        d = chosen if clip is None else np.minimum(chosen, clip)
        expected = np.sum(np.asarray(weights)[index] * d * mask) / mask.sum()
        loss, metrics = jax.jit(
            lambda s, clip=clip: vigos_loss(s, teachers, index, mask, weights=weights, token_clip=clip)
        )(student)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["divergence/reference"], per_teacher[2][1, :4].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["tokens/perception"], 2 / mask.sum(), rtol=1e-6)  # [2, 0] is masked
    # changing a teacher no token is routed to does not change the loss
    unused = np.zeros_like(index)
    swapped = teachers.copy()
    swapped[1:] = _logits(10, 2)
    np.testing.assert_allclose(
        vigos_loss(student, teachers, unused, mask)[0], vigos_loss(student, swapped, unused, mask)[0], rtol=1e-7
    )
    with pytest.raises(ValueError, match="teacher_logits"):
        vigos_loss(student, teachers[:2], index, mask)
    with pytest.raises(ValueError, match="teacher_index"):
        vigos_loss(student, teachers, index[:, :3], mask)


def test_vigos_description_end_parses_valid_and_invalid_rollouts():
    valid = "<description>A red cube.</description>\n<think>Count faces.</think> The answer is \\boxed{6}."
    end = vigos_description_end(valid)
    assert valid[:end].endswith("</description>") and valid[end:].startswith("\n<think>")
    assert vigos_description_end(valid.replace("\\boxed{6}", "6")) is None  # no boxed answer
    assert vigos_description_end(valid.replace("<think>", "")) is None
    assert vigos_description_end("<think>x</think><description>y</description> \\boxed{1}") is None
    assert vigos_description_end(valid + "<think>again</think>") is None
    with_block = "<description>d</description><think>r</think>\n<answer>\\boxed{2}</answer>"
    assert vigos_description_end(with_block, answer_block=True) == len("<description>d</description>")
    assert vigos_description_end(valid, answer_block=True) is None


def test_vigos_teacher_index_from_token_offsets():
    texts = ["<description>sky</description><think>blue</think>\\boxed{B}", "no format \\boxed{B}"]
    ends = [vigos_description_end(t) for t in texts]
    assert ends[1] is None
    # tokens of row 0 split exactly at the description end, plus one straddling token
    starts = np.array([[0, 13, 16, 30, 37, 41], [0, 3, 10, 17, 19, 19]])
    index = vigos_teacher_index(starts, ends)
    np.testing.assert_array_equal(
        index,
        [[VIGOS_PERCEPTION] * 3 + [VIGOS_REASONING] * 3, [VIGOS_REFERENCE] * 6],
    )
    starts[0, 3] = 29  # a token starting inside "</description>" belongs to the description
    assert vigos_teacher_index(starts, ends)[0, 3] == VIGOS_PERCEPTION
    with pytest.raises(ValueError, match="description_end"):
        vigos_teacher_index(starts, ends[:1])
