"""Mixture policies on constructed TrainingStates: each moves the weights the way its rule
says, keeps them within bounds, is deterministic, survives a state_dict round trip exactly,
and can be chosen from YAML."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from helpers.policies import policy_from_config, policy_from_yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_aquila.callbacks.policies import (
    BanditMixture,
    ExcessLossMixture,
    MixturePolicy,
    QualityCurriculum,
    StagedMixture,
    StaticMixture,
    load_reference_losses,
    project_to_bounds,
)
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import check_bound, normalized

DOMAINS = ["code", "web", "books"]
UNIFORM = dict.fromkeys(DOMAINS, 1 / 3)


def state(step: int, losses: dict[str, float] | None = None, tokens: int | None = None,
          per_domain_tokens: dict[str, int] | None = None) -> TrainingState:
    """A state as the TSM publishes it after a training-loss interval at ``step``."""
    losses = losses or {}
    per_domain = per_domain_tokens or dict.fromkeys(DOMAINS, 100 * step)
    return TrainingState(step=step, tokens=sum(per_domain.values()) if tokens is None else tokens,
                         tokens_per_domain=per_domain, train_loss=dict(losses),
                         train_loss_last=dict(losses), train_step=step)


def loss_stream(n: int, seed: int = 0) -> list[TrainingState]:
    """n fresh training-loss intervals with domain losses that drift differently."""
    import random

    rng = random.Random(seed)
    return [state(10 * (i + 1), {"code": 4 + rng.random(), "web": 3 + rng.random(),
                                 "books": 2 + rng.random()}) for i in range(n)]


def drive(policy: MixturePolicy, states: list[TrainingState],
          current: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Feed states in order, carrying the proposed weights forward as the mixture would."""
    current = dict(current or UNIFORM)
    seen = []
    for s in states:
        proposal = policy.propose(s, current)
        if proposal is not None:
            current = proposal
        seen.append(dict(current))
    return seen


def make_policies() -> list[MixturePolicy]:
    return [
        StaticMixture({"code": 2, "web": 1, "books": 1}, min_weight=0.1, max_weight=0.45),
        StagedMixture([{"name": "K6", "weights": {"code": 1, "web": 1}, "until_tokens": 1500},
                       {"name": "K61", "weights": "uniform"}], min_weight=0.1, max_weight=0.45),
        ExcessLossMixture({"code": 3.0, "web": 3.0, "books": 3.0}, step_size=2.0,
                          min_weight=0.1, max_weight=0.45),
        BanditMixture(update_every=1, min_weight=0.1, max_weight=0.45),
    ]


# -- the bounded simplex ----------------------------------------------------------------------
def test_weights_within_bounds_come_back_unchanged():
    weights = {"code": 0.5, "web": 0.3, "books": 0.2}
    assert project_to_bounds(weights, 0.1, 0.6) == weights


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=2, max_size=6), st.floats(0, 0.15),
       st.floats(0.5, 1.0))
def test_projection_is_the_nearest_point_of_the_bounded_simplex(raw, low, high):
    weights = {f"d{i}": v for i, v in enumerate(raw)}
    out = project_to_bounds(weights, low, high)
    assert math.isclose(sum(out.values()), 1.0, abs_tol=1e-9)
    assert all(low - 1e-12 <= w <= high + 1e-12 for w in out.values())
    # Optimality (KKT): out = clip(v - tau, low, high) for one tau.
    free = [weights[d] - out[d] for d in out if low + 1e-9 < out[d] < high - 1e-9]
    if free:
        tau = free[0]
        assert all(math.isclose(t, tau, abs_tol=1e-9) for t in free)
        for d in out:
            expected = min(max(weights[d] - tau, low), high)
            assert math.isclose(out[d], expected, abs_tol=1e-9)


def test_bounds_no_weights_can_meet_are_refused_naming_the_sums():
    with pytest.raises(ValueError, match=r"min_weights sum to 1\.2"):
        project_to_bounds(UNIFORM, 0.4, 1.0)
    with pytest.raises(ValueError, match=r"max_weights to 0\.6"):
        project_to_bounds(UNIFORM, 0.0, 0.2)


def test_bounds_that_leave_one_feasible_mixture_warn_naming_the_bound_to_change():
    policy = BanditMixture(min_weight=0.03, max_weight=0.5)  # over two domains: only 0.5/0.5
    with pytest.warns(UserWarning, match=r"allows only one mixture, \{'a': 0\.5, 'b': 0\.5\}"
                      r".*Raise max_weight \(above 0\.5"):
        policy.setup(["a", "b"])


def test_a_curriculum_over_pinned_bounds_warns_once_naming_the_wrapped_policy(recwarn):
    """The bounds are the wrapped policy's: one warning, in its name, not a second one for
    the curriculum around it."""
    QualityCurriculum(BanditMixture(min_weight=0.03, max_weight=0.5),
                      [{"name": "only"}]).setup(["a", "b"])
    pinned = [str(w.message) for w in recwarn if "allows only one mixture" in str(w.message)]
    assert len(pinned) == 1 and pinned[0].startswith("BanditMixture(min_weight=0.03")


def test_bounds_that_leave_room_do_not_warn(recwarn):
    BanditMixture(min_weight=0.03, max_weight=0.5).setup(["a", "b", "c"])
    StaticMixture({"a": 1.0, "b": 1.0}).setup(["a", "b"])
    assert [str(w.message) for w in recwarn] == []


