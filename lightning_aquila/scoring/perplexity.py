"""The perplexity of each document under a checkpoint of our own model, as CCNet grades
Common Crawl by a language model trained on clean text: the score is minus the mean
negative log-likelihood per predicted token, in nats (``-log perplexity``), so higher is
better like every score. A document predicts its tokens after the first, eos included; a
document longer than the context is cut into consecutive windows of ``context`` predicted
tokens (each window starts fresh), and its score averages over all of them. A document of
one token predicts nothing and scores NaN.

Tokens are read straight from the store (no re-tokenizing). Windows of a batch of documents
are sorted by length and packed under a token budget, so padding stays small. It runs on
every CPU core (torch's intra-op threads) or on a GPU, in bf16 there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.model import AquilaModel
from lightning_aquila.model.head_loss import IGNORE_INDEX


def load_model(checkpoint: str | Path) -> AquilaModel:
    """The decoder of a single-file AquilaLM checkpoint (a sharded one is consolidated
    first: ``lightning-aquila consolidate``)."""
    from lightning_aquila.export import model_from_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        raise DataError(f"checkpoint {str(path)!r} is a directory (a sharded checkpoint?); "
                        "merge it with `lightning-aquila consolidate --output FILE` first")
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    try:
        return model_from_checkpoint(torch.load(path, map_location="cpu", weights_only=False))
    except ValueError as exc:
        raise DataError(f"checkpoint {str(path)!r}: {exc}") from None


class PerplexityScorer:
    """Scores batches of stored documents by ``-mean token NLL`` under ``model``; a scorer
    for ``score_domain``.

    Args:
        model: the decoder
        context: predicted tokens per window (default and at most: the model's max_seq_len)
        batch_tokens: tokens per forward pass, padding included
        device: ``cpu``, ``cuda``, ... (default: a GPU where there is one)
    """

    def __init__(self, model: AquilaModel, *, context: int | None = None,
                 batch_tokens: int = 16384, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        limit = model.config.max_seq_len
        self.context = min(context or limit, limit)
        if self.context < 1 or batch_tokens < self.context:
            raise DataError(f"--context {self.context} and --batch-tokens {batch_tokens}: "
                            "need 1 <= context <= batch tokens")
        self.batch_tokens = batch_tokens
        self.model = model.to(self.device).eval()
        self.vocab_size = model.config.vocab_size

    def check_store(self, where: str, max_token_id: int) -> None:
        """A store whose ids the model has no embedding for is refused up front."""
        if max_token_id >= self.vocab_size:
            raise DataError(f"{where} has token id {max_token_id}, but the model's vocabulary "
                            f"has {self.vocab_size} ids: it was trained with another tokenizer")

    def __call__(self, batches: Iterator[list[np.ndarray]]) -> Iterator[np.ndarray]:
        for batch in batches:
            yield self.score(batch)

    @torch.inference_mode()
    def score(self, documents: list[np.ndarray]) -> np.ndarray:
        windows: list[tuple[int, np.ndarray]] = []  # (document, context + 1 tokens at most)
        for index, doc in enumerate(documents):
            for start in range(0, len(doc) - 1, self.context):
                windows.append((index, doc[start:start + self.context + 1]))
        windows.sort(key=lambda w: len(w[1]))
        nll = np.zeros(len(documents), dtype=np.float64)
        count = np.zeros(len(documents), dtype=np.int64)
        begin = 0
        while begin < len(windows):
            end = begin + 1  # sorted by length: the last window of a pack is its longest
            while end < len(windows) and (end + 1 - begin) * (len(windows[end][1]) - 1) \
                    <= self.batch_tokens:
                end += 1
            pack = windows[begin:end]
            sums, counts = self._forward([w for _, w in pack])
            owners = np.array([i for i, _ in pack])
            np.add.at(nll, owners, sums)
            np.add.at(count, owners, counts)
            begin = end
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, -nll / np.maximum(count, 1), np.nan).astype(np.float32)

    def _forward(self, windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Summed NLL and predicted-token count of each window (right-padded)."""
        length = max(len(w) for w in windows) - 1
        ids = torch.zeros(len(windows), length, dtype=torch.long)
        labels = torch.full((len(windows), length), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(windows):
            tokens = torch.from_numpy(w.astype(np.int64))
            ids[row, :len(w) - 1] = tokens[:-1]
            labels[row, :len(w) - 1] = tokens[1:]
        ids, labels = ids.to(self.device), labels.to(self.device)
        autocast: Any = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" else torch.autocast("cpu", enabled=False))
        with autocast:
            _, per_token = self.model(ids, labels)
        sums = per_token.float().sum(dim=1).double().cpu().numpy()
        counts = (labels != IGNORE_INDEX).sum(dim=1).cpu().numpy()
        return sums, counts


__all__ = ["PerplexityScorer", "load_model"]
