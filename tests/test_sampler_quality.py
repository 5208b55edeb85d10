"""Sampling by document score inside a domain, specified on document tables laid over windows:
proportions, floor, repeat cap, temperature changes, resume and elastic determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.datamodules.quality import DomainScores, lower_quantiles
from lightning_aquila.datamodules.sampler import MixtureSampler, WeightedEpochOrder, unpack_scores

SEQ = 16
WINDOWS = {"code": 3000, "en": 5000}


def table(windows: int, scores: np.ndarray, floor: float | None = None) -> DomainScores:
    """One document per window (``scores[j]`` for window ``j``) and a last, partial one."""
    bounds = np.arange(windows + 2, dtype=np.int64) * SEQ
    values = np.append(np.asarray(scores, dtype=np.float32), np.float32(0.0))
    return DomainScores(bounds, values, SEQ, windows, floor_quantile=floor)


def two_level(windows: int) -> np.ndarray:
    """Even windows score 0, odd ones ln 3: at τ = 1 the odd ones weigh 3 times as much."""
    return np.where(np.arange(windows) % 2, np.log(3.0), 0.0)


def make(temperature=1.0, *, world=1, rank=0, batch_size=8, accumulate=1, floor=None,
         max_repeats=None, scores=None, mixture=None, seed=3):
    scores = scores or {d: two_level(n) for d, n in WINDOWS.items()}
    quality = {d: table(n, scores[d], floor) for d, n in WINDOWS.items()}
    mixture = mixture or DomainMixture(list(WINDOWS), {"code": 0.4, "en": 0.6},
                                       quality_temperature=dict.fromkeys(WINDOWS, temperature))
    return MixtureSampler(mixture, WINDOWS, batch_size=batch_size, num_replicas=world, rank=rank,
                          seed=seed, block_windows=64, shuffle_blocks=4, epoch_batches=100_000,
                          accumulate=accumulate, quality=quality, max_repeats=max_repeats)


def take(sampler: MixtureSampler, count: int) -> list[np.ndarray]:
    batches = list(itertools.islice(iter(sampler), count))
    for _ in batches:
        sampler.mark_consumed()
    return batches


def windows_of(batches: list[np.ndarray], domain: int) -> np.ndarray:
    rows = np.concatenate(batches)
    return rows[rows[:, 0] == domain, 1]


def epochs_of(sampler: MixtureSampler, domain: str, count: int) -> list[np.ndarray]:
    """The windows of ``domain`` in each of its first ``count`` epochs, as the sampler yields
    them; its mixture must draw ``domain`` alone. An epoch ends where the domain's cursor in
    ``state_dict`` says the next one began (epochs are far longer than a batch)."""
    index = sampler.mixture.domains.index(domain)
    drawn: list[np.ndarray] = []
    ends: list[int] = []
    for spec in iter(sampler):
        sampler.mark_consumed()
        assert (spec[:, 0] == index).all()
        drawn.append(spec[:, 1])
        cursor = sampler.state_dict()["cursors"][domain]
        if cursor["epoch"] > len(ends):
            ends.append(sum(map(len, drawn)) - cursor["position"])
            if len(ends) == count:
                break
    windows = np.concatenate(drawn)
    return [windows[start:stop] for start, stop in zip([0, *ends], ends)]


def only_en(temperature: float, max_repeats: int | None) -> MixtureSampler:
    """A sampler that draws "en" alone, at ``temperature``, 64 windows a batch."""
    mixture = DomainMixture(list(WINDOWS), {"code": 0.0, "en": 1.0},
                            quality_temperature=dict.fromkeys(WINDOWS, temperature))
    return make(temperature, batch_size=64, max_repeats=max_repeats, mixture=mixture)


def test_without_a_temperature_the_windows_are_those_of_the_plain_sampler():
    plain = MixtureSampler(DomainMixture(list(WINDOWS), {"code": 0.4, "en": 0.6}), WINDOWS,
                           batch_size=8, seed=3, block_windows=64, shuffle_blocks=4,
                           epoch_batches=100_000)
    scored = make(temperature=None)
    for a, b in zip(take(plain, 1500), take(scored, 1500)):  # about two epochs of each domain
        np.testing.assert_array_equal(a, b[:, :2])
        assert b.shape == (8, 3)


def test_each_sample_carries_the_score_of_its_window():
    batches = take(make(), 50)
    for spec in batches:
        expected = np.where(spec[:, 1] % 2, np.float32(np.log(3.0)), np.float32(0.0))
        np.testing.assert_array_equal(unpack_scores(spec[:, 2]), expected)


def test_windows_are_drawn_in_proportion_to_exp_score_over_temperature():
    drawn = windows_of(take(make(1.0), 3000), 1)  # 3000 x 8 x 0.6: about 3 epochs of "en"
    odd, even = np.count_nonzero(drawn % 2), np.count_nonzero(drawn % 2 == 0)
    assert odd / even == pytest.approx(3.0, rel=0.05)
    hotter = windows_of(take(make(2.0), 3000), 1)  # τ = 2: sqrt(3) times as often
    assert np.count_nonzero(hotter % 2) / np.count_nonzero(hotter % 2 == 0) == pytest.approx(
        3 ** 0.5, rel=0.05)


def test_an_epoch_draws_each_window_its_rounded_expected_count():
    sampler = only_en(0.5, max_repeats=None)
    expected = sampler.quality["en"].expected_counts(0.5, None)
    [epoch] = epochs_of(sampler, "en", 1)
    counts = np.bincount(epoch, minlength=WINDOWS["en"])
    assert np.all((counts == np.floor(expected)) | (counts == np.ceil(expected)))
    assert abs(len(epoch) - WINDOWS["en"]) < 4 * np.sqrt(WINDOWS["en"])


def test_documents_below_the_floor_quantile_are_never_drawn():
    rng = np.random.default_rng(0)
    scores = {d: rng.normal(size=n) for d, n in WINDOWS.items()}
    sampler = make(None, floor=0.3, scores=scores)
    drawn = windows_of(take(sampler, 2000), 1)
    cut = np.quantile(np.append(scores["en"], 0.0), 0.3)  # the table's last document: 0
    assert scores["en"][drawn].min() >= cut
    kept = np.flatnonzero(scores["en"] >= cut)
    assert set(np.unique(drawn)) == set(kept.tolist())  # ~2 epochs: every kept window seen


def test_no_window_is_drawn_more_than_max_repeats_times_per_epoch():
    sampler = only_en(0.05, max_repeats=2)  # at τ = 0.05 the odd windows would take ~all draws
    for epoch in epochs_of(sampler, "en", 3):
        counts = np.bincount(epoch, minlength=WINDOWS["en"])
        assert counts.max() == 2
        assert counts[1::2].min() == 2 and counts[0::2].max() == 0


def test_a_temperature_change_starts_a_new_epoch_at_its_recorded_batch():
    sampler = make(1.0)
    take(sampler, 40)
    before = sampler.state_dict()["cursors"]["en"]
    change = sampler.mixture.set_quality_temperature({"en": 4.0}, reason="curriculum")
    assert change.batch_index == 40
    assert change.temperature == {"code": 1.0, "en": 4.0}
    take(sampler, 1)
    after = sampler.state_dict()["cursors"]
    assert after["en"]["epoch"] == before["epoch"] + 1 and after["en"]["temperature"] == 4.0
    assert after["code"]["temperature"] == 1.0 and after["code"]["epoch"] == 0


def test_bad_temperatures_are_refused_and_leave_the_mixture_unchanged():
    mixture = make().mixture
    for bad, match in ((0, "positive"), (-1.0, "positive"), ({"fr": 1.0}, "unknown domain"),
                       ("hot", "positive")):
        with pytest.raises(ValueError, match=match):
            mixture.set_quality_temperature(bad)
    assert len(mixture.temperatures) == 1
    with pytest.raises(ValueError, match="does not sample by score"):
        DomainMixture(["a"], {"a": 1.0}).set_quality_temperature(2.0)


def run_with_change(sampler: MixtureSampler, start: int, stop: int) -> list[np.ndarray]:
    """Batches ``start..stop``, the temperature of "en" set to 3 once batch 30 is drawn."""
    out = []
    for index in range(start, stop):
        if index == 30 and sampler.mixture.temperature_at(10**9)["en"] == 1.0:
            sampler.mixture.set_quality_temperature({"en": 3.0}, reason="stage")
        out += take(sampler, 1)
    return out


def test_resuming_with_scores_and_a_temperature_change_continues_the_exact_sequence():
    whole = run_with_change(make(1.0), 0, 80)
    first = make(1.0)
    run_with_change(first, 0, 50)
    state = {"sampler": first.state_dict(), "mixture": first.mixture.state_dict()}
    resumed = make(1.0)
    resumed.mixture.load_state_dict(state["mixture"])
    resumed.load_state_dict(state["sampler"])
    rest = run_with_change(resumed, 50, 80)
    assert resumed.mixture.temperatures[-1].batch_index == 30
    for a, b in zip(whole[50:], rest, strict=True):
        np.testing.assert_array_equal(a, b)


def test_resuming_before_a_recorded_change_replays_it_at_its_batch():
    first = make(1.0)
    iterator = iter(first)
    drawn = [next(iterator) for _ in range(35)]  # change stamped at 35: drawn, not consumed
    for _ in range(20):
        first.mark_consumed()
    first.mixture.set_quality_temperature({"en": 3.0})
    state = {"sampler": first.state_dict(), "mixture": first.mixture.state_dict()}
    assert state["sampler"]["next_batch"] == 20
    resumed = make(1.0)
    resumed.mixture.load_state_dict(state["mixture"])
    resumed.load_state_dict(state["sampler"])
    replayed = take(resumed, 40)
    for a, b in zip(drawn[20:], replayed[:15]):
        np.testing.assert_array_equal(a, b)
    assert resumed.mixture.temperature_at(35)["en"] == 3.0
    assert resumed.state_dict()["cursors"]["en"]["temperature"] == 3.0


def global_rows(layout: tuple[int, int, int], steps: int, state=None) -> list[list[tuple]]:
    batch, world, accumulate = layout
    ranks = [make(1.5, world=world, rank=r, batch_size=batch, accumulate=accumulate,
                  max_repeats=3) for r in range(world)]
    if state is not None:
        for sampler in ranks:
            sampler.mixture.load_state_dict(state["mixture"])
            sampler.load_state_dict(state["sampler"])
    drawn = [take(sampler, steps * accumulate) for sampler in ranks]
    return [sorted(tuple(row) for rank in drawn
                   for spec in rank[s * accumulate:(s + 1) * accumulate] for row in spec.tolist())
            for s in range(steps)], ranks[0]


@pytest.mark.parametrize("layout", [(4, 2, 1), (2, 2, 2), (8, 1, 1)])
def test_the_global_sequence_with_scores_is_the_same_on_every_world_size(layout):
    reference, _ = global_rows((8, 1, 1), 40)
    first, sampler = global_rows((4, 2, 1), 15)
    state = {"sampler": sampler.state_dict(), "mixture": sampler.mixture.state_dict()}
    rest, _ = global_rows(layout, 25, state)
    assert first == reference[:15]
    assert rest == reference[15:]


@pytest.mark.parametrize("size", [1, 7, 1000, 50_001])
def test_the_floor_and_median_are_numpys_lower_quantiles_of_the_scored_documents(size):
    rng = np.random.default_rng(size)
    values = (rng.normal(size=size) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    values[rng.random(size) < 0.1] = np.nan
    wanted = [0.0, 0.2, 0.5, 0.99]
    found, scored = lower_quantiles(values, wanted, step=97)  # many slices
    assert scored == np.count_nonzero(~np.isnan(values))
    expected = (np.nanquantile(values, wanted, method="lower") if scored
                else [np.nan] * len(wanted))
    np.testing.assert_array_equal(found, expected)


# -- epochs, caps and domains without scores ----------------------------------------------------
def test_a_cap_below_the_expected_count_shortens_the_epoch():
    sampler = only_en(0.05, max_repeats=1)  # the odd windows would be drawn twice each
    [epoch] = epochs_of(sampler, "en", 1)
    counts = np.bincount(epoch, minlength=WINDOWS["en"])
    assert len(epoch) == 2500 and counts[1::2].min() == counts.max() == 1


def test_block_sums_past_one_byte_and_domains_past_one_slice_count_every_draw():
    # 129 windows of 2 or 3 draws in blocks of 128: a block's draws do not fit one byte
    order = WeightedEpochOrder("en", 0, 128, 2, np.full(129, 2.5, dtype=np.float32))
    counts = order.counts(0)[0]
    visited = order.windows(0, 129, np.arange(order.length(0, 129)))
    np.testing.assert_array_equal(np.bincount(visited, minlength=129), counts)
    # 5 * 2^20 + 1 windows: counted in slices of 2^22 (bounded temporaries), blocks of 2^20
    n, block = 5 * 2**20 + 1, 2**20
    big = WeightedEpochOrder("en", 0, block, 1, np.full(n, 0.5, dtype=np.float32))
    counts, per_block = big.counts(0)
    np.testing.assert_array_equal(per_block, np.add.reduceat(counts, np.arange(0, n, block),
                                                             dtype=np.int64))
    assert big.length(0, n) == counts.sum()


def test_a_scored_domain_is_drawn_epoch_after_epoch_across_temperature_changes():
    """20 windows drawn 64 at a time: each batch spans several epochs of uneven length;
    each change starts a new epoch at its batch, from the epoch's first position."""
    windows = {"en": 20}
    scores = table(20, two_level(20))
    mixture = DomainMixture(["en"], {"en": 1.0}, quality_temperature={"en": 1.0})
    sampler = MixtureSampler(mixture, windows, batch_size=64, seed=3, block_windows=4,
                             shuffle_blocks=2, epoch_batches=100_000, quality={"en": scores})
    for temperature in (1.0, 2.0, 0.5, 4.0):  # more than the orders the sampler keeps
        if temperature != 1.0:
            mixture.set_quality_temperature({"en": temperature})
        epoch = sampler.state_dict()["cursors"]["en"]["epoch"] + (temperature != 1.0)
        drawn = np.concatenate([b[:, 1] for b in take(sampler, 5)])
        order = WeightedEpochOrder("en", 3, 4, 2, scores.expected_counts(temperature, None))
        expected = []
        while len(expected) < len(drawn):
            expected += order.windows(epoch, 20, np.arange(order.length(epoch, 20))).tolist()
            assert np.bincount(expected[-order.length(epoch, 20):], minlength=20).tolist() == (
                order.counts(epoch)[0].tolist())
            epoch += 1
        np.testing.assert_array_equal(drawn, expected[:len(drawn)])


