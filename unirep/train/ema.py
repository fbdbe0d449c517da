"""Exponential moving average of a model's weights (the weights REPA/DiT sample and evaluate with).

``ema <- decay * ema + (1 - decay) * param`` after every optimiser step (DiT ``train.py`` ``update_ema``, REPA
``train.py``; decay 0.9999 there). With ``warmup`` the decay of the n-th update (1-based) is
``min(decay, (1 + n) / (10 + n))``, as mace-torch's EMA (torch_ema ``use_num_updates=True``): early averages are not
dominated by the random initial weights. Float parameters are averaged; buffers (e.g. normalisation statistics) are
copied. Submodules that are :class:`unirep.encoders.FrozenEncoder` are left out: they never change and are rebuilt from
their own weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from unirep.encoders import FrozenEncoder

__all__ = ["EMA", "frozen_prefixes", "trainable_state"]


def frozen_prefixes(module: nn.Module) -> list[str]:
    """State-dict prefixes (``"name."``) of the FrozenEncoder submodules of ``module`` (outermost only)."""
    out: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, FrozenEncoder) and not any((name + ".").startswith(p) for p in out):
            out.append(name + "." if name else "")
    return out


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` without the entries of FrozenEncoder submodules (the checkpointed state)."""
    prefixes = frozen_prefixes(module)
    if "" in prefixes:
        return {}
    return {k: v for k, v in module.state_dict().items() if not any(k.startswith(p) for p in prefixes)}


class EMA:
    """An EMA of ``model``'s float parameters plus a copy of its buffers, kept as plain tensors.

    Args:
        model: the network (``task.model``).
        decay: averaging factor per step; 0 makes the EMA a copy of the weights.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the n-th update (``num_updates`` counts them).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}: set trainer.ema_decay accordingly")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        state = trainable_state(model)
        params = dict(model.named_parameters())
        # average float parameters only; integer buffers and frozen parameters are copied
        self.averaged = [k for k, v in state.items() if k in params and v.is_floating_point()]
        self.copied = [k for k in state if k not in set(self.averaged)]
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in state.items()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        decay = self.current_decay()
        self.num_updates += 1
        if self.averaged:
            ema = [self.shadow[k] for k in self.averaged]
            cur = [state[k].detach() for k in self.averaged]  # same dtypes as the shadow (cloned from them)
            torch._foreach_lerp_(ema, cur, 1.0 - decay)
        for k in self.copied:
            self.shadow[k].copy_(state[k])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "the checkpoint was written for a different model config"
            )
        with torch.no_grad():
            for k, v in state.items():
                self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (strict on the non-frozen entries)."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (for evaluation and sampling), then restore them."""
        backup = {k: v.detach().clone() for k, v in trainable_state(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                state = model.state_dict()
                for k, v in backup.items():
                    state[k].copy_(v)
