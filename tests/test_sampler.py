"""The domain-mixture sampler and the Mixture contract, specified on window counts."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.datamodules.sampler import EpochOrder, MixtureSampler

WINDOWS = {"code": 3000, "en": 5000, "zh": 2000}


def make_sampler(weights=None, *, windows=WINDOWS, batch_size=8, world=1, rank=0, seed=0,
                 mixture=None, **kwargs) -> MixtureSampler:
    mixture = mixture or DomainMixture(list(windows), weights or {"code": 0.2, "en": 0.5,
                                                                  "zh": 0.3})
    return MixtureSampler(mixture, windows, batch_size=batch_size, num_replicas=world,
                          rank=rank, seed=seed, block_windows=kwargs.pop("block_windows", 64),
                          shuffle_blocks=kwargs.pop("shuffle_blocks", 4),
                          epoch_batches=kwargs.pop("epoch_batches", 10_000), **kwargs)


def take(sampler: MixtureSampler, count: int, *, consume: bool = True) -> list[np.ndarray]:
    """Draw ``count`` batches; ``consume`` also reports each one as taken by training."""
    batches = list(itertools.islice(iter(sampler), count))
    if consume:
        for _ in batches:
            sampler.mark_consumed()
    return batches


def shares(batches: list[np.ndarray], n_domains: int) -> np.ndarray:
    domains = np.concatenate([b[:, 0] for b in batches])
    return np.bincount(domains, minlength=n_domains), len(domains)


def assert_binomial(counts: np.ndarray, total: int, weights: dict[str, float], sigmas=4.0):
    """Each domain's count ~ Binomial(total, w): within ``sigmas`` standard deviations."""
    for count, w in zip(counts, weights.values()):
        std = math.sqrt(total * w * (1 - w))
        assert abs(count - total * w) <= sigmas * std + 1e-9, (count, total * w, std)


def test_domain_shares_match_the_weights_within_four_binomial_sigmas():
    weights = {"code": 0.2, "en": 0.5, "zh": 0.3}
    counts, total = shares(take(make_sampler(weights), 2000), 3)
    assert total == 16_000
    # 4 sigma: a correct sampler fails this with probability < 1e-4 per domain; a sampler
    # that ignored the weights (uniform) would be ~40 sigma off for "en".
    assert_binomial(counts, total, weights)


def test_shares_follow_a_weight_change_from_its_recorded_batch_on():
    sampler = make_sampler()
    before = take(sampler, 300)
    new = {"code": 0.7, "en": 0.1, "zh": 0.2}
    change = sampler.mixture.set_weights(new, reason="test")
    assert change.batch_index == 300
    after = take(sampler, 500)
    counts, total = shares(after, 3)
    assert_binomial(counts, total, new)
    assert len(before) == 300


def test_a_change_applies_from_the_first_batch_not_yet_drawn():
    sampler = make_sampler({"code": 1.0})
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(5)]
    sampler.mark_consumed()  # training has taken one; four are still queued
    change = sampler.mixture.set_weights({"zh": 1.0})
    assert change.batch_index == 5
    assert all((b[:, 0] == 0).all() for b in drawn)
    assert (next(iterator)[:, 0] == 2).all()


def test_a_zero_weight_domain_is_never_drawn():
    counts, _ = shares(take(make_sampler({"code": 0.0, "en": 0.5, "zh": 0.5}), 500), 3)
    assert counts[0] == 0


def test_the_sequence_is_a_function_of_seed_world_rank_and_history():
    def run(**kwargs):
        sampler = make_sampler(**kwargs)
        first = take(sampler, 50)
        sampler.mixture.set_weights({"code": 0.9, "en": 0.1})
        return np.stack(first + take(sampler, 50))

    assert np.array_equal(run(), run())
    assert not np.array_equal(run(), run(seed=1))
    assert not np.array_equal(run(world=2, rank=0), run(world=2, rank=1))


def test_each_epoch_visits_every_window_of_a_domain_exactly_once():
    order = EpochOrder("en", seed=3, block_windows=7, shuffle_blocks=3)
    for epoch in (0, 1):
        ids = order.windows(epoch, 100, np.arange(100))
        assert sorted(ids.tolist()) == list(range(100))
    assert not np.array_equal(order.windows(0, 100, np.arange(100)),
                              order.windows(1, 100, np.arange(100)))


