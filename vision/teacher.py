"""The project's own frozen teacher: a small timm ViT trained self-supervised on the digits as a masked autoencoder.

No pretrained vision weights can be downloaded offline, so the quick start needs a teacher it can make itself.
The objective is MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022;
facebookresearch/mae ``models_mae.py``): 75 % of the patches are dropped, the ViT encodes the visible ones plus the
class token, a light decoder (fixed 2-D sin-cos positions, mask tokens) reconstructs the per-patch normalised
pixels of the dropped patches, and the loss counts only those.

Why MAE and not a DINO-style student/EMA-teacher objective: REPA reports that MAE teachers help too (REPA
Table 2), and MAE cannot collapse: its loss is a reconstruction, so it makes steady progress in the couple of
CPU minutes the quick start can afford, and the encoder only sees a quarter of the tokens, which makes a step
about four times cheaper. A DINO run (two 16×16 views, 256 prototypes, centring, teacher temperature 0.04) stayed
at the uniform-distribution loss log(256) ≈ 5.5 for its first 100 steps at ~2.5 s/step on the shared 2-core
machine, i.e. it needed more compute than a quick start has.

The teacher is an artifact: :func:`digits_teacher` (the hydra target of the recipes) only loads the weights file and,
when it is missing, stops with the command that makes it. Making it is a recipe on the one trainer,
``unirep-train experiment=vision/teacher_mae`` (:class:`MAETeacherTask`): at the end, ``evaluate`` exports the
backbone as a safetensors file of the timm model's state dict (plus a JSON sidecar with its training settings and
linear-probe accuracy) that loads through exactly the same :class:`vision.encoders.TimmViTEncoder` ``pretrained_path``
code as DINOv2 (short name ``unirep_vit_digits``). Before this recipe, a private loop of 1,500 steps (batch 128,
AdamW 1.5e-3, 5 % warm-up and cosine decay) gave a linear probe of 92.8 % on the held-out digits against 80.0 % for
the same architecture at initialisation (92.2 % when rerun on 2026-12-01). The recipe, same settings on the trainer
(epoch permutations instead of sampling with replacement, per-step generators): MAE loss 0.586 / 0.429 / 0.365 / 0.341
at steps 250 / 500 / 1000 / 1500 (the loop: 0.562 / 0.423 / 0.361 / 0.338), linear probe 96.1 %, 80.0 % at
initialisation (one seed; 30 min on a shared 2-core CPU at load ~20, one thread).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from unirep.train import Task
from vision.encoders import TimmViTEncoder

__all__ = [
    "DEFAULT_TEACHER_PATH",
    "TEACHER_COMMAND",
    "MAETeacherTask",
    "train_digits_teacher",
    "ensure_digits_teacher",
    "digits_teacher",
    "linear_probe",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER_PATH = REPO_ROOT / "data" / "vision" / "teacher_vit_digits.safetensors"
TEACHER_NAME = "unirep_vit_digits"
TEACHER_RES = 16  # trained at 16x16 (4x4 grid of 4-pixel patches); other grids resample the position embedding
TEACHER_COMMAND = ".venv/bin/unirep-train experiment=vision/teacher_mae"


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random resized crop (scale 0.4-1), rotation (±15°), shear, contrast/brightness jitter, noise; x in [-1, 1]."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> Tensor:  # drawn on the CPU generator, so a step's randomness is device-free
        return (lo + (hi - lo) * torch.rand(b, generator=gen)).to(x.device)

    scale = u(0.4, 1.0).sqrt()  # side fraction of the crop
    ang = u(-15, 15) * math.pi / 180
    shear = u(-0.15, 0.15)
    tx, ty = u(-1, 1) * (1 - scale), u(-1, 1) * (1 - scale)
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos, -sin + shear * scale, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * u(0.7, 1.3).view(b, 1, 1, 1) + u(-0.2, 0.2).view(b, 1, 1, 1)
    out = out + 0.05 * torch.randn(out.shape, generator=gen).to(x.device)
    return out.clamp(-1, 1)


@torch.no_grad()
def linear_probe(encoder: TimmViTEncoder, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Accuracy of a logistic-regression probe on the frozen class token (fit on train, scored on held-out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def feats(x: Tensor) -> Tensor:
        return torch.cat([encoder.encode_pooled(x[i : i + 256]) for i in range(0, len(x), 256)])

    scaler = StandardScaler().fit(feats(train_x).numpy())
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(feats(train_x).numpy()), train_y.numpy())
    return float(clf.score(scaler.transform(feats(test_x).numpy()), test_y.numpy()))


class MAEDecoder(nn.Module):
    """MAE's decoder: embed, insert mask tokens, unshuffle, fixed sin-cos positions, a few blocks, predict pixels."""

    def __init__(self, dim: int, num_patches: int, patch_dim: int, width: int = 64, depth: int = 2, heads: int = 4):
        from timm.models.vision_transformer import Block

        from vision.models.sit import get_2d_sincos_pos_embed

        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        grid = int(round(math.sqrt(num_patches)))
        pos = torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float()
        self.register_buffer("pos", torch.cat([torch.zeros(1, width), pos]).unsqueeze(0))  # (1, 1 + N, W)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, h: Tensor, ids_restore: Tensor) -> Tensor:
        h = self.embed(h)  # (B, 1 + N_keep, W)
        b, n = ids_restore.shape
        masks = self.mask_token.expand(b, n + 1 - h.shape[1], -1)
        seq = torch.cat([h[:, 1:], masks], dim=1)  # (B, N, W) in shuffled order
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, seq.shape[2]))  # original order
        seq = torch.cat([h[:, :1], seq], dim=1) + self.pos
        return self.pred(self.norm(self.blocks(seq)))[:, 1:]  # (B, N, p*p*3)


