"""Vision-only alignment terms: HASTE's attention-map distillation.

HASTE (Wang et al. 2025, "REPA Works Until It Doesn't: Early-Stopped, Holistic Alignment Supercharges Diffusion
Training"; anchor NUS-HPC-AI-Lab/HASTE) adds to REPA's feature alignment (0.5) an attention distillation (0.5): the
cross-entropy between the frozen teacher's attention maps (after softmax) of its layers 8-11 (DINOv2-B) and the
student SiT's attention logits of its blocks 5-8, on the first ``num_heads`` heads; both terms stop at one step
(phase II, 250 K iterations for XL).

:class:`AttentionDistillTerm` is an :class:`unirep.align.AlignmentTerm`, so :class:`unirep.align.Alignment` runs it
beside the others; its "features" are attention logits, which the task puts in :class:`VisionAlignContext`.
Block numbers follow :mod:`unirep.intermediates` (block k is 1..L, negative from the end): the anchor's indices count
from 0 in Python loops over the blocks, so its student blocks 5-8 are 6..9 here and its teacher layers 8-11 of 12
are 9..12 (the last four).

The teacher's maps are read from outside its ``timm`` blocks: a forward pre-hook on ``block.attn`` captures the
attention input, and the logits are recomputed from that module's own ``qkv``, ``q_norm``, ``k_norm`` and ``scale``
(the fused SDPA kernel exposes no maps). The teacher's prefix tokens (class, registers) are dropped as keys and
queries before the softmax, so a map covers the patch grid, as the student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.align import AlignContext, AlignmentTerm
from unirep.intermediates import normalize_index

__all__ = ["VisionAlignContext", "AttentionDistillTerm", "attention_cross_entropy", "teacher_attention_logits"]


@dataclass
class VisionAlignContext(AlignContext):
    """:class:`~unirep.align.AlignContext` plus the student's attention logits by block ``{k: [B, H, T, T]}``.

    ``attention_prefix`` is the number of leading non-patch tokens in those maps (REG's class token: 1).
    """

    attention: dict[int, Tensor] = field(default_factory=dict)
    attention_prefix: int = 0


def attention_cross_entropy(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """``-sum_j p_teacher(i, j) log softmax(student_logits)(i, j)``, averaged over items, heads and query tokens.

    Both ``[B, H, N, N]``; computed in float32 with autocast off.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student_logits.shape)} vs teacher "
            f"{tuple(teacher_probs.shape)} (same items, heads and patch grid needed)"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        logp = F.log_softmax(student_logits.float(), dim=-1)
        return -(teacher_probs.float() * logp).sum(-1).mean()


