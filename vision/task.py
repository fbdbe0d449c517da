"""VisionFlowTask: flow-matching training of a DiT/SiT with representation alignment, sampling and evaluation.

One task implements the REPA family as configurations of the shared parts (``unirep.align``, ``unirep.flow``):

- ``sit``: flow matching only (Ma et al. 2024, willisma/SiT), in this project's time convention (t = 1 noise).
- ``repa``: + ``Aligner(ProjectorMLP(D, 2048, D_teacher), neg_cosine, 0.5)`` between the output of block
  ``align_depth`` and the frozen teacher's patch tokens (Yu et al., ICLR 2025; sihyun-yu/REPA ``train.py``,
  ``loss.py``).
- ``reg``: REPA + the teacher's class token noised with the same t and its own noise, prepended as a token, its
  velocity predicted by a zero-initialised head with weight 0.03, sampled jointly (Wu et al. 2025; Martinser/REG).
- ``haste``: REPA with the alignment weight scheduled to zero at ``align_stop_step`` (Wang et al. 2025, HASTE).
- ``sra``: the target is a deeper layer of an EMA copy of the student, fed a less noisy input (Jiang et al. 2025,
  "No Other Representation Component Is Needed", SRA).
- ``layersync``: the target is a deeper layer of the same forward pass, gradient stopped (Haghighi et al. 2025).
- ``dispersive``: the dispersive loss on one block's tokens, no target (Wang & He 2025, "Diffuse and Disperse").

Evaluation (``evaluate``): Fréchet distance and k-NN precision/recall (Kynkäänniemi et al. 2019, k = 3) in the
frozen teacher's pooled feature space between generated samples and the held-out split, the accuracy of a
separately trained classifier on class-conditional samples, a sample grid PNG and a JSON of the metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unirep.align import Aligner, EMATeacher, ProjectorMLP, StopAtStep, dispersive_loss
from unirep.encoders import FrozenEncoder
from unirep.flow import cfg_batched, interpolate, sample_ode, sample_sde, sample_time, shift_time, velocity_target
from unirep.tokenizers import Tokenizer
from unirep.train import Task

__all__ = ["VisionFlowTask", "RECIPES", "frechet_distance", "knn_precision_recall", "save_grid"]

RECIPES = ("sit", "repa", "reg", "haste", "sra", "layersync", "dispersive")
_TEACHER_RECIPES = ("repa", "reg", "haste")


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a[n, d]`` and ``b[m, d]`` (FID's formula).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``; the trace of the matrix square root is computed from the
    eigenvalues of ``S_a^{1/2} S_b S_a^{1/2}`` (symmetric PSD), which avoids complex parts of ``scipy.linalg.sqrtm``.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    ev_a, vec_a = torch.linalg.eigh(cov_a)
    sqrt_a = vec_a @ torch.diag(ev_a.clamp_min(0).sqrt()) @ vec_a.T
    mid = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0)
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * mid.sqrt().sum())


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): share of fake (real) points inside the union of the
    k-NN balls of the real (fake) points; a point's radius is the distance to its k-th nearest neighbour (self
    excluded)."""

    def radii(x: Tensor) -> Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k + 1: the zero distance to itself comes first

    def coverage(ref: Tensor, r: Tensor, query: Tensor) -> float:
        return float((torch.cdist(query, ref) <= r[None, :]).any(dim=1).float().mean())

    real, fake = real.double(), fake.double()
    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


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


