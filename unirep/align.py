"""Representation alignment: projector, losses on token sets, weight schedules, target kinds.

REPA (Yu et al. 2025, "Representation Alignment for Generation", anchor sihyun-yu/REPA ``models/sit.py``
``build_mlp`` and ``loss.py``) projects a student's hidden tokens with an MLP and maximises their cosine to a
frozen teacher's tokens of the same items. The same machinery serves images (patch tokens) and molecules
(per-atom tokens) because everything here works on :class:`~unirep.tokens.TokenSet`.

Losses (each ``loss(pred, target) -> scalar``, ``pred`` and ``target`` holding the same tokens):

- ``neg_cosine``: REPA's ``-mean cos(normalize(pred), normalize(target))``, computed in float32 (fp16 gives NaNs,
  REPA issue #46). Averaged per token within an item, then over items. For images every item has the same
  number of tokens and this equals REPA's mean over patches and batch; for molecules of different sizes it
  weighs every molecule equally rather than every atom.
- ``vf_loss``: VA-VAE's vision-foundation loss (Yao et al. 2025, anchor hustvl/LightningDiT
  ``vavae/ldm/modules/losses/contperceptual.py``): marginal cosine ``mean ReLU(1 - m1 - cos(z_ij, f_ij))`` plus
  marginal distance-matrix ``mean_ij ReLU(|cos(z_i, z_j) - cos(f_i, f_j)| - m2)`` with the token-to-token cosine
  matrix taken within one item, as the anchor's ``einsum('bci,bcj->bij')`` does; the diagonal (always 0 before
  the margin) is counted in the mean like in the anchor.
- ``nt_xent``: InfoNCE over tokens: token t of ``pred`` must pick token t of ``target`` among the batch's tokens.
- ``mse`` and ``smooth_l1`` on token features, averaged like ``neg_cosine`` (per token, then per item).

Alignment terms (:class:`AlignmentTerm`, run together by :class:`Alignment`) are the one code path every task
uses: ``AlignmentTerm(layer, projector, target, loss, weight, schedule)`` projects the student's tokens at ``layer``
(the :mod:`unirep.intermediates` index convention) and compares them with the tokens of a target:

1. :class:`TeacherTarget`: a frozen encoder's tokens (REPA, MACE-REPA, conformer REPA), at one of its layers, or
   its pooled token (REG's ``[cls, patches]``); the task's own teacher when no encoder is given;
2. :class:`EMATarget`: an EMA copy of the student at a deeper layer and a less noisy time (SRA, Jiang et al. 2025);
3. :class:`LayerTarget`: another layer of the same forward pass, gradient stopped (LayerSync);
4. ``None``: a regulariser on the student's tokens alone, e.g. :func:`dispersive_loss`.

Each method is one config under ``configs/align/``; adding one is a config plus, at most, a loss function.
:func:`dispersive_loss` (Wang & He 2025, "Diffuse and Disperse") is a regulariser with no target.
Weight schedules: :class:`ConstantWeight`, :class:`StopAtStep` (HASTE, Wang et al. 2025: alignment switched off
at a step), :class:`LinearDecay`. :func:`resample_grid` resizes a square token grid when the teacher's grid
differs from the student's.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.intermediates import normalize_index
from unirep.tokens import TokenSet, segment_mean

__all__ = [
    "ProjectorMLP",
    "neg_cosine",
    "vf_loss",
    "vf_loss_parts",
    "nt_xent",
    "mse",
    "smooth_l1",
    "token_cosine",
    "LOSSES",
    "Aligner",
    "ConstantWeight",
    "StopAtStep",
    "LinearDecay",
    "dispersive_loss",
    "EMATeacher",
    "detach_target",
    "resample_grid",
    "resample_tokens",
    "AlignContext",
    "AlignTarget",
    "TeacherTarget",
    "EMATarget",
    "LayerTarget",
    "AlignmentTerm",
    "Alignment",
    "prepend_tokens",
]

Tokens = TokenSet | Tensor


# -- projector ------------------------------------------------------------------------------------------------
class ProjectorMLP(nn.Module):
    """Per-token MLP ``in_dim -> hidden -> ... -> out_dim`` with SiLU, REPA's ``build_mlp`` shape.

    ``num_layers`` counts the Linear layers (REPA: 3, i.e. D -> 2048 -> 2048 -> z_dim). Accepts a TokenSet (returns
    a TokenSet with the same items) or a tensor ``[..., in_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ProjectorMLP num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, tokens: Tokens) -> Tokens:
        if isinstance(tokens, TokenSet):
            return tokens.with_x(self.net(tokens.x))
        return self.net(tokens)


# -- helpers --------------------------------------------------------------------------------------------------
def _as_tokenset(t: Tokens, name: str) -> TokenSet:
    """TokenSet as is; a dense tensor ``[B, N, D]`` becomes B items of N tokens."""
    if isinstance(t, TokenSet):
        return t
    if isinstance(t, Tensor) and t.dim() == 3:
        return TokenSet.from_dense(t)
    raise TypeError(
        f"{name} must be a TokenSet or a dense tensor [B, N, D], got {type(t).__name__} "
        f"{tuple(t.shape) if isinstance(t, Tensor) else ''}"
    )


