"""AioliMixture on constructed TrainingStates from a simulated run whose held-out losses follow
a known linear mixing law: the policy probes every domain, recovers the law, exploits it,
resumes exactly from its state_dict, and says what is wrong with bad settings."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from helpers.policies import policy_from_yaml

from lightning_aquila.callbacks.policies import MixturePolicy
from lightning_aquila.callbacks.policies.aioli import AioliMixture
from lightning_aquila.callbacks.state import TrainingState

DOMAINS = ["code", "web", "books"]
V = 10  # steps per interval = the trainer's val_check_interval


class LinearRun:
    """A run whose held-out loss drops by ``A @ p + common`` over every interval trained on
    mixture ``p``; its evaluations reach the policy one interval late, as in Lightning, where
    validation at step s runs after the engine's update at step s."""

    def __init__(self, a: np.ndarray, common: float = 0.05, interval: int = V) -> None:
        self.a, self.common, self.interval = a, common, interval
        self.loss = np.full(len(DOMAINS), 5.0)
        self.vals: dict[int, dict[str, float]] = {}

    def state(self, step: int) -> TrainingState:
        seen = [s for s in self.vals if s < step]
        if not seen:
            return TrainingState(step=step)
        last = max(seen)
        return TrainingState(step=step, val_loss=dict(self.vals[last]), val_step=last)

    def train(self, step: int, weights: dict[str, float]) -> None:
        """The interval (step, step + interval] on ``weights``, then its evaluation."""
        p = np.array([weights[d] for d in DOMAINS])
        self.loss = self.loss - self.a @ p - self.common
        self.vals[step + self.interval] = dict(zip(DOMAINS, self.loss.tolist()))


def drive(policy: MixturePolicy, run: LinearRun, intervals: int,
          current: dict[str, float] | None = None, start: int = 0) -> list[dict[str, float]]:
    current = dict(current or dict.fromkeys(DOMAINS, 1 / 3))
    seen = []
    for i in range(start, start + intervals):
        step = i * run.interval
        proposal = policy.propose(run.state(step), current)
        if proposal is not None:
            current = proposal
        seen.append(dict(current))
        run.train(step, current)
    return seen


# A[i, j]: how much training on domain j lowers domain i's held-out loss. Training on "books"
# helps everyone; "web" helps itself a little; "code" helps code only.
A = np.array([[0.03, 0.00, 0.02],
              [0.00, 0.01, 0.02],
              [0.00, 0.00, 0.04]])


def test_aioli_probes_each_domain_once_per_sweep_with_the_one_hot_factor():
    policy = AioliMixture(one_hot_factor=0.8, lp_rounds=2, update_every=V, seed=3)
    seen = drive(policy, LinearRun(A), 7)[1:]  # step 0 keeps the mixture: nothing to probe from
    probed = [max(w, key=w.get) for w in seen]
    assert sorted(probed[:3]) == sorted(DOMAINS) and sorted(probed[3:]) == sorted(DOMAINS)
    assert probed == policy.probe_order(0)
    for w, domain in zip(seen, probed):
        assert w == pytest.approx({d: 0.8 if d == domain else 0.1 for d in DOMAINS})


def test_aioli_probe_order_is_seeded_and_differs_between_rounds():
    domains = [f"d{i}" for i in range(8)]
    policy, same, other = AioliMixture(seed=7), AioliMixture(seed=7), AioliMixture(seed=8)
    for p in (policy, same, other):
        p.setup(domains)
    assert sorted(policy.probe_order(0)) == domains
    assert policy.probe_order(0) == same.probe_order(0)
    assert policy.probe_order(0) != policy.probe_order(1)
    assert other.probe_order(0) != policy.probe_order(0)


def test_aioli_recovers_the_mixing_law_from_the_held_out_losses():
    """With an exactly linear run the fitted matrix is A plus the drop every domain has
    anyway (which the probes cannot tell apart from A and which changes no weight), shifted
    to be non-negative and normalised, as the paper's code does."""
    common = 0.05
    policy = AioliMixture(ema=0.0, eta=1.0, update_every=V, exploit_updates=3)
    drive(policy, LinearRun(A, common=common), len(DOMAINS) + 3)
    assert policy.matrices == 1
    expected = A + common
    expected = (expected - min(expected.min(), 0)) / expected.sum()
    assert np.array(policy.a_ema) == pytest.approx(expected, abs=1e-9)


