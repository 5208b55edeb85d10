"""Shared fixtures. DMU fixtures are prefixed ``dmu_``; what else test files share (the
corpus store's builder, a plain Lightning project) is in ``helpers/``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

try:  # hypothesis is in the dev extra; tests that use it skip without it
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover
    pass
else:
    # "ci" (default): a fixed, modest set of cases per property test, the same on every run;
    # "nightly" (HYPOTHESIS_PROFILE=nightly): many more, freshly random each time.
    from hypothesis import Phase

    _hypothesis_settings.register_profile("ci", max_examples=60, deadline=None,
                                          derandomize=True, database=None,
                                          print_blob=True,
                                          phases=[p for p in Phase if p != Phase.explain])
    _hypothesis_settings.register_profile("nightly", max_examples=2000, deadline=None,
                                          print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Synthetic token streams encode where each token came from: domain i, position p of its
#: split holds ``i * DMU_DOMAIN_STRIDE + p`` (held-out tokens add DMU_HELDOUT_OFFSET), so a
#: test can tell from a window alone which domain and which window it is.
DMU_DOMAIN_STRIDE = 10_000_000
DMU_HELDOUT_OFFSET = 5_000_000


@pytest.fixture(autouse=True)
def environment_as_found() -> Iterator[None]:
    """Each test leaves ``os.environ`` as it found it. A ``Trainer`` with a parallel strategy
    run inside the test process sets ``LOCAL_RANK`` (and ``MASTER_PORT``, ``NODE_RANK``); a
    multi-process test started later inherits it, and Lightning's launcher then takes its
    processes as started by someone else and waits for the second rank until the timeout."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture
def dmu_make_store(tmp_path: Path) -> Callable[..., str]:
    """Writes a synthetic shard store: ``make({"a": 5000, "b": 3000}) -> url``."""
    from lightning_aquila.datamodules.writer import DomainWriter

    counter = iter(range(1000))

    def make(domains: Mapping[str, int], *, heldout: int = 400, chunk_tokens: int = 1024,
             url: str | None = None, tokenizer_hash: str = "synthetic",
             documents: int = 1, quality: Mapping[str, Any] | None = None) -> str:
        """``quality``: per domain, the score of each training document (NaN: none) and,
        after them, of the held-out one; written as ``prepare --quality-field`` writes it,
        so it reads as the score ``quality``."""
        url = url or str(tmp_path / f"synthetic{next(counter)}.zarr")
        for index, (name, tokens) in enumerate(domains.items()):
            scores = list((quality or {}).get(name, []))
            with DomainWriter(url, name, tokenizer={"hash": tokenizer_hash}, language="xx",
                              chunk_tokens=chunk_tokens, with_quality=quality is not None
                              ) as writer:
                base = index * DMU_DOMAIN_STRIDE
                for k, part in enumerate(np.array_split(np.arange(tokens), documents)):
                    if len(part):
                        writer.add_document("train", (base + part).astype(np.uint32),
                                            quality=scores[k] if scores else None)
                if heldout:
                    held = base + DMU_HELDOUT_OFFSET + np.arange(heldout)
                    writer.add_document("heldout", held.astype(np.uint32),
                                        quality=scores[documents] if scores else None)
                writer.add_source({"path": f"synthetic-{name}", "sha256": f"{name}-{tokens}"})
                writer.commit()
        return url

    return make


@pytest.fixture(scope="session")
def dmu_tokenizer() -> str:
    """The bundled tokenizer (what ``prepare`` uses by default)."""
    from lightning_aquila.tokenizer import DEFAULT_TOKENIZER

    return str(DEFAULT_TOKENIZER)


@pytest.fixture(scope="session")
def dmu_other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second, tiny tokenizer whose vocabulary (hence hash) differs from the bundled one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 20, trainer)
    path = tmp_path_factory.mktemp("other_tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def dmu_corpus() -> Path:
    """The bundled multi-domain corpus: ``corpus/<domain>/*.jsonl``."""
    return REPO / "corpus"


@pytest.fixture(scope="session")
def corpus_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A shard store prepared once per session from the first file of every bundled corpus
    domain (5% held out). Tests only read it."""
    from helpers.corpus import prepare_bundled_corpus

    return prepare_bundled_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The URL of a plain moto S3 server process (``python -m moto.server``), started once
    per session when a test asks; skips without ``moto``/``s3fs``. (``helpers.s3_faults``
    has the one that can be stopped, restarted and throttled.)"""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from helpers.ports import free_port
    from helpers.s3_faults import wait_until_up

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