def _check_pair(pred: Tokens, target: Tokens, same_dim: bool = True) -> tuple[TokenSet, TokenSet]:
    p, t = _as_tokenset(pred, "pred"), _as_tokenset(target, "target")
    if p.x.shape[0] != t.x.shape[0] or p.num_items != t.num_items or not torch.equal(p.batch, t.batch):
        raise ValueError(
            f"alignment needs the same tokens in pred and target: pred has {p.x.shape[0]} tokens in {p.num_items} "
            f"items, target {t.x.shape[0]} tokens in {t.num_items} items (or a different item order). For images "
            "with different grids, resample the teacher with unirep.align.resample_tokens first."
        )
    if same_dim and p.dim != t.dim:
        raise ValueError(
            f"pred has dimension {p.dim} but target {t.dim}: set the projector's out_dim to the teacher's {t.dim}"
        )
    return p, t


def _item_mean(values: Tensor, tokens: TokenSet) -> Tensor:
    """Mean of a per-token scalar ``[T]`` within each item, then over the items that have tokens."""
    per_item = segment_mean(values, tokens.batch, tokens.num_items)  # [B]
    has = tokens.counts > 0
    return per_item[has].mean()


def _full_precision(x: Tensor) -> torch.autocast:
    """Switch autocast off: the losses' matmuls must run in float32 even inside a bf16/fp16 training step."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def token_cosine(pred: Tokens, target: Tokens) -> Tensor:
    """Cosine of every token with its counterpart ``[T]``, in float32."""
    p, t = _check_pair(pred, target)
    return F.cosine_similarity(p.x.float(), t.x.float(), dim=-1, eps=1e-8)


# -- losses ---------------------------------------------------------------------------------------------------
def neg_cosine(pred: Tokens, target: Tokens) -> Tensor:
    """REPA: ``-mean cos(pred_t, target_t)``, per item then over items (see the module docstring)."""
    p, t = _check_pair(pred, target)
    # normalise in float32: half-precision normalisation of large-norm DINOv2 tokens overflows (REPA #46)
    cos = (F.normalize(p.x.float(), dim=-1) * F.normalize(t.x.float(), dim=-1)).sum(-1)  # [T]
    return -_item_mean(cos, p)


def vf_loss_parts(pred: Tokens, target: Tokens, m1: float = 0.5, m2: float = 0.25) -> dict[str, Tensor]:
    """VA-VAE's two terms ``{"mcos": L_mcos, "mdms": L_mdms}`` (see :func:`vf_loss`)."""
    p, t = _check_pair(pred, target)
    with _full_precision(p.x):
        return _vf_parts(p, t, m1, m2)


def _vf_parts(p: TokenSet, t: TokenSet, m1: float, m2: float) -> dict[str, Tensor]:
    zp, mask = p.to_dense()  # [B, N, D], [B, N]
    zt, _ = t.to_dense()
    zp = F.normalize(zp.float(), dim=-1)
    zt = F.normalize(zt.float(), dim=-1)
    # marginal cosine: per token ReLU(1 - m1 - cos), padded slots masked out
    cos = (zp * zt).sum(-1)  # [B, N]
    mcos = F.relu(1.0 - m1 - cos)
    counts = mask.sum(1).clamp_min(1).float()  # [B]
    has = mask.any(1)
    l_mcos = ((mcos * mask).sum(1) / counts)[has].mean()
    # marginal distance matrix within each item: [B, N, N] token-to-token cosines
    gram_p = zp @ zp.transpose(1, 2)
    gram_t = zt @ zt.transpose(1, 2)
    pair_mask = mask[:, :, None] & mask[:, None, :]
    mdms = F.relu((gram_p - gram_t).abs() - m2) * pair_mask
    l_mdms = (mdms.sum((1, 2)) / counts**2)[has].mean()
    return {"mcos": l_mcos, "mdms": l_mdms}


def vf_loss(
    pred: Tokens,
    target: Tokens,
    m1: float = 0.5,
    m2: float = 0.25,
    w_mcos: float = 1.0,
    w_mdms: float = 1.0,
) -> Tensor:
    """VA-VAE VF loss ``w_mdms * L_mdms + w_mcos * L_mcos`` with margins ``m1`` (cosine) and ``m2`` (distance matrix).

    Both terms are averaged per item (over its N tokens, resp. its N*N token pairs) and then over items; with a
    uniform token count this is the anchor's mean over ``[B, H*W]`` resp. ``[B, H*W, H*W]``.
    """
    parts = vf_loss_parts(pred, target, m1=m1, m2=m2)
    return w_mdms * parts["mdms"] + w_mcos * parts["mcos"]