class VisionFlowTask(Task):
    """Flow matching of ``model`` on images or latents with an optional alignment recipe.

    Args:
        model: a :class:`vision.models.sit.SiT` (``forward_intermediates(x, t, y, indices, cls=...)``).
        recipe: one of :data:`RECIPES`.
        teacher: frozen encoder: the alignment target of ``repa``/``reg``/``haste`` and, for every recipe, the
            feature space of FD-teacher and precision/recall in :meth:`evaluate`; wrapped in a
            :class:`FrozenEncoder`, so its weights are never saved in checkpoints.
        teacher_cache: cache teacher features per item id (in memory, or on disk under ``teacher_cache_dir``). Turn
            it off for data with random augmentations whose ids do not name the augmentation.
        tokenizer: maps data to the space the model is trained in (``None``: pixels, or precomputed latents).
        align_depth: block whose output is aligned (REPA: 4 for B, 8 for L/XL); the dispersive loss's block too.
        target_depth: the deeper block of the target (``sra``, ``layersync``).
        align_weight, align_loss, projector_dim: the aligner (REPA: 0.5, neg-cosine, 2048).
        align_stop_step: ``haste``: the step from which the alignment weight is 0.
        sra_decay, sra_time_gap: ``sra``: EMA decay of the teacher copy and how much less noise (in t) it sees.
        dispersive_weight, dispersive_tau: the dispersive regulariser (paper: 0.5 and 0.5).
        reg_weight: weight of the class-token flow loss (REG: 0.03).
        time_sampler, time_mean, time_std, time_shift: training-time distribution (REPA: uniform, no shift).
        sampler, sample_steps, cfg_scale, guidance_interval, guide_channels, sample_shift: sampling defaults
            (``sampler``: ``euler``/``heun`` ODE or ``sde``); ``guide_channels=3`` reproduces DiT's guidance bug.
        eval_samples, eval_batch, eval_seed: evaluation size and seed.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: str = "sit",
        teacher: nn.Module | None = None,
        teacher_cache: bool = True,
        teacher_cache_dir: str | None = None,
        tokenizer: Tokenizer | None = None,
        num_classes: int | None = None,
        align_depth: int = 4,
        target_depth: int | None = None,
        align_weight: float = 0.5,
        align_loss: str = "neg_cosine",
        projector_dim: int = 2048,
        align_stop_step: int | None = None,
        sra_decay: float = 0.999,
        sra_time_gap: float = 0.1,
        dispersive_weight: float = 0.5,
        dispersive_tau: float = 0.5,
        reg_weight: float = 0.03,
        time_sampler: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float = 1.0,
        sampler: str = "euler",
        sample_steps: int = 50,
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        guide_channels: int | None = None,
        sample_shift: float = 1.0,
        eval_samples: int = 500,
        eval_batch: int = 250,
        eval_seed: int = 0,
    ):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}: use one of {RECIPES}")
        if sampler not in ("euler", "heun", "sde"):
            raise ValueError(f"sampler must be 'euler', 'heun' or 'sde', got {sampler!r}")
        self.model = model
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.num_classes = int(getattr(model, "num_classes", 0) if num_classes is None else num_classes)
        depth = int(model.depth)
        if not 1 <= align_depth <= depth:
            raise ValueError(f"align_depth {align_depth} outside [1, {depth}] for a model of depth {depth}")
        self.align_depth = align_depth
        self.teacher: FrozenEncoder | None = None
        self.aligner: Aligner | None = None
        self.ema_teacher: EMATeacher | None = None
        self.teacher_cache = teacher_cache
        hidden = int(model.hidden_size)
        if teacher is not None:  # other recipes keep it for evaluation (FD-teacher, precision/recall) only
            self.teacher = teacher if isinstance(teacher, FrozenEncoder) else FrozenEncoder(teacher, teacher_cache_dir)
        if recipe in _TEACHER_RECIPES:
            if self.teacher is None:
                raise ValueError(f"recipe {recipe!r} needs a teacher (task.teacher in the config)")
            schedule = None
            if recipe == "haste":
                if align_stop_step is None:
                    raise ValueError("recipe 'haste' needs align_stop_step (the step where alignment stops)")
                schedule = StopAtStep(align_weight, align_stop_step)
            projector = ProjectorMLP(hidden, self.teacher.dim, hidden_dim=projector_dim)
            self.aligner = Aligner(projector, loss=align_loss, weight=align_weight, schedule=schedule)
            if recipe == "reg" and getattr(model, "cls_token_dim", None) != self.teacher.dim:
                raise ValueError(
                    f"recipe 'reg' needs the model built with cls_token_dim = teacher dim ({self.teacher.dim}), "
                    f"got {getattr(model, 'cls_token_dim', None)}: set task.model.cls_token_dim"
                )
        elif recipe in ("sra", "layersync"):
            if target_depth is None or not align_depth < target_depth <= depth:
                raise ValueError(
                    f"recipe {recipe!r} needs align_depth < target_depth <= {depth}, got {align_depth}, {target_depth}"
                )
            projector = ProjectorMLP(hidden, hidden, hidden_dim=projector_dim) if recipe == "sra" else None
            self.aligner = Aligner(projector, loss=align_loss, weight=align_weight)
            if recipe == "sra":
                self.ema_teacher = EMATeacher(model, decay=sra_decay)
        self.target_depth = target_depth
        self.sra_time_gap = sra_time_gap
        self.dispersive_weight, self.dispersive_tau = dispersive_weight, dispersive_tau
        self.reg_weight = reg_weight
        self.time_sampler, self.time_mean, self.time_std = time_sampler, time_mean, time_std
        self.time_shift = time_shift
        self.sampler, self.sample_steps, self.cfg_scale = sampler, sample_steps, cfg_scale
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self.guide_channels, self.sample_shift = guide_channels, sample_shift
        self.eval_samples, self.eval_batch, self.eval_seed = eval_samples, eval_batch, eval_seed
        self._classifier: Any = None

    # -- training ------------------------------------------------------------------------------------------------
    def _check_labels(self, y: Tensor, ids: Sequence[str] | None) -> None:
        if self.num_classes <= 0:
            return
        bad = ((y < 0) | (y >= self.num_classes)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            where = f" (item {ids[i]!r})" if ids is not None else ""
            raise ValueError(
                f"label {int(y[i])}{where} is outside [0, {self.num_classes}): fix the data set's labels or set "
                f"task.model.num_classes"
            )

    def _to_model_space(self, x: Tensor) -> Tensor:
        if self.tokenizer is None:
            return x
        with torch.no_grad():
            return self.tokenizer.encode(x)

    def _teacher_out(self, images: Tensor, ids: Sequence[str] | None) -> tuple[Any, Tensor | None]:
        assert self.teacher is not None
        ids = list(ids) if (ids is not None and self.teacher_cache) else None
        tokens = self.teacher.encode(images, ids=ids, device=images.device)
        cls = self.teacher.encode_pooled(images, ids=ids, device=images.device) if self.recipe == "reg" else None
        return tokens.to(images.device), cls

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x = batch["x"]
        y = batch.get("y")
        ids = batch.get("id")
        if y is not None:
            y = y.long()
            self._check_labels(y, ids)
        z = self._to_model_space(x)
        b = z.shape[0]
        t = sample_time(b, self.time_sampler, self.time_mean, self.time_std, device=z.device)
        if self.time_shift != 1.0:
            t = shift_time(t, self.time_shift)
        eps = torch.randn_like(z)
        x_t = interpolate(z, eps, t)
        v_target = velocity_target(z, eps)
        out: dict[str, Tensor] = {}

        indices: list[int] = []
        if self.aligner is not None or self.recipe == "dispersive":
            indices.append(self.align_depth)
        if self.recipe == "layersync":
            indices.append(int(self.target_depth))
        cls_t = cls_v = None
        teacher_tokens = None
        if self.recipe in _TEACHER_RECIPES:
            teacher_tokens, cls = self._teacher_out(batch.get("image", x), ids)
            if cls is not None:
                eps_c = torch.randn_like(cls)
                cls_t = interpolate(cls, eps_c, t)  # same t, its own noise
                cls_v = velocity_target(cls, eps_c)
        y_in = y if self.num_classes > 0 else None
        pred, feats = self.model.forward_intermediates(x_t, t, y_in, indices, cls=cls_t)
        if cls_t is not None:
            pred, pred_cls = pred
            loss_cls = (pred_cls.float() - cls_v.float()).square().mean()
            out["loss/cls"] = loss_cls.detach()
        c = z.shape[1]
        loss_flow = (pred[:, :c].float() - v_target.float()).square().mean()  # learn_sigma: velocity channels only
        loss = loss_flow
        out["loss/flow"] = loss_flow.detach()
        if cls_t is not None:
            loss = loss + self.reg_weight * loss_cls

        if self.aligner is not None:
            if self.recipe in _TEACHER_RECIPES:
                target = teacher_tokens
            elif self.recipe == "layersync":
                target = feats[1].detach()
            else:  # sra: the EMA copy's deeper layer on a less noisy input with the same noise
                t_teacher = (t - self.sra_time_gap).clamp_min(0.0)
                with torch.no_grad():
                    _, tf = self.ema_teacher.module.forward_intermediates(
                        interpolate(z, eps, t_teacher), t_teacher, y_in, [int(self.target_depth)]
                    )
                target = tf[0]
            res = self.aligner(feats[0], target, step)
            loss = loss + res["loss"]
            out["loss/align"] = res["raw"].detach()
            out["align/cos"] = res["cos"]
            out["align/weight"] = torch.tensor(float(res["weight"]))
        if self.recipe == "dispersive":
            disp = dispersive_loss(feats[0], tau=self.dispersive_tau)
            loss = loss + self.dispersive_weight * disp
            out["loss/dispersive"] = disp.detach()
        out["loss"] = loss
        return out

    def on_step_end(self, step: int) -> None:
        if self.ema_teacher is not None:
            self.ema_teacher.update(self.model)

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
    ) -> tuple[Tensor, Tensor]:
        """Draw ``num`` samples (decoded to images when a tokenizer is set) and their labels; deterministic in seed.

        Initial noise for every sample comes from one CPU generator seeded with ``seed``, so ODE samples do not depend
        on the batch size or the device; the SDE's per-step noise is drawn per batch (same seed and batch size, same
        samples). REG samples the class token jointly (packed with the image into one state).
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
            self._check_labels(labels, None)
        shape = self._latent_shape()
        n_img = int(np.prod(shape))
        cls_dim = int(self.teacher.dim) if self.recipe == "reg" else 0
        if cls_dim and channels is not None:
            raise ValueError("guide_channels (DiT's 3-channel guidance) is not defined for REG's joint sampling")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(num, n_img + cls_dim, generator=gen, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        outs = []
        bs = batch_size or self.eval_batch
        try:
            for i in range(0, num, bs):
                x1 = noise[i : i + bs].to(device, dtype)
                y = labels[i : i + bs].to(device)

                def model_fn(state: Tensor, t: Tensor, yy: Tensor) -> Tensor:
                    xx = state[:, :n_img].reshape(-1, *shape)
                    y_in = yy if self.num_classes > 0 else None
                    if cls_dim:
                        v, v_cls = self.model(xx, t, y_in, cls=state[:, n_img:])
                        return torch.cat([v[:, : shape[0]].flatten(1), v_cls], dim=1)
                    return self.model(xx, t, y_in)[:, : shape[0]].flatten(1)

                if self.num_classes > 0:
                    if channels is not None:  # DiT's kept bug: guide only the first k channels of the image

                        def fn_img(xd, t, yy):
                            return model_fn(xd.flatten(1), t, yy).reshape(-1, *shape)

                        guided = cfg_batched(fn_img, y, self.num_classes, scale, interval, channels)

                        def vel(state, t, g=guided):
                            return g(state.reshape(-1, *shape), t).flatten(1)
                    else:
                        vel = cfg_batched(model_fn, y, self.num_classes, scale, interval)
                else:

                    def vel(state, t, yy=y):
                        return model_fn(state, t, yy)

                if sampler == "sde":
                    g = torch.Generator().manual_seed(seed * 100003 + i)
                    out = sample_sde(vel, x1, steps=steps, shift=shift, generator=g)
                else:
                    out = sample_ode(vel, x1, steps=steps, method=sampler, shift=shift)
                outs.append(out[:, :n_img].reshape(-1, *shape).float().cpu())
        finally:
            self.model.train(was_training)
        samples = torch.cat(outs)
        if self.tokenizer is not None:
            samples = torch.cat([self.tokenizer.decode(s.to(device)).cpu() for s in samples.split(bs)])
        return samples, labels

    def sample(self, out_dir: Path, num: int, seed: int, **kwargs: Any) -> dict[str, Any]:
        """Write ``samples.npz`` (images in [-1, 1], labels) and ``samples.png`` (a grid) under ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        images, labels = self.generate(num, seed, **kwargs)
        npz, png = out_dir / "samples.npz", out_dir / "samples.png"
        np.savez(npz, images=images.numpy().astype(np.float32), labels=labels.numpy())
        save_grid(images[:100], png, nrow=max(self.num_classes, 10) if self.num_classes else 10)
        return {"npz": str(npz), "png": str(png), "num": num, "seconds": round(time.time() - start, 2)}

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
            feats_f = torch.cat([self.teacher.encode_pooled(f.to(device)).cpu() for f in fake.split(self.eval_batch)])
            metrics["fd_teacher"] = frechet_distance(feats_r, feats_f)
            p, r = knn_precision_recall(feats_r, feats_f, k=3)
            metrics["precision"], metrics["recall"] = p, r
        if self.num_classes > 0 and self.tokenizer is None:
            clf, clf_acc = self._fit_classifier(data)
            pred = clf.predict(fake.flatten(1).numpy())
            metrics["cond_accuracy"] = float((pred == labels.numpy()).mean())
            metrics["classifier_val_accuracy"] = clf_acc
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
            fid="unavailable: Inception FID needs torch-fidelity and a local Inception weights file; "
            "FD-teacher is the offline substitute",
        )
        (eval_dir / f"metrics_step_{step:08d}.json").write_text(json.dumps(record, indent=2))
        return metrics