def test_per_domain_bounds_apply_to_their_domain_only():
    out = project_to_bounds({"code": 0.8, "web": 0.1, "books": 0.1}, {"books": 0.3},
                            {"code": 0.5})
    assert out["code"] == pytest.approx(0.5) and out["books"] == pytest.approx(0.3)


def test_without_bounds_weights_on_the_simplex_come_back_unchanged():
    weights = {"code": 0.1, "web": 0.2, "books": 0.7}  # sums to 1 within rounding only
    assert project_to_bounds(weights) == weights
    assert project_to_bounds({"code": 0.6, "web": 0.3, "books": 0.1}, 0.1, 0.6) == {
        "code": 0.6, "web": 0.3, "books": 0.1}  # on a bound each side


def test_bounds_that_sum_to_exactly_one_leave_exactly_that_mixture():
    assert project_to_bounds({"a": 0.9, "b": 0.1}, 0.5, 1.0) == {"a": 0.5, "b": 0.5}
    caps = {"a": 0.7, "b": 0.2, "c": 0.1}  # they sum to 1 - 1e-16 in floats
    assert project_to_bounds({"a": 1.0, "b": 0.0, "c": 0.0}, 0.0, caps) == pytest.approx(caps)


def test_a_domain_pinned_by_equal_bounds_gets_exactly_that_weight():
    out = project_to_bounds({"code": 0.8, "web": 0.1, "books": 0.1}, {"web": 0.3}, {"web": 0.3})
    assert out["web"] == pytest.approx(0.3) and sum(out.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(("low", "high", "match"), [
    ({"code": 0.3, "web": 0.6}, {"code": 0.3, "web": 0.4},
     "min_weight exceeds max_weight for domain 'web'"),
    (0.0, 1.5, r"max_weight for domain 'code' must be in \[0, 1\], got 1\.5"),
    ("0.1", 1.0, "min_weight is not a number: '0.1'"),
    (0.0, {"web": True}, r"max_weight\['web'\] is not a number: True"),
    (0.0, {"news": 0.5}, r"max_weight: unknown domain\(s\) \['news'\]"),
])
def test_bounds_that_are_not_bounds_are_refused_naming_them(low, high, match):
    with pytest.raises(ValueError, match=match):
        project_to_bounds({"code": 0.5, "web": 0.3, "books": 0.2}, low, high)


def test_non_finite_weights_are_refused_before_bounding_naming_the_domain():
    with pytest.raises(ValueError, match=r"domain\(s\) \['web'\] are not finite"):
        project_to_bounds({"code": 0.5, "web": math.nan, "books": 0.2})


@pytest.mark.parametrize("bound", [{"code": 0.2}, 0.0, 1.0])
def test_a_bound_in_zero_one_is_accepted(bound):
    check_bound(bound, "min_weight")


@pytest.mark.parametrize(("bound", "match"), [
    (1.5, r"min_weight must lie in \[0, 1\], got 1\.5"),
    ({"code": 1.5}, r"min_weight\['code'\] must lie in \[0, 1\]"),
    ({"code": "x"}, r"min_weight\['code'\] is not a number"),
])
def test_a_bound_outside_zero_one_is_refused_naming_it(bound, match):
    with pytest.raises(ValueError, match=match):
        check_bound(bound, "min_weight")


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5], b"1"])
def test_only_numbers_are_weights(value):
    with pytest.raises(ValueError, match=f"w: weight for domain 'a' is not a number: "
                       f"{re.escape(repr(value))}"):
        normalized({"a": value, "b": 1.0}, "w")


def test_normalised_weights_sum_to_one_even_near_the_float_maximum():
    assert normalized({"a": 1e308, "b": 1e308, "c": 1e308}, "w") == pytest.approx(
        dict.fromkeys("abc", 1 / 3))
    with pytest.raises(ValueError, match="all zero"):
        normalized({}, "w")


def test_weights_that_must_sum_to_one_may_miss_it_by_the_tolerance_only():
    assert normalized({"a": 0.5, "b": 0.5004}, "w", sum_tolerance=1e-3) == pytest.approx(
        {"a": 0.5 / 1.0004, "b": 0.5004 / 1.0004})
    with pytest.raises(ValueError, match=r"w: the weights sum to 1\.1, not 1"):
        normalized({"a": 0.6, "b": 0.5}, "w", sum_tolerance=1e-3)


# -- StaticMixture ----------------------------------------------------------------------------
def test_static_mixture_proposes_its_weights_normalised():
    policy = StaticMixture({"code": 2, "web": 1})
    assert policy.propose(state(1), UNIFORM) == {"code": 2 / 3, "web": 1 / 3, "books": 0.0}


def test_static_natural_weights_follow_the_corpus_token_counts():
    policy = StaticMixture("natural")
    policy.setup(DOMAINS, {"code": 600, "web": 300, "books": 100})
    assert policy.propose(state(1), UNIFORM) == pytest.approx(
        {"code": 0.6, "web": 0.3, "books": 0.1})


def test_static_natural_without_corpus_counts_uses_the_tokens_seen_or_waits():
    policy = StaticMixture("natural")
    assert policy.propose(TrainingState(), UNIFORM) is None  # nothing counted yet
    seen = state(5, per_domain_tokens={"code": 100, "web": 300, "books": 600})
    assert policy.propose(seen, UNIFORM) == pytest.approx({"code": 0.1, "web": 0.3, "books": 0.6})


