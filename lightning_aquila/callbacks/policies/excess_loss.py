"""DoReMi-style reweighting by excess loss over a reference (:class:`ExcessLossMixture`), and
the reading of those reference losses from a mapping, a JSON/YAML file or a reference run's
``metrics.jsonl`` (:func:`load_reference_losses`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_aquila.callbacks.policies.base import MixturePolicy
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import Bound, as_number, normalized
from lightning_aquila.tracking.run_files import EVENTS_FILE, read_jsonl


def load_reference_losses(reference: Mapping[str, float] | str,
                          signal: Literal["train", "val"] = "train",
                          command: str | None = None) -> dict[str, float]:
    """Per-domain reference losses from a mapping, or from a file:

    * ``*.json`` / ``*.yaml`` / ``*.yml``: a mapping ``domain -> loss``;
    * ``*.jsonl``: a TSM ``metrics.jsonl`` of a reference run; the last finite
      ``tsm/val_loss/<domain>`` (``signal="val"``) or ``tsm/train_loss/<domain>``
      (``signal="train"``) of each domain.

    A missing file is a ``ValueError`` naming it and ``command``, the command that writes it
    (or, without one, what writes such a file).
    """
    if isinstance(reference, Mapping):
        source, raw = "ExcessLossMixture(reference)", dict(reference)
    elif not isinstance(reference, (str, os.PathLike)):
        raise ValueError(f"ExcessLossMixture(reference={reference!r}) must be a mapping "
                         "domain -> loss or the path of a .json/.yaml/.jsonl file")
    else:
        path = Path(reference)
        source = str(path)
        if not path.is_file():
            how = (f"create it with: {' '.join(command.split())}" if command else
                   "train the reference run first (its TrainingStateMonitor writes "
                   "<trainer.default_root_dir>/tsm/metrics.jsonl) or give a .json/.yaml "
                   "mapping domain -> loss")
            raise ValueError(f"ExcessLossMixture: the reference file {source} does not "
                             f"exist; {how}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            prefix = "tsm/val_loss/" if signal == "val" else "tsm/train_loss/"
            raw = {}
            for row in read_jsonl(path):  # in the order written; a torn last line skipped
                for key, value in row.items():
                    name = key[len(prefix):]
                    if (key.startswith(prefix) and "/" not in name
                            and isinstance(value, (int, float)) and math.isfinite(value)):
                        raw[name] = float(value)
            if not raw:
                raise ValueError(f"{source} holds no {prefix}<domain> values")
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source} must hold a mapping domain -> loss, got "
                             f"{type(raw).__name__}")
    losses: dict[str, float] = {}
    for domain, value in raw.items():
        try:
            loss = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: reference loss of {domain!r} is not a number: "
                             f"{value!r}") from None
        if not math.isfinite(loss):
            raise ValueError(f"{source}: reference loss of {domain!r} is not finite: {loss}")
        losses[str(domain)] = loss
    return losses


def reference_tokenizer(reference: Mapping[str, float] | str) -> str | None:
    """The tokenizer hash a reference run's monitor recorded at its first session start
    (``events.jsonl`` beside its ``metrics.jsonl``), or ``None`` when it is not a run's
    file or the run predates the record."""
    if isinstance(reference, Mapping):
        return None
    events = Path(reference).parent / EVENTS_FILE
    if Path(reference).suffix != ".jsonl" or not events.is_file():
        return None
    return next((e["tokenizer"] for e in read_jsonl(events)
                 if e.get("kind") == "session_start" and e.get("tokenizer")), None)


class ExcessLossMixture(MixturePolicy):
    r"""DoReMi-style online reweighting (Xie et al. 2023) by excess loss over a reference.

    At each update with a fresh loss signal, per domain ``i``:
    ``delta_i = max(loss_i - reference_i, 0)``, ``a_i <- a_i * exp(step_size * delta_i)``,
    normalise, then ``a <- (1 - smoothing) * a + smoothing / K``. The weights are ``a``,
    projected onto the bounds (``min_weight`` is the per-domain floor). ``a`` starts from the
    mixture's weights at the first update and lives in the checkpoint.

    Args:
        reference: per-domain reference losses: a mapping (loss targets), or a file
            (see :func:`load_reference_losses`): JSON/YAML mapping or a reference run's TSM
            ``metrics.jsonl``. It must cover every domain of the mixture.
        signal: ``"train"``: the TSM's per-domain training-loss EMA (``state.train_loss``,
            fresh when ``state.train_step`` moves); ``"val"``: the held-out loss
            (``state.val_loss``, fresh when ``state.val_step`` moves).
        step_size: the exponentiated-gradient step ``eta`` per nat of excess loss.
        smoothing: the mass ``c`` mixed in from the uniform distribution at every update.
        reference_command: the command that writes the ``reference`` file, quoted in the
            error if the file does not exist (e.g. the quickstart's reference run).
    """

    def __init__(self, reference: Mapping[str, float] | str,
                 signal: Literal["train", "val"] = "train", step_size: float = 1.0,
                 smoothing: float = 1e-3, update_every: int = 10, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0, reference_command: str | None = None) -> None:
        super().__init__(update_every, min_weight, max_weight)
        if signal not in ("train", "val"):
            raise ValueError(f"ExcessLossMixture(signal={signal!r}) must be 'train' or 'val'")
        if not as_number(step_size, "ExcessLossMixture(step_size)") > 0:
            raise ValueError(f"ExcessLossMixture(step_size={step_size!r}) must be positive")
        if not 0.0 <= as_number(smoothing, "ExcessLossMixture(smoothing)") <= 1.0:
            raise ValueError(f"ExcessLossMixture(smoothing={smoothing!r}) must be in [0, 1]")
        self.reference = dict(reference) if isinstance(reference, Mapping) else reference
        self.signal, self.step_size, self.smoothing = signal, float(step_size), float(smoothing)
        self.reference_command = reference_command
        self.reference_losses = load_reference_losses(reference, signal, reference_command)
        #: the hash of the tokenizer the reference run trained with (None: not a run's
        #: metrics.jsonl, or one from before runs recorded it); checked before step 0
        self.reference_tokenizer = reference_tokenizer(reference)
        self.alpha: dict[str, float] | None = None
        self.last_signal_step: int | None = None
        self.updates = 0

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        super().setup(domains, natural, **context)
        missing = [d for d in self.domains if d not in self.reference_losses]
        if missing:
            raise ValueError(f"ExcessLossMixture: the reference ({self.reference!r}) has no "
                             f"loss for domain(s) {missing}: train the reference on this run's "
                             "domains")
        if self.alpha is not None:  # a resume with other domains: keep the ones that stayed
            kept = {d: self.alpha[d] for d in self.domains if d in self.alpha}
            fresh = 1.0 / len(self.domains)
            self.alpha = normalized({d: kept.get(d, fresh) for d in self.domains}, self.name)

    def excess(self, losses: Mapping[str, float]) -> dict[str, float]:
        """``max(loss - reference, 0)`` per domain; 0 where the loss is unknown or not
        finite (a spike's NaN must not steer the mixture)."""
        out = {}
        for d in self.domains:
            loss = losses.get(d)
            ok = loss is not None and math.isfinite(loss)
            out[d] = max(loss - self.reference_losses[d], 0.0) if ok else 0.0
        return out

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        signal_step = state.train_step if self.signal == "train" else state.val_step
        losses = state.train_loss if self.signal == "train" else state.val_loss
        if signal_step is None or signal_step == self.last_signal_step or not losses:
            return None
        self.last_signal_step = signal_step
        alpha = self.alpha or normalized(current, self.name)
        delta = self.excess(losses)
        # log-space update: exp of a large excess must not overflow
        logits = {d: math.log(max(alpha[d], 1e-300)) + self.step_size * delta[d]
                  for d in self.domains}
        top = max(logits.values())
        raw = {d: math.exp(v - top) for d, v in logits.items()}
        total = sum(raw.values())
        k = len(self.domains)
        self.alpha = {d: (1 - self.smoothing) * raw[d] / total + self.smoothing / k
                      for d in self.domains}
        self.updates += 1
        return dict(self.alpha)

    def config(self) -> dict[str, Any]:
        # reference_command only when given: a run recorded without it compares equal on resume
        command = {"reference_command": self.reference_command} if self.reference_command else {}
        return {"reference": self.reference, "signal": self.signal,
                "step_size": self.step_size, "smoothing": self.smoothing, **command,
                **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": None if self.alpha is None else dict(self.alpha),
                "last_signal_step": self.last_signal_step, "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = None if state["alpha"] is None else dict(state["alpha"])
        self.last_signal_step = state["last_signal_step"]
        self.updates = int(state["updates"])



__all__ = ["ExcessLossMixture", "load_reference_losses"]
