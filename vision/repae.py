"""REPA-E: end-to-end tuning of a VAE together with the latent diffusion transformer trained on it.

Leng et al. 2025, "REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion Transformers"; anchor
implementation End2End-Diffusion/REPA-E (``train_repae.py``, ``loss/losses.py`` ``ReconstructionLoss_Single_Stage``,
``models/sit.py`` ``bn``/``init_bn``/``extract_latents_stats``, ``save_vae_weights.py``).

What the anchor does per step, and where it is here (:meth:`REPAETask.losses`):

- Latent normalisation by ``BatchNorm2d(C, affine=False, eps=1e-4, momentum=0.1)`` (:class:`LatentBatchNorm`; no
  affine parameters, so the diffusion loss cannot "hack" the scale), its running statistics initialised from the
  VAE's fitted latent statistics (the anchor's ``init_bn``) and used at decoding and sampling.
- (a) The VAE is updated with ``L1 + perceptual + 1e-6 * KL + 0.1 * GAN + 1.5 * REPA``: KL summed over latent
  elements and averaged over the batch (the anchor's ``sum(kl) / B``, not per pixel as ``VAVAEStage1Task``), the
  hinge generator loss ``-mean D(x_rec)`` with a fixed weight 0.1 (no adaptive weight) from ``disc_start`` (0), and
  REPA computed *through the diffusion model held in eval mode* (running BatchNorm statistics, no label dropout) with
  its parameters and the projector's frozen (``requires_grad(model, False)`` in the anchor), so the alignment
  gradient reaches the VAE through the BatchNorm and the diffusion model gets none of it.
- The discriminator is updated with the hinge loss on detached reconstructions (``vision.losses.gan_losses``).
- (b) The diffusion model is updated on the *detached* latent, BatchNorm in training mode (batch statistics; the
  running statistics move once per step), with its flow loss + 0.5 REPA, reusing the time and noise drawn for (a)
  (the anchor's ``time_input``/``noises``).

One trainer, one optimiser: this follows the tokenizer tasks' GAN pattern (:func:`vision.losses.gan_losses`), not a
second optimiser stepped inside the task. In the anchor every gradient of the three updates is evaluated at the same
point (the VAE step uses the diffusion model before its update; the diffusion step uses the latent computed before
the VAE's update; the discriminator sees the pre-update reconstruction), so one backward over the sum of the three
losses, each routed to its own parameters (frozen diffusion model in (a), detached discriminator parameters in the
generator loss, detached latent in (b)), then one AdamW step, is the same update, since AdamW treats each parameter
separately and the anchor uses one learning rate (1e-4) and the same betas for all three optimisers. Differences:
gradient clipping is global (``trainer.grad_clip``) instead of per model; the BatchNorm statistics are copied into
the EMA rather than averaged; the aligned diffusion pass in (a) runs the whole network instead of stopping at the
aligned block (the extra output is unused); the discriminator sees real and fake images in one batch; under
``torchrun`` the BatchNorm is a plain one (DDP broadcasts rank 0's running statistics), the anchor's a SyncBatchNorm.

Export (:func:`export_tokenizer`, written by :meth:`REPAETask.evaluate` to ``<out_dir>/tokenizer``): the tuned VAE
with ``latent_mean = running_mean`` and ``latent_std = sqrt(running_var + eps)`` (what the diffusion model saw; the
anchor's ``save_vae_weights.py`` drops the eps), in ``tokenizer.safetensors`` (the VAE's state under
``tokenizer/``, the BatchNorm's under ``latent_norm/``) plus ``tokenizer.json`` (class, constructor arguments,
normalisation). :func:`vision.tokenizers.tasks.load_tokenizer` reads such a folder, so any recipe trains on it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.align import AlignContext, Alignment, AlignmentTerm
from unirep.flow import FlowMatching, FlowSample, interpolate, velocity_target
from unirep.tokenizers import Tokenizer
from vision.align import VisionAlignContext
from vision.losses import GEN_LOSSES, LPIPS, EncoderPerceptualLoss, gan_losses
from vision.models.sit import check_labels
from vision.task import VisionFlowTask
from vision.tokenizers.metrics import psnr
from vision.tokenizers.vavae import VAVAE, Downsample, ResBlock

__all__ = ["LatentBatchNorm", "REPAETask", "export_tokenizer", "load_exported_tokenizer", "export_checkpoint"]

FORMAT = "unirep-tokenizer/1"


class LatentBatchNorm(nn.BatchNorm2d):
    """REPA-E's latent normaliser: ``BatchNorm2d(channels, affine=False, eps=1e-4, momentum=0.1)``.

    In training mode it normalises with the batch statistics and moves the running ones (the diffusion model's step);
    :meth:`frozen` normalises with the running statistics, differentiably in ``z`` (the VAE's step and decoding).
    ``items_seen`` counts the latents the running statistics were updated with, on top of ``init_items``.
    """

    def __init__(self, channels: int, eps: float = 1e-4, momentum: float = 0.1):
        super().__init__(channels, eps=eps, momentum=momentum, affine=False, track_running_stats=True)
        self.register_buffer("items_seen", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor) -> Tensor:
        if self.training:
            self.items_seen += z.shape[0]
        return super().forward(z)

    def frozen(self, z: Tensor) -> Tensor:
        """``(z - running_mean) / sqrt(running_var + eps)``; a snapshot of the statistics, so a later training-mode
        call (which updates them in place) leaves this graph valid."""
        return F.batch_norm(z, self.running_mean.clone(), self.running_var.clone(), None, None, False, 0.0, self.eps)

    @torch.no_grad()
    def init_from(self, mean: Tensor, std: Tensor) -> None:
        """The anchor's ``init_bn``: running mean and variance from fitted latent statistics ``[C, ...]``."""
        self.running_mean.copy_(mean.reshape(-1).to(self.running_mean))
        self.running_var.copy_(std.reshape(-1).to(self.running_var).square())

    def statistics(self) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of shape ``[C, 1, 1]`` with ``std = sqrt(running_var + eps)``: the eval-mode normaliser."""
        c = self.num_features
        return self.running_mean.view(c, 1, 1).clone(), (self.running_var + self.eps).sqrt().view(c, 1, 1)


@contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` out of the graph and the modules in eval mode (the anchor's ``requires_grad(model,
    False); model.eval()``), restored afterwards. Gradients still flow through their activations to the inputs."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    for p in params:
        p.requires_grad_(False)
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, mode in modes:
            m.training = mode


class REPAETask(VisionFlowTask):
    """REPA-E: one step updates the VAE (reconstruction + KL + GAN + REPA through the frozen diffusion model), the
    discriminator, and the diffusion model on the detached, batch-normalised latent (flow + REPA).

    Args:
        model: the SiT (``task.model``: the network the trainer keeps an EMA of and samples with).
        tokenizer: the :class:`VAVAE` (or plain KL-VAE) to tune, e.g. a ``vavae_stage1`` tokenizer from
            :func:`vision.tokenizers.tasks.load_tokenizer`; its parameters are made trainable here. Its fitted latent
            statistics initialise the BatchNorm's running statistics.
        teacher: the frozen encoder: REPA target, perceptual features, FD-teacher.
        align: the REPA terms of the diffusion model (``configs/align/repa.yaml``, weight 0.5); the VAE's step uses
            the same terms (same projector, frozen there) with weight ``vae_align_weight`` instead.
        vae_align_weight: the anchor's ``vae_align_proj_coeff`` (1.5).
        flow: the flow objective (uniform times, linear path, velocity: the anchor's defaults).
        kl_weight: 1e-6 on ``mean_batch(sum_latent KL)``.
        perceptual_weight: :class:`vision.losses.EncoderPerceptualLoss` on the teacher (0: off).
        lpips, lpips_weight: LPIPS-VGG16 from local weights files (the anchor's perceptual loss), or ``None``.
        discriminator, disc_weight, disc_start, gen_loss: the adversarial term (anchor: PatchGAN, 0.1, 0, hinge).
        bn_eps, bn_momentum: the BatchNorm's (1e-4, 0.1).
        recon_eval_items: held-out images whose reconstruction PSNR :meth:`evaluate` reports.
        Other arguments: as :class:`vision.task.VisionFlowTask`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: VAVAE,
        teacher: nn.Module | None = None,
        align: Mapping[str, AlignmentTerm] | Alignment | None = None,
        vae_align_weight: float = 1.5,
        flow: FlowMatching | None = None,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        lpips_weight: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.1,
        disc_start: int = 0,
        gen_loss: str = "hinge",
        bn_eps: float = 1e-4,
        bn_momentum: float = 0.1,
        recon_eval_items: int = 256,
        **kwargs: Any,
    ):
        if not isinstance(tokenizer, VAVAE):
            raise TypeError(
                f"REPAETask tunes a KL autoencoder: task.tokenizer must be a vision.tokenizers.VAVAE, got "
                f"{type(tokenizer).__name__}"
            )
        if "cls_token" in kwargs:
            raise ValueError("REPAETask does not support REG's class token (task.cls_token): remove it")
        if int(getattr(model, "in_channels", tokenizer.z_channels)) != tokenizer.z_channels:
            raise ValueError(
                f"the diffusion model takes {model.in_channels} channels but the VAE's latent has "
                f"{tokenizer.z_channels}: set task.model.in_channels={tokenizer.z_channels}"
            )
        if teacher is None and perceptual_weight > 0:
            raise ValueError("REPAETask: the perceptual loss needs a teacher; pass task.teacher or perceptual_weight=0")
        if gen_loss not in GEN_LOSSES:
            raise ValueError(f"gen_loss must be one of {sorted(GEN_LOSSES)} (REPA-E: hinge), got {gen_loss!r}")
        for name, value in (
            ("kl_weight", kl_weight),
            ("disc_weight", disc_weight),
            ("vae_align_weight", vae_align_weight),
        ):
            if value < 0:
                raise ValueError(f"REPAETask {name} must be >= 0, got {value}")
        super().__init__(model, flow=flow, align=align, teacher=teacher, tokenizer=tokenizer, **kwargs)
        tokenizer.requires_grad_(True)  # a loaded tokenizer comes frozen (load_tokenizer); here it is trained
        if not hasattr(tokenizer, "stats_items"):
            tokenizer.register_buffer("stats_items", torch.zeros((), dtype=torch.long))
        self.latent_norm = LatentBatchNorm(tokenizer.z_channels, eps=bn_eps, momentum=bn_momentum)
        self.latent_norm.init_from(tokenizer.latent_mean, tokenizer.latent_std)
        self.register_buffer("init_items", tokenizer.stats_items.detach().clone())
        self.vae_align_weight, self.kl_weight = float(vae_align_weight), float(kl_weight)
        self.perceptual = EncoderPerceptualLoss(self.teacher) if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.lpips, self.lpips_weight = lpips, float(lpips_weight)
        self.discriminator = discriminator
        self.disc_weight, self.disc_start, self.gen_loss = float(disc_weight), int(disc_start), gen_loss
        self.recon_eval_items = int(recon_eval_items)
        self.sync_statistics()

    # -- the BatchNorm statistics as the tokenizer's named state -----------------------------------------------------
    @torch.no_grad()
    def sync_statistics(self) -> None:
        """Copy the BatchNorm's running statistics into ``tokenizer.latent_mean``/``latent_std`` (decode, sampling)."""
        tok = self.tokenizer
        mean, std = self.latent_norm.statistics()
        tok.latent_mean.copy_(mean.to(tok.latent_mean))
        tok.latent_std.copy_(std.to(tok.latent_std))
        tok.stats_items.fill_(int(self.init_items) + int(self.latent_norm.items_seen))

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        self.sync_statistics()

    # -- one step ----------------------------------------------------------------------------------------------------
    def _reconstruction(self, x_rec: Tensor, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        rec = (x_rec - x).abs().mean()  # the anchor's F.l1_loss(mean)
        out = {"loss/l1": rec.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x_rec, x)
            rec = rec + self.perceptual_weight * p
            out["loss/perceptual"] = p.detach()
        if self.lpips is not None:
            lp = self.lpips(x_rec, x)
            rec = rec + self.lpips_weight * lp
            out["loss/lpips"] = lp.detach()
        return rec, out

    def _align_ctx(self, batch: dict[str, Any], feats: list, t: Tensor, cache: dict) -> VisionAlignContext:
        return VisionAlignContext(
            batch=batch, features=dict(zip(self._layers, feats, strict=True)), t=t, device=t.device, cache=cache
        )

    def _vae_alignment(self, ctx: AlignContext, step: int, zero: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``vae_align_weight * sum_terms raw_term`` (a term switched off by its schedule stays off)."""
        total, logs = zero, {}
        for name, term in self.alignment.terms.items():
            res = term(ctx, step)
            w = float(res["weight"])
            if w == 0.0:
                continue
            raw = res["loss"] / w  # res["loss"] = w * raw, differentiable (res["raw"] is detached)
            total = total + raw
            logs[f"loss/vae_{name}"] = res["raw"]
            if "cos" in res:
                logs[f"align/vae_{name}/cos"] = res["cos"]
        return self.vae_align_weight * total, logs

    def losses(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The step's losses, each routed to its own parameters, plus the tensors the tests inspect.

        Returns ``vae`` (reaches the VAE only), ``disc`` (the discriminator only), ``diffusion`` (the SiT and its
        projector only), their parts ``vae_align`` and ``flow``, the raw latent ``z``, its eval-normalised copy
        ``z_vae`` (what the VAE's REPA sees) and ``logs``.
        """
        x = batch.get("image", batch.get("x"))
        if x is None:
            raise KeyError(f"a REPA-E batch needs an 'image' or 'x' entry (pixels), got keys {sorted(batch)}")
        y_in = None
        if batch.get("y") is not None and self.num_classes > 0:
            y_in = batch["y"].long()
            check_labels(y_in, self.num_classes, batch.get("id"))
        model = self.model
        cache: dict[Any, Any] = {}  # teacher features shared by both passes

        # (a) the VAE: reconstruction, KL, GAN, and REPA through the frozen diffusion model
        x_rec, z, post = self.tokenizer(x, sample=True)  # z: raw posterior sample [B, C, h, w]
        rec, logs = self._reconstruction(x_rec, x)
        kl = post.kl().mean()  # anchor: sum over latent elements, mean over the batch
        logs["loss/kl"] = kl.detach()
        vae = rec + self.kl_weight * kl
        disc = x.new_zeros(())
        if self.discriminator is not None and step >= self.disc_start:
            g_loss, d_loss = gan_losses(self.discriminator, x, x_rec, gen_loss=self.gen_loss)
            vae = vae + self.disc_weight * g_loss
            disc = d_loss
            logs["loss/gan_g"], logs["loss/gan_d"] = g_loss.detach(), d_loss.detach()
        z_vae = self.latent_norm.frozen(z)  # running statistics: the VAE's gradient passes the BatchNorm here
        draw = self.flow.draw(z_vae)  # t and eps, reused by (b) as the anchor's time_input / noises
        vae_align = z.new_zeros(())
        if len(self.alignment) and self.vae_align_weight > 0:
            with _frozen(model, self.alignment):
                feats = model.forward_intermediates(draw.x_t, draw.t_in, y_in, self._layers)[1]
                vae_align, align_logs = self._vae_alignment(
                    self._align_ctx(batch, feats, draw.t, cache), step, vae_align
                )
            logs.update(align_logs)
            vae = vae + vae_align
        logs["loss/vae"] = vae.detach()

        # (b) the diffusion model on the detached latent, BatchNorm with batch statistics
        z_sit = self.latent_norm(z.detach())
        sample = FlowSample(
            z_sit, draw.eps, draw.t, draw.t_in, interpolate(z_sit, draw.eps, draw.t_in),
            velocity_target(z_sit, draw.eps), None, z_sit.shape[0],
        )  # fmt: skip
        drop = model.sample_label_drop(y_in) if hasattr(model, "sample_label_drop") else None
        pred, feats = model.forward_intermediates(sample.x_t, sample.t_in, y_in, self._layers, force_drop_ids=drop)
        flow = self.flow.loss(pred[:, : z_sit.shape[1]], sample.target, sample.x_t, sample.t_in)
        logs["loss/flow"] = flow.detach()
        diffusion = flow
        if len(self.alignment):
            align_loss, align_logs = self.alignment(self._align_ctx(batch, feats, sample.t, cache), step)
            if align_loss is not None:
                diffusion = diffusion + align_loss
            logs.update(align_logs)
        logs["bn/mean_abs"] = self.latent_norm.running_mean.abs().mean().detach()
        logs["bn/std_mean"] = self.latent_norm.running_var.add(self.latent_norm.eps).sqrt().mean().detach()
        return dict(
            vae=vae, disc=disc, diffusion=diffusion, vae_align=vae_align, flow=flow, z=z, z_vae=z_vae, logs=logs
        )

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        parts = self.losses(batch, step)
        return {**parts["logs"], "loss": parts["vae"] + parts["disc"] + parts["diffusion"]}

    # -- evaluation and export ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Any, out_dir: Path, step: int) -> dict[str, float]:
        """The generation metrics of :class:`VisionFlowTask`, the tuned VAE's reconstruction PSNR on held-out images,
        and the export of the tuned VAE to ``<out_dir>/tokenizer``."""
        self.sync_statistics()
        metrics = super().evaluate(data, out_dir, step)
        ds = data.val if getattr(data, "val", None) is not None and len(data.val) > 0 else data.train
        n = min(len(ds), self.recon_eval_items)
        if n > 0:
            device = self.tokenizer.latent_mean.device
            x = torch.stack([ds[i].get("image", ds[i]["x"]) for i in range(n)]).to(device)
            r = torch.cat([self.tokenizer.decode(self.tokenizer.encode(c)) for c in x.split(64)]).clamp(-1, 1)
            metrics["recon/psnr"] = psnr(r.cpu(), x.cpu())
        path = export_tokenizer(self, Path(out_dir) / "tokenizer", step=step)
        print(f"[unirep] REPA-E tokenizer exported to {path}", flush=True)
        return metrics


# -- export: safetensors + JSON ----------------------------------------------------------------------------------
def _vavae_kwargs(tok: VAVAE) -> dict[str, Any]:
    """The constructor arguments of a :class:`VAVAE`, read off its modules (the strict load checks them)."""
    ch = tok.encoder.conv_in.out_channels
    mult, counts, n, width = [], [], 0, ch
    for layer in tok.encoder.down:
        if isinstance(layer, ResBlock):
            n, width = n + 1, layer.conv2.out_channels
        elif isinstance(layer, Downsample):
            mult.append(width // ch)
            counts.append(n)
            n = 0
    mult.append(width // ch)
    counts.append(n)
    if len(set(counts)) != 1 or counts[0] == 0:
        raise ValueError(f"cannot read the VAVAE's num_res_blocks from its encoder (blocks per level {counts})")
    return dict(
        in_channels=int(tok.in_channels),
        ch=int(ch),
        ch_mult=[int(m) for m in mult],
        num_res_blocks=int(counts[0]),
        z_channels=int(tok.z_channels),
        sample_latents=bool(tok.sample_latents),
        eps=float(tok.eps),
    )


def export_tokenizer(source: REPAETask | Tokenizer, out_dir: str | os.PathLike, step: int | None = None) -> Path:
    """Write ``tokenizer.safetensors`` + ``tokenizer.json`` to ``out_dir`` (atomically: a temporary folder renamed).

    ``source`` is a :class:`REPAETask` (its BatchNorm statistics become the tokenizer's ``latent_mean``/``latent_std``
    and are stored as ``latent_norm/*``) or a :class:`VAVAE` as it is.
    """
    from safetensors.torch import save_file

    norm = None
    if isinstance(source, REPAETask):
        source.sync_statistics()
        tok, norm = source.tokenizer, source.latent_norm
    else:
        tok = source
    if not isinstance(tok, VAVAE):
        raise TypeError(f"export_tokenizer writes a VAVAE, got {type(tok).__name__}")
    tensors = {f"tokenizer/{k}": v for k, v in tok.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "target": f"{type(tok).__module__}.{type(tok).__qualname__}",
        "kwargs": _vavae_kwargs(tok),
        "step": step,
        "normalisation": {"kind": "channel statistics", "latent_std": "as fitted"},
    }
    if norm is not None:
        tensors.update({f"latent_norm/{k}": v for k, v in norm.state_dict().items()})
        meta["normalisation"] = {
            "kind": "BatchNorm2d running statistics (REPA-E)",
            "affine": False,
            "eps": norm.eps,
            "momentum": norm.momentum,
            "latent_mean": "running_mean",
            "latent_std": "sqrt(running_var + eps)",
        }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(out.name + f".tmp-{os.getpid()}"), out.with_name(out.name + f".old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / "tokenizer.safetensors")
    )
    (tmp / "tokenizer.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_exported_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer :func:`export_tokenizer` wrote to ``path``, frozen and in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_file, tensor_file = path / "tokenizer.json", path / "tokenizer.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(
            f"{path} is not an exported tokenizer (needs tokenizer.json and tokenizer.safetensors): export one with "
            f"`unirep-train experiment=vision/repae` (written at evaluation) or `python -m vision.repae <checkpoint> "
            f"<out>`"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT!r}")
    module, _, name = str(meta["target"]).rpartition(".")
    if not module.startswith(("vision.", "unirep.", "molecular.")):  # never import a module a file names at will
        raise ValueError(f"{meta_file}: target {meta['target']!r} is not a tokenizer class of this project")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise TypeError(f"{meta_file}: target {meta['target']} is not a Tokenizer class")
    tok = cls(**meta["kwargs"])
    tensors = load_file(str(tensor_file))
    state = {k[len("tokenizer/") :]: v for k, v in tensors.items() if k.startswith("tokenizer/")}
    if "stats_items" in state and not hasattr(tok, "stats_items"):
        tok.register_buffer("stats_items", torch.zeros((), dtype=torch.long))
    try:
        tok.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{tensor_file} does not fit {meta['target']}({meta['kwargs']}): {err}") from None
    tok.requires_grad_(False)
    return tok.eval()


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the tuned VAE of a ``repae`` training checkpoint (or run folder: its newest checkpoint)."""
    from unirep.train import load_task

    task, _ = load_task(str(checkpoint), ema=True)
    if not isinstance(task, REPAETask):
        raise TypeError(f"{checkpoint} is a checkpoint of {type(task).__name__}, not of REPAETask")
    return export_tokenizer(task, out_dir)


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export the VAE of a REPA-E checkpoint as a tokenizer folder.")
    parser.add_argument("checkpoint", help="a repae run folder or checkpoints/step_N folder")
    parser.add_argument("out", help="the folder to write (tokenizer.safetensors + tokenizer.json)")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out))


if __name__ == "__main__":
    _main()