def test_static_weights_for_an_unknown_domain_are_refused_naming_it():
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['news'\]"):
        StaticMixture({"news": 1.0}).setup(DOMAINS)


@pytest.mark.parametrize("weights", [{"code": -1.0}, {"code": float("nan")}, {"code": 0.0},
                                     "natura1", [0.5, 0.5]])
def test_static_weights_that_are_not_weights_are_refused(weights):
    with pytest.raises(ValueError, match="StaticMixture"):
        StaticMixture(weights)


def test_static_mixture_defaults_to_the_natural_mixture_updated_every_step():
    policy = StaticMixture()
    policy.setup(DOMAINS, {"code": 600, "web": 300, "books": 100})
    assert policy.propose(state(1), UNIFORM) == pytest.approx(
        {"code": 0.6, "web": 0.3, "books": 0.1})
    assert policy.due(1) and StagedMixture(STAGES).due(1)


def test_static_and_staged_mixtures_keep_a_copy_of_the_weights_they_were_given():
    weights, tau = {"code": 1.0, "web": 1.0}, {"code": 0.5}
    stage = {"name": "only", "weights": weights, "quality_temperature": tau}
    static, staged = StaticMixture(weights), StagedMixture([stage])
    weights["books"], tau["web"] = 8.0, 2.0
    assert staged.quality_temperature == {"code": 0.5}
    assert static.propose(state(1), UNIFORM) == {"code": 0.5, "web": 0.5, "books": 0.0}
    assert staged.propose(state(1), UNIFORM) == {"code": 0.5, "web": 0.5, "books": 0.0}


@pytest.mark.parametrize("policy", [
    StaticMixture({"code": 2.0}, update_every=3, min_weight=0.1),
    StagedMixture([{"name": "a", "weights": {"code": 1}, "until_step": 5},
                   {"weights": "uniform", "quality_temperature": 0.5}], max_weight=0.9)])
def test_a_fixed_mixture_is_rebuilt_from_its_config(policy):
    rebuilt = type(policy)(**policy.config())
    assert rebuilt.config() == policy.config()


def test_static_unknown_domains_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"StaticMixture\(weights\): unknown domain\(s\)"):
        StaticMixture({"news": 1.0}).setup(DOMAINS)


def test_static_temperature_weights_follow_the_corpus_token_counts():
    policy = StaticMixture("temperature:2")
    policy.setup(DOMAINS, {"code": 900, "web": 400, "books": 100})
    assert policy.propose(state(1), UNIFORM) == pytest.approx(
        {"code": 0.5, "web": 1 / 3, "books": 1 / 6})


# -- StagedMixture ----------------------------------------------------------------------------
STAGES = [
    {"name": "K6", "weights": {"code": 1, "web": 1}, "until_tokens": 1000},
    {"name": "K61", "weights": {"web": 1, "books": 3}, "until_tokens": 5000},
    {"name": "K62", "weights": "uniform"},
]


def test_staged_mixture_switches_at_the_token_count():
    policy = StagedMixture(STAGES)
    before = policy.propose(state(9, tokens=999), UNIFORM)
    assert policy.stage == "K6" and before == {"code": 0.5, "web": 0.5, "books": 0.0}
    at = policy.propose(state(10, tokens=1000), before)
    assert policy.stage == "K61" and at == {"code": 0.0, "web": 0.25, "books": 0.75}
    assert policy.propose(state(40, tokens=4999), at) == at and policy.stage == "K61"
    assert policy.propose(state(41, tokens=5000), at) == pytest.approx(UNIFORM)
    assert policy.stage == "K62"
    assert policy.switches == [{"stage": "K6", "step": 9, "tokens": 999},
                               {"stage": "K61", "step": 10, "tokens": 1000},
                               {"stage": "K62", "step": 41, "tokens": 5000}]


def test_staged_mixture_switches_at_the_step():
    policy = StagedMixture([{"name": "warm", "weights": {"code": 1}, "until_step": 50},
                            {"name": "main", "weights": {"web": 1}}])
    assert policy.propose(state(49), UNIFORM)["code"] == 1.0 and policy.stage == "warm"
    assert policy.propose(state(50), UNIFORM)["web"] == 1.0 and policy.stage == "main"


def test_staged_mixture_skips_stages_passed_at_once_and_never_goes_back():
    policy = StagedMixture(STAGES)
    policy.propose(state(1, tokens=6000), UNIFORM)
    assert policy.stage == "K62"
    policy.propose(state(2, tokens=10), UNIFORM)  # a token count that went back (a new TSM)
    assert policy.stage == "K62"


@pytest.mark.parametrize(("stages", "match"), [
    ([{"name": "a", "weights": {"code": 1}}, {"name": "b", "weights": {"web": 1}}],
     r"stages\[0\]\) needs until_tokens or until_step"),
    ([{"name": "a", "weights": {"code": 1}, "until_tokens": 9, "until_step": 3}],
     "both until_tokens and until_step"),
    ([{"name": "a", "weights": {"code": 1}, "until_tokens": 9},
      {"name": "b", "weights": {"code": 1}, "until_tokens": 5},
      {"name": "c", "weights": "uniform"}],
     "until_tokens must increase"),
    ([{"name": "a", "weight": {"code": 1}}], r"unknown key\(s\) \['weight'\]"),
    ([{"name": "a", "weights": {"code": 1}, "until_step": 5},
      {"name": "a", "weights": {"web": 1}}], "stage names repeat"),
    ([], "at least one stage"),
    ([{"name": "a", "weights": {"code": 1}, "until_step": 9},
      {"name": "b", "weights": {"code": 1}, "until_step": 5},
      {"name": "c", "weights": "uniform"}], "until_step must increase"),
    ("K6", "must be a list of stages"),
])
def test_malformed_stages_are_refused_naming_the_stage(stages, match):
    with pytest.raises(ValueError, match=match):
        StagedMixture(stages)