def test_aioli_exploits_the_domain_that_lowers_the_held_out_loss_most():
    policy = AioliMixture(eta=20.0, update_every=V, exploit_updates=3)
    seen = drive(policy, LinearRun(A), len(DOMAINS) + 3)
    exploit = seen[-1]
    assert exploit["books"] > exploit["code"] > exploit["web"]  # column sums .08 > .03 > .01
    column = A.sum(axis=0) + 3 * 0.05
    column = column / (A + 0.05).sum()
    expected = np.exp(20.0 * (column - column.max()))
    assert [exploit[d] for d in DOMAINS] == pytest.approx(expected / expected.sum(), rel=1e-9)


def test_aioli_turns_away_from_a_domain_whose_held_out_loss_rises_when_trained_on():
    """A small domain repeated many times: training on it lowers its training loss but raises
    its held-out loss (negative diagonal); the exploit weight of that domain falls below the
    uniform prior."""
    overfit = np.array([[0.03, 0.0, 0.0],
                        [0.0, 0.03, 0.0],
                        [0.0, 0.0, -0.02]])
    policy = AioliMixture(eta=10.0, update_every=V, exploit_updates=3)
    seen = drive(policy, LinearRun(overfit), len(DOMAINS) + 3)
    assert seen[-1]["books"] < 1 / 3 < seen[-1]["code"]


def test_aioli_keeps_the_prior_until_its_first_law_and_during_warmup():
    policy = AioliMixture(update_every=V, warmup_steps=2 * V, prior="uniform")
    start = {"code": 0.5, "web": 0.3, "books": 0.2}
    seen = drive(policy, LinearRun(A), 2 + len(DOMAINS) + 1, current=start)
    assert seen[:2] == [start, start]  # warm-up: the mixture's own weights
    assert seen[2 + len(DOMAINS)] == pytest.approx(dict.fromkeys(DOMAINS, 1 / 3))


def test_aioli_drops_an_evaluation_whose_interval_spans_two_mixtures():
    """update_every unequal to the evaluation interval: no probe is measured cleanly, so the
    policy warns, names the setting and keeps its weights."""
    policy = AioliMixture(update_every=V, exploit_updates=3)
    with pytest.warns(UserWarning, match="val_check_interval"):
        for i in range(len(DOMAINS) + 3):
            step = i * V
            # evaluations land mid-interval (every V, offset by V // 2)
            state = TrainingState(step=step)
            if i:
                state.val_loss = dict(zip(DOMAINS, (5.0 - 0.01 * i,) * 3))
                state.val_step = step - V // 2
            policy.propose(state, dict.fromkeys(DOMAINS, 1 / 3))
    assert policy.matrices == 0 and policy.exploit is None


@pytest.mark.parametrize("split", range(1, 14))
def test_aioli_state_dict_round_trip_resumes_exactly(split):
    """Resumed at every interval of 14: mid-round, right after a law is fitted and while it
    exploits one, so every field of the state (the fitted matrices, their EMA, the exploit
    weights, the round) has to survive the round trip."""
    whole = AioliMixture(update_every=V, exploit_updates=3, lp_rounds=1, seed=1)
    expected = drive(whole, LinearRun(A), 14)
    assert whole.matrices >= 2 and whole.a_ema is not None  # the run does fit laws
    first = AioliMixture(update_every=V, exploit_updates=3, lp_rounds=1, seed=1)
    run = LinearRun(A)
    head = drive(first, run, split)
    saved = json.loads(json.dumps(first.state_dict()))
    second = AioliMixture(update_every=V, exploit_updates=3, lp_rounds=1, seed=1)
    second.load_state_dict(saved)
    assert second.state_dict() == first.state_dict()
    assert head + drive(second, run, 14 - split, current=head[-1], start=split) == expected


def test_aioli_weights_stay_within_bounds():
    policy = AioliMixture(update_every=V, exploit_updates=2, eta=50.0, min_weight=0.1,
                          max_weight=0.8)
    for weights in drive(policy, LinearRun(A), 20):
        assert all(0.1 - 1e-12 <= w <= 0.8 + 1e-12 for w in weights.values())
        assert sum(weights.values()) == pytest.approx(1.0)


