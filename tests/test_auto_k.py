"""Choosing k from alpha and c: Leviathan et al.'s expected speedup, the k search, AutoK, step timing."""

import logging

import pytest
from tiny import make_tiny_model, random_prompt

from decoding.prompt_lookup import PromptLookupDrafter
from experiments.auto_k import (
    AutoK,
    StepCosts,
    choose_k,
    estimate_alpha,
    expected_speedup,
    has_draft_model,
    measure_step_costs,
)
from experiments.llama_drafter import LlamaDrafter


def test_expected_speedup_values():
    # (1 - 0.8^5) / (0.2 * (4 * 0.1 + 1)) = 0.67232 / 0.28
    assert expected_speedup(0.8, 0.1, 4) == pytest.approx(2.4011428571)
    assert expected_speedup(0.0, 0.5, 3) == pytest.approx(1 / 2.5)
    assert expected_speedup(1.0, 0.25, 4) == pytest.approx(5 / 2)
    assert expected_speedup(0.8, 0.1, 4, verification_cost=1.4) == pytest.approx(0.67232 / 0.2 / 1.8)


@pytest.mark.parametrize(
    ("alpha", "c", "k", "message"),
    [(1.5, 0.1, 4, "alpha must be in"), (0.5, -0.1, 4, "c must be >= 0"), (0.5, 0.1, 0, "k must be >= 1")],
)
def test_expected_speedup_rejects_invalid(alpha, c, k, message):
    with pytest.raises(ValueError, match=message):
        expected_speedup(alpha, c, k)


def test_choose_k_maximises_formula():
    # speedups for alpha 0.8, c 0.1 peak at k = 6 (2.4696)
    assert choose_k(0.8, 0.1) == 6
    assert choose_k(0.8, 0.1, max_k=4) == 4


def test_choose_k_edges():
    # a free draft that is always right: more tokens are always better
    assert choose_k(1.0, 0.0, max_k=16) == 16
    # a draft that is never right: one token is the cheapest loss
    assert choose_k(0.0, 0.3) == 1
    with pytest.raises(ValueError, match="max_k must be >= 1"):
        choose_k(0.5, 0.1, max_k=0)


def test_estimate_alpha():
    assert estimate_alpha(30, 10) == 0.75
    assert estimate_alpha(0, 0) is None


def test_auto_k_probes_then_chooses(caplog):
    auto_k = AutoK(probe_k=4, probe_items=2, max_k=16)
    assert auto_k.k == 4
    auto_k.record(accepted=12, rejected=3)
    assert not auto_k.needs_choice
    auto_k.record(accepted=4, rejected=1)
    assert auto_k.needs_choice

    with caplog.at_level(logging.INFO, logger="experiments.auto_k"):
        k = auto_k.choose(c=0.1)

    # alpha = 16 / 20
    assert k == choose_k(0.8, 0.1) == 6
    assert auto_k.k == 6
    assert not auto_k.needs_choice
    assert auto_k.chosen["alpha"] == 0.8
    assert "speculative.k=auto chose k=6" in caplog.text
    # items after the choice leave it unchanged
    auto_k.record(accepted=0, rejected=5)
    assert auto_k.chosen["alpha"] == 0.8


def test_auto_k_without_tested_tokens_picks_one():
    auto_k = AutoK(probe_items=1)
    auto_k.record(accepted=0, rejected=0)
    assert auto_k.choose(c=0.2) == 1


@pytest.mark.parametrize("draft_kind", ["model", "llama_drafter"])
def test_measure_step_costs(draft_kind):
    target = make_tiny_model("llama", seed=0)
    draft = make_tiny_model("llama", seed=1)
    if draft_kind == "llama_drafter":
        draft = LlamaDrafter(draft)

    costs = measure_step_costs(target, draft, random_prompt(10), k=4, repeats=3)

    assert isinstance(costs, StepCosts)
    assert costs.target_step_s > 0
    assert costs.draft_step_s > 0
    assert costs.target_verify_step_s > 0
    assert costs.c == costs.draft_step_s / costs.target_step_s
    record = costs.to_dict()
    assert (record["k"], record["context_tokens"], record["repeats"]) == (4, 10, 3)
    assert record["verification_cost"] == costs.verification_cost


def test_has_draft_model():
    model = make_tiny_model("llama")
    assert has_draft_model(model)
    assert has_draft_model(LlamaDrafter(model))
    assert not has_draft_model(PromptLookupDrafter())


def test_mode_runner_auto_k_switches_after_probe(caplog):
    from cli_helpers import compose_config
    from tiny_tokenizers import make_tiny_tokenizer

    from experiments.generation import ModeRunner
    from experiments.models import LoadedModel, ModelConfig
    from experiments.llama_drafter import model_drafter

    cfg = compose_config(["modes=[speculative]", "speculative.k=auto", "generation.max_new_tokens=6"])
    model = make_tiny_model("llama")
    target = LoadedModel(model=model, tokenizer=make_tiny_tokenizer("chatml"), name="tiny", config=ModelConfig())
    runner = ModeRunner(cfg, target, draft=model_drafter(model))
    questions = ["one?", "two?", "three?", "four?"]

    with caplog.at_level(logging.INFO, logger="experiments.auto_k"):
        outputs = [runner.generate("speculative", [question], [question])[0] for question in questions]

    used = [output.stats["k"] for output in outputs]
    assert used[:3] == [4, 4, 4]
    assert used[3] == runner.auto_k.k
    assert runner.auto_k.chosen["probe_items"] == 3
    # the draft is the target, so the probe items accept every draft token
    assert runner.auto_k.chosen["alpha"] == 1.0
    assert "speculative.k=auto chose" in caplog.text