@pytest.mark.parametrize(("policy", "stages", "match"), [
    ("uniform", [], r"QualityCurriculum\(stages\) needs at least one stage"),
    ("uniform", {"name": "a"}, r"QualityCurriculum\(stages\) must be a list"),
    ("uniform", [{"name": "a", "weights": "uniform"}],
     r"stages\[0\]\) has unknown key\(s\) \['weights'\]"),
    ("uniform", [{"name": "a", "until_tokens": 5}, {"name": "b"}],
     r"stages\[0\]\) has unknown key\(s\) \['until_tokens'\]"),
    ("uniform", [{"name": "a"}, {"name": "b"}], r"stages\[0\]\) needs until_step"),
    ("uniform", [{"name": "a", "until_step": 0}, {"name": "b"}], r"must be a positive integer"),
    ("uniform", [{"name": "a", "until_step": 9}, {"name": "b", "until_step": 4}, {"name": "c"}],
     r"until_step must increase"),
    ("uniform", [{"name": "a", "until_step": 4}, {"name": "a"}], r"stage names repeat"),
    ("uniform", [{"name": "a", "quality_temperature": -1.0}], r"quality_temperature"),
    (None, [{"name": "a"}], r"QualityCurriculum\(policy\) must be a MixturePolicy"),
])
def test_malformed_curriculum_stages_are_refused_naming_the_stage(policy, stages, match):
    inner = StaticMixture(policy) if policy else {"weights": "uniform"}
    with pytest.raises(ValueError, match=match):
        QualityCurriculum(inner, stages)


def test_a_curriculum_stage_without_a_temperature_keeps_the_one_in_force():
    curriculum = QualityCurriculum(StaticMixture("uniform"), [
        {"name": "sharp", "until_step": 4, "quality_temperature": 0.5}, {"name": "later"}])
    curriculum.setup(["a", "b"])
    current = {"a": 0.5, "b": 0.5}
    curriculum.propose(TrainingState(step=0), current)
    assert (curriculum.stage, curriculum.quality_temperature) == ("sharp", 0.5)
    curriculum.propose(TrainingState(step=4), current)
    # no opinion (None), so the engine leaves the mixture's temperature, 0.5, in force
    assert (curriculum.stage, curriculum.quality_temperature) == ("later", None)


def test_staged_stages_without_names_are_numbered():
    policy = StagedMixture([{"weights": {"code": 1}, "until_step": 5}, {"weights": "uniform"}])
    assert [s["name"] for s in policy.stages] == ["stage0", "stage1"]


def test_a_last_stage_with_an_end_stays_in_force_past_it():
    policy = StagedMixture(STAGES[:2])  # the last stage ends at 5000 tokens: nothing follows
    policy.propose(state(1, tokens=9000), UNIFORM)
    assert policy.stage == "K61"


def test_staged_max_weight_applies_to_every_stage():
    policy = StagedMixture([{"name": "a", "weights": {"code": 1}}], max_weight=0.5)
    assert policy.propose(state(1), UNIFORM)["code"] == pytest.approx(0.5)


def test_staged_natural_and_unimax_stages_read_the_counts_and_budget_of_setup():
    policy = StagedMixture([{"name": "a", "weights": "natural", "until_step": 5},
                            {"name": "b", "weights": "unimax:4"}])
    policy.setup(DOMAINS, {"code": 600, "web": 300, "books": 100},
                 unique_tokens={"code": 1000, "web": 4000, "books": 16000},
                 budget_tokens=63000)
    assert policy.propose(state(1), UNIFORM) == pytest.approx(
        {"code": 1 / 21, "web": 4 / 21, "books": 16 / 21})  # unique tokens come first
    assert policy.propose(state(5), UNIFORM) == pytest.approx(
        {"code": 4 / 63, "web": 16 / 63, "books": 43 / 63})
    natural = StagedMixture([{"name": "a", "weights": "natural"}])
    natural.setup(DOMAINS, {"code": 600, "web": 300, "books": 100})  # corpus counts only
    assert natural.propose(state(1), UNIFORM) == pytest.approx(
        {"code": 0.6, "web": 0.3, "books": 0.1})


@pytest.mark.parametrize(("given", "kept"), [
    (0.5, 0.5), (None, "inf"), ({"code": 0.5, "web": None}, {"code": 0.5, "web": None})])
def test_a_stage_quality_temperature_is_kept_as_given(given, kept):
    policy = StagedMixture([{"name": "a", "weights": "uniform", "quality_temperature": given}])
    assert policy.quality_temperature == kept
    assert StagedMixture([{"weights": "uniform"}]).quality_temperature is None


@pytest.mark.parametrize(("value", "match"), [
    (-1.0, r"stages\[0\]\)\.quality_temperature must be a positive number"),
    ({"code": 0}, r"stages\[0\]\)\.quality_temperature\['code'\] must be a positive"),
    ({"news": 1.0}, r"stages\[0\]\.quality_temperature\) names unknown domain"),
])
def test_a_stage_quality_temperature_that_is_not_one_is_refused_naming_it(value, match):
    with pytest.raises(ValueError, match=match):
        StagedMixture([{"weights": "uniform", "quality_temperature": value}]).setup(DOMAINS)