def test_aioli_warns_when_max_weight_caps_the_probes():
    policy = AioliMixture(one_hot_factor=0.75, max_weight=0.5)
    with pytest.warns(UserWarning, match="max_weight"):
        policy.setup(DOMAINS)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eta": 0}, "eta"), ({"one_hot_factor": 1.5}, "one_hot_factor"), ({"ema": 1.0}, "ema"),
    ({"lp_rounds": 0}, "lp_rounds"), ({"exploit_updates": 1}, "exploit_updates"),
    ({"prior": "stratified"}, "prior"), ({"warmup_steps": -1}, "warmup_steps"),
])
def test_aioli_bad_settings_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AioliMixture(**kwargs)


def test_aioli_is_chosen_from_yaml_by_class_path():
    policy = policy_from_yaml("""
class_path: lightning_aquila.callbacks.AioliMixture
init_args: {update_every: 50, eta: 2.0, prior: natural}
""")
    assert isinstance(policy, AioliMixture)
    assert (policy.update_every, policy.eta, policy.prior) == (50, 2.0, "natural")


# -- what mutation testing found untested ------------------------------------------------------
def normalised(law: np.ndarray) -> np.ndarray:
    """The fitted matrix of an exactly linear run: shifted to be non-negative, summing to 1."""
    law = law - min(law.min(), 0.0)
    return law / law.sum()


def test_aioli_defaults_are_the_documented_ones_and_the_config_rebuilds_the_policy():
    assert AioliMixture().config() == {
        "eta": 1.0, "one_hot_factor": 0.75, "lp_rounds": 1, "exploit_updates": 8, "ema": 0.1,
        "prior": "uniform", "warmup_steps": 0, "seed": 0, "update_every": 50,
        "min_weight": 0.0, "max_weight": 1.0}
    tuned = AioliMixture(eta=2.0, one_hot_factor=0.5, lp_rounds=2, exploit_updates=3, ema=0.3,
                         prior={"code": 2, "web": 1, "books": 1}, warmup_steps=20, seed=4,
                         update_every=7, min_weight=0.05, max_weight=0.9)
    assert AioliMixture(**tuned.config()).config() == tuned.config()


