"""VisionFlowTask: flow matching of a DiT/SiT on images or latents with alignment terms, sampling and evaluation.

The task is the shared parts put together, with no method switch: :meth:`unirep.flow.FlowMatching.objective` for the
flow loss, :class:`unirep.align.Alignment` for any set of alignment terms (each a config under ``configs/align/``),
and, for REG, the class-token flow (:class:`ClassTokenFlow`). The recipes of ``configs/experiment/vision/`` are:

- SiT (Ma et al. 2024, willisma/SiT): no terms, flow matching only, in this project's time convention (t = 1 noise).
- REPA (Yu et al., ICLR 2025; sihyun-yu/REPA): ``align.repa`` = ``configs/align/repa.yaml``.
- REG (Wu et al. 2025; Martinser/REG): REPA on ``[cls, patches]`` (``configs/align/reg.yaml``) + ``cls_token``: the
  teacher's class token noised with the same t and its own noise, prepended as token 0, its velocity read after the
  shared final LayerNorm + adaLN, weight 0.03, sampled jointly with its own guidance scale.
- HASTE (Wang et al. 2025; NUS-HPC-AI-Lab/HASTE): REPA + attention distillation (``vision.align``), both stopped at
  one step (``configs/align/haste.yaml``, ``configs/align/haste_attention.yaml``).
- SRA (Jiang et al. 2025; vvvvvjdy/SRA): the EMA student at a deeper block and a less noisy time; the task's
  ``rerun`` runs the EMA copy on the same data and noise with the student's dropped labels.
- LayerSync (Haghighi et al. 2025): a deeper block of the same pass, detached. Dispersive loss (Wang & He 2025): a
  regulariser with no target.
- iREPA (Singh et al. 2025; End2End-Diffusion/iREPA): REPA with a conv projector on the token grid and spatially
  z-scored teacher tokens (:mod:`vision.irepa`, ``configs/align/irepa.yaml``).
- x-prediction (JiT: Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"): ``prediction="x0"``;
  the network outputs the clean image, the loss is JiT's velocity loss (prediction and target converted with the
  same clamp of t) and samplers get ``(x_t - x0) / max(t, clamp)``. ``"eps"`` likewise.
- MeanFlow (Geng et al. 2025; Gsunshine/meanflow): ``meanflow`` = :class:`vision.meanflow.MeanFlow`, the average
  velocity ``u(z_t, r, t)`` of a SiT built with ``interval_embed``, trained on the JVP target, sampled with
  ``sampler="meanflow"`` in ``sample_steps`` evaluations (1: ``z_0 = z_1 - u(z_1, 0, 1)``); alignment terms
  attach to the same forward pass (MeanFlow + REPA).

Evaluation (``evaluate``): Fréchet distance and k-NN precision/recall (Kynkäänniemi et al. 2019, k = 3;
:mod:`unirep.metrics`) in the frozen teacher's pooled feature space between generated samples and the held-out
split, the accuracy of a separately trained classifier on class-conditional samples, a sample grid PNG and a JSON of
the metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unirep.align import Alignment, AlignmentTerm
from unirep.encoders import FrozenEncoder
from unirep.flow import (
    FlowMatching,
    FlowSample,
    FlowStep,
    cfg_batched,
    interpolate,
    pred_to_velocity,
    sample_ode,
    sample_sde,
)
from unirep.metrics import frechet_distance, knn_precision_recall
from unirep.tokenizers import Tokenizer
from unirep.tokens import TokenSet
from unirep.train import Task
from vision.align import VisionAlignContext
from vision.meanflow import MeanFlow, sample_meanflow
from vision.models.sit import check_labels

__all__ = ["VisionFlowTask", "ClassTokenFlow", "save_grid"]


class ClassTokenFlow:
    """REG's class-token flow (Wu et al. 2025, Martinser/REG): the teacher's pooled token as an extra flow target.

    The token is noised with the item's t and its own noise, enters the SiT as token 0 (``cls_token_dim`` = the
    teacher's pooled width) and its velocity loss is added with ``weight`` (REG: 0.03). At sampling it is drawn
    jointly with the image; when the image is guided (``cfg_scale != 1``), the class token is guided with
    ``cfg_scale`` here (REG's ``cls_cfg_scale``, 1.5 in the anchor's SDE sampling).
    """

    def __init__(self, weight: float = 0.03, cfg_scale: float = 1.5) -> None:
        if weight < 0:
            raise ValueError(f"ClassTokenFlow weight must be >= 0, got {weight}")
        self.weight, self.cfg_scale = float(weight), float(cfg_scale)

    def __repr__(self) -> str:
        return f"ClassTokenFlow(weight={self.weight}, cfg_scale={self.cfg_scale})"


def save_grid(images: Tensor, path: Path, nrow: int = 10) -> None:
    """Write ``images[N, C, H, W]`` in [-1, 1] as one PNG grid (1 or 3 channels)."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.zeros(c, nrows * (h + 1) + 1, ncol * (w + 1) + 1, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3]).save(path)