@torch.no_grad()
def teacher_attention_logits(vit: nn.Module, inputs: Tensor, blocks: Sequence[int]) -> dict[int, Tensor]:
    """Attention logits ``{k: [B, H, T, T]}`` of a timm ViT's blocks ``k`` (1-based) on preprocessed ``inputs``.

    Hooks ``vit.blocks[k - 1].attn`` from outside and recomputes ``q k^T * scale`` from its own projections, so the
    ViT keeps its fused attention; the hooks are removed before returning.
    """
    captured: dict[int, Tensor] = {}
    handles = []
    for k in blocks:
        attn = vit.blocks[k - 1].attn

        def hook(module: nn.Module, args: tuple[Any, ...], k: int = k) -> None:
            x = args[0]
            b, n, _ = x.shape
            qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
            q, kk = module.q_norm(qkv[0]), module.k_norm(qkv[1])
            captured[k] = (q * module.scale) @ kk.transpose(-2, -1)  # [B, H, T, T]

        handles.append(attn.register_forward_pre_hook(hook))
    try:
        vit.forward_features(inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


class AttentionDistillTerm(AlignmentTerm):
    """HASTE's attention distillation as an alignment term (see the module docstring).

    Args:
        student_blocks: the student's blocks whose attention logits are distilled (1..L; anchor 6..9 of 28).
        teacher_blocks: the teacher's blocks paired with them in order (1..L_teacher; anchor 9..12 of 12).
        num_heads: heads distilled, the first ones of both networks; ``None``: the smaller head count.
        encoder: a teacher with a timm ViT (``.model``, ``.preprocess``, ``.num_prefix_tokens``, as
            :class:`vision.encoders.TimmViTEncoder`), or a :class:`~unirep.encoders.FrozenEncoder` of one; ``None``
            uses the task's teacher.
        input_key: the batch fields tried in order for the teacher's images.
        weight, schedule: as :class:`~unirep.align.AlignmentTerm` (HASTE: 0.5 with a :class:`StopAtStep`).
    """

    def __init__(
        self,
        student_blocks: Sequence[int] = (6, 7, 8, 9),
        teacher_blocks: Sequence[int] = (9, 10, 11, 12),
        num_heads: int | None = None,
        encoder: nn.Module | None = None,
        input_key: str | Sequence[str] = ("image", "x"),
        weight: float = 0.5,
        schedule: Any = None,
    ) -> None:
        super().__init__(
            layer=0, projector=None, target=None, loss=attention_cross_entropy, weight=weight, schedule=schedule
        )
        if len(student_blocks) != len(teacher_blocks) or not student_blocks:
            raise ValueError(
                f"AttentionDistillTerm pairs student and teacher blocks in order: got {list(student_blocks)} and "
                f"{list(teacher_blocks)} (same non-zero length needed)"
            )
        self.student_spec, self.teacher_spec = list(student_blocks), list(teacher_blocks)
        self.student_blocks, self.teacher_blocks = list(student_blocks), list(teacher_blocks)
        self.num_heads_spec = num_heads
        self.heads = 0
        self.encoder = encoder
        self.input_key = (input_key,) if isinstance(input_key, str) else tuple(input_key)

    # -- binding --------------------------------------------------------------------------------------------------
    def _vit_teacher(self) -> Any:
        enc = self.encoder if self.encoder is not None else getattr(self, "_shared", None)
        enc = getattr(enc, "encoder", enc) if not hasattr(enc, "model") else enc  # unwrap a FrozenEncoder
        if enc is None or not hasattr(enc, "model") or not hasattr(enc.model, "blocks"):
            raise TypeError(
                "AttentionDistillTerm needs a timm ViT teacher (vision.encoders.TimmViTEncoder or the digits teacher): "
                f"got {type(enc).__name__}"
            )
        return enc

    def bind(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        if self.encoder is None:
            if teacher is None:
                raise ValueError("AttentionDistillTerm without an encoder uses the task's teacher, but there is none")
            object.__setattr__(self, "_shared", teacher)  # shared with the task, not registered twice
        vit = self._vit_teacher()
        n_student, n_teacher = int(model.num_layers), len(vit.model.blocks)
        self.student_blocks = [normalize_index(int(k), n_student, "student") for k in self.student_spec]
        self.teacher_blocks = [normalize_index(int(k), n_teacher, "teacher") for k in self.teacher_spec]
        if 0 in self.student_blocks or 0 in self.teacher_blocks:
            raise ValueError("attention blocks are 1..L (0 is the embedded input and has no attention)")
        h_student = int(model.blocks[self.student_blocks[0] - 1].attn.num_heads)
        h_teacher = int(vit.model.blocks[self.teacher_blocks[0] - 1].attn.num_heads)
        self.heads = int(self.num_heads_spec) if self.num_heads_spec is not None else min(h_student, h_teacher)
        if not 1 <= self.heads <= min(h_student, h_teacher):
            raise ValueError(
                f"AttentionDistillTerm num_heads={self.heads}: the student has {h_student} heads, the teacher "
                f"{h_teacher}; distil at most {min(h_student, h_teacher)}"
            )
        self.layer = 0
        self.bound = True

    def student_layers(self) -> list[int]:
        return []  # no hidden tokens: the student's attention logits come through VisionAlignContext

    def student_attention(self) -> list[int]:
        """The student blocks whose attention logits the task must return (``forward_intermediates(attention=)``)."""
        return list(self.student_blocks)

    # -- the loss -------------------------------------------------------------------------------------------------
    def _teacher_probs(self, ctx: AlignContext) -> dict[int, Tensor]:
        memo = ("attention", id(self), tuple(self.teacher_blocks))
        if memo in ctx.cache:
            return ctx.cache[memo]
        vit = self._vit_teacher()
        batch = ctx.batch
        images = next((batch[k] for k in self.input_key if k in batch), None)
        if images is None:
            raise KeyError(f"AttentionDistillTerm: the batch has none of {list(self.input_key)} (has {list(batch)})")
        logits = teacher_attention_logits(vit.model, vit.preprocess(images), self.teacher_blocks)
        p = int(getattr(vit, "num_prefix_tokens", 1))
        # drop the class/register tokens as queries and keys, then normalise over the patch keys
        probs = {k: lg[:, : self.heads, p:, p:].float().softmax(-1) for k, lg in logits.items()}
        ctx.cache[memo] = probs
        return probs

    def forward(self, ctx: AlignContext, step: int) -> dict[str, Tensor]:
        if not self.bound:
            raise RuntimeError("AttentionDistillTerm used before bind(model): the task must call Alignment.bind")
        w = self.weight_at(step)
        attention = getattr(ctx, "attention", None)
        if w == 0.0:  # switched off (HASTE's phase II): no teacher call
            dev = ctx.device if ctx.device is not None else "cpu"
            zero = torch.zeros((), device=dev)
            return {"loss": zero, "raw": zero, "weight": torch.tensor(0.0)}
        if not attention:
            raise ValueError(
                "AttentionDistillTerm needs the student's attention logits: a task that passes a VisionAlignContext "
                "with attention (vision.task.VisionFlowTask)"
            )
        probs = self._teacher_probs(ctx)
        skip = int(getattr(ctx, "attention_prefix", 0))
        losses = []
        for ks, kt in zip(self.student_blocks, self.teacher_blocks, strict=True):
            student = attention[ks][:, : self.heads, skip:, skip:]  # [B, h, N, N] patch queries and keys
            teacher = probs[kt].to(student.device)
            if teacher.shape[-1] != student.shape[-1]:
                raise ValueError(
                    f"teacher attention covers {teacher.shape[-1]} patches, the student's block {ks} "
                    f"{student.shape[-1]}: build the teacher with the student's grid (grid_size)"
                )
            losses.append(attention_cross_entropy(student, teacher))
        raw = torch.stack(losses).mean()
        return {"loss": w * raw, "raw": raw.detach(), "weight": torch.tensor(w)}
