"""EffectiveDataMixture and the fixed mixtures it is measured against (temperature sampling,
UniMax), on constructed TrainingStates: the plan shares the remaining budget by marginal
dev-loss value, caps repetition, follows the measured slopes, reads nothing before its
warm-up and nothing that is not finite, resumes exactly, and is chosen from YAML."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.policies import policy_from_yaml

from lightning_aquila.callbacks.policies import EffectiveDataMixture, StaticMixture
from lightning_aquila.callbacks.policies.effective_data import (
    effective_tokens,
    marginal_value,
    plan_tokens,
    slope_scales,
)
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import resolve_weights, temperature_weights, unimax_weights

UNIQUE = {"small": 1_000_000, "mid": 4_000_000, "large": 16_000_000}
DOMAINS = list(UNIQUE)


def policy(budget_epochs: float = 3.0, **kwargs) -> EffectiveDataMixture:
    made = EffectiveDataMixture(**kwargs)
    made.setup(DOMAINS, unique_tokens=UNIQUE,
               budget_tokens=int(budget_epochs * sum(UNIQUE.values())))
    return made


def evaluation(step: int, tokens: dict[str, float], dev: dict[str, float]) -> TrainingState:
    """A state as the TSM publishes it after a dev evaluation at ``step``."""
    return TrainingState(step=step, tokens=int(sum(tokens.values())),
                         tokens_per_domain={d: int(n) for d, n in tokens.items()},
                         val_loss=dict(dev), val_step=step)


def run(made: EffectiveDataMixture, curves, steps: int = 40, stop: int | None = None,
        start: dict[str, float] | None = None) -> tuple[list[dict[str, float]], dict]:
    """Train the budget in ``steps`` equal intervals (the first ``stop`` of them): each
    interval's tokens follow the current weights, then ``curves(tokens) -> dev losses`` is
    evaluated and the policy asked. Returns the weights after each interval and the tokens
    each domain had."""
    budget = made.budget
    weights = made.propose(TrainingState(), start or dict.fromkeys(DOMAINS, 1 / 3))
    tokens = dict.fromkeys(DOMAINS, 0.0)
    seen = [weights]
    for i in range(1, (stop or steps) + 1):
        for d in DOMAINS:
            tokens[d] += weights[d] * budget / steps
        proposal = made.propose(evaluation(25 * i, tokens, curves(tokens)), weights)
        weights = proposal or weights
        seen.append(dict(weights))
    return seen, tokens


def power_law(scales: dict[str, float], exponent: float = 0.3):
    """Dev loss ``2 + A_d (n/1e6)^-alpha`` of each domain's own tokens (no repetition)."""
    return lambda tokens: {d: 2.0 + scales[d] * max(tokens[d] / 1e6, 1e-3) ** -exponent
                           for d in DOMAINS}


# -- the fixed mixtures ------------------------------------------------------------------------
def test_temperature_weights_are_token_counts_to_the_power_one_over_t():
    weights = temperature_weights(UNIQUE, 2.0)
    assert weights == pytest.approx({"small": 1 / 7, "mid": 2 / 7, "large": 4 / 7})
    assert temperature_weights(UNIQUE, 1.0) == pytest.approx(
        {d: n / 21e6 for d, n in UNIQUE.items()})


def test_unimax_shares_the_budget_uniformly_below_the_caps():
    assert unimax_weights(UNIQUE, 0.5 * 21e6, 4) == pytest.approx(dict.fromkeys(DOMAINS, 1 / 3))


def test_unimax_caps_small_domains_at_n_epochs_and_gives_the_rest_to_larger_ones():
    budget = 3 * 21e6  # 63M tokens: small capped at 4M, mid at 16M, large takes 43M
    weights = unimax_weights(UNIQUE, budget, 4)
    assert weights == pytest.approx({"small": 4 / 63, "mid": 16 / 63, "large": 43 / 63})