def _mae_forward(model: nn.Module, decoder: MAEDecoder, inp: Tensor, mask_ratio: float, gen: torch.Generator) -> Tensor:
    """MAE loss on a batch of preprocessed images ``inp[B, 3, S, S]`` (timm ViT with a class token)."""
    from vision.models.sit import patchify

    p = model.patch_embed.patch_size[0]
    x = model.patch_embed(inp) + model.pos_embed[:, 1:]  # (B, N, D)
    b, n, d = x.shape
    keep = max(1, int(round(n * (1 - mask_ratio))))
    ids_shuffle = torch.argsort(torch.rand(b, n, generator=gen), dim=1).to(inp.device)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, keep, D) visible patches
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(b, -1, -1)
    h = model.norm(model.blocks(model.norm_pre(torch.cat([cls, x], dim=1))))
    pred = decoder(h, ids_restore)
    target = patchify(inp, p)  # (B, N, p*p*3)
    # per-patch normalised pixels (MAE's norm_pix_loss, which gives better features)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(b, n, device=inp.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # 1 on dropped patches, original order
    per_patch = (pred - target).square().mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def _images_labels(ds: Any) -> tuple[Tensor, Tensor]:
    """All images and labels of a data set (``DigitsDataset`` holds them as tensors; others are stacked)."""
    if hasattr(ds, "images") and hasattr(ds, "labels"):
        return ds.images, torch.as_tensor(ds.labels)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["x"] for it in items]), torch.stack([torch.as_tensor(it["y"]) for it in items])