@pytest.mark.parametrize("end", [0, -5, 2.5, True, "100"])
def test_a_stage_end_that_is_not_a_positive_integer_is_refused(end):
    with pytest.raises(ValueError, match=r"stages\[0\]\)\.until_step must be a positive"):
        StagedMixture([{"weights": "uniform", "until_step": end}, {"weights": "uniform"}])
    assert StagedMixture([{"weights": "uniform", "until_step": 1},
                          {"weights": "uniform"}]).stages[0]["until_step"] == 1


# -- ExcessLossMixture ------------------------------------------------------------------------
REFERENCE = {"code": 2.0, "web": 2.0, "books": 2.0}


def test_excess_loss_moves_weight_to_the_domains_furthest_above_their_reference():
    policy = ExcessLossMixture(REFERENCE, step_size=1.0, smoothing=0.01)
    losses = {"code": 3.0, "web": 2.5, "books": 1.5}  # excess 1.0, 0.5, 0 (below reference)
    out = policy.propose(state(10, losses), UNIFORM)
    raw = {"code": math.exp(1.0), "web": math.exp(0.5), "books": 1.0}
    total = sum(raw.values())
    expected = {d: 0.99 * raw[d] / total + 0.01 / 3 for d in DOMAINS}
    assert out == pytest.approx(expected, rel=1e-12)
    assert out["code"] > out["web"] > out["books"]


def test_excess_loss_waits_for_a_fresh_loss_signal():
    policy = ExcessLossMixture(REFERENCE)
    s = state(10, {"code": 3.0, "web": 2.0, "books": 2.0})
    first = policy.propose(s, UNIFORM)
    assert first is not None
    assert policy.propose(s, first) is None  # same train_step: the same evidence again


def test_excess_loss_on_held_out_loss_uses_the_val_step():
    policy = ExcessLossMixture(REFERENCE, signal="val")
    s = state(10)
    assert policy.propose(s, UNIFORM) is None  # no validation yet
    s.val_loss, s.val_step = {"code": 2.0, "web": 4.0, "books": 2.0}, 10
    out = policy.propose(s, UNIFORM)
    assert out["web"] > out["code"] == pytest.approx(out["books"])


def test_excess_loss_ignores_non_finite_losses():
    policy = ExcessLossMixture(REFERENCE, smoothing=0.0)
    out = policy.propose(state(10, {"code": float("nan"), "web": 2.0, "books": 2.0}), UNIFORM)
    assert out == pytest.approx(UNIFORM)


def test_excess_loss_floor_keeps_every_domain_at_min_weight():
    policy = ExcessLossMixture(REFERENCE, step_size=50.0, smoothing=0.0, min_weight=0.05)
    out = policy.propose(state(10, {"code": 9.0, "web": 2.0, "books": 2.0}), UNIFORM)
    assert out["web"] == pytest.approx(0.05) and out["books"] == pytest.approx(0.05)


def test_reference_losses_are_read_from_a_monitor_metrics_file(tmp_path):
    rows = [{"step": 10, "tsm/train_loss/code": 5.0, "tsm/val_loss/code": 5.5},
            {"step": 20, "tsm/train_loss/code": 4.0, "tsm/train_loss/web": 3.0,
             "tsm/train_loss_ema/web": 9.0, "tsm/val_loss/code": None}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 3")  # torn line
    assert load_reference_losses(str(path), "train") == {"code": 4.0, "web": 3.0}
    assert load_reference_losses(str(path), "val") == {"code": 5.5}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_reference_losses_are_read_from_a_mapping_file(tmp_path, suffix):
    path = tmp_path / f"reference{suffix}"
    path.write_text(json.dumps(REFERENCE) if suffix == ".json" else yaml.safe_dump(REFERENCE))
    assert load_reference_losses(str(path)) == REFERENCE


def test_a_reference_without_a_mixture_domain_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"no loss for domain\(s\) \['books'\]"):
        ExcessLossMixture({"code": 1.0, "web": 1.0}).setup(DOMAINS)


def test_a_missing_reference_file_is_refused_naming_it_and_what_writes_one(tmp_path):
    missing = tmp_path / "reference" / "tsm" / "metrics.jsonl"
    with pytest.raises(ValueError) as refused:
        ExcessLossMixture(str(missing), signal="val")
    assert str(refused.value) == (
        f"ExcessLossMixture: the reference file {missing} does not exist; train the reference "
        "run first (its TrainingStateMonitor writes <trainer.default_root_dir>/tsm/metrics.jsonl)"
        " or give a .json/.yaml mapping domain -> loss")


def test_a_missing_reference_file_is_refused_naming_the_command_that_writes_it(tmp_path):
    missing = tmp_path / "reference" / "tsm" / "metrics.jsonl"
    command = "lightning-aquila fit --config a.yaml\n  --config reference.yaml"  # folded YAML
    with pytest.raises(ValueError) as refused:
        ExcessLossMixture(str(missing), signal="val", reference_command=command)
    assert str(refused.value) == (
        f"ExcessLossMixture: the reference file {missing} does not exist; create it with: "
        "lightning-aquila fit --config a.yaml --config reference.yaml")