def nt_xent(pred: Tokens, target: Tokens, tau: float = 0.1, symmetric: bool = True, negatives: str = "batch") -> Tensor:
    """InfoNCE over tokens: the positive of ``pred`` token t is ``target`` token t.

    ``negatives="batch"`` contrasts against every token of the batch (a ``[T, T]`` logit matrix); ``"item"`` only
    against the other tokens of the same item (``[B, N, N]``, cheaper for many tokens). ``symmetric`` averages the
    pred->target and target->pred directions (CLIP-style). Averaged per token, then per item.
    """
    if tau <= 0:
        raise ValueError(f"nt_xent tau must be > 0, got {tau}")
    p, t = _check_pair(pred, target)
    with _full_precision(p.x):
        return _nt_xent(p, t, tau, symmetric, negatives)


def _nt_xent(p: TokenSet, t: TokenSet, tau: float, symmetric: bool, negatives: str) -> Tensor:
    zp = F.normalize(p.x.float(), dim=-1)
    zt = F.normalize(t.x.float(), dim=-1)
    if negatives == "batch":
        logits = zp @ zt.T / tau  # [T, T]
        labels = torch.arange(zp.shape[0], device=zp.device)
        per_token = F.cross_entropy(logits, labels, reduction="none")
        if symmetric:
            per_token = 0.5 * (per_token + F.cross_entropy(logits.T, labels, reduction="none"))
        return _item_mean(per_token, p)
    if negatives == "item":
        dp, mask = p.with_x(zp).to_dense()  # [B, N, D]
        dt, _ = t.with_x(zt).to_dense()
        logits = dp @ dt.transpose(1, 2) / tau  # [B, N, N]
        invalid = ~(mask[:, None, :])  # padded columns are no candidates
        logits = logits.masked_fill(invalid, float("-inf"))
        # positives [B, N]; padded slots get 0 so that no inf enters the (masked-out) padded losses
        diag = torch.where(mask, logits.diagonal(dim1=1, dim2=2), torch.zeros((), device=logits.device))
        loss = torch.logsumexp(logits, dim=2) - diag
        if symmetric:
            logits_t = logits.transpose(1, 2).masked_fill(invalid, float("-inf"))
            loss = 0.5 * (loss + torch.logsumexp(logits_t, dim=2) - diag)
        counts = mask.sum(1).clamp_min(1).float()
        loss = torch.where(mask, loss, torch.zeros_like(loss))
        return ((loss.sum(1) / counts)[mask.any(1)]).mean()
    raise ValueError(f"nt_xent negatives must be 'batch' or 'item', got {negatives!r}")


def mse(pred: Tokens, target: Tokens) -> Tensor:
    """Mean squared error over features, averaged per token then per item."""
    p, t = _check_pair(pred, target)
    return _item_mean((p.x.float() - t.x.float()).pow(2).mean(-1), p)


def smooth_l1(pred: Tokens, target: Tokens, beta: float = 1.0) -> Tensor:
    """Smooth L1 (Huber with threshold ``beta``) over features, averaged per token then per item."""
    p, t = _check_pair(pred, target)
    per = F.smooth_l1_loss(p.x.float(), t.x.float(), reduction="none", beta=beta).mean(-1)
    return _item_mean(per, p)


LOSSES: dict[str, Callable[[Tokens, Tokens], Tensor]] = {
    "neg_cosine": neg_cosine,
    "vf_loss": vf_loss,
    "vf": vf_loss,
    "nt_xent": nt_xent,
    "mse": mse,
    "smooth_l1": smooth_l1,
}