def _save_atomic(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written teacher under the real name


class _MAEModel(nn.Module):
    """The timm ViT being pretrained plus MAE's decoder; normalises [-1, 1] images as the teacher will."""

    def __init__(self, vit: nn.Module, decoder: MAEDecoder, mean: Tensor, std: Tensor, img_size: int):
        super().__init__()
        self.vit, self.decoder, self.img_size = vit, decoder, img_size
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:  # the same as TimmViTEncoder.preprocess
        x = (images.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return x


class MAETeacherTask(Task):
    """MAE pretraining of the digits ViT as a task on :class:`unirep.train.Trainer` (recipe ``vision/teacher_mae``).

    Each step augments the batch (random resized crop, rotation, shear, jitter, noise), masks ``mask_ratio`` of the
    patches and returns the reconstruction loss on the masked ones (:func:`_mae_forward`). The step's randomness is
    drawn from a generator seeded by ``(seed, step)``, so a resumed run replays it. ``evaluate`` (at the end of the run)
    exports the backbone to ``export_path`` atomically and writes the ``.json`` sidecar with the linear-probe accuracy
    on the held-out split, of the trained weights and of the same weights at initialisation.

    Args:
        name: the teacher's short name in :data:`vision.encoders.TEACHERS`.
        resolution: training input size (the teacher's native size).
        mask_ratio: fraction of patches dropped (MAE: 0.75).
        decoder_width, decoder_depth, decoder_heads: the light MAE decoder.
        augment: apply :func:`_augment` to each batch.
        seed: seeds the per-step augmentation and masking.
        export_path: where ``evaluate`` writes the teacher (``None``: ``data/vision/teacher_vit_digits.safetensors``).
        probe: fit the linear probes in ``evaluate`` (a few seconds; off in smoke runs).
    """

    def __init__(
        self,
        name: str = TEACHER_NAME,
        resolution: int = TEACHER_RES,
        mask_ratio: float = 0.75,
        decoder_width: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        augment: bool = True,
        seed: int = 0,
        export_path: str | None = None,
        probe: bool = True,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"task.mask_ratio={mask_ratio}: use a fraction in (0, 1) (MAE: 0.75)")
        enc = TimmViTEncoder(name, img_size=resolution, allow_random_init=True)
        vit = enc.model
        vit.requires_grad_(True)
        p = vit.patch_embed.patch_size[0]
        decoder = MAEDecoder(
            enc.dim, vit.patch_embed.num_patches, p * p * 3, decoder_width, decoder_depth, decoder_heads
        )
        self.model = _MAEModel(vit, decoder, enc.mean, enc.std, enc.img_size)
        self.name, self.resolution, self.mask_ratio = name, int(resolution), float(mask_ratio)
        self.augment, self.seed, self.probe = augment, int(seed), probe
        self.export_path = Path(export_path) if export_path else DEFAULT_TEACHER_PATH
        # the initial weights, for the random-init reference probe (a small ViT: a few MB)
        self._init_state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
        self._start = time.time()

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        x = batch["x"]
        if self.augment:
            x = _augment(x, gen)
        loss = _mae_forward(self.model.vit, self.model.decoder, self.model.preprocess(x), self.mask_ratio, gen)
        return {"loss": loss}

    def _load(self, path: Path | None = None, state: dict[str, Tensor] | None = None) -> TimmViTEncoder:
        if path is not None:
            return TimmViTEncoder(self.name, img_size=self.resolution, pretrained_path=str(path))
        enc = TimmViTEncoder(self.name, img_size=self.resolution, allow_random_init=True)
        enc.model.load_state_dict(state)
        return enc

    @torch.no_grad()
    def evaluate(self, data: Any, out_dir: str | os.PathLike, step: int) -> dict[str, float]:
        """Export the teacher (atomically) and probe it through the same loading path every user of it takes."""
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.vit.state_dict().items()}
        path = self.export_path
        _save_atomic(state, path, {"teacher": self.name, "objective": "mae", "step": str(step)})
        wall = time.time() - self._start
        acc = random_acc = None
        if self.probe:
            if data.val is None:
                raise ValueError("the MAE teacher recipe probes on the held-out split: its data needs a val set")
            tr_x, tr_y = _images_labels(data.train)
            va_x, va_y = _images_labels(data.val)
            acc = linear_probe(self._load(path), tr_x, tr_y, va_x, va_y)
            random_acc = linear_probe(self._load(state=self._init_state), tr_x, tr_y, va_x, va_y)
        info = dict(
            name=self.name,
            objective="mae",
            mask_ratio=self.mask_ratio,
            steps=int(step),
            resolution=self.resolution,
            seed=self.seed,
            train_seconds=round(wall, 1),
            linear_probe_val_acc=acc,
            linear_probe_val_acc_random_init=random_acc,
            val_items=len(data.val) if data.val is not None else 0,
            run_dir=str(out_dir),
        )
        sidecar = path.with_suffix(".json")
        tmp = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, sidecar)
        print(f"[teacher] saved {path}: linear probe {acc} (at initialisation {random_acc})", flush=True)
        out = {"teacher_steps": float(step)}
        if acc is not None:
            out.update(linear_probe_val_acc=acc, linear_probe_val_acc_random_init=random_acc)
        return out