# -- BanditMixture ----------------------------------------------------------------------------
def test_bandit_explores_uniformly_while_epsilon_is_one_over_k():
    policy = BanditMixture(update_every=1)
    # eps_t = min(1/K, sqrt(ln K / (K t))) stays 1/3 while step t <= 3 ln 3 (~3.3)
    early = [state(t, {"code": 9.0, "web": 3.0, "books": 2.0}) for t in (1, 2, 3)]
    out = drive(policy, early)
    assert all(w == pytest.approx(UNIFORM) for w in out)
    assert drive(policy, [state(4, {"code": 9.0, "web": 3.0, "books": 2.0})],
                 current=out[-1])[0]["code"] > 1 / 3


def test_bandit_moves_weight_to_the_domain_with_the_highest_loss():
    policy = BanditMixture(update_every=1)
    out = drive(policy, loss_stream(12))[-1]
    assert out["code"] > out["web"] > out["books"]  # losses ~4.5 > ~3.5 > ~2.5


def test_bandit_follows_the_exp3_update():
    policy = BanditMixture(smoothing=0.9, importance_weighted=True, update_every=1)
    losses = {"code": 4.0, "web": 3.0, "books": 2.0}
    current = {"code": 0.5, "web": 0.3, "books": 0.2}
    policy.setup(DOMAINS)
    eps_prev = policy.epsilon = math.sqrt(math.log(3) / (3 * 10))  # an update at step 10
    out = policy.propose(state(20, losses), current)
    rewards = {d: 0.1 * losses[d] / current[d] for d in DOMAINS}  # R: 0.9 * 0 + 0.1 * l / p
    eps = math.sqrt(math.log(3) / (3 * 20))
    raw = {d: math.exp(eps_prev * rewards[d]) for d in DOMAINS}
    total = sum(raw.values())
    assert out == pytest.approx({d: (1 - 3 * eps) * raw[d] / total + eps for d in DOMAINS},
                                rel=1e-12)


def test_bandit_rewards_only_the_domains_sampled_since_its_last_update():
    policy = BanditMixture(update_every=1, importance_weighted=False)
    policy.propose(state(10, {"code": 4.0, "web": 3.0, "books": 2.0}), UNIFORM)
    stale = state(20, {"code": 4.0, "web": 3.0, "books": 2.0},
                  per_domain_tokens={"code": 2000, "web": 1000, "books": 1000})
    before = dict(policy.rewards)
    policy.propose(stale, UNIFORM)
    assert policy.rewards["web"] == before["web"] and policy.rewards["books"] == before["books"]
    assert policy.rewards["code"] == pytest.approx(0.9 * before["code"] + 0.1 * 4.0)


def test_bandit_importance_weighting_favours_a_rarely_sampled_domain_at_equal_loss():
    policy = BanditMixture(update_every=1, importance_weighted=True)
    equal = {"code": 3.0, "web": 3.0, "books": 3.0}
    current = {"code": 0.6, "web": 0.3, "books": 0.1}
    policy.propose(state(10, equal), current)
    assert policy.rewards["books"] > policy.rewards["web"] > policy.rewards["code"]


def test_bandit_on_mixed_batches_does_not_favour_a_rare_domain_at_equal_loss():
    """Every domain is observed in every interval of mixed batches (full information), so by
    default the reward is the loss itself and equal losses give equal rewards."""
    policy = BanditMixture(update_every=1)
    equal = {"code": 3.0, "web": 3.0, "books": 3.0}
    current = {"code": 0.6, "web": 0.3, "books": 0.1}
    out = policy.propose(state(10, equal), current)
    assert policy.rewards == {d: pytest.approx(0.1 * 3.0) for d in DOMAINS}
    assert out == pytest.approx(UNIFORM)


