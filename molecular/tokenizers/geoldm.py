"""GeoLDM-style equivariant VAE: an equivariant coordinate latent and an invariant feature latent per atom.

GeoLDM (Xu et al. 2023, "Geometric Latent Diffusion Models for 3D Molecule Generation", ``MinkaiXu/GeoLDM``): an
EGNN encoder maps a molecule ``(x, h)`` to per-atom latents ``z_x[N, 3]`` (equivariant: rotates with the input,
zero centre of mass) and ``z_h[N, k]`` (invariant); an EGNN decoder maps ``(z_x, z_h)`` back to coordinates and atom
types. The latent is regularised towards N(0, I) by a KL term (GeoLDM trains the VAE with a small KL weight, so
the latent stays close to the data scale); a diffusion / flow model then generates in latent space and its samples
are decoded.

Two modes:

- ``conditional=True`` (conformer generation): encoder and decoder also see the molecular graph (atom features and
  bond orders, the conditioning of the conformer flow), so the latent only has to carry the geometry; the decoder
  returns coordinates.
- ``conditional=False`` (unconditional generation, GeoLDM's setting): the decoder sees only the latents and also
  predicts atom types (cross-entropy over :data:`molecular.conformers.SUPPORTED_ELEMENTS`); edges are all pairs.

The coordinate latent gets Gaussian noise of fixed scale ``sigma_x`` while training (GeoLDM's fixed encoder
variance), the feature latent is sampled with the reparameterisation trick; KL terms are the closed forms.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from molecular.conformers.data import NUM_ATOM_FEATURES, NUM_BOND_TYPES
from molecular.conformers.generate import SUPPORTED_ELEMENTS
from unirep.tokens import segment_mean
from unirep.train import Task

__all__ = ["EquivariantVAE", "GeoVAETask", "geo_vae_small", "geo_vae_tiny", "load_vae", "unconditional_view"]


def unconditional_view(batch):
    """The batch without its molecular graph: constant atom features and no bonds (all pairs stay edges)."""
    return replace(
        batch,
        atom_features=torch.ones(batch.batch.shape[0], 1, device=batch.batch.device),
        bond_index=torch.zeros(2, 0, dtype=torch.long, device=batch.batch.device),
        bond_types=torch.zeros(0, dtype=torch.long, device=batch.batch.device),
    )


class _EGNN(nn.Module):
    """EGNN trunk: ``(batch, h_in[T, F], x[T, 3]) -> (h[T, H], x'[T, 3])`` (the conformer flow's layers)."""

    def __init__(self, in_dim: int, hidden: int, num_layers: int):
        super().__init__()
        from molecular.flows.egnn import EGNNLayer

        self.embed = nn.Linear(in_dim, hidden)
        self.edge_embed = nn.Embedding(NUM_BOND_TYPES, 16)
        self.layers = nn.ModuleList(EGNNLayer(hidden, 16, True) for _ in range(num_layers))

    def forward(self, batch, h_in: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        from molecular.flows.egnn import bond_edge_types, full_edges, remove_mean

        n = x.shape[0]
        edges = full_edges(batch.batch, batch.num_graphs)
        eattr = self.edge_embed(bond_edge_types(edges, batch.bond_index, batch.bond_types, n)).to(x.dtype)
        h = self.embed(h_in)
        x = remove_mean(x, batch.batch, batch.num_graphs)
        for layer in self.layers:
            h, x = layer(h, x, edges, eattr)
        return h, remove_mean(x, batch.batch, batch.num_graphs)


class EquivariantVAE(nn.Module):
    """Encoder ``(graph, x) -> (z_x, mu_h, logvar_h)`` and decoder ``(graph, z_x, z_h) -> (x, type logits)``.

    Args:
        latent_dim: ``k``, channels of the invariant latent ``z_h``.
        hidden, num_layers: EGNN width and depth of encoder and decoder.
        conditional: see the module docstring.
        sigma_x: fixed noise scale of the coordinate latent in training.
    """

    def __init__(
        self,
        latent_dim: int = 4,
        hidden: int = 64,
        num_layers: int = 4,
        conditional: bool = True,
        sigma_x: float = 0.1,
        num_atom_features: int = NUM_ATOM_FEATURES,
    ):
        super().__init__()
        self.latent_dim, self.conditional, self.sigma_x = latent_dim, conditional, sigma_x
        self.num_types = len(SUPPORTED_ELEMENTS)
        self.encoder = _EGNN(num_atom_features, hidden, num_layers)
        self.enc_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * latent_dim))
        dec_in = latent_dim + (num_atom_features if conditional else 0)
        self.decoder = _EGNN(dec_in, hidden, num_layers)
        self.type_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, self.num_types))

    def encode(self, batch, x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z_x[T, 3] zero CoM, mu_h[T, k], logvar_h[T, k])`` of the structures (``x`` defaults to positions).

        The encoder always sees the atom features (it encodes a known molecule); the decoder sees them only when
        ``conditional``.
        """
        x = batch.positions if x is None else x
        h, z_x = self.encoder(batch, batch.atom_features.to(x.dtype), x)
        mu, logvar = self.enc_head(h).chunk(2, dim=-1)
        return z_x, mu, logvar.clamp(-10.0, 5.0)

    def decode(self, batch, z_x: Tensor, z_h: Tensor) -> tuple[Tensor, Tensor]:
        """``(x[T, 3] zero CoM, type_logits[T, num_types])``; ``batch`` gives the graph (conditional) and atom count."""
        if self.conditional:
            h_in = torch.cat([z_h, batch.atom_features.to(z_h.dtype)], dim=-1)
            view = batch
        else:
            h_in, view = z_h, unconditional_view(batch)
        h, x = self.decoder(view, h_in, z_x)
        return x, self.type_head(h)

    def forward(self, batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Encode with noise, decode; the reconstruction and KL terms per molecule (means over molecules)."""
        from molecular.flows.egnn import remove_mean

        bidx, n = batch.batch, batch.num_graphs
        x = remove_mean(batch.positions, bidx, n)
        z_x, mu, logvar = self.encode(batch, x)
        noise_x = remove_mean(torch.randn_like(z_x), bidx, n)
        z_x_s = z_x + self.sigma_x * noise_x
        z_h = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        x_hat, logits = self.decode(batch, z_x_s, z_h)
        recon = segment_mean(((x_hat - x) ** 2).sum(-1), bidx, n).mean()
        # KL(N(z_x, sigma_x^2) || N(0, 1)) up to a constant: the mean's squared norm; closed form for z_h
        kl_x = segment_mean(0.5 * (z_x**2).sum(-1), bidx, n).mean()
        kl_h = segment_mean(0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(-1), bidx, n).mean()
        out = {"recon": recon, "kl_x": kl_x, "kl_h": kl_h, "x_hat": x_hat, "x": x}
        if not self.conditional:
            out["type_ce"] = nn.functional.cross_entropy(logits, batch.atom_types)
            out["type_acc"] = (logits.argmax(-1) == batch.atom_types).float().mean()
        return out


def geo_vae_tiny(latent_dim: int = 2, conditional: bool = True) -> EquivariantVAE:
    """Smoke tests: 2 layers of width 16."""
    return EquivariantVAE(latent_dim, 16, 2, conditional)


def geo_vae_small(latent_dim: int = 4, conditional: bool = True) -> EquivariantVAE:
    """CPU runs: 4 layers of width 64."""
    return EquivariantVAE(latent_dim, 64, 4, conditional)


class GeoVAETask(Task):
    """Trains the :class:`EquivariantVAE`: coordinate reconstruction + ``kl_weight`` KL (+ type CE, unconditional).

    Evaluation decodes the noiseless latents of held-out conformers and reports the reconstruction RMSD and the
    share of decoded structures that keep their bond graph.
    """

    def __init__(self, model: EquivariantVAE, kl_weight: float = 1e-3, type_weight: float = 1.0, eval_batches: int = 4):
        super().__init__()
        self.model, self.kl_weight, self.type_weight, self.eval_batches = model, kl_weight, type_weight, eval_batches

    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        out = self.model(batch)
        loss = out["recon"] + self.kl_weight * (out["kl_x"] + out["kl_h"])
        logs = {k: out[k].detach() for k in ("recon", "kl_x", "kl_h")}
        if "type_ce" in out:
            loss = loss + self.type_weight * out["type_ce"]
            logs.update({"type_ce": out["type_ce"].detach(), "type_acc": out["type_acc"].detach()})
        logs = {f"loss/{k}" if k in ("recon", "kl_x", "kl_h", "type_ce") else f"vae/{k}": v for k, v in logs.items()}
        logs["loss"] = loss
        return logs

    @torch.no_grad()
    def evaluate(self, data, out_dir: str | Path, step: int) -> dict[str, float]:
        import numpy as np

        from molecular.conformers import collate_molecules, keeps_bond_graph, with_coordinates

        ds = data.val if getattr(data, "val", None) is not None else data.train
        was = self.model.training
        self.model.eval()
        rmsd, valid = [], []
        device = next(self.model.parameters()).device
        for i in range(min(len(ds), 16 * self.eval_batches)):
            rec, pos, _, _ = ds[i]
            b = collate_molecules([ds[i]]).to(device)
            z_x, mu, _ = self.model.encode(b)
            x_hat, _ = self.model.decode(b, z_x, mu)
            x = (pos - pos.mean(0)).double().numpy()
            xh = x_hat.cpu().double().numpy()
            rmsd.append(float(np.sqrt(((xh - x) ** 2).sum(-1).mean())))
            valid.append(keeps_bond_graph(with_coordinates(rec.mol, xh)))
        self.model.train(was)
        return {"vae/recon_rmsd": float(np.mean(rmsd)), "vae/decoded_valid_graph": float(np.mean(valid))}


def load_vae(
    checkpoint: str | None, ema: bool = True, random_init: bool = False, latent_dim: int = 2, conditional: bool = True
) -> EquivariantVAE:
    """The VAE of a ``molecular/geoldm_vae`` run (``unirep.train.load_task``), or an untrained tiny one (smoke)."""
    if random_init:
        return geo_vae_tiny(latent_dim, conditional)
    from unirep.train import find_checkpoint, load_task

    if checkpoint is None or find_checkpoint(checkpoint) is None:
        raise FileNotFoundError(
            f"no VAE checkpoint at {checkpoint!r}: train one first with `unirep-train experiment=molecular/geoldm_vae` "
            "and pass task.vae.checkpoint=<its out_dir>"
        )
    task, _ = load_task(checkpoint, ema=ema)
    if not isinstance(task.model, EquivariantVAE):
        raise ValueError(f"checkpoint {checkpoint!r} holds a {type(task.model).__name__}, not an EquivariantVAE")
    return task.model