def test_a_domain_without_scores_carries_nan_beside_scored_ones():
    mixture = DomainMixture(list(WINDOWS), {"code": 0.5, "en": 0.5},
                            quality_temperature={"en": 1.0})
    sampler = MixtureSampler(mixture, WINDOWS, batch_size=8, seed=3, block_windows=64,
                             shuffle_blocks=4, quality={"en": table(5000, two_level(5000))})
    rows = np.concatenate(take(sampler, 20))
    scores = unpack_scores(rows[:, 2])
    assert np.isnan(scores[rows[:, 0] == 0]).all()
    np.testing.assert_array_equal(scores[rows[:, 0] == 1],
                                  two_level(5000).astype(np.float32)[rows[rows[:, 0] == 1, 1]])


# -- resuming with other scores ------------------------------------------------------------------
def test_a_plain_run_resumed_with_scores_starts_the_scored_domains_next_epoch():
    plain = MixtureSampler(DomainMixture(list(WINDOWS), {"code": 0.4, "en": 0.6}), WINDOWS,
                           batch_size=8, seed=3, block_windows=64, shuffle_blocks=4)
    take(plain, 40)
    scored = make(2.0)
    scored.load_state_dict(plain.state_dict())  # cursors without a temperature: plain orders
    rows = np.concatenate(take(scored, 1))
    assert scored.state_dict()["cursors"] == {  # the first draw starts the scored epochs
        d: {"epoch": 1, "position": int((rows[:, 0] == i).sum()), "windows": n,
            "temperature": 2.0} for i, (d, n) in enumerate(WINDOWS.items())}


