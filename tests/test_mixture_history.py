"""``DomainMixture`` on its own: what each change records, the defaults before a sampler
binds it, and how a checkpoint's history is taken over on resume (older checkpoints, added
domains, the quality temperature switched on or changed); a sampler only where a resume must
give the same sequence."""

from __future__ import annotations

import itertools
from dataclasses import asdict

import numpy as np
import pytest

from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.datamodules.sampler import MixtureSampler


def test_weights_must_sum_to_one_unless_normalize_is_asked():
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="mixture weights: the weights sum to 4"):
        mixture.set_weights({"a": 2.0, "b": 2.0})
    assert mixture.set_weights({"a": 3.0, "b": 1.0}, normalize=True).weights == {
        "a": 0.75, "b": 0.25}


def test_before_a_sampler_binds_it_every_change_applies_from_batch_zero():
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    assert (mixture.history[0].batch_index, mixture.history[0].reason) == (0, "initial")
    assert (mixture.next_batch_index, mixture.consumed_batches) == (0, 0)
    mixture.bind(lambda: 7)
    assert (mixture.next_batch_index, mixture.consumed_batches) == (7, 0)
    mixture.bind(lambda: 9, lambda: 4)
    assert (mixture.next_batch_index, mixture.consumed_batches) == (9, 4)


def test_listeners_get_each_accepted_change():
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    heard = []
    mixture.add_listener(heard.append)
    change = mixture.set_weights({"a": 1.0}, "policy")
    assert heard == [change]


def test_a_skip_records_its_reason_step_and_extra_and_one_batch_is_enough():
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    mixture.bind(lambda: 12)
    skip = mixture.skip_batches(1, "spike", step=6, loss=9.5)
    assert asdict(skip) == {"batch_index": 12, "count": 1, "reason": "spike", "step": 6,
                            "extra": {"loss": 9.5}}
    assert mixture.is_skipped(12) and not mixture.is_skipped(13)


def test_a_temperature_change_records_its_batch_reason_step_and_extra():
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0},
                            quality_temperature={"a": 1.0, "b": None})
    first = mixture.temperatures[0]
    assert (first.batch_index, first.reason) == (0, "initial")
    mixture.bind(lambda: 5)
    change = mixture.set_quality_temperature({"b": 2.0}, "stage K61", step=3, source="engine")
    assert asdict(change) == {"batch_index": 5, "temperature": {"a": 1.0, "b": 2.0},
                              "reason": "stage K61", "step": 3,
                              "extra": {"source": "engine"}}


def _sampler(mixture: DomainMixture) -> MixtureSampler:
    return MixtureSampler(mixture, {"a": 300, "b": 500}, batch_size=4, seed=3,
                          block_windows=16, shuffle_blocks=2, epoch_batches=1000,
                          consume_on_yield=True)


def _take(sampler: MixtureSampler, count: int) -> list[list[list[int]]]:
    return [spec.tolist() for spec in itertools.islice(iter(sampler), count)]


def test_a_mixture_without_scores_round_trips_to_the_same_sequence_and_no_temperature():
    def first_part() -> tuple[DomainMixture, MixtureSampler]:
        mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
        sampler = _sampler(mixture)
        _take(sampler, 12)
        mixture.set_weights({"a": 0.9, "b": 0.1}, "policy")  # from batch 12 on
        return mixture, sampler

    whole = _take(first_part()[1], 18)
    saved, saved_sampler = first_part()
    resumed = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    assert resumed.load_state_dict(saved.state_dict()) is None
    sampler = _sampler(resumed)
    sampler.load_state_dict(saved_sampler.state_dict())
    assert _take(sampler, 18) == whole
    assert resumed.weights == {"a": 0.9, "b": 0.1}
    assert (resumed.temperatures, resumed.quality_temperature, resumed.temperature_at(20)) == (
        [], None, {})


def test_an_older_checkpoint_without_skips_or_configured_weights_resumes_unchanged():
    saved = DomainMixture(["a", "b"], {"a": 1.0, "b": 3.0}).state_dict()
    del saved["skips"], saved["configured"]
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 3.0})
    assert mixture.load_state_dict(saved) is None
    assert mixture.skips == [] and len(mixture.history) == 1


def test_a_domain_added_on_resume_is_at_zero_until_the_recorded_change():
    old = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    mixture = DomainMixture(["a", "b", "c"], {"a": 1.0, "b": 1.0, "c": 2.0})
    change = mixture.load_state_dict(old.state_dict(), next_batch_index=8)
    assert change.reason == "resume: domains changed (added ['c'], removed [])"
    assert change.batch_index == 8
    assert mixture.weights_at(7).tolist() == [0.5, 0.5, 0.0]
    assert np.allclose(mixture.weights_at(8), [0.25, 0.25, 0.5])


def test_a_domain_added_at_weight_zero_or_one_removed_on_resume_is_a_recorded_change():
    """Either edit of the domain list alone (nothing else configured differently) records the
    configured weights at the next batch, replacing what a policy had set: a removed domain
    must stop being drawn, and an added one is announced even at weight 0."""
    old = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    old.set_weights({"a": 0.2, "b": 0.8}, "policy")
    added = DomainMixture(["a", "b", "held"], {"a": 1.0, "b": 1.0, "held": 0.0})
    change = added.load_state_dict(old.state_dict(), next_batch_index=4)
    assert change.reason == "resume: domains changed (added ['held'], removed [])"
    assert added.weights_at(4).tolist() == [0.5, 0.5, 0.0]
    removed = DomainMixture(["a"], {"a": 1.0})
    change = removed.load_state_dict(old.state_dict(), next_batch_index=4)
    assert change.reason == "resume: domains changed (added [], removed ['b'])"
    assert removed.weights_at(4).tolist() == [1.0]


def test_quality_sampling_switched_on_at_resume_starts_at_the_next_batch():
    old = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0})
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0}, quality_temperature={"a": 2.0})
    mixture.bind(lambda: 11)
    mixture.load_state_dict(old.state_dict())
    [change] = mixture.temperatures
    assert (change.batch_index, change.temperature, change.reason) == (
        11, {"a": 2.0, "b": None}, "resume: quality sampling switched on")


def test_a_configured_temperature_changed_at_resume_follows_the_saved_history():
    old = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0}, quality_temperature={"a": 1.0})
    old.bind(lambda: 5)
    old.set_quality_temperature({"b": 3.0})
    mixture = DomainMixture(["a", "b"], {"a": 1.0, "b": 1.0}, quality_temperature={"a": 2.0})
    mixture.load_state_dict(old.state_dict(), next_batch_index=3)
    assert [(t.batch_index, t.temperature) for t in mixture.temperatures] == [
        (0, {"a": 1.0, "b": None}), (5, {"a": 1.0, "b": 3.0}), (5, {"a": 2.0, "b": None})]
    assert mixture.temperatures[-1].extra == {"previous": {"a": 1.0, "b": 3.0}}
    assert mixture.temperature_at(4) == {"a": 1.0, "b": None}
