"""Downstream probes: small evaluations the TSM runs every N steps, so a run shows a
capability curve next to its loss curve.

A probe is any object with a ``name`` and ``__call__(pl_module) -> dict[str, float]``;
subclass :class:`Probe` to make one configurable from YAML. The monitor calls every probe on
every rank (a sharded model needs all ranks in its forward) and logs the results as
``tsm/probe/<name>/<metric>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_aquila.model.head_loss import token_losses

#: The bundled task: hand-written English and Chinese cloze items with one right completion.
BUNDLED_TASK = Path(__file__).resolve().parents[1] / "assets" / "probes" / "cloze_bilingual.jsonl"


class Probe:
    """Base class of the TSM's probes."""

    name: str = "probe"

    def __call__(self, pl_module: LightningModule) -> dict[str, float]:
        raise NotImplementedError


def load_items(path: str | Path) -> list[dict[str, Any]]:
    """Multiple-choice items from JSONL: ``{"context": str, "choices": [str, ...],
    "answer": int, "lang": str}`` per line (``lang`` optional). Checked here, so a bad file
    fails when the probe is built, naming the line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            choices, answer = item.get("choices"), item.get("answer")
            if not isinstance(item.get("context"), str) or not isinstance(choices, list) or len(
                    choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f"{path}:{number}: an item needs a string 'context' and a list "
                                 "of at least two non-empty string 'choices'")
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{path}:{number}: 'answer' must index 'choices', got {answer!r}")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """A text -> token ids function from a tokenizer object (``tokenizers.Tokenizer``,
    a transformers tokenizer, anything with ``encode``), a path/name for ``load_tokenizer``,
    a plain callable, or ``None`` for the bundled tokenizer. No special tokens are added."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from lightning_aquila import tokenizer as bundled

        if tokenizer is None:
            tokenizer = getattr(bundled, "DEFAULT_TOKENIZER", None)
        tokenizer = bundled.load_tokenizer() if tokenizer is None else bundled.load_tokenizer(
            str(tokenizer))
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        if not callable(tokenizer):
            raise TypeError(f"cannot tokenize with {tokenizer!r}: give an object with encode() "
                            "or a function from text to token ids")
        return lambda text: list(tokenizer(text))

    def encode_text(text: str) -> list[int]:
        try:
            out = encode(text, add_special_tokens=False)
        except TypeError:
            out = encode(text)
        return list(getattr(out, "ids", out))

    return encode_text


def _run_tokenizer(pl_module: LightningModule) -> Any:
    """The tokenizer of the run ``pl_module`` trains in (``tokenizer_check.run_tokenizer``),
    read from a datamodule that records one (``DomainDataModule.tokenizer_record``)."""
    from lightning_aquila.datamodules.tokenizer_check import datamodule_tokenizer, run_tokenizer

    return run_tokenizer(pl_module, datamodule_tokenizer(getattr(pl_module, "_trainer", None)))


class MultipleChoiceProbe(Probe):
    """Scores each choice by the log-likelihood the model gives it after the context; the
    item counts as right when the answer's score is highest.

    Reports ``acc`` (summed log-likelihood), ``acc_norm`` (log-likelihood per character of the
    choice, as lm-evaluation-harness's ``acc_norm``, which removes the bias towards short
    choices) and ``acc_<lang>`` per language. Chance is 1/len(choices).

    Args:
        path: JSONL task file (default: the bundled bilingual cloze task).
        tokenizer: see ``_encoder``; default: the run's tokenizer, loaded at first use: the
            model's named one, else the copy its shard store recorded at ``prepare``, else
            the bundled one (``datamodules/tokenizer_check.py``, which also checks it before
            step 0).
        name: metric namespace (``tsm/probe/<name>/...``).
        bos_token_id: prepended to every sequence; default ``pl_module.config.bos_token_id``
            when the module has one.
        batch_size: sequences per forward pass.
    """

    def __init__(self, path: str | None = None, tokenizer: Any = None, name: str = "cloze",
                 bos_token_id: int | None = None, batch_size: int = 32) -> None:
        self.path = Path(path) if path is not None else BUNDLED_TASK
        self.items = load_items(self.path)
        self.tokenizer = tokenizer
        self.name = name
        self.bos_token_id = bos_token_id
        self.batch_size = batch_size
        self._encode: Callable[[str], list[int]] | None = None

    def __call__(self, pl_module: LightningModule) -> dict[str, float]:
        if self._encode is None:
            self._encode = _encoder(self.tokenizer if self.tokenizer is not None
                                    else _run_tokenizer(pl_module))
        bos = self.bos_token_id
        if bos is None:
            bos = getattr(getattr(pl_module, "config", None), "bos_token_id", None)
        prefix = [] if bos is None else [int(bos)]
        sequences = []  # (context ids, choice ids) for every choice of every item
        for item in self.items:
            context = prefix + self._encode(item["context"])
            sequences += [(context, self._encode(choice)) for choice in item["choices"]]
        scores = self._log_likelihoods(pl_module, sequences)
        return self._accuracy(scores)

    def _log_likelihoods(self, pl_module: LightningModule,
                         sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        was_training = pl_module.training
        pl_module.eval()
        scores: list[float] = []
        try:
            with torch.no_grad():
                for start in range(0, len(sequences), self.batch_size):
                    scores += self._score_batch(pl_module, sequences[start:start + self.batch_size])
        finally:
            pl_module.train(was_training)
        return scores

    @staticmethod
    def _score_batch(pl_module: LightningModule,
                     batch: list[tuple[list[int], list[int]]]) -> list[float]:
        length = max(len(context) + len(choice) for context, choice in batch) - 1
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        for row, (context, choice) in enumerate(batch):
            ids = torch.tensor(context + choice)
            input_ids[row, : len(ids) - 1] = ids[:-1]
            # labels[t] is the target of position t: only the choice's tokens are scored
            labels[row, len(context) - 1 : len(ids) - 1] = ids[len(context):]
        logits = pl_module(input_ids.to(pl_module.device))
        per_token, _ = token_losses(logits, labels.to(logits.device))  # 0 where not scored
        return (-per_token.sum(1)).tolist()

    def _accuracy(self, scores: list[float]) -> dict[str, float]:
        right, right_norm = 0, 0
        per_lang: dict[str, list[int]] = {}
        offset = 0
        for item in self.items:
            choices = item["choices"]
            item_scores = scores[offset : offset + len(choices)]
            offset += len(choices)
            best = max(range(len(choices)), key=item_scores.__getitem__)
            best_norm = max(range(len(choices)),
                            key=lambda i: item_scores[i] / len(choices[i].strip() or choices[i]))
            hit = int(best == item["answer"])
            right += hit
            right_norm += int(best_norm == item["answer"])
            per_lang.setdefault(item.get("lang", "all"), []).append(hit)
        n = len(self.items)
        # chance: what guessing scores, for the report's reference line
        results = {"acc": right / n, "acc_norm": right_norm / n,
                   "chance": sum(1 / len(item["choices"]) for item in self.items) / n}
        if len(per_lang) > 1:
            results.update({f"acc_{lang}": sum(h) / len(h) for lang, h in per_lang.items()})
        return results