# -- every policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(4))
def test_policies_keep_every_weight_within_bounds(index):
    policy = make_policies()[index]
    for weights in drive(policy, loss_stream(30, seed=index)):
        assert all(0.1 - 1e-12 <= w <= 0.45 + 1e-12 for w in weights.values())
        assert sum(weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("index", range(4))
def test_policies_are_deterministic_given_the_states(index):
    first = drive(make_policies()[index], loss_stream(20, seed=3))
    second = drive(make_policies()[index], loss_stream(20, seed=3))
    assert first == second


@pytest.mark.parametrize("index", range(4))
def test_policy_state_dict_round_trip_is_exact(index):
    states = loss_stream(20, seed=5)
    whole = make_policies()[index]
    expected = drive(whole, states)
    first = make_policies()[index]
    head = drive(first, states[:8])
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint can hold
    second = make_policies()[index]
    second.load_state_dict(saved)
    assert second.state_dict() == first.state_dict()
    assert head + drive(second, states[8:], current=head[-1]) == expected


def test_policies_are_chosen_from_yaml_by_class_path():
    policy = policy_from_yaml("""
class_path: lightning_aquila.callbacks.policies.StagedMixture
init_args:
  update_every: 5
  min_weight: 0.01
  stages:
    - {name: K6, weights: {code: 0.7, web: 0.3}, until_tokens: 1000}
    - {name: K61, weights: uniform}
""")
    assert isinstance(policy, StagedMixture) and policy.update_every == 5
    assert [s["name"] for s in policy.stages] == ["K6", "K61"]
    for path, args in [("StaticMixture", {"weights": "natural"}),
                       ("ExcessLossMixture", {"reference": {"code": 2.0}, "signal": "val"}),
                       ("BanditMixture", {"smoothing": 0.8})]:
        built = policy_from_config({"class_path": f"lightning_aquila.callbacks.policies.{path}",
                                    "init_args": args})
        assert type(built).__name__ == path


# -- what mutation testing found untested in the bandit and DoReMi policies ---------------------
def test_bandit_and_excess_loss_defaults_are_the_documented_ones_and_configs_rebuild_them():
    assert BanditMixture().config() == {"smoothing": 0.9, "importance_weighted": False,
                                        "warmup_steps": 0, "update_every": 10,
                                        "min_weight": 0.0, "max_weight": 1.0}
    assert ExcessLossMixture(REFERENCE).config() == {
        "reference": REFERENCE, "signal": "train", "step_size": 1.0, "smoothing": 1e-3,
        "update_every": 10, "min_weight": 0.0, "max_weight": 1.0}
    for tuned in (BanditMixture(smoothing=0.5, importance_weighted=True, warmup_steps=7,
                                update_every=3, min_weight=0.1, max_weight=0.8),
                  ExcessLossMixture(REFERENCE, signal="val", step_size=0.5, smoothing=0.2,
                                    update_every=4, min_weight=0.1, max_weight=0.8,
                                    reference_command="make reference")):
        assert type(tuned)(**tuned.config()).config() == tuned.config()
    assert tuned.config()["reference_command"] == "make reference"


@pytest.mark.parametrize(("make", "match"), [
    (lambda: BanditMixture(smoothing=1.0), r"smoothing=1\.0\) must be in \[0, 1\)"),
    (lambda: BanditMixture(smoothing="x"), r"BanditMixture\(smoothing\) is not a number"),
    (lambda: BanditMixture(warmup_steps=-1), r"warmup_steps=-1\) must be >= 0"),
    (lambda: BanditMixture(warmup_steps=True), r"warmup_steps=True\) must be >= 0"),
    (lambda: BanditMixture(warmup_steps=1.5), r"warmup_steps=1\.5\) must be >= 0"),
    (lambda: ExcessLossMixture(REFERENCE, signal="dev"), r"signal='dev'\) must be 'train'"),
    (lambda: ExcessLossMixture(REFERENCE, step_size=0), r"step_size=0\) must be positive"),
    (lambda: ExcessLossMixture(REFERENCE, step_size="x"),
     r"ExcessLossMixture\(step_size\) is not a number"),
    (lambda: ExcessLossMixture(REFERENCE, smoothing=1.5), r"smoothing=1\.5\) must be in \[0, 1\]"),
    (lambda: ExcessLossMixture(REFERENCE, smoothing="x"),
     r"ExcessLossMixture\(smoothing\) is not a number"),
    (lambda: ExcessLossMixture(3), r"reference=3\) must be a mapping domain -> loss or the path"),
])
def test_bandit_and_excess_loss_settings_out_of_range_are_refused_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bandit_and_excess_loss_accept_the_edges_of_their_ranges():
    assert BanditMixture(smoothing=0.0).smoothing == 0.0
    assert ExcessLossMixture(REFERENCE, smoothing=1.0, step_size=1e-9).smoothing == 1.0


def test_bandit_waits_for_its_warmup_step_and_starts_at_it():
    policy = BanditMixture(update_every=1, warmup_steps=20)
    losses = {"code": 4.0, "web": 3.0, "books": 2.0}
    assert policy.propose(state(19, losses), UNIFORM) is None
    assert policy.propose(state(20, losses), UNIFORM) is not None


def test_bandit_first_update_uses_one_over_k_as_its_temperature():
    policy = BanditMixture(smoothing=0.0, update_every=1)
    losses = {"code": 4.0, "web": 3.0, "books": 2.0}
    out = policy.propose(state(30, losses), UNIFORM)
    eps = math.sqrt(math.log(3) / (3 * 30))
    raw = {d: math.exp(losses[d] / 3) for d in DOMAINS}
    total = sum(raw.values())
    assert out == pytest.approx({d: (1 - 3 * eps) * raw[d] / total + eps for d in DOMAINS},
                                rel=1e-12)


def test_bandit_exploration_decays_with_two_domains_too():
    policy = BanditMixture()
    policy.setup(["code", "web"])
    assert policy.exploration(0) == 0.5
    assert policy.exploration(100) == pytest.approx(math.sqrt(math.log(2) / 200))


def test_bandit_does_not_reward_a_domain_absent_from_the_token_counts_or_at_weight_zero():
    policy = BanditMixture(update_every=1, importance_weighted=True, smoothing=0.0)
    losses = {"code": 4.0, "web": 3.0, "books": 2.0}
    out = policy.propose(state(10, losses, per_domain_tokens={"code": 500, "web": 500}),
                         {"code": 0.5, "web": 0.5, "books": 0.0})
    assert policy.rewards["books"] == 0.0 and all(map(math.isfinite, out.values()))
    assert policy.tokens_seen == {"code": 500, "web": 500, "books": 0}
    policy.propose(state(20, losses, per_domain_tokens={"code": 900, "web": 500, "books": 9}),
                   {"code": 0.5, "web": 0.5, "books": 0.0})
    assert policy.rewards["books"] == 0.0 and policy.rewards["web"] == 6.0  # 3.0 / 0.5


def test_bandit_a_huge_importance_weighted_reward_does_not_overflow():
    policy = BanditMixture(update_every=1, importance_weighted=True)
    out = policy.propose(state(10, {"code": 10.0, "web": 3.0, "books": 2.0}),
                         {"code": 1e-5, "web": 0.5, "books": 0.5 - 1e-5})
    assert all(map(math.isfinite, out.values())) and out["code"] == max(out.values())


def test_excess_loss_builds_on_its_previous_weights_and_survives_a_large_excess():
    policy = ExcessLossMixture(REFERENCE, step_size=1.0, smoothing=0.0)
    first = policy.propose(state(10, {"code": 3.0, "web": 2.0, "books": 2.0}), UNIFORM)
    second = policy.propose(state(20, {"code": 2.0, "web": 3.0, "books": 2.0}), first)
    raw = {"code": first["code"], "web": first["web"] * math.e, "books": first["books"]}
    assert second == pytest.approx({d: v / sum(raw.values()) for d, v in raw.items()},
                                   rel=1e-12)
    huge = ExcessLossMixture(REFERENCE, step_size=1000.0, smoothing=0.0)
    out = huge.propose(state(10, {"code": 5.0, "web": 4.0, "books": 2.0}), UNIFORM)
    assert out == pytest.approx({"code": 1.0, "web": 0.0, "books": 0.0})


def test_excess_loss_state_round_trips_before_its_first_update_and_resumes_on_new_domains():
    fresh = ExcessLossMixture(REFERENCE)
    again = ExcessLossMixture(REFERENCE)
    again.load_state_dict(json.loads(json.dumps(fresh.state_dict())))
    assert again.state_dict() == fresh.state_dict() == {
        "alpha": None, "last_signal_step": None, "updates": 0}
    policy = ExcessLossMixture({**REFERENCE, "math": 2.0}, smoothing=0.0)
    policy.setup(["code", "web"])
    policy.propose(state(10, {"code": 3.0, "web": 2.0}, per_domain_tokens={"code": 1, "web": 1}),
                   {"code": 0.5, "web": 0.5})
    kept = dict(policy.alpha)
    policy.setup(["code", "web", "math"])  # a resume with a domain added
    assert policy.alpha == pytest.approx({"code": kept["code"] * 3 / 4, "web": kept["web"] * 3 / 4,
                                          "math": 1 / 4})


def test_reference_losses_from_bad_files_are_refused_naming_the_file_and_the_value(tmp_path):
    cases = {"metrics.jsonl": ('{"step": 1, "tsm/val_loss/code": 2.0}\n', "holds no "
                               "tsm/train_loss/<domain> values"),
             "list.json": ("[1, 2]", "must hold a mapping domain -> loss, got list"),
             "word.json": ('{"code": "low"}', "reference loss of 'code' is not a number: 'low'"),
             "inf.yml": ("code: .inf", "reference loss of 'code' is not finite: inf")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}") + ".*" + match):
            load_reference_losses(str(tmp_path / name))
    (tmp_path / "ok.yml").write_text("code: 2.5\n")
    assert load_reference_losses(str(tmp_path / "ok.yml")) == {"code": 2.5}


def test_the_reference_runs_tokenizer_is_read_from_its_events_file(tmp_path):
    from lightning_aquila.tracking.run_files import EVENTS_FILE

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "tsm/train_loss/code": 2.0}\n')
    assert ExcessLossMixture(str(metrics)).reference_tokenizer is None  # no events file
    (tmp_path / EVENTS_FILE).write_text("\n".join(json.dumps(e) for e in [
        {"kind": "stop", "tokenizer": "wrong"}, {"kind": "session_start"},
        {"kind": "session_start", "tokenizer": "abc123"},
        {"kind": "session_start", "tokenizer": "later"}]) + "\n")
    assert ExcessLossMixture(str(metrics)).reference_tokenizer == "abc123"
    (tmp_path / "reference.json").write_text('{"code": 2.0}')
    assert ExcessLossMixture(str(tmp_path / "reference.json")).reference_tokenizer is None
    assert ExcessLossMixture({"code": 2.0}).reference_tokenizer is None


