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

The trained backbone is saved as a safetensors file of the timm model's state dict (plus a JSON sidecar with its
training settings and linear-probe accuracy) and loaded through exactly the same
:class:`vision.encoders.TimmViTEncoder` ``pretrained_path`` code as DINOv2 (short name ``unirep_vit_digits``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from vision.encoders import TimmViTEncoder

__all__ = ["DEFAULT_TEACHER_PATH", "train_digits_teacher", "ensure_digits_teacher", "digits_teacher", "linear_probe"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER_PATH = REPO_ROOT / "data" / "vision" / "teacher_vit_digits.safetensors"
TEACHER_NAME = "unirep_vit_digits"
TEACHER_RES = 16  # trained at 16x16 (4x4 grid of 4-pixel patches); other grids resample the position embedding


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random resized crop (scale 0.4-1), rotation (±15°), shear, contrast/brightness jitter, noise; x in [-1, 1]."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    scale = u(0.4, 1.0).sqrt()  # side fraction of the crop
    ang = u(-15, 15) * math.pi / 180
    shear = u(-0.15, 0.15)
    tx, ty = u(-1, 1) * (1 - scale), u(-1, 1) * (1 - scale)
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos, -sin + shear * scale, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * u(0.7, 1.3).view(b, 1, 1, 1) + u(-0.2, 0.2).view(b, 1, 1, 1)
    out = out + 0.05 * torch.randn(out.shape, generator=gen)
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
    ids_shuffle = torch.argsort(torch.rand(b, n, generator=gen), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, keep, D) visible patches
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(b, -1, -1)
    h = model.norm(model.blocks(model.norm_pre(torch.cat([cls, x], dim=1))))
    pred = decoder(h, ids_restore)
    target = patchify(inp, p)  # (B, N, p*p*3)
    # per-patch normalised pixels (MAE's norm_pix_loss, which gives better features)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # 1 on dropped patches, original order
    per_patch = (pred - target).square().mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def train_digits_teacher(
    path: str | os.PathLike = DEFAULT_TEACHER_PATH,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    mask_ratio: float = 0.75,
    seed: int = 0,
    log_every: int = 250,
    probe: bool = True,
) -> dict:
    """Train the digits ViT as a masked autoencoder and save it (safetensors + ``.json`` sidecar).

    Returns the sidecar dict: training settings, wall time, and (``probe=True``) the linear-probe accuracy on the
    held-out split of the trained class token and, for reference, of the same architecture at random initialisation.
    """
    from vision.data import DigitsDataset

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = DigitsDataset("train", resolution=TEACHER_RES, channels=1)
    val = DigitsDataset("val", resolution=TEACHER_RES, channels=1)
    enc = TimmViTEncoder(TEACHER_NAME, img_size=TEACHER_RES, allow_random_init=True)
    random_probe = linear_probe(enc, train.images, train.labels, val.images, val.labels) if probe else None
    model = enc.model
    nn.Module.train(model, True)
    model.requires_grad_(True)
    p = model.patch_embed.patch_size[0]
    decoder = MAEDecoder(enc.dim, model.patch_embed.num_patches, p * p * 3)
    params = list(model.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    n = len(train.images)
    start = time.time()
    for step in range(steps):
        frac = step / max(1, steps - 1)
        for g in opt.param_groups:  # linear warm-up (5 %), cosine decay, as MAE schedules it
            g["lr"] = lr * min(1.0, (step + 1) / (0.05 * steps)) * 0.5 * (1 + math.cos(math.pi * frac))
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        inp = enc.preprocess(_augment(train.images[idx], gen))
        loss = _mae_forward(model, decoder, inp, mask_ratio, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[teacher] step {step}/{steps} MAE loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    wall = time.time() - start

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"teacher": TEACHER_NAME, "objective": "mae"})
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written teacher under the real name
    # probe the saved file through the same loading path every user of the teacher takes
    loaded = TimmViTEncoder(TEACHER_NAME, img_size=TEACHER_RES, pretrained_path=str(path))
    acc = linear_probe(loaded, train.images, train.labels, val.images, val.labels) if probe else None
    info = dict(
        name=TEACHER_NAME,
        objective="mae",
        mask_ratio=mask_ratio,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        resolution=TEACHER_RES,
        train_seconds=round(wall, 1),
        linear_probe_val_acc=acc,
        linear_probe_val_acc_random_init=random_probe,
        val_items=len(val.labels),
    )
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    print(f"[teacher] saved {path}: linear probe {acc} (random init {random_probe}), {wall:.0f}s", flush=True)
    return info


def ensure_digits_teacher(path: str | os.PathLike | None = None, steps: int = 1500, seed: int = 0) -> Path:
    """Return the teacher weights file, training it first (a few minutes on CPU) when it is missing."""
    path = Path(path) if path is not None else DEFAULT_TEACHER_PATH
    if not path.is_file():
        print(
            f"[teacher] {path} is missing: training the digits teacher ({steps} MAE steps, a few CPU minutes)",
            flush=True,
        )
        train_digits_teacher(path, steps=steps, seed=seed)
    return path


def digits_teacher(
    grid_size: int | None = None,
    pretrained_path: str | None = None,
    train_if_missing: bool = True,
    allow_random_init: bool = False,
    steps: int = 1500,
) -> TimmViTEncoder:
    """The self-trained digits ViT as a frozen teacher (hydra target of the quick-start configs).

    ``allow_random_init=True`` skips the weights entirely (smoke runs); otherwise the file at ``pretrained_path``
    (default ``data/vision/teacher_vit_digits.safetensors``) is loaded, and trained first when missing and
    ``train_if_missing``.
    """
    if allow_random_init:
        return TimmViTEncoder(TEACHER_NAME, grid_size=grid_size, allow_random_init=True)
    path = Path(pretrained_path) if pretrained_path is not None else DEFAULT_TEACHER_PATH
    if train_if_missing:
        ensure_digits_teacher(path, steps=steps)
    return TimmViTEncoder(TEACHER_NAME, grid_size=grid_size, pretrained_path=str(path))
