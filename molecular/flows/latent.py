"""GeoLDM-style latent flow: flow matching on the latents of an equivariant VAE, samples decoded to structures.

GeoLDM (Xu et al. 2023, ``MinkaiXu/GeoLDM``) generates in the latent space of a VAE whose per-atom latent has an
equivariant coordinate part ``z_x[N, 3]`` and an invariant feature part ``z_h[N, k]``
(:class:`molecular.tokenizers.geoldm.EquivariantVAE`, frozen here). This task learns a flow on the joint state
``[z_x, z_h]`` (``[T, 3 + k]``) with one E(3)-equivariant network (equivariant velocity for ``z_x``, invariant for
``z_h``) through ``unirep.flow.FlowMatching.objective`` (one time per molecule, per-molecule mean loss); the prior is
the task's coordinate prior for ``z_x`` (zero CoM; Kabsch-aligned to ``z_x`` when ``align_prior``) and N(0, I) for
``z_h`` (normalised with statistics fitted on the first training batch). Sampling integrates the flow and **decodes**
the final latents with the VAE decoder: coordinates always, atom types too for unconditional generation.

- conditional (conformers; the VAE and the flow see the molecular graph): evaluated like the conformer flow, on the
  decoded structures (COV/MAT, validity, chirality corrected post hoc);
- unconditional (``conditional=False``; GeoLDM's task): :meth:`LatentFlowTask.sample_unconditional` draws atom
  counts from the training histogram, decodes coordinates and atom types, perceives bonds and reports the share of
  structures rdkit can sanitise.

The previous ``latent_flow`` (the local autoencoder's codes as extra channels next to explicit coordinates, whose
sampled latents were thrown away) is gone: it was a coordinate flow with an extra channel.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from molecular.data import GraphBatch
from unirep.flow import FlowMatching

from ..tokenizers.geoldm import EquivariantVAE, load_vae, unconditional_view
from .paths import kabsch_align
from .task import ConformerFlowTask

__all__ = ["LatentFlowTask", "load_vae"]


class LatentFlowTask(ConformerFlowTask):
    """Flow on the frozen VAE's per-atom latents ``[z_x, z_h]``; samples go through the decoder.

    Args:
        model: velocity network with ``latent_dim`` equal to the VAE's (``num_atom_features=1`` when unconditional).
        vae: the frozen :class:`EquivariantVAE` (:func:`load_vae` in configs).
        other arguments: as :class:`ConformerFlowTask` (``bridge_noise`` and ``loss`` are not used: plain flow
            matching on the latents).
    """

    def __init__(self, model: nn.Module, vae: EquivariantVAE, **kwargs):
        if kwargs.get("teacher") is not None or kwargs.get("align"):
            raise ValueError("LatentFlowTask takes no teacher or alignment: use molecular/conformer_repa for alignment")
        kwargs["bridge_noise"] = 0.0  # plain flow matching on the latents (no bridge noise, FlowMatching's loss)
        super().__init__(model, **kwargs)
        if getattr(model, "latent_dim", None) != vae.latent_dim:
            raise ValueError(
                f"velocity network latent_dim={getattr(model, 'latent_dim', None)} but the VAE's invariant latent has "
                f"{vae.latent_dim} channels: set task.model.latent_dim={vae.latent_dim}"
            )
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae
        self.flow = FlowMatching(self.path.flow.time_dist, self.path.flow.mean, self.path.flow.std, self.time_shift)
        k = vae.latent_dim
        self.register_buffer("z_mean", torch.zeros(k))
        self.register_buffer("z_std", torch.ones(k))
        self.register_buffer("stats_ready", torch.tensor(False))
        self.register_buffer("atom_count_hist", torch.zeros(256))  # training atom counts (unconditional sampling)

    def train(self, mode: bool = True) -> LatentFlowTask:
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    def _view(self, batch):
        return batch if self.vae.conditional else unconditional_view(batch)

    @torch.no_grad()
    def latents(self, batch) -> Tensor:
        """``[z_x, (mu_h - mean) / std]`` of the clean structures ``[T, 3 + k]`` (noiseless encoder means)."""
        z_x, mu, _ = self.vae.encode(batch)
        if not bool(self.stats_ready):
            self.z_mean.copy_(mu.mean(0))
            self.z_std.copy_(mu.std(0).clamp_min(1e-3))
            self.stats_ready.fill_(True)
        return torch.cat([z_x, (mu - self.z_mean) / self.z_std], dim=1)

    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        bidx, n_graphs = batch.batch, batch.num_graphs
        counts = torch.bincount(batch.num_atoms.clamp_max(255), minlength=256).to(self.atom_count_hist)
        self.atom_count_hist += counts
        s = self.latents(batch).to(batch.positions.dtype)
        eps_x = self.prior.sample(batch, dtype=s.dtype)
        if self.path.align_prior:
            eps_x = kabsch_align(eps_x, s[:, :3], bidx, n_graphs)
        eps = torch.cat([eps_x, torch.randn_like(s[:, 3:])], dim=1)
        view = self._view(batch)

        def model_fn(sample):
            v, v_z = self.model(view, sample.x_t[:, :3], sample.t_in, sample.x_t[:, 3:])
            return torch.cat([v, v_z], dim=1)

        res = self.flow.objective(s, model_fn, eps=eps, batch=bidx, num_items=n_graphs)
        k = 3
        with torch.no_grad():
            err = (res.pred - res.sample.target) ** 2
            logs = {"loss/coord_latent": err[:, :k].mean(), "loss/feature_latent": err[:, k:].mean()}
        return {"loss": res.loss, "loss/flow": res.loss.detach(), **logs}

    # joint state [T, 3 + k]: coordinate latent then feature latent
    def _initial_state(self, batch, generator: torch.Generator) -> Tensor:
        x1 = self.prior.sample(batch, generator=generator, dtype=torch.float32)
        z1 = torch.randn(x1.shape[0], self.vae.latent_dim, generator=generator).to(x1.device)
        return torch.cat([x1, z1], dim=1)

    def _velocity_fn(self, batch) -> Callable[[Tensor, Tensor], Tensor]:
        view = self._view(batch)

        def fn(s: Tensor, t: Tensor) -> Tensor:
            v, v_z = self.model(view, s[:, :3], t, s[:, 3:])
            return torch.cat([v, v_z], dim=1)

        return fn

    def decode(self, batch, state: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE decoder on a sampled latent state: ``(x[T, 3], type_logits[T, num_types])``."""
        z_h = state[:, 3:] * self.z_std + self.z_mean
        return self.vae.decode(batch, state[:, :3].contiguous(), z_h)

    def _decode(self, batch, state: Tensor) -> Tensor:
        return self.decode(batch, state)[0]

    @torch.no_grad()
    def sample_unconditional(
        self, out_dir: str | Path, num: int, seed: int, steps: int | None = None, num_atoms: Sequence[int] | None = None
    ) -> dict:
        """GeoLDM's unconditional generation: atom counts, latents, decoded coordinates and atom types.

        Writes ``unconditional.extxyz`` and returns the share of structures whose perceived bonds sanitise in rdkit.
        """
        from ase import Atoms
        from ase.io import write
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdDetermineBonds

        from molecular.conformers.generate import SUPPORTED_ELEMENTS

        if self.vae.conditional:
            raise ValueError("unconditional sampling needs an unconditional VAE (task.vae.conditional=false)")
        gen = torch.Generator().manual_seed(int(seed))
        if num_atoms is None:
            hist = self.atom_count_hist.double()
            if hist.sum() == 0:
                raise ValueError("no training atom counts recorded: pass num_atoms=[...]")
            num_atoms = torch.multinomial(hist / hist.sum(), num, replacement=True, generator=gen).tolist()
        counts = torch.tensor(list(num_atoms))
        device = next(self.model.parameters()).device
        n = int(counts.sum())
        bidx = torch.repeat_interleave(torch.arange(len(counts)), counts)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        batch = GraphBatch(
            numbers=torch.ones(n, dtype=torch.long),
            positions=torch.zeros(n, 3),
            batch=bidx,
            ptr=ptr,
            atom_features=torch.ones(n, 1),
            bond_index=torch.zeros(2, 0, dtype=torch.long),
            bond_types=torch.zeros(0, dtype=torch.long),
        ).to(device)
        s1 = self._initial_state(batch, gen).to(device)
        state = self._integrate(batch, s1, self.sample_steps if steps is None else steps, self.sampler, gen)
        x, logits = self.decode(batch, state)
        x, types = x.cpu().double().numpy(), logits.argmax(-1).cpu().numpy()
        frames, valid = [], []
        table = Chem.GetPeriodicTable()
        RDLogger.DisableLog("rdApp.*")
        for g in range(len(counts)):
            a, b = int(ptr[g]), int(ptr[g + 1])
            numbers = [table.GetAtomicNumber(SUPPORTED_ELEMENTS[int(k)]) for k in types[a:b]]
            frames.append(Atoms(numbers=numbers, positions=x[a:b]))
            rw = Chem.RWMol()
            for z in numbers:
                rw.AddAtom(Chem.Atom(z))
            conf = Chem.Conformer(len(numbers))
            for i, p in enumerate(x[a:b]):
                conf.SetAtomPosition(i, p.tolist())
            mol = rw.GetMol()
            mol.AddConformer(conf)
            try:
                rdDetermineBonds.DetermineBonds(mol)
                Chem.SanitizeMol(mol)
                valid.append(len(Chem.GetMolFrags(mol)) == 1)
            except Exception:  # no bond-order assignment exists: not a molecule
                valid.append(False)
        RDLogger.EnableLog("rdApp.*")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write(out_dir / "unconditional.extxyz", frames, format="extxyz")
        res = {"num_structures": len(frames), "valid_molecule": float(np.mean(valid)), "num_atoms": counts.tolist()}
        (out_dir / "unconditional.json").write_text(json.dumps(res, indent=1))
        return res

    def extra_repr(self) -> str:
        return f"latent_dim={self.vae.latent_dim}, conditional={self.vae.conditional}"