def test_unimax_past_every_cap_gives_every_domain_n_epochs():
    assert unimax_weights(UNIQUE, 100 * 21e6, 4) == pytest.approx(
        {d: n / 21e6 for d, n in UNIQUE.items()})


def test_temperature_below_one_sharpens_and_an_empty_domain_stays_at_zero():
    assert temperature_weights({"a": 1, "b": 3, "c": 0}, 0.5) == pytest.approx(
        {"a": 0.1, "b": 0.9, "c": 0.0})
    assert resolve_weights("temperature:0.5", ["a", "b"], {"a": 1, "b": 3}, "w") == (
        pytest.approx({"a": 0.1, "b": 0.9}))


def test_unimax_refuses_a_budget_of_nothing():
    with pytest.raises(ValueError, match=r"unimax:4 needs a positive token budget, got 0"):
        unimax_weights(UNIQUE, 0, 4)


def test_resolved_uniform_and_natural_specs_sum_to_one_over_the_domains():
    assert resolve_weights("uniform", DOMAINS, None, "w") == pytest.approx(
        dict.fromkeys(DOMAINS, 1 / 3))
    assert resolve_weights("natural", DOMAINS, {"mid": 3, "large": 1}, "w") == pytest.approx(
        {"small": 0.0, "mid": 0.75, "large": 0.25})  # a domain not counted is at 0
    assert resolve_weights("natural", DOMAINS, dict.fromkeys(DOMAINS, 0), "w") is None


@pytest.mark.parametrize(("spec", "match"), [
    ("temperature", "needs a positive number"), ("temperature:0", "needs a positive number"),
    ("unimax:x", "needs a positive number"), ("zipf:2", "one of")])
def test_malformed_weight_specs_are_refused_naming_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(spec, DOMAINS, UNIQUE, "weights")


def test_static_unimax_uses_the_budget_the_engine_gives():
    static = StaticMixture("unimax:4")
    static.setup(DOMAINS, unique_tokens=UNIQUE, budget_tokens=63_000_000)
    assert static.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3)) == pytest.approx(
        {"small": 4 / 63, "mid": 16 / 63, "large": 43 / 63})


def test_static_unimax_without_a_budget_keeps_the_current_weights():
    static = StaticMixture("unimax:4")
    static.setup(DOMAINS, unique_tokens=UNIQUE)
    assert static.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3)) is None


# -- the plan ------------------------------------------------------------------------------------
def test_effective_tokens_count_the_first_epoch_in_full_and_repeats_less():
    unique = np.array([1e6])
    assert effective_tokens(np.array([0.5e6]), unique, 1.5)[0] == 0.5e6
    twice, thrice = effective_tokens(np.array([2e6, 3e6]), np.array([1e6, 1e6]), 1.5)
    assert 1e6 < twice < 2e6 and twice < thrice < 3e6
    assert thrice - twice < twice - 1e6  # each repetition is worth less than the last
    assert effective_tokens(np.array([1e9]), unique, 1.5)[0] == pytest.approx(2.5e6)


def test_plan_equalises_the_marginal_value_of_the_domains_it_gives_tokens():
    consumed = np.array([3e6, 1e6, 0.5e6])
    unique = np.array(list(UNIQUE.values()), dtype=float)
    scale = np.array([1.0, 2.0, 0.5])
    final = plan_tokens(consumed, unique, 30e6, scale, 1.5, 0.3)
    assert final.sum() == pytest.approx(30e6)
    assert (final >= consumed - 1e-6).all()
    value = marginal_value(final, unique, scale, 1.5, 0.3)
    growing = final > consumed + 1e3
    assert growing.all()
    assert value[growing] == pytest.approx(np.full(3, value[0]), rel=0.02)


def test_plan_gives_nothing_to_a_domain_already_past_its_worth():
    consumed = np.array([20e6, 0.0, 0.0])  # 20 epochs of "small" already
    unique = np.array(list(UNIQUE.values()), dtype=float)
    final = plan_tokens(consumed, unique, 40e6, np.ones(3), 1.5, 0.3)
    assert final[0] == pytest.approx(20e6) and final.sum() == pytest.approx(40e6)


