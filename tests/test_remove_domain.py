"""``lightning-aquila remove-domain``: a domain leaves a store in one metadata write, and a
run checkpointed before the removal resumes without it."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lightning_aquila.cli import main as cli
from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.store import ShardStore
from lightning_aquila.datamodules.writer import DomainWriter


def files(url: str) -> dict[str, bytes]:
    return {str(p.relative_to(url)): p.read_bytes() for p in Path(url).rglob("*")
            if p.is_file()}


def test_a_removed_domain_is_gone_and_the_others_are_untouched(dmu_make_store, capsys):
    url = dmu_make_store({"a": 3000, "b": 2000, "empty": 100})
    before = files(url)
    assert cli(["remove-domain", url, "empty"]) == 0
    assert "removed domain 'empty'" in capsys.readouterr().out
    store = ShardStore(url)
    assert sorted(store.domains) == ["a", "b"]
    assert not (Path(url) / "empty").exists()
    after = files(url)
    changed = {k for k in before if k in after and before[k] != after[k]}
    assert changed == {"zarr.json"}  # only the manifest; a and b byte for byte
    assert {k for k in before if k not in after} == {k for k in before
                                                     if k.startswith("empty/")}


def test_removing_an_unknown_domain_names_the_domains_and_changes_nothing(dmu_make_store,
                                                                         capsys):
    url = dmu_make_store({"a": 3000})
    before = files(url)
    assert cli(["remove-domain", url, "legal"]) == 1
    assert "has no domain 'legal'; it has ['a']" in capsys.readouterr().err
    assert files(url) == before


def test_keep_data_unlists_the_domain_and_a_later_prepare_of_that_name_starts_afresh(
        dmu_make_store):
    url = dmu_make_store({"a": 3000, "b": 2000})
    assert cli(["remove-domain", url, "b", "--keep-data"]) == 0
    assert sorted(ShardStore(url).domains) == ["a"]
    assert (Path(url) / "b" / "train").is_dir()  # a run reading "b" now still can
    with DomainWriter(url, "b", tokenizer={"hash": "synthetic"}, language="xx") as writer:
        writer.add_document("train", np.arange(50, dtype=np.uint32))
        writer.commit()
    assert ShardStore(url).info("b").tokens("train") == 50


def test_a_delete_that_fails_after_the_commit_leaves_a_consistent_store(dmu_make_store,
                                                                       monkeypatch):
    """The order is the contract: unlist (the commit), then delete. A delete that fails (a
    disk error, a kill) must find the domain already unlisted, so every reader sees a store
    with the other domains whole; a delete before the commit would leave the manifest naming
    a half-deleted group."""
    import zarr

    url = dmu_make_store({"a": 3000, "b": 2000})
    before = files(url)

    def failing_delete(self, key):
        raise OSError(f"injected: cannot delete {key!r}")

    monkeypatch.setattr(zarr.Group, "__delitem__", failing_delete)
    from lightning_aquila.datamodules.edit import remove_domain

    with pytest.raises(OSError, match="injected"):  # the failure reaches the caller
        remove_domain(url, "b")
    store = ShardStore(url)
    assert sorted(store.domains) == ["a"]
    store.verify(full=True)
    after = files(url)
    assert {k: v for k, v in after.items() if k != "zarr.json"} == {
        k: v for k, v in before.items() if k != "zarr.json"}  # nothing deleted yet


def test_a_run_checkpointed_before_a_removal_resumes_on_the_remaining_domains(
        dmu_make_store):
    url = dmu_make_store({"a": 6000, "b": 4000, "c": 3000})

    def datamodule() -> DomainDataModule:
        dm = DomainDataModule(url, seq_len=16, batch_size=4, seed=3, weights="uniform",
                              val_windows_per_domain=0)
        dm.setup("fit")
        return dm

    running = datamodule()
    list(itertools.islice(iter(running.train_dataloader()), 12))
    state = running.state_dict()
    assert cli(["remove-domain", url, "c"]) == 0
    resumed = datamodule()
    resumed.load_state_dict(state)
    assert resumed.mixture.domains == ["a", "b"]
    cursors = resumed.sampler.state_dict()["cursors"]
    assert cursors == {d: state["sampler"]["cursors"][d] for d in ("a", "b")}
    assert resumed.mixture.history[-1].reason.startswith("resume: domains changed")
    assert resumed.mixture.history[-1].extra["removed"] == ["c"]
    batch = next(iter(resumed.train_dataloader()))
    assert set(batch["domain"].tolist()) <= {0, 1}