@pytest.mark.parametrize("shuffle_blocks", [4, 1])
def test_the_draw_order_is_local_so_few_chunks_are_live_at_once(shuffle_blocks):
    order = EpochOrder("en", seed=0, block_windows=64, shuffle_blocks=shuffle_blocks)
    ids = order.windows(0, 64 * 100, np.arange(64 * 100))
    # Each group of 64 x shuffle_blocks consecutive draws touches shuffle_blocks blocks.
    group = 64 * shuffle_blocks
    for start in range(0, len(ids), group):
        assert len(np.unique(ids[start:start + group] // 64)) <= shuffle_blocks


def test_ranks_get_disjoint_windows_that_cover_the_domain_once_per_epoch():
    windows = {"en": 640}
    ranks = [make_sampler({"en": 1.0}, windows=windows, batch_size=4, world=2, rank=r)
             for r in (0, 1)]
    # 640 windows / (4 samples x 2 ranks) = 80 global batches per epoch.
    seen = [np.concatenate([b[:, 1] for b in take(s, 80)]) for s in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(640))


def test_resuming_from_the_consumed_position_continues_the_exact_sequence():
    reference = take(make_sampler(), 60)
    sampler = make_sampler()
    iterator = iter(sampler)
    for _ in range(25):  # drawn 25 ...
        next(iterator)
    for _ in range(20):  # ... but training took only 20 (5 were in the prefetch queue)
        sampler.mark_consumed()
    state = sampler.state_dict()
    assert state["next_batch"] == 20
    resumed = make_sampler()
    resumed.load_state_dict(state)
    for expected, got in zip(reference[20:], take(resumed, 40)):
        np.testing.assert_array_equal(expected, got)


def test_a_new_iterator_restarts_from_the_consumed_position():
    sampler = make_sampler()
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(10)]
    for _ in range(4):
        sampler.mark_consumed()
    np.testing.assert_array_equal(next(iter(sampler)), drawn[4])


def test_changing_the_world_size_across_a_resume_neither_repeats_nor_skips():
    one = make_sampler(batch_size=4)
    take(one, 30)
    state = one.state_dict()
    continued = take(one, 20)
    halves = []
    for rank in (0, 1):
        sampler = make_sampler(batch_size=2, world=2, rank=rank)
        sampler.load_state_dict(state)
        halves.append(take(sampler, 20))
    for whole, a, b in zip(continued, *halves):
        np.testing.assert_array_equal(whole, np.concatenate([a, b]))


def test_resuming_with_a_domain_removed_continues_the_domains_that_stayed():
    everything = make_sampler({"code": 0.5, "en": 0.5})
    take(everything, 40)
    state = everything.state_dict()
    narrower = make_sampler(windows={"code": 3000, "en": 5000},
                            mixture=DomainMixture(["code", "en"], {"code": 0.5, "en": 0.5}))
    narrower.load_state_dict(state)
    # the domains that stayed go on from their cursors: same windows as without the change
    expected = take(everything, 30)
    got = take(narrower, 30)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_a_domain_added_on_resume_starts_at_its_first_epoch():
    small = make_sampler(windows={"code": 3000, "en": 5000},
                         mixture=DomainMixture(["code", "en"], {"code": 0.5, "en": 0.5}))
    take(small, 40)
    wider = make_sampler({"zh": 1.0})
    wider.load_state_dict(small.state_dict())
    assert wider.state_dict()["cursors"]["zh"] == {"epoch": 0, "position": 0, "windows": 2000}
    assert wider.state_dict()["cursors"]["en"] == small.state_dict()["cursors"]["en"]


def test_skipped_batches_are_drawn_but_never_yielded_and_survive_a_resume():
    reference = take(make_sampler(), 30)
    sampler = make_sampler()
    take(sampler, 10)
    skip = sampler.mixture.skip_batches(5, reason="spike")
    assert (skip.batch_index, skip.stop) == (10, 15)
    # a checkpoint written now holds the skip but has not reached it yet
    mixture_state, sampler_state = sampler.mixture.state_dict(), sampler.state_dict()
    after = take(sampler, 5)
    for expected, got in zip(reference[15:20], after):
        np.testing.assert_array_equal(expected, got)
    resumed = make_sampler()
    resumed.load_state_dict(sampler_state)
    resumed.mixture.load_state_dict(mixture_state)
    for expected, got in zip(reference[15:20], take(resumed, 5)):
        np.testing.assert_array_equal(expected, got)


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"fr": 1.0}, "unknown domain"), ({"en": -0.5, "zh": 1.5}, "negative: -0.5"),
     ({"en": float("nan"), "zh": 1.0}, "not finite: nan"), ({"en": 0.0}, "all zero"),
     ({"en": 0.5}, "sum to 0.5")],
)
def test_invalid_weights_raise_naming_the_value_and_leave_the_mixture_unchanged(weights,
                                                                               message):
    mixture = DomainMixture(["en", "zh"], {"en": 0.5, "zh": 0.5})
    with pytest.raises(ValueError, match=message):
        mixture.set_weights(weights)
    assert mixture.weights == {"en": 0.5, "zh": 0.5}
    assert len(mixture.history) == 1


