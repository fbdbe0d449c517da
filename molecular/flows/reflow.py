"""Few-step conformer sampling by reflow (Liu et al. 2023, "Flow Straight and Fast"; Cao et al. 2025 for conformers).

A trained conformer flow defines a deterministic coupling: prior sample ``eps`` -> ODE solution ``x0_hat``. Reflow
trains a student flow on these pairs, ``x_t = (1 - t) x0_hat + t eps`` with target ``eps - x0_hat``
(``unirep.flow.FlowMatching.objective``): the pairs no longer cross, the learned paths become straighter, and one or
a few Euler steps follow them closely. Cao et al. (2025, SO(3)-averaged flow matching, NVIDIA) reflow and then
distill their conformer model to one or two steps; this is the reflow stage.

Pairs are made online: each training batch's molecules get fresh prior samples, and the frozen teacher integrates
them with ``teacher_steps`` Euler steps (its chirality is not corrected: the pairing must be the ODE's). The student
starts from the teacher's weights (``model`` and ``teacher_model`` are two loads of the same checkpoint in the
recipe) and is evaluated like any conformer flow (``task.sample_steps`` sets its step count; see
``scripts/bench_conformers.py`` for the quality/steps table).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from unirep.flow import sample_ode

from .egnn import remove_mean
from .task import ConformerFlowTask

__all__ = ["ReflowTask", "load_velocity_net"]


def load_velocity_net(
    checkpoint: str | None, ema: bool = True, random_init: bool = False, kind: str = "egnn"
) -> nn.Module:
    """The velocity network of a conformer-flow run (its EMA weights by default), or a tiny random one (smoke)."""
    if random_init:
        from .egnn import egnn_tiny
        from .et import et_tiny

        return {"egnn": egnn_tiny, "et": et_tiny}[kind]()
    from unirep.train import find_checkpoint, load_task

    if checkpoint is None or find_checkpoint(checkpoint) is None:
        raise FileNotFoundError(
            f"no conformer-flow checkpoint at {checkpoint!r}: train one first (e.g. `unirep-train "
            "experiment=molecular/conformer_qm9`) and pass task.model.checkpoint=<its out_dir>"
        )
    task, _ = load_task(checkpoint, ema=ema)
    if not isinstance(task, ConformerFlowTask):
        raise ValueError(f"checkpoint {checkpoint!r} holds a {type(task).__name__}, not a ConformerFlowTask")
    return task.model


class ReflowTask(ConformerFlowTask):
    """Reflow of a trained conformer flow: the student learns the straight paths between the teacher's pairs.

    Args:
        model: the student velocity network (initialised from the teacher).
        teacher_model: the trained velocity network whose ODE defines the pairs (frozen); ``None`` copies ``model``.
        teacher_steps: Euler steps of the teacher ODE per training batch.
        other arguments: as :class:`ConformerFlowTask` (Kabsch alignment and bridge noise are off: the coupling is
            the teacher's).
    """

    def __init__(self, model: nn.Module, teacher_model: nn.Module | None = None, teacher_steps: int = 20, **kwargs):
        kwargs.update(align_prior=False, bridge_noise=0.0)
        super().__init__(model, **kwargs)
        teacher_model = copy.deepcopy(model) if teacher_model is None else teacher_model
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        self.teacher_model = teacher_model
        self.teacher_steps = int(teacher_steps)

    def train(self, mode: bool = True) -> ReflowTask:
        super().train(mode)
        self.teacher_model.eval()
        return self

    @torch.no_grad()
    def pairs(self, batch) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps)``: the teacher's ODE solution from fresh prior samples of the batch's molecules."""
        bidx, n = batch.batch, batch.num_graphs
        eps = self.prior.sample(batch, dtype=batch.positions.dtype)

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.teacher_model(batch, x_t, t)

        def project(x: Tensor) -> Tensor:
            return remove_mean(x, bidx, n)

        x0 = sample_ode(fn, eps, self.teacher_steps, shift=self.time_shift, project=project, batch_time=False)
        return x0, eps

    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        x0, eps = self.pairs(batch)

        def model_fn(sample):
            return self.model(batch, sample.x_t, sample.t_in)

        res = self.path.flow.objective(x0, model_fn, eps=eps, batch=batch.batch, num_items=batch.num_graphs)
        return {"loss": res.loss, "loss/flow": res.loss.detach()}
