"""Kept only for ``callbacks/monitor/held_out.py``, which still imports ``token_losses`` from
here: the losses live in ``lightning_aquila.model.head_loss``. Delete this file once that
import follows (importing it registers every strategy just to get a loss function)."""

from lightning_aquila.model.head_loss import token_cross_entropy, token_losses

__all__ = ["token_cross_entropy", "token_losses"]