def test_resuming_with_edited_configured_weights_records_a_resume_change():
    old = DomainMixture(["en", "zh"], {"en": 0.5, "zh": 0.5})
    old.set_weights({"en": 0.9, "zh": 0.1}, reason="policy")
    same = DomainMixture(["en", "zh"], {"en": 0.5, "zh": 0.5})
    assert same.load_state_dict(old.state_dict(), next_batch_index=70) is None
    assert same.weights == {"en": 0.9, "zh": 0.1}  # the policy's weights stay in force
    edited = DomainMixture(["en", "zh"], {"en": 0.2, "zh": 0.8})
    change = edited.load_state_dict(old.state_dict(), next_batch_index=70)
    assert change.batch_index == 70 and change.reason.startswith("resume:")
    assert edited.weights == {"en": 0.2, "zh": 0.8}
    assert [c.reason for c in edited.history][:2] == ["initial", "policy"]


def test_resuming_with_a_changed_domain_set_records_a_resume_change():
    old = DomainMixture(["en", "zh"], {"en": 0.5, "zh": 0.5})
    new = DomainMixture(["en", "code"], {"en": 0.5, "code": 0.5})
    change = new.load_state_dict(old.state_dict(), next_batch_index=12)
    assert change.extra["added"] == ["code"] and change.extra["removed"] == ["zh"]
    np.testing.assert_allclose(new.weights_at(12), [0.5, 0.5])


# -- arguments, lengths and iterators ----------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"accumulate": 0}, "accumulate must be positive, got 0"),
    ({"world": 2, "rank": 2}, "rank 2 is outside the world of 2"),
    ({"windows": {"code": 3000, "en": 5000}, "mixture": DomainMixture(list(WINDOWS), {"en": 1})},
     r"domain\(s\) \['zh'\] have no training windows"),
    ({"windows": {"code": 3000, "en": 5000, "zh": 0}}, r"\['zh'\] have no training windows"),
])
def test_arguments_the_sampler_cannot_use_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**kwargs)


def test_a_domain_of_one_window_is_drawn_every_time_it_is_chosen():
    batches = take(make_sampler({"en": 1.0}, windows={"code": 3000, "en": 1, "zh": 2000}), 3)
    assert all((b == [1, 0]).all() for b in batches)


