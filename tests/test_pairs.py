"""The self-distilled pair builder on a small fixture."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from specs_jax.data import PairConfig, PromptSamples, build_pairs, save_pairs
from specs_jax.rewards import CORRUPTION_KINDS, accuracy_reward, format_reward


def formatted(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think>\n<answer>The answer is \\boxed{{{answer}}}</answer>"


def fixture() -> list[PromptSamples]:
    """Prompts with the interesting cases: duplicates, wrong answers, base candidates, no chosen."""
    samples = [
        PromptSamples(
            prompt="AB = 10, AE = 5, DE = 6. Find BC.",
            image="images/0001.png",
            answer="12",
            grpo_zero=[
                formatted("Similar triangles give BC = 12.", "12"),
                formatted("Similar triangles give BC = 12.", "12") + "\n",  # duplicate once stripped
                formatted("Ratio 5/10 = 6/BC, so BC = 12.", "12"),
                formatted("Guess.", "10"),  # wrong answer
                "BC = 12, so \\boxed{12}",  # unformatted
            ],
            base=[
                "Since the triangles are similar, BC = \\boxed{12}.",
                "Since the triangles are similar, BC = \\boxed{12}.",  # duplicate
                "BC is 12.",  # no boxed answer: not correct by the reward
                formatted("Formatted base.", "12"),  # formatted: not a rejected candidate
                "So BC = \\boxed{10}.",  # wrong
            ],
        ),
        PromptSamples(
            prompt="How many objects are left?",
            image="images/0002.png",
            answer="5",
            grpo_zero=[formatted("Count.", "6"), "\\boxed{5}"],
            base=["\\boxed{5}"],
        ),
        PromptSamples(
            prompt="What fraction is shaded?",
            image=None,
            answer="0.5",
            grpo_zero=[
                formatted("Half of the squares.", "\\frac{1}{2}"),
                formatted("2 of 4.", "\\dfrac{2}{4}"),
            ],
        ),
    ]
    for i in range(20):
        samples.append(
            PromptSamples(
                prompt=f"What is {i} + {i}?",
                image=f"id-{i}",
                answer=str(2 * i),
                grpo_zero=[formatted(f"Add {i} twice, way {j}.", str(2 * i)) for j in range(3)],
                base=[f"Doubling gives \\boxed{{{2 * i}}}."],
            )
        )
    return samples


def assert_valid(dataset: datasets.Dataset) -> None:
    for row in dataset:
        assert format_reward(row["chosen"]) == 0.5 and accuracy_reward(row["chosen"], row["answer"]) == 1.0
        assert format_reward(row["rejected"]) == 0.0
        assert accuracy_reward(row["rejected"], row["answer"]) == 1.0
        assert row["chosen"] != row["rejected"]


def test_pairs_are_valid_and_summarised() -> None:
    dataset, summary = build_pairs(fixture(), PairConfig(pairs_per_prompt=2, seed=3))
    assert_valid(dataset)
    assert dataset.column_names == [
        "prompt", "image", "chosen", "rejected", "corruption_kind", "source_policy", "answer"
    ]
    assert summary["prompts"] == 23 and summary["prompts_with_pairs"] == 22
    assert summary["pairs"] == len(dataset) == 2 + 2 + 20 * 2
    assert summary["dropped"]["prompt: no correct formatted response"] == 1
    assert summary["dropped"]["response: duplicate"] == 2
    assert summary["dropped"]["pair: fewer correct formatted responses than pairs_per_prompt"] == 0
    assert sum(summary["by_kind"].values()) == sum(summary["by_source"].values()) == len(dataset)
    assert summary["by_kind"]["none"] == summary["by_source"]["base"]
    for row in dataset:
        assert (row["source_policy"] == "base") == (row["corruption_kind"] == "none")
        assert row["corruption_kind"] in (*CORRUPTION_KINDS, "none")
    first = dataset.filter(lambda r: r["image"] == "images/0001.png")
    assert len(set(first["chosen"])) == 2
    assert set(dataset["image"]) >= {"images/0001.png", None, "id-7"}


def test_same_seed_same_pairs_other_seed_other_pairs() -> None:
    a, summary_a = build_pairs(fixture(), PairConfig(seed=7))
    b, summary_b = build_pairs(fixture(), PairConfig(seed=7))
    c, _ = build_pairs(fixture(), PairConfig(seed=8))
    assert a.to_list() == b.to_list() and summary_a == summary_b
    assert a.to_list() != c.to_list()


def test_mix_base_probability_and_shortfall() -> None:
    config = PairConfig(corruption_mix={"strip_think": 1.0}, base_rejected_prob=0.0)
    only_think, summary = build_pairs(fixture(), config)
    assert set(only_think["corruption_kind"]) == {"strip_think"}
    assert summary["by_source"] == {"grpo_zero": 22, "base": 0}
    all_base, summary = build_pairs(fixture(), PairConfig(base_rejected_prob=1.0, pairs_per_prompt=3))
    assert_valid(all_base)
    # prompt 1: one unique base candidate, so one of its two pairs is a corruption
    first = all_base.filter(lambda r: r["image"] == "images/0001.png")
    assert sorted(first["source_policy"]) == ["base", "grpo_zero"]
    assert summary["by_source"]["base"] == 1 + 20
    # shortfall: prompt 1 has 2 chosen and prompt 3 has 2 chosen, each 1 short of 3
    assert summary["dropped"]["pair: fewer correct formatted responses than pairs_per_prompt"] == 2


def test_dedupe_off_keeps_duplicates() -> None:
    _, summary = build_pairs(fixture()[:1], PairConfig(pairs_per_prompt=5, dedupe=False))
    assert summary["pairs"] == 3 and summary["dropped"]["response: duplicate"] == 0


def test_judge_filters_chosen() -> None:
    calls = []

    def judge(prompt: str, response: str, answer: str) -> bool:
        calls.append(answer)
        return "Ratio" not in response

    dataset, summary = build_pairs(fixture()[:1], PairConfig(pairs_per_prompt=5, judge=judge))
    assert dataset["chosen"] == [formatted("Similar triangles give BC = 12.", "12")]
    assert summary["dropped"]["response: judge rejected"] == 1
    assert calls == ["12", "12"]
    assert summary["config"]["judge"] is True


def test_save_pairs_writes_parquet_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset, summary = build_pairs(fixture(), PairConfig())
    path = save_pairs(dataset, summary, tmp_path / "out")
    assert path == tmp_path / "out" / "pairs.parquet"
    assert datasets.Dataset.from_parquet(str(path)).to_list() == dataset.to_list()
    assert json.loads((tmp_path / "out" / "pairs_summary.json").read_text()) == summary
    assert '"pairs":' in capsys.readouterr().out


def test_empty_input_gives_empty_dataset() -> None:
    dataset, summary = build_pairs([], PairConfig())
    assert len(dataset) == 0 and summary["pairs"] == 0
    assert dataset.column_names[0] == "prompt"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"pairs_per_prompt": 0}, "pairs_per_prompt"),
        ({"corruption_mix": {"shuffle": 1.0}}, "unknown kinds"),
        ({"corruption_mix": {"strip_think": 0.0}}, "sum > 0"),
        ({"corruption_mix": {"strip_think": -1.0, "strip_answer": 2.0}}, ">= 0"),
        ({"base_rejected_prob": 1.5}, "base_rejected_prob"),
        ({"tag_text": {"<answer>": "<answer>"}}, "contains a tag"),
    ],
)
def test_config_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PairConfig(**kwargs)


def test_samples_bad_input() -> None:
    with pytest.raises(TypeError, match="grpo_zero must be a sequence of strings"):
        PromptSamples(prompt="p", answer="1", grpo_zero="<think>..")
    with pytest.raises(TypeError, match="answer must be str"):
        PromptSamples(prompt="p", answer=1, grpo_zero=[])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="samples must be PromptSamples"):
        build_pairs([{"prompt": "p"}])  # type: ignore[list-item]