def test_aioli_needs_two_domains_and_names_what_is_not_a_number_or_not_a_domain():
    with pytest.raises(ValueError, match="at least two domains"):
        AioliMixture().setup(["code"])
    AioliMixture().setup(["code", "web"])
    with pytest.raises(ValueError, match=r"AioliMixture\(eta\) is not a number"):
        AioliMixture(eta="x")
    with pytest.raises(ValueError, match=r"AioliMixture\(prior\).*'fr'"):
        AioliMixture(prior={"code": 1.0, "fr": 1.0}).setup(DOMAINS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cap on the probes: no warning
        AioliMixture(prior="initial").setup(DOMAINS)


def test_aioli_starts_afresh_on_other_domains_and_keeps_what_it_learnt_on_the_same():
    policy = AioliMixture(update_every=V, exploit_updates=3)
    policy.setup(DOMAINS)
    drive(policy, LinearRun(A), len(DOMAINS) + 3)
    learnt = policy.state_dict()
    policy.setup(DOMAINS)
    assert policy.state_dict() == learnt and policy.matrices == 1
    policy.setup(["code", "web"])
    assert (policy.matrices, policy.a_ema, policy.exploit, policy.round) == (0, None, None, 0)


@pytest.mark.parametrize("prior", ["natural", "initial", {"code": 1, "web": 2, "books": 5}])
def test_aioli_exploits_the_law_times_its_prior(prior):
    start = {"code": 0.2, "web": 0.3, "books": 0.5}
    natural = {"code": 6.0, "web": 3.0, "books": 1.0}
    policy = AioliMixture(eta=3.0, ema=0.0, update_every=V, exploit_updates=3, prior=prior)
    policy.setup(DOMAINS, natural)
    seen = drive(policy, LinearRun(A), len(DOMAINS) + 3, current=start)
    weights = {"natural": natural, "initial": start}[prior] if isinstance(prior, str) else prior
    p = np.array([weights[d] for d in DOMAINS], dtype=float)
    expected = p / p.sum() * np.exp(3.0 * normalised(A + 0.05).sum(axis=0))
    assert [seen[-1][d] for d in DOMAINS] == pytest.approx(expected / expected.sum(), rel=1e-9)


def test_aioli_natural_prior_without_corpus_counts_is_the_mixtures_weights():
    start = {"code": 0.2, "web": 0.3, "books": 0.5}
    policy = AioliMixture(update_every=V, prior="natural")
    policy.setup(DOMAINS)
    drive(policy, LinearRun(A), 1, current=start)
    assert policy.prior_weights == start


def test_aioli_rounds_are_the_seeded_probes_then_exploit_updates_intervals():
    policy = AioliMixture(update_every=V, exploit_updates=3, seed=2)
    seen = drive(policy, LinearRun(A), 1 + 3 * (len(DOMAINS) + 3))
    for r in range(3):
        block = seen[1 + r * 6:1 + r * 6 + 6]
        assert [max(w, key=w.get) for w in block[:3]] == policy.probe_order(r)
        assert all(max(w.values()) == pytest.approx(0.75) for w in block[:3])
        assert all(max(w.values()) != pytest.approx(0.75) for w in block[3:])


def test_aioli_shifts_a_law_with_negative_entries_and_falls_back_to_uniform_without_signal():
    harmful = np.array([[0.03, -0.05, 0.0], [0.0, 0.02, 0.0], [-0.04, 0.0, 0.01]])
    policy = AioliMixture(ema=0.0, update_every=V, exploit_updates=3)
    drive(policy, LinearRun(harmful, common=0.0), len(DOMAINS) + 3)
    assert np.array(policy.a_ema) == pytest.approx(normalised(harmful), abs=1e-9)
    flat = AioliMixture(ema=0.0, update_every=V, exploit_updates=3)
    seen = drive(flat, LinearRun(np.zeros((3, 3)), common=0.0), len(DOMAINS) + 3)
    assert np.array(flat.a_ema) == pytest.approx(np.full((3, 3), 1 / 9))
    assert seen[-1] == pytest.approx(dict.fromkeys(DOMAINS, 1 / 3))


def test_aioli_smooths_each_new_law_with_the_previous_one():
    class Switching(LinearRun):  # the law changes once the first round is over
        def train(self, step, weights):
            self.a = A if step < 6 * V else A.T
            super().train(step, weights)

    policy = AioliMixture(ema=0.25, update_every=V, exploit_updates=3)
    drive(policy, Switching(A, common=0.0), 1 + 2 * (len(DOMAINS) + 3))
    assert policy.matrices == 2
    expected = 0.75 * normalised(A.T) + 0.25 * normalised(A)
    assert np.array(policy.a_ema) == pytest.approx(expected, abs=1e-9)


def test_aioli_a_large_eta_does_not_overflow():
    policy = AioliMixture(eta=1e4, update_every=V, exploit_updates=3)
    exploit = drive(policy, LinearRun(A), len(DOMAINS) + 3)[-1]
    assert exploit["books"] == pytest.approx(1.0) and all(np.isfinite(list(exploit.values())))


def test_aioli_averages_each_probe_over_its_own_measurements_and_skips_a_nan_evaluation():
    """Two sweeps; the evaluation ending the second sweep's first probe is NaN for one domain,
    so that probe and the next (whose interval starts there) are measured once, the third
    twice. The law of an exactly linear run is the same, however often each was measured."""
    class Holed(LinearRun):
        def train(self, step, weights):
            super().train(step, weights)
            if step == 4 * V:
                self.vals[step + V]["web"] = float("nan")

    policy = AioliMixture(ema=0.0, lp_rounds=2, update_every=V, exploit_updates=3)
    drive(policy, Holed(A), 1 + 2 * len(DOMAINS) + 2)
    assert sorted(policy.counts.values()) == [1, 1, 2]
    assert policy.matrices == 1
    assert np.array(policy.a_ema) == pytest.approx(normalised(A + 0.05), abs=1e-9)


def test_aioli_edges_of_its_ranges_integers_that_are_not_and_a_copy_of_its_prior():
    assert AioliMixture(one_hot_factor=1.0, ema=0.0).one_hot_factor == 1.0
    for kwargs in ({"one_hot_factor": 0.0}, {"lp_rounds": True}, {"lp_rounds": 1.5},
                   {"seed": "1"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AioliMixture(**kwargs)
    given = {"code": 1.0, "web": 1.0, "books": 1.0}
    policy = AioliMixture(prior=given)
    given["code"] = 9.0
    assert policy.config()["prior"] == {"code": 1.0, "web": 1.0, "books": 1.0}
