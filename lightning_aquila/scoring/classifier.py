"""A fastText quality classifier, as DCLM filters its pool: trained on positive (high
quality) against negative text, a document's score is the log-odds of the positive label,
``log P(hq) - log P(cc)``; ``P(hq) = 1 / (1 + exp(-score))``. Higher is better, and ranking
by it is ranking by ``P(hq)`` (DCLM keeps the top 10% by that probability).

The library is ``fasttext-numpy2`` (the ``quality`` extra): the fastText C++ code of
facebookresearch/fastText, whose own PyPI package has no wheels and whose ``predict`` breaks
under numpy 2 (``fasttext-wheel`` has the same bug), built as wheels with that fixed.

Interoperability: the model is a plain fastText ``.bin`` with DCLM's labels ``__label__hq``
and ``__label__cc``, and texts are fed as datatrove's ``FastTextClassifierFilter`` feeds them
(newlines as spaces). A model trained here therefore works in datatrove, and DCLM's released
classifier (or any fastText ``.bin``) works here with ``--model`` and ``--label``.

The store holds tokens, so documents are decoded with the domain's tokenizer (lossless for
byte-level BPE). Decoding runs on all cores (the tokenizer's threads); fastText's ``predict``
holds the GIL, so with ``processes > 1`` batches go to a pool of processes instead, each
decoding and predicting on its own core.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lightning_aquila.datamodules.shard_format import DataError

POSITIVE, NEGATIVE = "__label__hq", "__label__cc"
#: fastText adds this to probabilities before taking logs; the log-odds use it too.
_EPS = 1e-5


def fasttext_module() -> Any:
    try:
        import fasttext
    except ImportError:
        raise DataError("the fastText scorer needs the 'quality' extra: pip install "
                        "'lightning-aquila[quality]' (fasttext-numpy2)") from None
    fasttext.FastText.eprint = lambda *args, **kwargs: None  # its load-time stderr warning
    return fasttext


def fasttext_line(text: str) -> str:
    """One document as one fastText input line, as datatrove's filter passes it."""
    return text.replace("\n", " ")


def train_classifier(positive: Sequence[str], negative: Sequence[str], output: str, *,
                     text_field: str = "text", epoch: int = 20, lr: float = 0.5,
                     word_ngrams: int = 2, dim: int = 100, min_count: int = 1,
                     threads: int | None = None, seed: int = 0) -> str:
    """Train a two-label classifier (``__label__hq`` for ``positive`` documents,
    ``__label__cc`` for ``negative``) from text files read as ``prepare`` reads them
    (jsonl/parquet records' ``text_field``, txt files), and save it as ``output`` (.bin).
    Bigrams (DCLM's setting); the defaults suit the small samples of a few thousand
    documents that a user labels by hand, more epochs than fastText's 5."""
    from lightning_aquila.datamodules.sources import read_texts

    fasttext = fasttext_module()
    counts = {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8",
                                     delete=False) as handle:
        for label, paths in ((POSITIVE, positive), (NEGATIVE, negative)):
            counts[label] = 0
            for text in read_texts(list(paths), text_field=text_field):
                line = fasttext_line(text).strip()
                if line:
                    handle.write(f"{label} {line}\n")
                    counts[label] += 1
    try:
        for label, paths in ((POSITIVE, positive), (NEGATIVE, negative)):
            if not counts[label]:
                kind = "positive" if label == POSITIVE else "negative"
                raise DataError(f"no {kind} documents in {list(paths)} (field "
                                f"{text_field!r}); the classifier needs both kinds")
        model = fasttext.train_supervised(
            handle.name, epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim,
            minCount=min_count, thread=threads or os.cpu_count() or 1, seed=seed, verbose=0)
    finally:
        os.unlink(handle.name)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    model.save_model(output)
    return output


def load_classifier(path: str, label: str = POSITIVE) -> Any:
    """The fastText model at ``path``; ``label`` must be one of its labels."""
    fasttext = fasttext_module()
    if not os.path.isfile(path):
        raise DataError(f"fastText model {path!r} does not exist")
    try:
        model = fasttext.load_model(path)
    except ValueError as exc:
        raise DataError(f"fastText model {path!r} cannot be loaded ({exc})") from None
    if label not in model.labels:
        raise DataError(f"fastText model {path!r} has no label {label!r}; its labels are "
                        f"{model.labels} (choose one with --label)")
    return model


def log_odds(model: Any, texts: Sequence[str], label: str) -> np.ndarray:
    """``log P(label) - log(1 - P(label))`` of each text under ``model``."""
    labels, probabilities = model.predict([fasttext_line(t) for t in texts], k=-1)
    p = np.array([dict(zip(names, probs)).get(label, 0.0)
                  for names, probs in zip(labels, probabilities)], dtype=np.float64)
    p = np.clip(p, 0.0, 1.0)
    return (np.log(p + _EPS) - np.log1p(-p + _EPS)).astype(np.float32)


# -- scoring stored documents on a pool of processes ------------------------------------------
_WORKER: dict[str, Any] = {}


def _start_worker(model_path: str, tokenizer_path: str, label: str,
                  one_thread: bool = False) -> None:
    if one_thread:  # the processes are the parallelism; read when the decoder first runs
        os.environ["RAYON_NUM_THREADS"] = "1"
    from lightning_aquila.tokenizer import load_tokenizer

    _WORKER.update(model=load_classifier(model_path, label), tokenizer=load_tokenizer(
        tokenizer_path), label=label)


def _score_batch(batch: list[np.ndarray]) -> np.ndarray:
    texts = _WORKER["tokenizer"].decode_batch([doc.tolist() for doc in batch],
                                              skip_special_tokens=True)
    return log_odds(_WORKER["model"], texts, _WORKER["label"])


class FastTextScorer:
    """Scores batches of stored documents (decode, then predict) on ``processes`` worker
    processes, results in order; a scorer for ``score_domain``. Use it as a context
    manager: its pool starts once (each worker loads the model) and serves every call."""

    def __init__(self, model_path: str, tokenizer_path: str, *, label: str = POSITIVE,
                 processes: int = 1) -> None:
        load_classifier(model_path, label)  # fail here, with one line, not in a worker
        self.args = (model_path, str(tokenizer_path), label)
        self.processes = max(1, processes)
        self._pool: Any = None

    def __enter__(self) -> FastTextScorer:
        if self.processes == 1:
            _start_worker(*self.args)
        else:  # forkserver: no fork of a process whose tokenizer threads already ran
            context = multiprocessing.get_context("forkserver")
            self._pool = context.Pool(self.processes, _start_worker, (*self.args, True))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __call__(self, batches: Iterator[list[np.ndarray]]) -> Iterator[np.ndarray]:
        if self._pool is None:
            if "model" not in _WORKER:
                raise RuntimeError("use FastTextScorer as a context manager")
            return map(_score_batch, batches)
        return self._pool.imap(_score_batch, batches)


__all__ = ["NEGATIVE", "POSITIVE", "FastTextScorer", "load_classifier", "log_odds",
           "train_classifier"]