# -- weight schedules -----------------------------------------------------------------------------------------
class ConstantWeight:
    """The same weight at every step."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def __call__(self, step: int) -> float:
        return self.weight

    def __repr__(self) -> str:
        return f"ConstantWeight({self.weight})"


class StopAtStep:
    """HASTE-style early stop: ``weight`` before ``stop_step``, 0 from ``stop_step`` on."""

    def __init__(self, weight: float, stop_step: int) -> None:
        if stop_step < 0:
            raise ValueError(f"StopAtStep stop_step must be >= 0, got {stop_step}")
        self.weight, self.stop_step = float(weight), int(stop_step)

    def __call__(self, step: int) -> float:
        return self.weight if step < self.stop_step else 0.0

    def __repr__(self) -> str:
        return f"StopAtStep({self.weight}, stop_step={self.stop_step})"


class LinearDecay:
    """``weight`` until ``start``, then linearly down to 0 at ``end``, 0 afterwards."""

    def __init__(self, weight: float, start: int, end: int) -> None:
        if end <= start:
            raise ValueError(f"LinearDecay needs end > start, got start={start}, end={end}")
        self.weight, self.start, self.end = float(weight), int(start), int(end)

    def __call__(self, step: int) -> float:
        frac = (step - self.start) / (self.end - self.start)
        return self.weight * min(1.0, max(0.0, 1.0 - frac))

    def __repr__(self) -> str:
        return f"LinearDecay({self.weight}, start={self.start}, end={self.end})"


# -- aligner --------------------------------------------------------------------------------------------------
class Aligner(nn.Module):
    """Project a student's tokens and compare them to a (detached) target's tokens of the same items.

    Args:
        projector: module applied to the student's token features (``ProjectorMLP``; ``None`` for identity, e.g.
            layer sync between layers of equal width).
        loss: a name in :data:`LOSSES` or a callable ``loss(pred, target) -> scalar``.
        weight: constant loss weight, used when no ``schedule`` is given.
        schedule: ``schedule(step) -> weight``; overrides ``weight`` when given.
    """

    def __init__(
        self,
        projector: nn.Module | None,
        loss: str | Callable[[Tokens, Tokens], Tensor] = "neg_cosine",
        weight: float = 0.5,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.projector = projector if projector is not None else nn.Identity()
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown alignment loss {loss!r}: use one of {sorted(LOSSES)} or a callable")
            self.loss_name, self.loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss_name, self.loss_fn = getattr(loss, "__name__", type(loss).__name__), loss
        else:
            raise TypeError(f"Aligner loss must be a name or a callable, got {type(loss).__name__}")
        self.schedule = schedule if schedule is not None else ConstantWeight(weight)

    def weight_at(self, step: int) -> float:
        return float(self.schedule(step))

    def forward(self, student: TokenSet, target: TokenSet, step: int = 0) -> dict[str, Tensor | float]:
        student = _as_tokenset(student, "student")
        target = _as_tokenset(target, "target").detach()  # the target is a teacher: no gradient flows into it
        if student.x.shape[0] != target.x.shape[0] or not torch.equal(student.batch, target.batch):
            raise ValueError(
                f"Aligner: student has {student.x.shape[0]} tokens in {student.num_items} items but target "
                f"{target.x.shape[0]} tokens in {target.num_items} items; they must hold the same tokens "
                "(resample the teacher grid with unirep.align.resample_tokens when patch grids differ)"
            )
        pred = student.with_x(self.projector(student.x))
        raw = self.loss_fn(pred, target)
        w = self.weight_at(step)
        with torch.no_grad():
            cos = _item_mean(token_cosine(pred, target), pred)
        return {"loss": w * raw, "raw": raw, "cos": cos.detach(), "weight": w}


# -- dispersive loss ------------------------------------------------------------------------------------------
def dispersive_loss(tokens: Tokens, tau: float = 0.5, variant: str = "l2", reduce: str = "flatten") -> Tensor:
    """Dispersive loss (Wang & He 2025): ``log mean_ij exp(-D(z_i, z_j) / tau)`` over all pairs of the batch.

    ``variant="l2"``: D = squared Euclidean distance divided by the dimension of z (the paper's InfoNCE-L2 form, as
    the official code computes it: ``||z_i - z_j||^2 / dim``); ``"cosine"``: D = -cos(z_i, z_j). Anchor defaults:
    tau 0.5, weight 0.5 at block depth // 4 (JAX code); tau 1, weight 0.25 at the last block (PyTorch code).
    The mean runs over all B*B pairs including i = j, as the paper's reference code does.
    ``reduce`` chooses what one ``z_i`` is: ``"flatten"`` all tokens of an item concatenated (the paper; needs
    the same token count in every item), ``"mean"`` the item's mean token (any token counts, e.g. molecules), or
    ``"tokens"`` every token of the batch on its own.
    """
    if tau <= 0:
        raise ValueError(f"dispersive_loss tau must be > 0, got {tau}")
    ts = _as_tokenset(tokens, "tokens")
    if reduce == "flatten":
        if not ts.is_uniform:
            raise ValueError("dispersive_loss reduce='flatten' needs the same token count per item; use 'mean'")
        z = ts.to_dense()[0].reshape(ts.num_items, -1)
    elif reduce == "mean":
        z = ts.pool("mean")
    elif reduce == "tokens":
        z = ts.x
    else:
        raise ValueError(f"dispersive_loss reduce must be 'flatten', 'mean' or 'tokens', got {reduce!r}")
    with _full_precision(z):
        return _dispersive(z.float(), tau, variant)


def _dispersive(z: Tensor, tau: float, variant: str) -> Tensor:
    if variant == "l2":
        sq = z.pow(2).sum(-1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)  # [B, B] squared distances
    elif variant == "cosine":
        zn = F.normalize(z, dim=-1)
        dist = -(zn @ zn.T)
    else:
        raise ValueError(f"dispersive_loss variant must be 'l2' or 'cosine', got {variant!r}")
    # the official code divides the squared distance by the feature dimension: without it exp(-d / tau) underflows
    # to 0 for every pair at realistic widths, the loss is the constant -log B and its gradient exactly zero
    scale = z.shape[1] if variant == "l2" else 1
    n = dist.numel()
    return torch.logsumexp(-dist.flatten() / (scale * tau), dim=0) - math.log(n)


# -- target kinds ---------------------------------------------------------------------------------------------
class EMATeacher(nn.Module):
    """A frozen exponential-moving-average copy of a student (self-alignment, SRA).

    ``update(student)`` sets ``p_teacher <- decay * p_teacher + (1 - decay) * p_student`` for every parameter and
    copies buffers. Calling the teacher runs the copy under ``no_grad`` in eval mode.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMATeacher decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(module).eval()
        self.module.requires_grad_(False)

    def train(self, mode: bool = True) -> EMATeacher:
        # the teacher always stays in eval mode (no dropout, fixed norms), whatever the student does
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        t_params = dict(self.module.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            missing = sorted(set(t_params) ^ set(s_params))[:5]
            raise ValueError(f"EMATeacher.update: student parameters differ from the teacher's: {missing}")
        for name, tp in t_params.items():
            tp.lerp_(s_params[name].detach().to(tp.dtype), 1.0 - self.decay)
        s_bufs = dict(student.named_buffers())
        for name, tb in self.module.named_buffers():
            if name in s_bufs:
                tb.copy_(s_bufs[name])

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def detach_target(tokens: Tokens) -> Tokens:
    """A target from the student itself (layer sync): the same tokens with the gradient stopped."""
    return tokens.detach()


# -- grid resampling ------------------------------------------------------------------------------------------
def _side(n: int, what: str) -> int:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"{what} = {n} tokens is not a square grid; resample_grid needs N = side*side")
    return s