def test_a_resume_on_other_scores_of_the_same_windows_starts_that_domains_next_epoch():
    first = make(2.0)
    take(first, 40)
    before = first.state_dict()["cursors"]
    rescored = make(2.0, scores={"code": two_level(3000), "en": two_level(5000)[::-1].copy()})
    with pytest.warns(UserWarning, match=r"\['en'\] start a new epoch"):
        rescored.load_state_dict(first.state_dict())
    after = rescored.state_dict()["cursors"]
    assert after["en"] == {"epoch": before["en"]["epoch"] + 1, "position": 0, "windows": 5000,
                           "temperature": 2.0}
    assert after["code"] == before["code"]


def test_a_scored_domain_added_on_resume_starts_its_first_epoch_at_the_temperature_in_force():
    first = MixtureSampler(DomainMixture(["code"], {"code": 1.0}, quality_temperature={
        "code": 2.0}), {"code": 3000}, batch_size=8, seed=3, block_windows=64,
        shuffle_blocks=4, quality={"code": table(3000, two_level(3000))})
    take(first, 10)
    wider = make(2.0)
    wider.load_state_dict(first.state_dict())
    assert wider.state_dict()["cursors"]["en"] == {"epoch": 0, "position": 0, "windows": 5000,
                                                   "temperature": 2.0}
    take(wider, 5)
    assert wider.state_dict()["cursors"]["en"]["epoch"] == 0