def train_digits_teacher(
    path: str | os.PathLike = DEFAULT_TEACHER_PATH,
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    log_every: int = 250,
    probe: bool = True,
    out_dir: str | os.PathLike | None = None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Run the ``vision/teacher_mae`` recipe from Python (what ``unirep-train experiment=vision/teacher_mae`` does)
    and return the sidecar dict. The run folder (checkpoints, metrics) is ``out_dir`` or a temporary folder."""
    from unirep.cli import compose, run_train

    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="teacher_mae_") as tmp:
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp)
        cfg = compose(
            "train",
            [
                "experiment=vision/teacher_mae",
                f"task.export_path={path}",
                f"task.probe={str(bool(probe)).lower()}",
                f"task.seed={seed}",
                f"seed={seed}",
                f"trainer.max_steps={steps}",
                f"trainer.batch_size={batch_size}",
                f"trainer.log_every={max(1, log_every or steps + 1)}",
                f"trainer.warmup_steps={max(1, round(0.05 * steps))}",
                f"trainer.ckpt_every={steps}",
                f"trainer.progress={str(bool(log_every)).lower()}",
                "trainer.tensorboard=false",
                f"out_dir={run_dir}",
                *overrides,
            ],
        )
        run_train(cfg)
    return json.loads(path.with_suffix(".json").read_text())


def _missing_help(path: Path) -> str:
    default = path.resolve() == DEFAULT_TEACHER_PATH.resolve()
    export = "" if default else f" task.export_path={path}"
    return (
        f"the digits teacher {path} does not exist. Make it once (MAE pretraining, ~6 CPU minutes) with\n"
        f"    {TEACHER_COMMAND}{export}\n"
        "or set task.teacher.allow_random_init=true for a smoke run with an untrained teacher"
    )


def ensure_digits_teacher(path: str | os.PathLike | None = None) -> Path:
    """The teacher weights file; when it is missing, stop with the command that makes it."""
    path = Path(path) if path is not None else DEFAULT_TEACHER_PATH
    if not path.is_file():
        raise FileNotFoundError(_missing_help(path))
    return path


def digits_teacher(
    grid_size: int | None = None,
    pretrained_path: str | None = None,
    allow_random_init: bool = False,
    train_if_missing: bool = False,
) -> TimmViTEncoder:
    """The self-trained digits ViT as a frozen teacher (hydra target of the recipes); loads weights, never trains.

    ``allow_random_init=True`` skips the weights entirely (smoke runs); otherwise the file at ``pretrained_path``
    (default ``data/vision/teacher_vit_digits.safetensors``) is loaded, and a missing file stops with the command that
    makes it. ``train_if_missing`` is accepted for old callers and must stay false.
    """
    if train_if_missing:
        raise ValueError(f"digits_teacher no longer trains: make the teacher with `{TEACHER_COMMAND}`")
    if allow_random_init:
        return TimmViTEncoder(TEACHER_NAME, grid_size=grid_size, allow_random_init=True)
    path = ensure_digits_teacher(pretrained_path)
    return TimmViTEncoder(TEACHER_NAME, grid_size=grid_size, pretrained_path=str(path))