def resample_grid(tokens: Tensor, n_out: int, antialias: bool = False) -> Tensor:
    """Bilinearly resample a square token grid ``[B, N, D]`` (row-major, N = s*s) to ``[B, n_out, D]``.

    ``align_corners=False`` treats tokens as patch centres, so the grid covers the same image area before and
    after. ``antialias=True`` low-pass filters when downsampling.
    """
    if tokens.dim() != 3:
        raise ValueError(f"resample_grid expects [B, N, D], got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    s_in, s_out = _side(n, "input N"), _side(n_out, "n_out")
    if n_out == n:
        return tokens
    grid = tokens.reshape(b, s_in, s_in, d).permute(0, 3, 1, 2)  # [B, D, s, s]
    out = F.interpolate(grid.float(), size=(s_out, s_out), mode="bilinear", align_corners=False, antialias=antialias)
    return out.permute(0, 2, 3, 1).reshape(b, n_out, d).to(tokens.dtype)  # [B, n_out, D]


def resample_tokens(tokens: TokenSet, n_out: int, antialias: bool = False) -> TokenSet:
    """:func:`resample_grid` for a TokenSet of square grids (same count per item); positions are dropped."""
    if not tokens.is_uniform:
        raise ValueError("resample_tokens needs the same number of tokens per item (square patch grids)")
    dense, _ = tokens.to_dense()  # [B, N, D]
    if dense.shape[1] == n_out:
        return tokens
    return TokenSet.from_dense(resample_grid(dense, n_out, antialias=antialias))


# -- alignment terms: one code path for every method ----------------------------------------------------------
@dataclass
class AlignContext:
    """What a task hands its alignment terms for one training step.

    Attributes:
        batch: the task's batch (a teacher target reads its input from it, see :meth:`TeacherTarget.teacher_input`).
        features: the student's hidden tokens by normalised layer index (from ``forward_intermediates``).
        t: per-item training times ``[B]`` (an EMA target's time offset is applied to them), or ``None``.
        rerun: ``rerun(module, t, indices) -> list[TokenSet]`` runs a copy of the student (same architecture) on
            this step's clean data and noise at other times ``t[B]``; generative tasks provide it for EMA targets.
        device: where the student's tokens live (teacher features are moved there).
        cache: per-step memo, so terms sharing a teacher run it once.
    """

    batch: Any
    features: dict[int, TokenSet]
    t: Tensor | None = None
    rerun: Callable[[nn.Module, Tensor, list[int]], list[TokenSet]] | None = None
    device: torch.device | None = None
    cache: dict[Any, Any] = field(default_factory=dict)


class AlignTarget(nn.Module, abc.ABC):
    """Base of the target kinds: what the student's projected tokens are compared with.

    A target is bound to the student once (:meth:`bind`), reports its token width (:meth:`dim`) so the projector
    can be built before the first step, and produces detached tokens of the batch's items (:meth:`tokens`).
    """

    kind = "target"

    def bind(self, model: nn.Module, num_layers: int, teacher: nn.Module | None = None) -> None:  # noqa: B027
        """Resolve layer indices against the student (``num_layers`` blocks); optional for subclasses."""

    def student_layers(self) -> list[int]:
        """Student layers this target reads from the same forward pass (layer sync)."""
        return []

    @abc.abstractmethod
    def dim(self, model: nn.Module) -> int:
        """Width of the target's tokens (the projector's output width)."""

    @abc.abstractmethod
    def tokens(self, ctx: AlignContext) -> TokenSet:
        """Detached target tokens of the batch's items, the same tokens as the student's."""

    def on_step_end(self, model: nn.Module) -> None:  # noqa: B027
        """After each optimiser step (EMA targets update their copy)."""


def _feature_dim(model: nn.Module, index: int) -> int:
    fn = getattr(model, "feature_dim", None)
    if fn is None:
        raise TypeError(
            f"{type(model).__name__} has no feature_dim(index): every backbone used for alignment must report the "
            "width of its hidden tokens (see unirep.intermediates)"
        )
    return int(fn(index))


def _num_layers(model: nn.Module) -> int:
    n = getattr(model, "num_layers", None)
    if n is None:
        raise TypeError(f"{type(model).__name__} has no num_layers: alignment needs it to resolve layer indices")
    return int(n)


_POOLED_MODES = ("tokens", "pooled", "pooled+tokens")


class TeacherTarget(AlignTarget):
    """A frozen teacher's tokens of the same items (REPA, MACE-REPA, conformer REPA, REG, VF).

    Args:
        encoder: the teacher (wrapped in a :class:`~unirep.encoders.FrozenEncoder` if it is not one); ``None``
            uses the task's teacher (``task.teacher``), so one teacher serves alignment and evaluation.
        layer: the teacher's layer (its ``forward_intermediates`` index); ``None`` for its default output.
        mode: ``"tokens"`` (patch / atom tokens), ``"pooled"`` (one token per item: the class token or the mean), or
            ``"pooled+tokens"`` (REG's ``[cls, patches]``: the pooled token prepended to each item's tokens).
        input_key: the batch field fed to the teacher: a name or a list tried in order (``("image", "x")``: the
            image when training on latents, else the input); ``None`` feeds the whole batch (graph batches).
        cache_dir: the teacher feature store when ``encoder`` is wrapped here.
    """

    kind = "teacher"

    def __init__(
        self,
        encoder: nn.Module | None = None,
        layer: int | None = None,
        mode: str = "tokens",
        input_key: str | Sequence[str] | None = ("image", "x"),
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in _POOLED_MODES:
            raise ValueError(f"TeacherTarget mode={mode!r}: use one of {_POOLED_MODES}")
        self.encoder = _frozen(encoder, cache_dir) if encoder is not None else None
        self.layer, self.mode = layer, mode
        self.input_key = (input_key,) if isinstance(input_key, str) else (tuple(input_key) if input_key else None)

    def bind(self, model: nn.Module, num_layers: int, teacher: nn.Module | None = None) -> None:
        if self.encoder is None:
            if teacher is None:
                raise ValueError(
                    "a TeacherTarget without an encoder uses the task's teacher, but the task has none: set "
                    "task.teacher or the target's encoder"
                )
            # the task's own FrozenEncoder, shared, not registered twice as a submodule
            object.__setattr__(self, "_shared", _frozen(teacher, None))
        if self.mode != "tokens" and not hasattr(self._teacher.encoder, "encode_pooled"):
            raise ValueError(f"TeacherTarget mode={self.mode!r} needs a teacher with a pooled vector (encode_pooled)")

    @property
    def teacher(self) -> Any:
        """The FrozenEncoder this target reads: its own, or the task's shared one after :meth:`bind`."""
        return self._teacher

    @property
    def _teacher(self) -> Any:
        enc = self.encoder if self.encoder is not None else getattr(self, "_shared", None)
        if enc is None:
            raise RuntimeError("TeacherTarget used before bind(): call Alignment.bind(model, teacher) first")
        return enc

    def dim(self, model: nn.Module) -> int:
        enc = self._teacher
        if self.mode == "pooled":
            return int(getattr(enc, "pooled_dim", None) or enc.dim)
        if self.layer is not None and hasattr(enc, "feature_dim"):
            return int(enc.feature_dim(self.layer))  # a teacher read at another layer may have another width
        return int(enc.dim)

    def teacher_input(self, batch: Any) -> Any:
        """The part of a training batch the teacher sees."""
        if self.input_key is None or not isinstance(batch, Mapping):
            return batch
        for key in self.input_key:
            if key in batch:
                return batch[key]
        raise KeyError(f"TeacherTarget: the batch has none of the fields {list(self.input_key)} (has {list(batch)})")

    def tokens(self, ctx: AlignContext) -> TokenSet:
        enc = self._teacher
        memo = (id(getattr(enc, "encoder", enc)), self.layer, self.mode)  # one call per wrapped teacher and step
        if memo in ctx.cache:
            return ctx.cache[memo]
        sample = self.teacher_input(ctx.batch)
        out: TokenSet | None = None
        if self.mode != "pooled":
            out = enc.encode(sample, layer=self.layer, device=ctx.device)
        if self.mode != "tokens":
            pooled = enc.encode_pooled(sample, device=ctx.device)  # [B, D]
            cls = TokenSet(pooled, torch.arange(pooled.shape[0], device=pooled.device), None, pooled.shape[0])
            out = cls if out is None else prepend_tokens(cls, out)
        assert out is not None
        out = out.detach()
        ctx.cache[memo] = out
        return out


def _frozen(encoder: nn.Module, cache_dir: str | None) -> Any:
    from unirep.encoders import FrozenEncoder

    return encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder, cache_dir)


def prepend_tokens(first: TokenSet, rest: TokenSet) -> TokenSet:
    """Per item, ``first``'s tokens followed by ``rest``'s (REG's ``[cls, patches]``); items must match."""
    if first.num_items != rest.num_items:
        raise ValueError(f"prepend_tokens: {first.num_items} items vs {rest.num_items}")
    x = torch.cat([first.x, rest.x.to(first.x.dtype)])
    batch = torch.cat([first.batch, rest.batch])
    order = torch.sort(batch, stable=True).indices  # tokens grouped by item, first's before rest's
    return TokenSet(x[order], batch[order], None, first.num_items)


class EMATarget(AlignTarget):
    """The EMA student's tokens at a deeper layer and a less noisy time (SRA, Jiang et al. 2025, vvvvvjdy/SRA).

    The copy is updated after every optimiser step. The teacher sees the same clean data and noise at
    ``t' = max(0, t - time_offset * u)``, ``u ~ U(0, 1)`` per item (``offset_dist="uniform"``, the anchor's
    ``0.2 * U(0, 1)``) or ``u = 1`` (``"fixed"``). The task provides ``AlignContext.rerun``.
    """

    kind = "ema"

    def __init__(
        self, layer: int, decay: float = 0.9999, time_offset: float = 0.2, offset_dist: str = "uniform"
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMATarget decay must be in [0, 1], got {decay}")
        if offset_dist not in ("uniform", "fixed"):
            raise ValueError(f"EMATarget offset_dist={offset_dist!r}: use 'uniform' or 'fixed'")
        self.layer_spec, self.decay = layer, float(decay)
        self.time_offset, self.offset_dist = float(time_offset), offset_dist
        self.ema: EMATeacher | None = None
        self.layer = layer

    def bind(self, model: nn.Module, num_layers: int, teacher: nn.Module | None = None) -> None:
        self.layer = normalize_index(self.layer_spec, num_layers, "student")
        if self.ema is None:
            self.ema = EMATeacher(model, decay=self.decay)

    def dim(self, model: nn.Module) -> int:
        return _feature_dim(model, self.layer)

    def tokens(self, ctx: AlignContext) -> TokenSet:
        if ctx.rerun is None or ctx.t is None:
            raise ValueError("an EMA target needs a task that provides AlignContext.rerun and t (a generative task)")
        assert self.ema is not None
        u = torch.rand_like(ctx.t) if self.offset_dist == "uniform" else torch.ones_like(ctx.t)
        t_teacher = (ctx.t - self.time_offset * u).clamp_min(0.0)
        with torch.no_grad():
            return ctx.rerun(self.ema.module, t_teacher, [self.layer])[0].detach()

    def on_step_end(self, model: nn.Module) -> None:
        assert self.ema is not None
        self.ema.update(model)


class LayerTarget(AlignTarget):
    """Another layer of the same forward pass, gradient stopped (LayerSync, vita-epfl/LayerSync)."""

    kind = "layer"

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer_spec = layer
        self.layer = layer

    def bind(self, model: nn.Module, num_layers: int, teacher: nn.Module | None = None) -> None:
        self.layer = normalize_index(self.layer_spec, num_layers, "student")

    def student_layers(self) -> list[int]:
        return [self.layer]

    def dim(self, model: nn.Module) -> int:
        return _feature_dim(model, self.layer)

    def tokens(self, ctx: AlignContext) -> TokenSet:
        return ctx.features[self.layer].detach()


ProjectorFactory = Callable[[int, int], nn.Module]


class AlignmentTerm(nn.Module):
    """One alignment method: the student's tokens at ``layer``, projected, compared with ``target`` by ``loss``.

    Args:
        layer: the student's layer (``forward_intermediates`` index: 0 embedding, 1..L blocks, negative from the end).
        projector: a built module, a factory ``(in_dim, out_dim) -> module`` (hydra ``_partial_: true``; built at
            :meth:`bind` with the student's and the target's widths), or ``None`` for the identity. A projector with
            ``grid_input = True`` receives the student's TokenSet, not its flat features (iREPA's conv on the grid).
        target: an :class:`AlignTarget`, or ``None`` for a regulariser on the student's tokens (dispersive loss):
            then ``loss(tokens) -> scalar``.
        loss: a name in :data:`LOSSES` or a callable ``loss(pred, target) -> scalar``.
        weight: constant weight when no ``schedule`` is given.
        schedule: ``schedule(step) -> weight`` (:class:`StopAtStep` for HASTE, :class:`LinearDecay`); at weight 0 the
            term is skipped entirely (no teacher call).
    """

    def __init__(
        self,
        layer: int,
        projector: nn.Module | ProjectorFactory | None = None,
        target: AlignTarget | None = None,
        loss: str | Callable[..., Tensor] = "neg_cosine",
        weight: float = 0.5,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.layer_spec = layer
        self.layer = layer
        self.target = target
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown alignment loss {loss!r}: use one of {sorted(LOSSES)} or a callable")
            self.loss_name, self.loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss_name = getattr(loss, "__name__", getattr(getattr(loss, "func", None), "__name__", "loss"))
            self.loss_fn = loss
        else:
            raise TypeError(f"AlignmentTerm loss must be a name or a callable, got {type(loss).__name__}")
        self.schedule = schedule if schedule is not None else ConstantWeight(weight)
        if isinstance(projector, nn.Module) or projector is None:
            self.projector: nn.Module = projector if projector is not None else nn.Identity()
            self._factory = None
        elif callable(projector):
            self.projector, self._factory = nn.Identity(), projector
        else:
            raise TypeError(f"projector must be a module, a factory (in_dim, out_dim) or None, got {projector!r}")
        self.bound = False

    def bind(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        """Resolve indices against the student and build the projector with the right widths."""
        n = _num_layers(model)
        self.layer = normalize_index(self.layer_spec, n, "student")
        if self.target is not None:
            self.target.bind(model, n, teacher)
        if self._factory is not None:
            in_dim = _feature_dim(model, self.layer)
            out_dim = self.target.dim(model) if self.target is not None else in_dim
            self.projector = self._factory(in_dim, out_dim)
            self._factory = None
        self.bound = True

    def student_layers(self) -> list[int]:
        return [self.layer] + (self.target.student_layers() if self.target is not None else [])

    def weight_at(self, step: int) -> float:
        return float(self.schedule(step))

    def forward(self, ctx: AlignContext, step: int) -> dict[str, Tensor]:
        """``{"loss": weighted, "raw": unweighted, "cos": mean cosine (targets only), "weight": w}``."""
        if not self.bound:
            raise RuntimeError("AlignmentTerm used before bind(model): the task must call Alignment.bind")
        w = self.weight_at(step)
        student = ctx.features[self.layer]
        zero = student.x.new_zeros(()).float()
        if w == 0.0:  # switched off (HASTE's stop): no projector, no teacher call
            return {"loss": zero, "raw": zero.detach(), "weight": torch.tensor(0.0)}
        if getattr(self.projector, "grid_input", False):
            pred = self.projector(student)  # sees each item's tokens together (a convolution on the token grid)
        else:
            pred = student.with_x(self.projector(student.x))
        if self.target is None:
            raw = self.loss_fn(pred)
            return {"loss": w * raw, "raw": raw.detach(), "weight": torch.tensor(w)}
        target = self.target.tokens(ctx)
        if target.x.shape[0] != pred.x.shape[0] and pred.is_uniform and target.is_uniform:
            target = resample_tokens(target, pred.x.shape[0] // max(pred.num_items, 1))
        target = target.to(pred.x.device)
        raw = self.loss_fn(pred, target)
        with torch.no_grad():
            cos = _item_mean(token_cosine(pred, target), pred)
        return {"loss": w * raw, "raw": raw.detach(), "cos": cos.detach(), "weight": torch.tensor(w)}


class Alignment(nn.Module):
    """The alignment terms of a task, run by one code path.

    ``terms`` maps a name to an :class:`AlignmentTerm` (a hydra dict composed from ``configs/align/``). A task calls
    :meth:`bind` once with its student (and its own teacher, for targets without an encoder), asks
    :meth:`student_layers` which hidden states ``forward_intermediates`` must return, and adds
    ``alignment(ctx, step)`` to its loss. Logged: ``loss/<name>`` (unweighted), ``align/<name>/cos``,
    ``align/<name>/weight``.
    """

    def __init__(self, terms: Mapping[str, AlignmentTerm] | Sequence[AlignmentTerm] | None = None) -> None:
        super().__init__()
        if terms is None:
            terms = {}
        if not isinstance(terms, Mapping):
            terms = {f"align{i}": term for i, term in enumerate(terms)}
        for name, term in terms.items():
            if not isinstance(term, AlignmentTerm):
                raise TypeError(f"alignment term {name!r} is a {type(term).__name__}, not an AlignmentTerm")
        self.terms = nn.ModuleDict(dict(terms))

    def __len__(self) -> int:
        return len(self.terms)

    def bind(self, model: nn.Module, teacher: nn.Module | None = None) -> Alignment:
        for term in self.terms.values():
            term.bind(model, teacher)
        return self

    def student_layers(self) -> list[int]:
        return sorted({i for term in self.terms.values() for i in term.student_layers()})

    def forward(self, ctx: AlignContext, step: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            res = term(ctx, step)
            total = res["loss"] if total is None else total + res["loss"]
            logs[f"loss/{name}"] = res["raw"]
            logs[f"align/{name}/weight"] = res["weight"]
            if "cos" in res:
                logs[f"align/{name}/cos"] = res["cos"]
        return total, logs

    def on_step_end(self, model: nn.Module) -> None:
        for term in self.terms.values():
            if term.target is not None:
                term.target.on_step_end(model)

    def teacher_targets(self) -> list[TeacherTarget]:
        return [t.target for t in self.terms.values() if isinstance(t.target, TeacherTarget)]