def _joint_cfg(model_fn, y: Tensor, null_label: int, scale: float, cls_scale: float, n_img: int, interval):
    """REG's guidance of a packed ``[image, class token]`` state: the image with ``scale``, the class token with
    ``cls_scale``, both from one call on the doubled batch, only when the image is guided (``scale != 1``) and t lies
    in ``interval``."""
    low, high = interval

    def fn(state: Tensor, t: Tensor) -> Tensor:
        b = state.shape[0]
        t = t.expand(b) if t.numel() == 1 else t
        inside = (t >= low) & (t <= high)
        if scale == 1.0 or not bool(inside.any()):
            return model_fn(state, t, y)
        v = model_fn(torch.cat([state, state]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
        v_c, v_u = v[:b], v[b:]
        w = torch.full((v_c.shape[1],), scale, dtype=v_c.dtype, device=v_c.device)
        w[n_img:] = cls_scale
        guided = v_u + w * (v_c - v_u)
        return torch.where(inside[:, None], guided, v_c)

    return fn


class VisionFlowTask(Task):
    """Flow matching of ``model`` on images or latents plus any alignment terms.

    Args:
        model: a :class:`vision.models.sit.SiT` or :class:`vision.models.ddt.DiTDH` (``forward_intermediates``,
            ``feature_dim``, ``num_layers``).
        flow: the training objective (time distribution, shift, prediction); default uniform times, no shift (REPA).
        align: alignment terms by name (``configs/align/*.yaml``), or ``None``; run by one :class:`Alignment`.
        teacher: the frozen encoder: the default encoder of every :class:`TeacherTarget` and of HASTE's attention
            term, REG's class token, and the feature space of FD-teacher and precision/recall in :meth:`evaluate`.
            Wrapped in a :class:`FrozenEncoder` (content-keyed feature cache), never saved in checkpoints.
        teacher_cache, teacher_cache_dir: the teacher's in-memory cache on/off, and its precomputed shards.
        tokenizer: maps data to the space the model is trained in (``None``: pixels, or precomputed latents).
        cls_token: REG's :class:`ClassTokenFlow`, or ``None``.
        prediction: what the network outputs: ``"velocity"``, ``"x0"`` (JiT's x-prediction; ``"x"`` is accepted) or
            ``"eps"``; ``None`` takes ``flow.prediction``. The conversion clamps t at ``flow.clamp`` (JiT: 0.05).
        meanflow: a :class:`vision.meanflow.MeanFlow` objective instead of flow matching (the model needs
            ``interval_embed=True``); ``flow`` is then unused in training.
        num_classes: default ``model.num_classes`` (0: unconditional).
        sampler, sample_steps, cfg_scale, guidance_interval, guide_channels, sample_shift: sampling defaults
            (``sampler``: ``euler``/``heun`` ODE or ``sde``); ``guide_channels=3`` reproduces DiT's guidance bug.
        eval_samples, eval_batch, eval_seed: evaluation size and seed.
        inception_path, inception_reference: FID, sFID and Inception Score in :meth:`evaluate` (:mod:`vision.fid`):
            the local Inception weights file (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; ``None``: no
            FID) and a reference npz (ADM's ``mu``/``sigma``/``mu_s``/``sigma_s``, or ``arr_0`` images; ``None``:
            the evaluated real images).
    """

    def __init__(
        self,
        model: nn.Module,
        flow: FlowMatching | None = None,
        align: Mapping[str, AlignmentTerm] | Alignment | None = None,
        teacher: nn.Module | None = None,
        teacher_cache: bool = True,
        teacher_cache_dir: str | None = None,
        tokenizer: Tokenizer | None = None,
        cls_token: ClassTokenFlow | None = None,
        num_classes: int | None = None,
        prediction: str | None = None,
        meanflow: MeanFlow | None = None,
        sampler: str = "euler",
        sample_steps: int = 50,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        guide_channels: int | None = None,
        sample_shift: float = 1.0,
        eval_samples: int = 500,
        eval_batch: int = 250,
        eval_seed: int = 0,
        inception_path: str | None = None,
        inception_reference: str | None = None,
    ):
        super().__init__()
        if sampler not in ("euler", "heun", "sde", "meanflow"):
            raise ValueError(f"sampler must be 'euler', 'heun', 'sde' or 'meanflow', got {sampler!r}")
        self.model = model
        self.flow = flow if flow is not None else FlowMatching()
        self.tokenizer = tokenizer
        self.num_classes = int(getattr(model, "num_classes", 0) if num_classes is None else num_classes)
        self.teacher: FrozenEncoder | None = None
        if teacher is not None:
            self.teacher = (
                teacher
                if isinstance(teacher, FrozenEncoder)
                else FrozenEncoder(teacher, teacher_cache_dir, cache=teacher_cache)
            )
        self.alignment = align if isinstance(align, Alignment) else Alignment(dict(align) if align else None)
        self.alignment.bind(model, teacher=self.teacher)
        self.cls_token = cls_token
        self._check_class_token()
        self.prediction = self._check_prediction(prediction)
        self.meanflow = meanflow
        self._check_meanflow(sampler)
        self._layers = self.alignment.student_layers()
        self._attention = sorted(
            {k for term in self.alignment.terms.values() for k in getattr(term, "student_attention", list)()}
        )
        self.sampler, self.sample_steps, self.cfg_scale = sampler, sample_steps, cfg_scale
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self.guide_channels, self.sample_shift = guide_channels, sample_shift
        self.eval_samples, self.eval_batch, self.eval_seed = eval_samples, eval_batch, eval_seed
        self.inception_path, self.inception_reference = inception_path, inception_reference
        self._classifier: Any = None

    def _check_class_token(self) -> None:
        """REG's pieces must agree: the model's class-token width, the teacher, the ``[cls, patches]`` targets."""
        modes = {t.mode for t in self.alignment.teacher_targets()}
        if self.cls_token is None:
            if "pooled+tokens" in modes:
                raise ValueError(
                    "a TeacherTarget with mode 'pooled+tokens' (REG's [cls, patches]) needs the student's class token: "
                    "set task.cls_token (vision.task.ClassTokenFlow) and task.model.cls_token_dim"
                )
            return
        if self.teacher is None:
            raise ValueError("task.cls_token (REG) needs a teacher: its class token is the extra flow target")
        dim = int(self.teacher.pooled_dim or self.teacher.dim)
        if getattr(self.model, "cls_token_dim", None) != dim:
            raise ValueError(
                f"REG's class token needs the model built with cls_token_dim = the teacher's pooled width ({dim}), "
                f"got {getattr(self.model, 'cls_token_dim', None)}: set task.model.cls_token_dim"
            )
        if "tokens" in modes:  # the student's tokens then start with its class token: 1 + N per item
            raise ValueError(
                "with task.cls_token the student's tokens include its class token: align them to [cls, patches] "
                "(TeacherTarget mode 'pooled+tokens', configs/align/reg.yaml), not to the patch tokens alone"
            )

    def _check_prediction(self, prediction: str | None) -> str:
        """The network's output kind; the flow objective's, unless set here (then they must agree)."""
        own = getattr(self.flow, "prediction", "velocity")
        kind = own if prediction is None else ("x0" if prediction == "x" else prediction)
        if kind not in ("velocity", "x0", "eps"):
            raise ValueError(f"task.prediction={prediction!r}: use 'velocity', 'x0' (or 'x') or 'eps'")
        if own not in ("velocity", kind):
            raise ValueError(
                f"task.prediction={kind!r} but task.flow.prediction={own!r}: set one of them (task.prediction wins "
                "only over the default 'velocity')"
            )
        if kind != "velocity" and self.cls_token is not None:
            raise ValueError("REG's class token predicts a velocity: use task.prediction=velocity with task.cls_token")
        return kind

    def _check_meanflow(self, sampler: str) -> None:
        if self.meanflow is None:
            if sampler == "meanflow":
                raise ValueError("sampler='meanflow' needs a MeanFlow-trained model: set task.meanflow")
            return
        if not getattr(self.model, "interval_embed", False):
            raise ValueError(
                "MeanFlow's model takes two times: build it with interval_embed=True (task.model.interval_embed)"
            )
        if self.prediction != "velocity" or self.cls_token is not None or self._attention_terms():
            raise ValueError(
                "task.meanflow predicts the average velocity: it is not combined with x/eps-prediction, REG's class "
                "token or attention distillation"
            )

    def _attention_terms(self) -> bool:
        return any(getattr(term, "student_attention", None) for term in self.alignment.terms.values())

    def _velocity_loss(self, step_out: FlowStep) -> Tensor:
        """JiT's loss for an x0 (or eps) prediction: prediction and truth converted to velocities with one clamp.

        For t above the clamp this is the flow objective's velocity MSE; below it, JiT divides the target by the same
        clamped t (``(x_t - x) / max(t, clamp)``), so the oracle ``x0 = x`` has zero loss at every t.
        """
        s, kind, clamp = step_out.sample, self.prediction, getattr(self.flow, "clamp", 1e-3)
        truth = s.x if kind == "x0" else s.eps
        v_pred = pred_to_velocity(step_out.pred.float(), kind, s.x_t.float(), s.t_in, clamp)
        v_true = pred_to_velocity(truth.float(), kind, s.x_t.float(), s.t_in, clamp)
        return (v_pred - v_true).square().flatten(1).mean(1).mean()

    # -- training ------------------------------------------------------------------------------------------------
    def _to_model_space(self, x: Tensor) -> Tensor:
        if self.tokenizer is None:
            return x
        with torch.no_grad():
            return self.tokenizer.encode(x)

    def _class_token(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        assert self.teacher is not None
        images = batch.get("image", batch["x"])
        return self.teacher.encode_pooled(images, device=device).float()  # [B, D_cls]

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        if self.meanflow is not None:
            return self._meanflow_forward(batch, step)
        x = batch["x"]
        y = batch.get("y")
        y_in = None
        if y is not None and self.num_classes > 0:
            y_in = y.long()
            check_labels(y_in, self.num_classes, batch.get("id"))
        z = self._to_model_space(x)
        cls = self._class_token(batch, z.device) if self.cls_token is not None else None
        model = self.model
        keep_prefix = cls is not None
        state: dict[str, Any] = {}

        def cls_at(t: Tensor) -> Tensor | None:
            return None if cls is None else interpolate(cls, state["eps_cls"], t)  # same t, its own noise

        def model_fn(sample: FlowSample) -> tuple[Tensor, Any]:
            if cls is not None:
                state["eps_cls"] = torch.randn_like(cls)
            drop = model.sample_label_drop(y_in) if hasattr(model, "sample_label_drop") else None
            state["drop"] = drop  # the same dropped labels for an EMA target's rerun (SRA)
            res = model.forward_intermediates(
                sample.x_t,
                sample.t_in,
                y_in,
                self._layers,
                cls=cls_at(sample.t),
                force_drop_ids=drop,
                keep_prefix=keep_prefix,
                attention=self._attention,
            )
            pred, feats = res[0], res[1]
            logits = res[2] if self._attention else {}
            pred_img, pred_cls = pred if cls is not None else (pred, None)
            return pred_img, (pred_cls, feats, logits)

        step_out = self.flow.objective(z, model_fn)
        pred_cls, feats, logits = step_out.aux
        sample = step_out.sample
        loss = step_out.loss if self.prediction == "velocity" else self._velocity_loss(step_out)
        out: dict[str, Tensor] = {"loss/flow": loss.detach()}
        if cls is not None:
            assert self.cls_token is not None
            v_cls = state["eps_cls"] - cls  # velocity target of the class token
            loss_cls = (pred_cls.float() - v_cls).square().mean()
            loss = loss + self.cls_token.weight * loss_cls
            out["loss/cls"] = loss_cls.detach()
        extra = getattr(model, "auxiliary_losses", None)
        if extra is not None:  # the model's own losses of this pass (DeepFlow): name -> (value, weight)
            for name, (value, weight) in extra(sample).items():
                loss = loss + weight * value
                out[f"loss/{name}"] = value.detach()
        if len(self.alignment):

            def rerun(module: nn.Module, t: Tensor, indices: list[int]) -> list[TokenSet]:
                res = module.forward_intermediates(
                    sample.at(t), t, y_in, indices, cls=cls_at(t), force_drop_ids=state["drop"], keep_prefix=keep_prefix
                )
                return res[1]

            ctx = VisionAlignContext(
                batch=batch,
                features=dict(zip(self._layers, feats, strict=True)),
                t=sample.t,
                rerun=rerun,
                device=z.device,
                attention=logits,
                attention_prefix=1 if keep_prefix else 0,
            )
            align_loss, logs = self.alignment(ctx, step)
            if align_loss is not None:
                loss = loss + align_loss
            out.update(logs)
        out["loss"] = loss
        return out

    def _meanflow_forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        """MeanFlow's objective (:mod:`vision.meanflow`) plus the alignment terms on the same forward pass."""
        assert self.meanflow is not None
        y = batch.get("y")
        y_in = None
        if y is not None and self.num_classes > 0:
            y_in = y.long()
            check_labels(y_in, self.num_classes, batch.get("id"))
        z = self._to_model_space(batch["x"])
        model = self.model
        drop = model.sample_label_drop(y_in) if hasattr(model, "sample_label_drop") else None

        def u_fn(z_t: Tensor, t: Tensor, r: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
            u, feats = model.forward_intermediates(z_t, t, y_in, self._layers, force_drop_ids=drop, t_minus_r=t - r)
            return u[:, : z.shape[1]], [(f.x, f.batch) for f in feats]  # jvp's aux holds tensors only

        def v_fn(z_t: Tensor, t: Tensor, conditional: bool) -> Tensor:  # the network at r = t (guidance)
            yy = y_in if conditional else torch.full_like(y_in, self.num_classes)
            keep = torch.zeros_like(drop) if drop is not None else None  # the labels as given: no dropout here
            return model(z_t, t, yy, force_drop_ids=keep)[:, : z.shape[1]]

        guided = self.meanflow.guided and y_in is not None
        step_out = self.meanflow.objective(z, u_fn, v_fn if guided else None, drop)
        loss = step_out.loss
        out: dict[str, Tensor] = {"loss/flow": loss.detach(), **step_out.logs}
        if len(self.alignment):
            ctx = VisionAlignContext(
                batch=batch,
                features={
                    k: TokenSet(x, b, None, z.shape[0]) for k, (x, b) in zip(self._layers, step_out.aux, strict=True)
                },
                t=step_out.t,
                device=z.device,
            )
            align_loss, logs = self.alignment(ctx, step)
            if align_loss is not None:
                loss = loss + align_loss
            out.update(logs)
        out["loss"] = loss
        return out

    def on_step_end(self, step: int) -> None:
        self.alignment.on_step_end(self.model)

    # -- sampling ------------------------------------------------------------------------------------------------
    def _latent_shape(self) -> tuple[int, int, int]:
        m = self.model
        return int(m.in_channels), int(m.input_size), int(m.input_size)

    @torch.no_grad()
    def generate(
        self,
        num: int,
        seed: int = 0,
        labels: Tensor | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        guidance_interval: Sequence[float] | None = None,
        guide_channels: int | None = None,
        shift: float | None = None,
        batch_size: int | None = None,
        cls_cfg_scale: float | None = None,
        sampler_options: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``num`` samples (decoded to images when a tokenizer is set) and their labels; deterministic in seed.

        Initial noise for every sample comes from one CPU generator seeded with ``seed``, so ODE samples do not depend
        on the batch size or the device; the SDE's per-step noise is drawn per batch (same seed and batch size, same
        samples). REG samples the class token jointly (packed with the image into one state) and guides it with its
        own scale (``cls_cfg_scale``, default ``cls_token.cfg_scale``) whenever the image is guided.
        """
        sampler = sampler or self.sampler
        steps = steps or self.sample_steps
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        interval = tuple(guidance_interval) if guidance_interval is not None else self.guidance_interval
        channels = self.guide_channels if guide_channels is None else guide_channels
        shift = self.sample_shift if shift is None else shift
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        if labels is None:
            labels = torch.arange(num) % max(self.num_classes, 1)
        labels = labels.long()
        if self.num_classes > 0:
            check_labels(labels, self.num_classes)
        shape = self._latent_shape()
        n_img = int(np.prod(shape))
        cls_dim = int(self.model.cls_token_dim) if self.cls_token is not None else 0
        if cls_dim and channels is not None:
            raise ValueError("guide_channels (DiT's 3-channel guidance) is not defined for REG's joint sampling")
        cls_scale = scale
        if cls_dim:
            cls_scale = self.cls_token.cfg_scale if cls_cfg_scale is None else cls_cfg_scale
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(num, n_img + cls_dim, generator=gen, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        outs = []
        bs = batch_size or self.eval_batch
        # a model that keeps state across sampling steps (DDT's encoder sharing) gives one velocity function per run
        make_state = getattr(self.model, "make_sampler_state", None)
        shared = None
        if make_state is not None:
            opts = dict(sampler_options or {})  # DDT: sharing, sharing_rate (+sample.sampler_options.<key> in the CLI)
            shared = make_state(
                steps=steps, shift=shift, sampler=sampler, cfg_scale=scale, guidance_interval=interval, **opts
            )
        elif sampler_options:
            raise ValueError(f"sampler_options {dict(sampler_options)} need a model with make_sampler_state (DDT)")
        net = self.model if shared is None else shared
        try:
            for i in range(0, num, bs):
                x1 = noise[i : i + bs].to(device, dtype)
                y = labels[i : i + bs].to(device)
                if shared is not None:
                    shared.reset()  # a new batch; the NFE counters keep counting

                def model_fn(state: Tensor, t: Tensor, yy: Tensor) -> Tensor:
                    xx = state[:, :n_img].reshape(-1, *shape)
                    y_in = yy if self.num_classes > 0 else None
                    if cls_dim:
                        v, v_cls = self.model(xx, t, y_in, cls=state[:, n_img:])
                        return torch.cat([v[:, : shape[0]].flatten(1), v_cls], dim=1)
                    return net(xx, t, y_in)[:, : shape[0]].flatten(1)

                if self.num_classes > 0:
                    if channels is not None:  # DiT's kept bug: guide only the first k channels of the image

                        def fn_img(xd, t, yy):
                            return model_fn(xd.flatten(1), t, yy).reshape(-1, *shape)

                        guided = cfg_batched(fn_img, y, self.num_classes, scale, interval, channels)

                        def vel(state, t, g=guided):
                            return g(state.reshape(-1, *shape), t).flatten(1)
                    elif cls_dim and cls_scale != scale:
                        vel = _joint_cfg(model_fn, y, self.num_classes, scale, cls_scale, n_img, interval)
                    else:
                        vel = cfg_batched(model_fn, y, self.num_classes, scale, interval)
                else:

                    def vel(state, t, yy=y):
                        return model_fn(state, t, yy)

                if self.prediction != "velocity":  # x0/eps -> velocity after guidance (affine in the prediction)
                    vel = self._as_velocity(vel)
                if sampler == "meanflow":
                    out = sample_meanflow(self._average_velocity(y, scale, interval), x1, steps=steps)
                elif sampler == "sde":
                    g = torch.Generator().manual_seed(seed * 100003 + i)
                    out = sample_sde(vel, x1, steps=steps, shift=shift, generator=g)
                else:
                    out = sample_ode(vel, x1, steps=steps, method=sampler, shift=shift)
                outs.append(out[:, :n_img].reshape(-1, *shape).float().cpu())
        finally:
            self.model.train(was_training)
        self.last_nfe = None if shared is None else dict(shared.nfe)  # {"encoder": calls, "decoder": calls}
        samples = torch.cat(outs)
        if self.tokenizer is not None:
            samples = torch.cat([self.tokenizer.decode(s.to(device)).cpu() for s in samples.split(bs)])
        return samples, labels

    def _as_velocity(self, fn):
        kind, clamp = self.prediction, getattr(self.flow, "clamp", 1e-3)

        def vel(state: Tensor, t: Tensor) -> Tensor:
            return pred_to_velocity(fn(state, t), kind, state, t, clamp)

        return vel

    def _average_velocity(self, y: Tensor, scale: float, interval: tuple[float, float]):
        """MeanFlow's ``u(z, t, r)`` on flattened states, guided ``u_u + scale (u_c - u_u)`` for t in ``interval``."""
        shape = self._latent_shape()
        guide = self.num_classes > 0 and scale != 1.0

        def u_fn(state: Tensor, t: Tensor, r: Tensor) -> Tensor:
            xx = state.reshape(-1, *shape)
            y_in = y if self.num_classes > 0 else None
            inside = bool(((t >= interval[0]) & (t <= interval[1])).any())
            if not (guide and inside):
                return self.model(xx, t, y_in, t_minus_r=t - r)[:, : shape[0]].flatten(1)
            yy = torch.cat([y, torch.full_like(y, self.num_classes)])
            u = self.model(torch.cat([xx, xx]), torch.cat([t, t]), yy, t_minus_r=torch.cat([t - r, t - r]))
            u_c, u_u = u[:, : shape[0]].flatten(1).chunk(2)
            return u_u + scale * (u_c - u_u)

        return u_fn

    def sample(self, out_dir: Path, num: int, seed: int, **kwargs: Any) -> dict[str, Any]:
        """Write ``samples.npz`` (images in [-1, 1], labels) and ``samples.png`` (a grid) under ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        images, labels = self.generate(num, seed, **kwargs)
        npz, png = out_dir / "samples.npz", out_dir / "samples.png"
        np.savez(npz, images=images.numpy().astype(np.float32), labels=labels.numpy())
        save_grid(images[:100], png, nrow=max(self.num_classes, 10) if self.num_classes else 10)
        nfe = {"nfe": self.last_nfe} if getattr(self, "last_nfe", None) else {}
        return {"npz": str(npz), "png": str(png), "num": num, "seconds": round(time.time() - start, 2), **nfe}

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _real_images(self, data: Any, num: int) -> tuple[Tensor, Tensor]:
        ds = data.val if getattr(data, "val", None) is not None else data.train
        n = min(num, len(ds))
        items = [ds[i] for i in range(n)]
        images = torch.stack([it.get("image", it["x"]) for it in items])
        if self.tokenizer is not None and "image" not in items[0]:
            images = self.tokenizer.decode(images)
        return images, torch.stack([torch.as_tensor(it["y"]) for it in items]).long()

    def _fit_classifier(self, data: Any) -> tuple[Any, float]:
        """A logistic-regression classifier on pixels of the training split; returns it and its held-out accuracy."""
        from sklearn.linear_model import LogisticRegression

        if self._classifier is None:
            n = min(len(data.train), 5000)
            items = [data.train[i] for i in range(n)]
            xs = torch.stack([it.get("image", it["x"]) for it in items]).flatten(1).numpy()
            ys = np.array([int(it["y"]) for it in items])
            clf = LogisticRegression(max_iter=1000, C=0.5).fit(xs, ys)
            acc = float("nan")
            if getattr(data, "val", None) is not None:
                vx, vy = self._real_images(data, len(data.val))
                acc = float(clf.score(vx.flatten(1).numpy(), vy.numpy()))
            self._classifier = (clf, acc)
        return self._classifier

    @torch.no_grad()
    def evaluate(self, data: Any, out_dir: Path, step: int) -> dict[str, float]:
        out_dir = Path(out_dir)
        start = time.time()
        num = self.eval_samples
        real, _ = self._real_images(data, num)
        fake, labels = self.generate(len(real), seed=self.eval_seed)
        metrics: dict[str, float] = {}
        if self.teacher is not None:
            device = next(self.model.parameters()).device
            feats_r = torch.cat([self.teacher.encode_pooled(r.to(device)).cpu() for r in real.split(self.eval_batch)])
            # generated images are new every call: computed, not cached
            feats_f = torch.cat([self.teacher.compute_pooled(f.to(device)).cpu() for f in fake.split(self.eval_batch)])
            metrics["fd_teacher"] = frechet_distance(feats_r, feats_f)
            p, r = knn_precision_recall(feats_r, feats_f, k=3)
            metrics["precision"], metrics["recall"] = p, r
        if self.num_classes > 0 and self.tokenizer is None:
            clf, clf_acc = self._fit_classifier(data)
            pred = clf.predict(fake.flatten(1).numpy())
            metrics["cond_accuracy"] = float((pred == labels.numpy()).mean())
            metrics["classifier_val_accuracy"] = clf_acc
        if self.inception_path is not None:  # FID / sFID / IS with the real Inception weights (vision.fid)
            from vision.fid import InceptionMetrics

            device = next(self.model.parameters()).device
            inception = InceptionMetrics(self.inception_path, self.inception_reference, self.eval_batch, device)
            metrics.update(inception(fake, None if self.inception_reference else real))
        metrics["eval_seconds"] = round(time.time() - start, 2)
        eval_dir = out_dir / "eval"
        save_grid(fake[:100], eval_dir / f"samples_step_{step:08d}.png", nrow=10)
        record = dict(
            metrics,
            step=step,
            num_samples=len(fake),
            sampler=self.sampler,
            steps=self.sample_steps,
            cfg_scale=self.cfg_scale,
            fid=metrics.get(
                "fid",
                "unavailable: set task.inception_path to a local Inception weights file (vision.fid); "
                "FD-teacher is the offline substitute",
            ),
        )
        (eval_dir / f"metrics_step_{step:08d}.json").write_text(json.dumps(record, indent=2))
        return metrics