def test_the_first_plan_is_uniform_while_no_domain_repeats():
    weights = policy(budget_epochs=0.1).propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    assert weights == pytest.approx(dict.fromkeys(DOMAINS, 1 / 3), abs=1e-3)


def test_the_first_plan_caps_a_small_domain_that_uniform_would_repeat():
    weights = policy(budget_epochs=3.0).propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    epochs = {d: weights[d] * 63e6 / UNIQUE[d] for d in DOMAINS}
    assert weights["small"] < weights["mid"] < weights["large"]
    assert epochs["small"] < 63e6 / 3 / UNIQUE["small"]  # fewer than uniform's 21 epochs
    assert epochs["small"] > epochs["mid"] > epochs["large"]  # more than natural's 3


def test_a_prior_temperature_starts_from_temperature_sampling():
    weights = policy(budget_epochs=0.1, prior_temperature=2.0).propose(
        TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    assert weights == pytest.approx(temperature_weights(UNIQUE, 2.0), abs=2e-3)


def test_a_domain_ahead_of_its_plan_late_in_the_run_draws_less_but_not_nothing():
    made = policy(budget_epochs=0.5)
    start = made.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    budget = made.budget
    tokens = {d: 0.95 * budget * start[d] for d in DOMAINS}
    tokens["mid"] += 0.04 * budget  # 4% of the budget more than planned, 5% left
    weights = made.propose(evaluation(500, tokens, dict.fromkeys(DOMAINS, 3.0)), start)
    assert start["mid"] / 2 - 1e-9 <= weights["mid"] < start["mid"]
    assert all(start[d] / 2 - 1e-9 <= weights[d] <= 2 * start[d] + 1e-9 for d in DOMAINS)


def test_max_epochs_is_a_hard_cap():
    weights = policy(budget_epochs=1.0, max_epochs=2.0).propose(
        TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    assert weights["small"] * 21e6 == pytest.approx(2 * UNIQUE["small"], rel=1e-3)


# -- the adaptation ----------------------------------------------------------------------------
def test_a_domain_that_learns_more_per_token_gets_more():
    _, equal = run(policy(budget_epochs=0.2), power_law(dict.fromkeys(DOMAINS, 2.0)))
    _, steep = run(policy(budget_epochs=0.2), power_law({"small": 2.0, "mid": 6.0,
                                                         "large": 2.0}))
    assert steep["mid"] > 1.2 * equal["mid"]


def test_a_domain_whose_dev_loss_stops_falling_gets_less_before_it_rises():
    def curves(tokens):
        losses = power_law(dict.fromkeys(DOMAINS, 2.0))(tokens)
        losses["mid"] = 2.0 + 2.0 * max(min(tokens["mid"], 0.5e6) / 1e6, 1e-3) ** -0.3
        return losses  # "mid" stops improving after 0.5M of its tokens

    _, flat = run(policy(budget_epochs=0.2), curves)
    _, equal = run(policy(budget_epochs=0.2), power_law(dict.fromkeys(DOMAINS, 2.0)))
    assert flat["mid"] < 0.8 * equal["mid"]


def test_no_dev_loss_is_read_before_the_warm_up():
    made = policy(budget_epochs=1.0, warmup_fraction=0.5, inertia=0.0)
    start = made.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    tokens = {d: 0.4 * 21e6 * start[d] for d in DOMAINS}  # 40% of the budget
    skewed = {"small": 9.0, "mid": 2.0, "large": 2.0}
    made.propose(evaluation(100, tokens, skewed), start)
    assert made.records == [] and made.scale is None


def test_a_non_finite_dev_loss_does_not_steer():
    made = policy(budget_epochs=1.0, warmup_fraction=0.0)
    made.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    tokens = dict.fromkeys(DOMAINS, 1e6)
    made.propose(evaluation(25, tokens, {"small": math.nan, "mid": 3.0, "large": 3.0}),
                 dict.fromkeys(DOMAINS, 1 / 3))
    assert made.records == []


def test_missing_unique_tokens_or_budget_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"unique training tokens.*'mid'"):
        EffectiveDataMixture().setup(DOMAINS, unique_tokens={"small": 1, "large": 2},
                                     budget_tokens=10)
    with pytest.raises(ValueError, match=r"trainer\.max_steps"):
        EffectiveDataMixture().setup(DOMAINS, unique_tokens=UNIQUE)


def test_weights_stay_within_bounds_and_sum_to_one():
    made = policy(budget_epochs=3.0, min_weight=0.1, max_weight=0.6)
    for weights in run(made, power_law({"small": 1.0, "mid": 5.0, "large": 0.5}))[0]:
        assert sum(weights.values()) == pytest.approx(1.0)
        assert all(0.1 - 1e-9 <= w <= 0.6 + 1e-9 for w in weights.values())


def test_resuming_from_the_state_dict_continues_exactly():
    curves = power_law({"small": 1.0, "mid": 4.0, "large": 2.0})
    whole, _ = run(policy(), curves)
    for cut in (3, 16, 30):  # before the warm-up ends, just after, and late
        first = policy()
        head, tokens = run(first, curves, stop=cut)
        saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint can hold
        second = policy()
        second.load_state_dict(saved)
        assert second.state_dict() == first.state_dict()
        weights, rest = head[-1], []
        for i in range(cut + 1, 41):
            for d in DOMAINS:
                tokens[d] += weights[d] * second.budget / 40
            weights = second.propose(evaluation(25 * i, tokens, curves(tokens)),
                                     weights) or weights
            rest.append(dict(weights))
        assert head + rest == whole


def test_it_is_chosen_from_yaml_by_class_path():
    built = policy_from_yaml("""
class_path: lightning_aquila.callbacks.EffectiveDataMixture
init_args: {repetition_epochs: 1.0, window: 6, update_every: 50}
""")
    assert isinstance(built, EffectiveDataMixture)
    assert (built.repetition_epochs, built.window, built.update_every) == (1.0, 6, 50)


# -- configuration, state and edges ------------------------------------------------------------
def test_the_defaults_are_the_documented_ones_and_the_config_rebuilds_the_policy():
    made = EffectiveDataMixture()
    assert {k: v for k, v in made.config().items() if k not in ("min_weight", "max_weight")} == {
        "budget_tokens": None, "repetition_epochs": 3.0, "loss_exponent": 0.3,
        "prior_temperature": None, "warmup_fraction": 0.1, "window": 8, "max_tilt": 4.0,
        "inertia": 0.5, "max_swing": 2.0, "max_epochs": None, "update_every": 25}
    tuned = EffectiveDataMixture(budget_tokens=10, repetition_epochs=2.0, loss_exponent=0.5,
                                 prior_temperature=3.0, warmup_fraction=0.2, window=5,
                                 max_tilt=2.0, inertia=0.1, max_swing=1.5, max_epochs=4.0)
    assert EffectiveDataMixture(**tuned.config()).config() == tuned.config()


@pytest.mark.parametrize(("arg", "value"), [
    ("budget_tokens", 0), ("budget_tokens", 2.5), ("budget_tokens", True),
    ("repetition_epochs", 0), ("repetition_epochs", math.inf), ("loss_exponent", "x"),
    ("prior_temperature", 0), ("prior_temperature", "x"), ("warmup_fraction", 1.0),
    ("warmup_fraction", "x"), ("inertia", 1.0), ("inertia", "x"), ("max_tilt", 0.99),
    ("max_swing", "x"), ("window", 2), ("window", 3.0), ("max_epochs", 0),
    ("max_epochs", "x")])
def test_arguments_out_of_range_are_refused_naming_them(arg, value):
    with pytest.raises(ValueError, match=rf"EffectiveDataMixture\({arg}"):
        EffectiveDataMixture(**{arg: value})


def test_arguments_on_the_edge_of_their_range_are_accepted():
    made = EffectiveDataMixture(budget_tokens=1, max_tilt=1.0, max_swing=1.0, window=3,
                                prior_temperature=0.5, max_epochs=0.5, warmup_fraction=0.0)
    assert (made.budget_tokens, made.window, made.max_tilt) == (1, 3, 1.0)


def test_a_resume_on_the_same_domains_keeps_the_window_and_on_others_starts_afresh():
    made = policy(budget_epochs=0.2)
    run(made, power_law({"small": 1.0, "mid": 4.0, "large": 2.0}), stop=20)
    kept = made.state_dict()
    assert kept["records"] and kept["scale"]
    made.setup(DOMAINS, unique_tokens=UNIQUE, budget_tokens=int(0.2 * 21e6))
    assert made.state_dict() == kept
    made.setup(DOMAINS[:2], unique_tokens=UNIQUE, budget_tokens=int(0.2 * 21e6))
    assert (made.records, made.scale, made.last) == ([], None, None)


def test_once_the_budget_is_spent_it_proposes_nothing():
    made = policy(budget_epochs=1.0)
    spent = {"small": 1e6, "mid": 4e6, "large": 16e6}  # exactly the budget
    assert made.propose(evaluation(25, spent, dict.fromkeys(DOMAINS, 3.0)),
                        dict.fromkeys(DOMAINS, 1 / 3)) is None


def test_inertia_keeps_that_share_of_the_previous_weights():
    made = policy(budget_epochs=3.0, inertia=0.25)
    first = made.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    tokens = {"small": 2e6, "mid": 1e6, "large": 1e6}
    plan = made.plan(tokens)
    second = made.propose(evaluation(25, tokens, dict.fromkeys(DOMAINS, 3.0)), first)
    assert second == pytest.approx({d: 0.25 * first[d] + 0.75 * plan[d] for d in DOMAINS})


def test_with_every_domain_at_its_hard_cap_it_draws_in_proportion_to_the_data():
    made = policy(budget_epochs=3.0, max_epochs=1.0, inertia=0.0)
    past = {"small": 2e6, "mid": 4e6, "large": 16e6}  # small past its cap, the others at it
    weights = made.propose(evaluation(25, past, dict.fromkeys(DOMAINS, 3.0)),
                           dict.fromkeys(DOMAINS, 1 / 3))
    assert weights == pytest.approx({"small": 1 / 21, "mid": 4 / 21, "large": 16 / 21})


def test_an_evaluation_is_read_once_and_a_state_without_one_reads_nothing():
    made = policy(budget_epochs=1.0, warmup_fraction=0.0)
    tokens = dict.fromkeys(DOMAINS, 1e6)
    for _ in range(2):
        made.propose(evaluation(25, tokens, dict.fromkeys(DOMAINS, 3.0)),
                     dict.fromkeys(DOMAINS, 1 / 3))
    made.propose(TrainingState(step=30, tokens_per_domain=tokens), dict.fromkeys(DOMAINS, 1 / 3))
    assert [r["step"] for r in made.records] == [25]


def test_three_evaluations_are_enough_to_measure_the_slopes():
    curves = power_law({"small": 1.0, "mid": 4.0, "large": 2.0})
    for evaluations in (2, 3):
        made = policy(budget_epochs=1.0, warmup_fraction=0.0)
        run(made, curves, stop=evaluations)
        assert len(made.records) == evaluations
        assert (made.scale is not None) == (evaluations == 3)


def test_a_resume_between_evaluations_proposes_what_the_uninterrupted_run_does():
    curves = power_law({"small": 1.0, "mid": 4.0, "large": 2.0})
    first = policy(budget_epochs=0.2)
    seen, tokens = run(first, curves, stop=20)
    second = policy(budget_epochs=0.2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    between = TrainingState(step=510, tokens_per_domain={d: int(n) for d, n in tokens.items()},
                            val_loss=curves(tokens), val_step=500)  # no new evaluation
    assert second.propose(between, seen[-1]) == first.propose(between, seen[-1])
    fresh = policy()
    fresh.load_state_dict(json.loads(json.dumps(policy().state_dict())))
    assert fresh.state_dict() == policy().state_dict()


def test_the_plan_spends_exactly_the_budget():
    consumed = np.array([3e6, 1e6, 0.5e6])
    unique = np.array(list(UNIQUE.values()), dtype=float)
    final = plan_tokens(consumed, unique, 30e6, np.array([1.0, 2.0, 0.5]), 1.5, 0.3)
    assert final.sum() == pytest.approx(30e6, rel=1e-12)


# -- the plan's numerics, against plans known in closed form -----------------------------------
NO_REPEATS = np.full(3, 1e15)  # unique tokens no plan here comes near: a pure power law


def test_without_repetition_the_plan_is_the_closed_form_water_filling_at_any_scale():
    # g_i = A_i n^(-alpha-1) equal for all: n_i ∝ A_i^(1/(1+alpha)), from a first token up to
    # 10^9 times it, as finely as the docstring's grid promises
    scale = np.array([1.0, 2.0, 0.5])
    share = scale ** (1 / 1.3) / (scale ** (1 / 1.3)).sum()
    for total in (3e3, 3e6, 3e9):
        final = plan_tokens(np.zeros(3), NO_REPEATS, total, scale, 1.5, 0.3)
        assert final == pytest.approx(total * share, rel=1e-5)


def test_a_small_remaining_budget_goes_whole_to_the_domain_worth_most():
    # "mid" is worth most at the present counts, and still worth most after all 1% left
    consumed = np.full(3, 10e6)
    final = plan_tokens(consumed, NO_REPEATS, 30.3e6, np.array([1.0, 2.0, 0.5]), 1.5, 0.3)
    assert final == pytest.approx([10e6, 10.3e6, 10e6], rel=1e-9)


def test_a_domain_at_its_hard_cap_stays_there_and_the_others_share_the_rest():
    cap = np.array([2e6, 1e15, 1e15])
    final = plan_tokens(np.zeros(3), NO_REPEATS, 30e6, np.ones(3), 1.5, 0.3, cap)
    assert final == pytest.approx([2e6, 14e6, 14e6], rel=1e-6)


def test_when_no_token_is_worth_anything_the_plan_still_spends_exactly_the_budget():
    # 10^6 epochs of a thousand tokens: every marginal value underflows to zero
    consumed, unique = np.array([0.0, 5e3]), np.array([1e3, 1e3])
    final = plan_tokens(consumed, unique, 1e9, np.ones(2), 0.75, 0.3)
    assert final.sum() == pytest.approx(1e9, rel=1e-12)
    assert (final >= consumed).all() and (final <= consumed + 1e9 - 5e3).all()


def test_a_domain_behind_its_plan_draws_at_most_max_swing_times_its_average_share():
    made = policy(budget_epochs=0.1, max_swing=1.5, inertia=0.0)  # no repeats: plan uniform
    budget = made.budget
    behind = made.plan({"small": 0.0, "mid": 0.6 * budget / 2.1, "large": 0.6 * budget / 2.1})
    # unbounded it would draw 7/9 of the rest; 1.5 x 1/3 is all it may
    assert behind["small"] == pytest.approx(0.5, abs=1e-6)
    assert behind["mid"] == pytest.approx(0.25, abs=1e-6) == behind["large"]


def test_a_domain_held_at_max_weight_zero_is_left_out_of_the_plan():
    """A held-out-only domain (read for reports, never trained on) gets weight 0, needs no
    unique-token count, and its falling dev loss changes nothing of the other domains' plan."""
    budget = int(0.2 * sum(UNIQUE.values()))
    alone = EffectiveDataMixture()
    alone.setup(DOMAINS, unique_tokens=UNIQUE, budget_tokens=budget)
    held = EffectiveDataMixture(max_weight={"clean": 0.0})
    held.setup([*DOMAINS, "clean"], unique_tokens=UNIQUE,  # none needed for a held domain
               budget_tokens=budget)
    curves = power_law({"small": 2.0, "mid": 6.0, "large": 2.0})
    weights = alone.propose(TrainingState(), dict.fromkeys(DOMAINS, 1 / 3))
    tokens = dict.fromkeys(DOMAINS, 0.0)
    for i in range(1, 21):
        for d in DOMAINS:
            tokens[d] += weights[d] * budget / 20
        dev = curves(tokens)
        mine = held.propose(evaluation(25 * i, tokens | {"clean": 0},
                                       dev | {"clean": 9.0 - 0.2 * i}),
                            weights | {"clean": 0.0})
        weights = alone.propose(evaluation(25 * i, tokens, dev), weights)
        assert mine["clean"] == 0.0
        assert {d: mine[d] for d in DOMAINS} == pytest.approx(weights, abs=1e-6)
    assert alone.scale is not None and held.scale == alone.scale  # the slopes were measured


def test_a_quality_curriculum_on_top_keeps_its_weights_and_switches_the_temperature():
    """QualityCurriculum(EffectiveDataMixture) proposes what the policy alone proposes, at the
    same steps, and moves the quality temperature at its stage's end (chosen from YAML)."""
    wrapped = policy_from_yaml("""
class_path: lightning_aquila.callbacks.QualityCurriculum
init_args:
  policy:
    class_path: lightning_aquila.callbacks.EffectiveDataMixture
    init_args: {update_every: 25}
  stages:
    - {name: broad, until_step: 250, quality_temperature: null}
    - {name: sharp, quality_temperature: {small: 1.0, mid: 1.0, large: 1.0}}
""")
    budget = int(0.2 * sum(UNIQUE.values()))
    alone = EffectiveDataMixture(update_every=25)
    for made in (wrapped, alone):
        made.setup(DOMAINS, unique_tokens=UNIQUE, budget_tokens=budget)
    curves = power_law({"small": 2.0, "mid": 6.0, "large": 2.0})
    start = dict.fromkeys(DOMAINS, 1 / 3)
    weights = alone.propose(TrainingState(), start)
    assert wrapped.propose(TrainingState(), start) == weights
    assert (wrapped.stage, wrapped.quality_temperature) == ("broad", "inf")
    tokens = dict.fromkeys(DOMAINS, 0.0)
    for i in range(1, 21):
        for d in DOMAINS:
            tokens[d] += weights[d] * budget / 20
        state = evaluation(25 * i, tokens, curves(tokens))
        assert wrapped.due(state.step) and alone.due(state.step)
        mine = wrapped.propose(state, weights)
        weights = alone.propose(state, weights)
        assert mine == weights
        assert wrapped.stage == ("broad" if state.step < 250 else "sharp")
    assert wrapped.quality_temperature == {"small": 1.0, "mid": 1.0, "large": 1.0}
    assert wrapped.switches == [{"stage": "broad", "step": 0}, {"stage": "sharp", "step": 250}]
    assert wrapped.state_dict()["policy"] == alone.state_dict()


# -- the slopes measured from dev losses, against losses known in closed form ------------------
def power_law_records(slopes: list[float], shares: list[float], steps: int = 5
                      ) -> list[dict]:
    """Dev evaluations of domains whose loss is exactly ``5 - s_i log D_i``, each domain
    drawing the same share of every interval (so all ``log D_i`` move alike), none
    repeating (unique tokens far above any count)."""
    names = [f"d{i}" for i in range(len(slopes))]
    records = []
    for k in range(1, steps + 1):
        tokens = {d: share * 1e6 * 2 ** k for d, share in zip(names, shares)}
        records.append({"tokens": tokens, "loss": {
            d: 5.0 - s * math.log(tokens[d]) for d, s in zip(names, slopes)}})
    return records


def expected_scales(slopes: list[float], shares: list[float], exponent: float,
                    max_tilt: float) -> np.ndarray:
    """The docstring's rule where every domain's ``log D`` moves alike: equal evidence, so
    each slope is shrunk halfway to the pooled one (their mean), floored at ``1/max_tilt`` of
    it, times ``D_i^alpha`` at the last evaluation, over their geometric mean, clipped."""
    s = np.array(slopes)
    shrunk = np.maximum((s + s.mean()) / 2, s.mean() / max_tilt)
    scale = shrunk * (np.array(shares) * 1e6 * 2 ** 5) ** exponent
    return np.clip(scale / np.exp(np.log(scale).mean()), 1 / max_tilt, max_tilt)


@pytest.mark.parametrize(("slopes", "shares"), [
    ([0.3, 0.1, 0.2], [1.0, 1.0, 1.0]),     # slopes alone
    ([0.2, 0.2, 0.2], [0.6, 0.3, 0.1]),     # the tokens' exponent alone
    ([0.5, 0.05, 0.2], [0.2, 0.5, 0.3]),    # both, the smallest slope at its floor
])
def test_the_measured_scales_follow_dev_losses_known_in_closed_form(slopes, shares):
    unique = np.full(len(slopes), 1e15)
    scales = slope_scales(power_law_records(slopes, shares), [f"d{i}" for i in
                          range(len(slopes))], unique, 3.0, 0.3, 4.0)
    assert scales == pytest.approx(expected_scales(slopes, shares, 0.3, 4.0), rel=1e-9)


def test_measured_scales_are_clipped_to_max_tilt_either_way():
    slopes, shares = [0.3, 0.3, 0.3], [0.98, 0.0199, 0.0001]  # D spans 9,800x
    unique = np.full(3, 1e15)
    scales = slope_scales(power_law_records(slopes, shares), ["d0", "d1", "d2"], unique,
                          3.0, 1.0, 2.0)
    assert scales[0] == 2.0 and scales[2] == 0.5  # both bounds bind
    assert scales == pytest.approx(expected_scales(slopes, shares, 1.0, 2.0), rel=1e-9)


def test_records_that_cannot_tell_give_no_scales():
    unique = np.full(2, 1e15)
    still = power_law_records([0.2, 0.1], [1.0, 1.0])
    for r in still:  # no domain drew a token between evaluations
        r["tokens"] = {"d0": 1e6, "d1": 1e6}
    assert slope_scales(still, ["d0", "d1"], unique, 3.0, 0.3, 4.0) is None
    flat = power_law_records([0.0, 0.0], [1.0, 1.0])  # no dev loss fell
    assert slope_scales(flat, ["d0", "d1"], unique, 3.0, 0.3, 4.0) is None
    rising = power_law_records([-0.1, -0.2], [1.0, 1.0])
    assert slope_scales(rising, ["d0", "d1"], unique, 3.0, 0.3, 4.0) is None
    assert slope_scales(power_law_records([0.2, 0.1], [1.0, 1.0])[:2], ["d0", "d1"], unique,
                        3.0, 0.3, 4.0) is None  # fewer than three evaluations


def test_the_tokens_factor_is_read_at_the_newest_evaluation():
    # exact power laws of one slope: every fit finds it, so only D_i^alpha tells the domains
    # apart, and only the newest evaluation, where d0 has had 8 times the others' tokens
    records = power_law_records([0.2, 0.2, 0.2], [1.0, 1.0, 1.0])
    last = records[-1]
    last["tokens"]["d0"] *= 8
    last["loss"]["d0"] = 5.0 - 0.2 * math.log(last["tokens"]["d0"])
    scales = slope_scales(records, ["d0", "d1", "d2"], np.full(3, 1e15), 3.0, 0.3, 4.0)
    assert scales[0] / scales[1] == pytest.approx(8 ** 0.3, rel=1e-9)
    assert scales[1] == pytest.approx(scales[2], rel=1e-12)
