"""Stage-1 training tasks for the vision tokenizers, and the loader that hands a trained tokenizer to stage 2.

- :class:`RAEStage1Task`: trains the RAE decoder (the encoder is frozen) with L1 + a perceptual term (+ optional
  LPIPS) + an optional adversarial term with the adaptive weight ``0.75 * ||grad L_rec|| / (||grad L_gan|| + 1e-6)``
  (clamped at 1e4) from ``disc_start`` on, on noise-augmented latents; the discriminator alone trains from
  ``disc_update_start`` (RAE: epoch 6 of 16, the generator's adversarial term from epoch 8) with the
  non-saturating generator loss (bytetriper/RAE, stage-1 training).
- :class:`VAVAEStage1Task`: trains the KL autoencoder with L1 + perceptual + ``kl_weight`` * KL + the VF loss (an
  :class:`unirep.align.AlignmentTerm`, ``configs/align/vf.yaml``) with its adaptive weight
  ``0.1 * ||grad L_nll|| / (||grad L_vf|| + 1e-4)`` w.r.t. the encoder's last layer (+ optional adversarial term), as
  hustvl/LightningDiT ``vavae`` (LDM's ``LPIPSWithDiscriminator`` plus the VF loss).
- :func:`load_tokenizer`: a stage-1 checkpoint (or, for smoke runs, a randomly initialised tokenizer), frozen, with
  latent statistics fitted over the training images when the checkpoint has none.

Losses are per pixel (LDM sums over pixels and divides by the batch; here both the reconstruction and the KL are
divided by the number of pixels per image, so ``kl_weight = 1e-6`` keeps its meaning relative to the L1 term).
GAN updates use one optimiser: see :func:`vision.losses.gan_losses`.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unirep.align import AlignContext, Alignment, AlignmentTerm
from unirep.encoders import FrozenEncoder
from unirep.tokenizers import Tokenizer
from unirep.train import Task
from vision.losses import GEN_LOSSES, LPIPS, EncoderPerceptualLoss, gan_adaptive_weight, gan_losses
from vision.tokenizers.metrics import frechet_distance, psnr, ssim
from vision.tokenizers.rae import RAE
from vision.tokenizers.vavae import VAVAE, adaptive_weight

__all__ = ["RAEStage1Task", "VAVAEStage1Task", "load_tokenizer", "fit_tokenizer_statistics", "images_of"]


def images_of(batch: dict[str, Any]) -> Tensor:
    """The pixels a tokenizer trains on: ``batch["image"]`` (what the teacher sees) or ``batch["x"]``."""
    x = batch.get("image", batch.get("x"))
    if x is None:
        raise KeyError(f"a tokenizer batch needs an 'image' or 'x' entry, got keys {sorted(batch)}")
    return x


def _stat_dims(tok: Tokenizer) -> tuple[int, ...]:
    # per-position statistics (RAE: (D, g, g)) reduce over the batch only; channel statistics (C, 1, 1) also over h, w
    return (0, 2, 3) if tuple(tok.latent_mean.shape[1:]) == (1, 1) else (0,)


@torch.no_grad()
def fit_tokenizer_statistics(
    tok: Tokenizer, dataset: Dataset, batch_size: int = 64, max_items: int | None = None, collate_fn=None
) -> int:
    """Fit ``latent_mean``/``latent_std`` over (up to ``max_items`` of) a data set's images; returns the item count."""
    if len(dataset) == 0:
        raise ValueError("cannot fit tokenizer statistics on an empty data set")
    was_training = tok.training
    tok.eval()
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    loader = DataLoader(
        torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
    )
    device = tok.latent_mean.device
    tok.fit_statistics((images_of(b).to(device) for b in loader), reduce_dims=_stat_dims(tok))
    tok.train(was_training)
    if hasattr(tok, "stats_items"):
        tok.stats_items.fill_(n)
    return n


def _ensure_stats_buffer(tok: Tokenizer) -> None:
    if not hasattr(tok, "stats_items"):  # how many items the statistics were fitted on (0: never), saved with them
        tok.register_buffer("stats_items", torch.zeros((), dtype=torch.long))