def test_excess_loss_on_held_out_loss_reads_the_reference_runs_held_out_loss_and_waits_for_it(
        tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 5, "tsm/train_loss/code": 9.0,
                                   "tsm/val_loss/code": 2.0, "tsm/val_loss/code/p90": 7.0,
                                   "tsm/val_loss/web": 2.0, "tsm/val_loss/books": 2.0}) + "\n")
    policy = ExcessLossMixture(str(metrics), signal="val")
    assert policy.reference_losses == {"code": 2.0, "web": 2.0, "books": 2.0}
    seen = state(10)
    seen.val_loss, seen.val_step = {"code": 3.0, "web": 2.0, "books": 2.0}, 10
    first = policy.propose(seen, UNIFORM)
    later = state(20)  # training moved on, no new held-out evaluation
    later.val_loss, later.val_step = seen.val_loss, 10
    assert first is not None and policy.propose(later, first) is None


def test_excess_loss_keeps_a_copy_of_its_reference_and_a_run_without_a_tokenizer_record(
        tmp_path):
    given = dict(REFERENCE)
    policy = ExcessLossMixture(given)
    given["code"] = 9.0
    assert policy.config()["reference"] == REFERENCE
    from lightning_aquila.tracking.run_files import EVENTS_FILE

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tsm/train_loss/code": 2.0}\n')
    (tmp_path / EVENTS_FILE).write_text('{"kind": "session_start"}\n')
    assert ExcessLossMixture(str(tmp_path / "metrics.jsonl")).reference_tokenizer is None