def test_a_nominal_epoch_is_the_windows_over_the_global_batch_and_an_iterator_stops_there():
    assert len(make_sampler(epoch_batches=None)) == math.ceil(10_000 / 8)
    assert len(make_sampler(epoch_batches=None, batch_size=4, accumulate=2)) == 2 * 1250
    tiny = make_sampler({"en": 1.0}, windows={"code": 1, "en": 5, "zh": 1}, epoch_batches=None)
    assert len(tiny) == 1
    sampler = make_sampler(epoch_batches=3)
    first, second = take(sampler, 10), take(sampler, 10)  # each iterator: one nominal epoch
    assert len(first) == len(second) == 3
    for a, b in zip(first + second, take(make_sampler(), 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_change_before_the_first_batch_applies_from_batch_zero():
    sampler = make_sampler()
    assert sampler.mixture.set_weights({"zh": 1.0}).batch_index == 0
    assert (take(sampler, 1)[0][:, 0] == 2).all()


def test_a_change_between_two_iterators_applies_from_the_first_batch_not_consumed():
    sampler = make_sampler({"code": 1.0})
    take(sampler, 4)
    drawn = list(itertools.islice(iter(sampler), 6))  # six drawn, none consumed
    again = iter(sampler)  # a new iterator goes back to the consumed position
    assert sampler.mixture.set_weights({"zh": 1.0}).batch_index == 4
    assert (next(again)[:, 0] == 2).all() and (drawn[0][:, 0] == 0).all()


def test_without_a_trainer_each_micro_batch_counts_as_consumed_when_yielded():
    reference = list(itertools.islice(iter(make_sampler(batch_size=4, accumulate=2)), 9))
    plain = make_sampler(batch_size=4, accumulate=2, consume_on_yield=True)
    got = list(itertools.islice(iter(plain), 5))  # two steps and half of the third
    state = plain.state_dict()
    assert (state["next_batch"], state["next_sample"]) == (2, 4)
    resumed = make_sampler(batch_size=4, accumulate=2)
    resumed.load_state_dict(state)
    got += take(resumed, 4)
    for a, b in zip(reference, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resume_inside_an_accumulation_goes_on_with_whole_steps():
    reference = take(make_sampler(batch_size=4, accumulate=2), 9)
    first = make_sampler(batch_size=4, accumulate=2)
    take(first, 5)  # two steps and the first micro-batch of the third
    resumed = make_sampler(batch_size=4, accumulate=2)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(reference[5:], take(resumed, 4), strict=True):
        np.testing.assert_array_equal(a, b)


# -- epochs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [8, 64])
def test_a_domain_is_drawn_epoch_after_epoch_also_across_boundaries_inside_a_batch(batch_size):
    """30 windows: a batch of 8 ends mid-epoch, one of 64 spans three epochs; 65 epochs in
    all, so every cache of the epoch order is refilled."""
    sampler = make_sampler({"en": 1.0}, windows={"en": 30}, batch_size=batch_size,
                           block_windows=4, shuffle_blocks=2,
                           mixture=DomainMixture(["en"], {"en": 1.0}))
    drawn = np.concatenate([b[:, 1] for b in take(sampler, 65 * 30 // batch_size)])
    order = EpochOrder("en", seed=0, block_windows=4, shuffle_blocks=2)
    epochs = [order.windows(e, 30, np.arange(30)) for e in range(len(drawn) // 30 + 1)]
    np.testing.assert_array_equal(drawn, np.concatenate(epochs)[:len(drawn)])
    assert all(sorted(e.tolist()) == list(range(30)) for e in epochs)


# -- resuming with another setting -------------------------------------------------------------
def cursors(sampler: MixtureSampler) -> dict[str, dict]:
    return sampler.state_dict()["cursors"]


@pytest.mark.parametrize(("kwargs", "same_windows"), [
    ({"seed": 1}, True), ({"block_windows": 32}, True), ({"shuffle_blocks": 2}, True),
    ({}, False),  # seq_len changed: the windows are other windows
])
def test_a_resume_whose_epoch_order_changed_starts_every_domains_next_epoch(kwargs,
                                                                            same_windows):
    first = make_sampler()
    take(first, 40)
    before = cursors(first)
    resumed = make_sampler(**kwargs)
    with pytest.warns(UserWarning, match=r"\['code', 'en', 'zh'\] start a new epoch"):
        resumed.load_state_dict(first.state_dict(), same_windows=same_windows)
    assert cursors(resumed) == {d: {"epoch": c["epoch"] + 1, "position": 0,
                                    "windows": WINDOWS[d]} for d, c in before.items()}


def test_a_domain_with_fewer_windows_starts_its_next_epoch_and_one_with_more_goes_on():
    first = make_sampler()
    take(first, 40)
    before = cursors(first)
    resumed = make_sampler(windows={"code": 2999, "en": 5000, "zh": 2001})
    with pytest.warns(UserWarning, match=r"\['code'\] start a new epoch"):
        resumed.load_state_dict(first.state_dict())
    assert cursors(resumed)["code"] == {"epoch": 1, "position": 0, "windows": 2999}
    # zh's new window joins at its next epoch: this one goes on over the 2000 it began with
    assert cursors(resumed)["zh"] == before["zh"] and cursors(resumed)["en"] == before["en"]


def test_a_checkpoint_without_the_fields_added_later_resumes_exactly():
    reference = take(make_sampler(), 50)
    first = make_sampler()
    take(first, 20)
    state = first.state_dict()
    for key in ("global_batch", "next_sample", "order", "layout"):
        del state[key]
    resumed = make_sampler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
    for a, b in zip(reference[20:], take(resumed, 30), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_resume_with_another_global_batch_warns_and_neither_repeats_nor_skips():
    one = {"en": 640}
    mixture = DomainMixture(["en"], {"en": 1.0})
    first = make_sampler(windows=one, mixture=mixture)
    before = [w for b in take(first, 30) for w in b[:, 1].tolist()]
    resumed = make_sampler(windows=one, batch_size=16,
                           mixture=DomainMixture(["en"], {"en": 1.0}))
    with pytest.warns(UserWarning, match="no longer those of the original run"):
        resumed.load_state_dict(first.state_dict())
    after = [w for b in take(resumed, 25) for w in b[:, 1].tolist()]
    assert sorted(before + after) == list(range(640))  # 240 + 400: exactly one epoch


def test_a_domain_added_first_on_resume_leaves_the_others_cursors_alone():
    small = make_sampler(windows={"code": 3000, "en": 5000},
                         mixture=DomainMixture(["code", "en"], {"code": 0.5, "en": 0.5}))
    take(small, 40)
    wider = make_sampler(windows=WINDOWS, mixture=DomainMixture(["zh", "code", "en"],
                                                                {"zh": 1.0}))
    wider.load_state_dict(small.state_dict())
    assert cursors(wider) == {"zh": {"epoch": 0, "position": 0, "windows": 2000},
                              **cursors(small)}