class _TokenizerTask(Task):
    """Shared parts: the adversarial term and the reconstruction evaluation."""

    tokenizer: Tokenizer

    def _setup_gan(
        self,
        discriminator: nn.Module | None,
        disc_weight: float,
        disc_start: int,
        max_w: float,
        disc_update_start: int | None,
        gen_loss: str,
    ) -> None:
        self.discriminator = discriminator
        self.disc_weight, self.disc_start, self.disc_max_weight = float(disc_weight), int(disc_start), float(max_w)
        self.disc_update_start = self.disc_start if disc_update_start is None else int(disc_update_start)
        if self.disc_update_start > self.disc_start:
            raise ValueError(
                f"disc_update_start ({self.disc_update_start}) must not come after disc_start "
                f"({self.disc_start}): the discriminator has to train before the decoder follows it"
            )
        if gen_loss not in GEN_LOSSES:  # checked at construction, not at disc_start
            raise ValueError(
                f"gen_loss must be one of {sorted(GEN_LOSSES)} (hinge: LDM, vanilla: RAE), got {gen_loss!r}"
            )
        self.gen_loss = gen_loss

    def _reconstruction_loss(self, x_rec: Tensor, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L1 + perceptual (+ LPIPS when its weights file is given): the "nll" the adaptive weights refer to."""
        nll = (x_rec - x).abs().mean()
        out = {"loss/l1": nll.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x_rec, x)
            nll = nll + self.perceptual_weight * p
            out["loss/perceptual"] = p.detach()
        if self.lpips is not None:
            lp = self.lpips(x_rec, x)
            nll = nll + self.lpips_weight * lp
            out["loss/lpips"] = lp.detach()
        return nll, out

    def _gan_terms(self, x: Tensor, x_rec: Tensor, nll: Tensor, last_layer: Tensor, step: int) -> dict[str, Tensor]:
        if self.discriminator is None or step < self.disc_update_start:
            return {}
        if hasattr(self.discriminator, "gan_terms"):  # a discriminator with its own recipe (vision.diffaug.DiffAugGAN)
            on = step >= self.disc_start
            w, max_w = self.disc_weight, self.disc_max_weight
            return self.discriminator.gan_terms(x, x_rec, nll, last_layer, on, w, max_w, adaptive=self.training)
        if step < self.disc_start:  # discriminator warm-up: the decoder does not see the adversarial term yet
            _, d_loss = gan_losses(self.discriminator, x, x_rec, generator=False)
            return {"gan_total": d_loss, "loss/gan_d": d_loss.detach()}
        g_loss, d_loss = gan_losses(self.discriminator, x, x_rec, gen_loss=self.gen_loss)
        lam = gan_adaptive_weight(nll, g_loss, last_layer, self.disc_max_weight) if self.training else nll.new_ones(())
        return {
            "gan_total": self.disc_weight * lam * g_loss + d_loss,
            "loss/gan_g": g_loss.detach(),
            "loss/gan_d": d_loss.detach(),
            "gan/weight": lam,
        }

    @abc.abstractmethod
    def _reconstruct_eval(self, x: Tensor) -> Tensor:
        """Images -> reconstructions as used at inference (no noise augmentation, no sampling)."""

    def _fd_encoder(self) -> nn.Module | None:
        return None

    @torch.no_grad()
    def evaluate(self, data, out_dir: Path, step: int) -> dict[str, float]:
        """PSNR, SSIM and FD-teacher of reconstructions on the held-out split (or the training split), then the latent
        statistics fitted over the training split."""
        dataset = data.val if getattr(data, "val", None) is not None and len(data.val) > 0 else data.train
        n = min(len(dataset), self.eval_items)
        loader = DataLoader(
            torch.utils.data.Subset(dataset, range(n)),
            batch_size=64,
            shuffle=False,
            collate_fn=getattr(data, "collate_fn", None),
        )
        was_training = self.training
        self.eval()
        device = self.tokenizer.latent_mean.device
        origs, recs = [], []
        for batch in loader:
            x = images_of(batch).to(device)
            origs.append(x.cpu())
            recs.append(self._reconstruct_eval(x).clamp(-1, 1).cpu())
        x, r = torch.cat(origs), torch.cat(recs)
        out = {"recon/psnr": psnr(r, x), "recon/ssim": ssim(r, x), "recon/l1": float((r - x).abs().mean())}
        enc = self._fd_encoder()
        if enc is not None and n >= 4:
            fa = torch.cat([enc.encode_pooled(x[i : i + 64].to(device)).cpu() for i in range(0, n, 64)])
            fb = torch.cat([enc.encode_pooled(r[i : i + 64].to(device)).cpu() for i in range(0, n, 64)])
            out["recon/fd_teacher"] = frechet_distance(fa, fb)
        if out_dir is not None:
            _save_grid(x[:8], r[:8], Path(out_dir) / f"reconstructions_{step:08d}.png")
        self.train(was_training)
        # fit the latent statistics here, so the checkpoint carries them (RAE: they depend on the frozen encoder only)
        n = fit_tokenizer_statistics(
            self.tokenizer,
            data.train,
            max_items=self.fit_statistics_items,
            collate_fn=getattr(data, "collate_fn", None),
        )
        out["stats/items"] = float(n)
        return out


def _save_grid(x: Tensor, r: Tensor, path: Path) -> None:
    """Originals (top row) over reconstructions (bottom row) as one PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [torch.cat(list(t), dim=-1) for t in (x, r)]  # [C, H, n*W] each
    img = ((torch.cat(rows, dim=-2).clamp(-1, 1) + 1) * 127.5).round().byte()
    arr = img.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


class RAEStage1Task(_TokenizerTask):
    """Train the RAE decoder.

    Args:
        tokenizer: the :class:`RAE` (frozen encoder + decoder); ``task.model`` is its decoder (the EMA'd network).
        perceptual_weight: weight of :class:`EncoderPerceptualLoss` on the RAE's own frozen encoder (0: off).
        lpips: an optional :class:`LPIPS` (needs its weights files), added with ``lpips_weight``.
        discriminator: optional (PatchGAN or feature discriminator); ``disc_weight`` 0.75 and ``disc_start`` as RAE.
        disc_update_start: step from which the discriminator trains (default ``disc_start``); the decoder gets the
            adversarial term from ``disc_start``. RAE: 6/16 and 8/16 of training.
        gen_loss: ``"vanilla"`` (non-saturating, RAE) or ``"hinge"`` (LDM).
        eval_items: images used by :meth:`evaluate`.
        fit_statistics_items: items of the training set the latent statistics are fitted on at evaluation.
    """

    def __init__(
        self,
        tokenizer: RAE,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        lpips_weight: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.75,
        disc_start: int = 0,
        disc_max_weight: float = 1e4,
        disc_update_start: int | None = None,
        gen_loss: str = "vanilla",
        eval_items: int = 256,
        fit_statistics_items: int | None = 4096,
    ):
        super().__init__()
        if not isinstance(tokenizer, RAE):
            raise TypeError(f"RAEStage1Task needs an RAE tokenizer, got {type(tokenizer).__name__}")
        _ensure_stats_buffer(tokenizer)
        self.tokenizer = tokenizer
        self.perceptual = EncoderPerceptualLoss(tokenizer.encoder) if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.lpips, self.lpips_weight = lpips, float(lpips_weight)
        self._setup_gan(discriminator, disc_weight, disc_start, disc_max_weight, disc_update_start, gen_loss)
        self.eval_items, self.fit_statistics_items = int(eval_items), fit_statistics_items

    @property
    def model(self) -> nn.Module:
        return self.tokenizer.decoder

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x = images_of(batch)
        x_rec = self.tokenizer.reconstruct(x)  # noise-augmented latent in training mode
        nll, out = self._reconstruction_loss(x_rec, x)
        gan = self._gan_terms(x, x_rec, nll, self.tokenizer.decoder.last_layer, step)
        out["loss"] = nll + gan.pop("gan_total", 0.0)
        return {**out, **gan}

    def _reconstruct_eval(self, x: Tensor) -> Tensor:
        return self.tokenizer._decode(self.tokenizer._encode(x))

    def _fd_encoder(self) -> nn.Module:
        return self.tokenizer.encoder


class VAVAEStage1Task(_TokenizerTask):
    """Train a VA-VAE (or, with ``align=None``, a plain KL-VAE: the ablation without the VF loss).

    Args:
        tokenizer: the :class:`VAVAE` (``task.model``).
        teacher: the frozen encoder (VF target, perceptual features, FD-teacher); wrapped in :class:`FrozenEncoder`.
        align: alignment terms on the latent (``configs/align/vf.yaml``: a per-token linear projector, the 1x1 conv
            of the anchor, and the VF loss; swap the loss for ``nt_xent``, ReaLS), or ``None``. Each term's weight
            (0.1 in the anchor) multiplies its adaptive weight ``||grad L_nll|| / (||grad L_align|| + eps)`` taken
            w.r.t. the encoder's last layer, as hustvl/LightningDiT.
        adaptive_eps: the ``eps`` of that ratio (1e-4 in the anchor).
        kl_weight: 1e-6 as LDM/VA-VAE.
        perceptual_weight, lpips, lpips_weight, discriminator, disc_weight, disc_start, disc_update_start: as
            :class:`RAEStage1Task` (LDM's GAN weight is 0.5).
        gen_loss: ``"hinge"`` (LDM's ``LPIPSWithDiscriminator``, the default here) or ``"vanilla"``.
        teacher_cache_dir: optional precomputed teacher features (``unirep-features``).
    """

    def __init__(
        self,
        tokenizer: VAVAE,
        teacher: nn.Module | None = None,
        align: Mapping[str, AlignmentTerm] | AlignmentTerm | None = None,
        adaptive_eps: float = 1e-4,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        lpips_weight: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 0,
        disc_max_weight: float = 1e4,
        disc_update_start: int | None = None,
        gen_loss: str = "hinge",
        teacher_cache_dir: str | None = None,
        eval_items: int = 256,
        fit_statistics_items: int | None = 4096,
    ):
        super().__init__()
        if not isinstance(tokenizer, VAVAE):
            raise TypeError(f"VAVAEStage1Task needs a VAVAE tokenizer, got {type(tokenizer).__name__}")
        if teacher is None and (align or perceptual_weight > 0):
            raise ValueError(
                "VAVAEStage1Task: the VF loss and the perceptual loss need a teacher encoder; pass "
                "teacher=... or set align=null and perceptual_weight=0"
            )
        _ensure_stats_buffer(tokenizer)
        self.tokenizer = tokenizer
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher if isinstance(teacher, FrozenEncoder) else FrozenEncoder(teacher, teacher_cache_dir)
        terms = {"vf": align} if isinstance(align, AlignmentTerm) else (dict(align) if align else None)
        self.alignment = Alignment(terms).bind(tokenizer, teacher=self.teacher)
        self.adaptive_eps = float(adaptive_eps)
        self.kl_weight = float(kl_weight)
        self.perceptual = EncoderPerceptualLoss(self.teacher) if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.lpips, self.lpips_weight = lpips, float(lpips_weight)
        self._setup_gan(discriminator, disc_weight, disc_start, disc_max_weight, disc_update_start, gen_loss)
        self.eval_items, self.fit_statistics_items = int(eval_items), fit_statistics_items

    @property
    def model(self) -> nn.Module:
        return self.tokenizer

    def _align_terms(self, batch: dict[str, Any], z: Tensor, nll: Tensor, step: int) -> tuple[Tensor, dict]:
        """Each term weighted by ``weight * ||grad nll|| / (||grad raw|| + eps)`` w.r.t. the encoder's last layer."""
        ctx = AlignContext(batch=batch, features={1: self.tokenizer.latent_tokens(z)}, device=z.device)
        total, out = nll.new_zeros(()), {}
        for name, term in self.alignment.terms.items():
            res = term(ctx, step)
            w = float(res["weight"])
            out[f"loss/{name}"] = res["raw"]
            if "cos" in res:
                out[f"align/{name}/cos"] = res["cos"]
            if w == 0.0:
                out[f"align/{name}/weight"] = nll.new_zeros(())
                continue
            # res["loss"] = w * raw: ||grad raw|| = ||grad loss|| / w
            ratio = adaptive_weight(nll, res["loss"] / w, self.tokenizer.encoder_last_layer, eps=self.adaptive_eps)
            total = total + ratio * res["loss"]
            out[f"align/{name}/weight"] = w * ratio
        return total, out

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x = images_of(batch)
        x_rec, z, post = self.tokenizer(x, sample=True)
        nll, out = self._reconstruction_loss(x_rec, x)
        kl = post.kl().mean() / math.prod(x.shape[1:])  # per pixel, as the L1 term
        out["loss/kl"] = kl.detach()
        loss = nll + self.kl_weight * kl
        if len(self.alignment):
            align_loss, logs = self._align_terms(batch, z, nll, step)
            loss = loss + align_loss
            out.update(logs)
        gan = self._gan_terms(x, x_rec, nll, self.tokenizer.decoder_last_layer, step)
        out["loss"] = loss + gan.pop("gan_total", 0.0)
        return {**out, **gan}

    def _reconstruct_eval(self, x: Tensor) -> Tensor:
        return self.tokenizer._decode(self.tokenizer._encode(x))

    def _fd_encoder(self) -> nn.Module | None:
        return self.teacher


def _build(node: Any) -> Any:
    """Instantiate a hydra config node handed over unbuilt (``_recursive_: false``); pass objects through."""
    from omegaconf import DictConfig

    if isinstance(node, (DictConfig, dict)) and "_target_" in node:
        from hydra.utils import instantiate

        return instantiate(node, _convert_="object")
    return node


def load_tokenizer(
    checkpoint: str | None = None,
    random_init: Any = None,
    data: Any = None,
    fit_statistics: str = "auto",
    fit_statistics_items: int | None = 4096,
    ema: bool = True,
) -> Tokenizer:
    """The frozen tokenizer for diffusion on its latents (the ``task.tokenizer`` node of ``rae_sit``/``vavae_sit``).

    Args:
        checkpoint: a stage-1 checkpoint folder (``<out_dir>/checkpoints/step_XXXXXXXX``) or run folder (its newest
            checkpoint) of ``rae_stage1``/``vavae_stage1``; its task is rebuilt from the saved config (EMA weights
            with ``ema``).
        random_init: used only when ``checkpoint`` is null: an untrained tokenizer or its config (smoke runs; a
            warning says so). The recipes mark the node ``_recursive_: false`` so it is built only when used.
        data: a DataModule, a data set, or its config, whose training images fit the latent statistics.
        fit_statistics: ``"auto"`` fits when the tokenizer has none, ``"always"`` refits, ``"never"`` keeps them.
    """
    if fit_statistics not in ("auto", "always", "never"):
        raise ValueError(f"fit_statistics must be 'auto', 'always' or 'never', got {fit_statistics!r}")
    if checkpoint is not None:
        from unirep.train import load_task

        path = Path(str(checkpoint)).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer checkpoint {path} does not exist: train one with "
                f"`unirep-train experiment=vision/rae_stage1` (or vavae_stage1) and pass "
                f"task.tokenizer.checkpoint=<its out_dir or a checkpoints/step_N folder>"
            )
        if (path / "tokenizer.json").is_file():  # an exported tokenizer folder (vision.repae.export_tokenizer)
            from vision.repae import load_exported_tokenizer

            tok = load_exported_tokenizer(path)
        else:
            task, _ = load_task(str(path), ema=ema)
            tok = getattr(task, "tokenizer", None)
            if not isinstance(tok, Tokenizer):
                raise TypeError(f"{path} is a checkpoint of {type(task).__name__}, not of a tokenizer stage-1 task")
    elif random_init is not None:
        warnings.warn(
            "load_tokenizer: no checkpoint given, using a randomly initialised tokenizer (smoke runs only)",
            stacklevel=2,
        )
        tok = _build(random_init)
    else:
        raise ValueError(
            "load_tokenizer needs task.tokenizer.checkpoint=<stage-1 checkpoint folder> "
            "(or task.tokenizer.random_init for smoke runs)"
        )
    _ensure_stats_buffer(tok)
    if data is not None and (fit_statistics == "always" or (fit_statistics == "auto" and int(tok.stats_items) == 0)):
        data = _build(data)
        dataset = getattr(data, "train", data)
        collate = getattr(data, "collate_fn", None)
        fit_tokenizer_statistics(tok, dataset, max_items=fit_statistics_items, collate_fn=collate)
    tok.requires_grad_(False)
    return tok.eval()
