"""Partially latent protein flow (La-Proteina-style): flow matching jointly on explicit C-alpha coordinates and the
per-residue latents of the SLAE-style autoencoder, decoded to all atoms.

After La-Proteina (Geffner et al. 2025, "La-Proteina: atomistic protein generation via partially latent flow
matching", NVIDIA ``la-proteina``): the backbone is generated explicitly (C-alpha coordinates, in nm there, in units
of ``ca_scale`` Å here), everything else (sequence, side chains, backbone atoms) through a small per-residue latent
that the autoencoder's decoder turns into atoms given the generated trace. Differences, stated: one flow time for
both parts (La-Proteina samples separate times and schedules), an E(3)-equivariant graph network over residues
(EGNN, Satorras et al. 2021) instead of its pair-biased transformer, a zero-centre-of-mass Gaussian prior on the trace.

State per residue ``s = [x / ca_scale, z]`` (``[R, 3 + L]``), conventions of :mod:`unirep.flow` (t = 0 data,
t = 1 noise, velocity target ``eps - x``) through :meth:`unirep.flow.FlowMatching.objective`. The velocity network
:class:`ResidueVelocityNet` is equivariant in the trace and invariant in the latents (tested in float64); its
hidden residue tokens after every layer (``forward_intermediates``) are what REPA-style alignment reads: an
:class:`unirep.align.AlignmentTerm` with a :class:`unirep.align.TeacherTarget` on the environment embeddings of
:mod:`molecular.proteins.environments` (the clean protein's residues).

Evaluation decodes samples to all atoms and measures validity (:func:`structure_validity`: bond lengths and angles
against Engh & Huber ideals, C-alpha spacing, clashes, Ramachandran plausibility against the training residues'
torsions) and diversity (pairwise C-alpha RMSD), with the same numbers for real held-out crops as the reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from unirep.align import AlignContext, Alignment, AlignmentTerm
from unirep.flow import FlowMatching, sample_ode
from unirep.intermediates import feature_take_indices
from unirep.nn import timestep_embedding
from unirep.tokens import TokenSet, segment_mean, segment_sum
from unirep.train import Task

from .constants import ATOM37, ATOM37_INDEX, ATOM37_MASK, RESIDUES, UNK
from .residues import ProteinBatch, backbone_torsions, kabsch_rmsd
from .slae import ProteinAutoencoder

__all__ = [
    "ResidueVelocityNet",
    "ProteinFlowTask",
    "load_autoencoder",
    "residue_skeleton",
    "structure_validity",
    "diversity",
    "IDEAL_BONDS",
    "IDEAL_ANGLES",
    "RamachandranReference",
    "flow_tiny",
    "flow_small",
]


def _remove_mean(x: Tensor, batch: Tensor, n: int) -> Tensor:
    return x - segment_mean(x, batch, n)[batch]


def _full_pairs(batch: Tensor) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``i != j`` of residues of the same protein."""
    i, j = torch.meshgrid(
        torch.arange(batch.numel(), device=batch.device),
        torch.arange(batch.numel(), device=batch.device),
        indexing="ij",
    )
    keep = (batch[i] == batch[j]) & (i != j)
    return i[keep], j[keep]


class _EGNNLayer(nn.Module):
    """E(n)-equivariant layer (Satorras et al. 2021): messages from invariants, coordinates moved along differences."""

    def __init__(self, hidden: int, edge_dim: int):
        super().__init__()
        self.msg = nn.Sequential(
            nn.Linear(2 * hidden + 1 + edge_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.coord = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        nn.init.zeros_(self.coord[-1].weight)  # start as the identity map on coordinates
        nn.init.zeros_(self.coord[-1].bias)

    def forward(self, h: Tensor, x: Tensor, i: Tensor, j: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        diff = x[i] - x[j]  # [P, 3]
        d2 = (diff**2).sum(-1, keepdim=True)
        m = self.msg(torch.cat([h[i], h[j], d2, e], -1))  # [P, H]
        n = h.shape[0]
        deg = segment_sum(torch.ones_like(d2), i, n).clamp_min(1)
        x = x + segment_sum(diff / (d2.sqrt() + 1.0) * self.coord(m), i, n) / deg
        h = h + self.node(torch.cat([self.norm(h), segment_sum(m, i, n) / deg], -1))
        return h, x


class ResidueVelocityNet(nn.Module):
    """Velocity of the joint state: ``(batch, x_t[R, 3], t[R], z_t[R, L]) -> (v_x[R, 3], v_z[R, L])``.

    Node inputs are invariant (the latents, the flow time, the residue's position in its chain); edges carry the
    squared distance and the sequence separation; ``v_x = x_L - x_0`` is E(3)-equivariant, ``v_z`` invariant.
    """

    def __init__(self, latent_dim: int, hidden: int = 64, num_layers: int = 4, edge_dim: int = 16):
        super().__init__()
        self.latent_dim, self.hidden = latent_dim, hidden
        self.embed = nn.Linear(latent_dim + 2 * hidden, hidden)
        self.sep = nn.Embedding(66, edge_dim)  # separation -32..32 within a chain, 65 = other chain
        self.layers = nn.ModuleList([_EGNNLayer(hidden, edge_dim) for _ in range(num_layers)])
        self.out_z = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim)
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def feature_dim(self, index: int) -> int:
        return self.hidden

    def forward_intermediates(
        self, batch: ProteinBatch, x_t: Tensor, t: Tensor, z_t: Tensor, indices: int | Sequence[int] | None = None
    ) -> tuple[tuple[Tensor, Tensor], list[TokenSet]]:
        """Velocities and the hidden residue tokens at ``indices`` (0 = embedded input, k = after layer k)."""
        take = feature_take_indices(self.num_layers, indices, "ResidueVelocityNet")
        rb, n = batch.residue_batch, batch.num_graphs
        pos_emb = timestep_embedding(batch.residue_position.to(x_t.dtype), self.hidden).to(x_t.dtype)
        t_emb = timestep_embedding(t.to(x_t.dtype) * 1000.0, self.hidden).to(x_t.dtype)
        h = self.embed(torch.cat([z_t, t_emb, pos_emb], -1))
        i, j = _full_pairs(rb)
        sep = (batch.residue_position[j] - batch.residue_position[i]).clamp(-32, 32) + 32
        sep = torch.where(batch.residue_chain[i] == batch.residue_chain[j], sep, torch.full_like(sep, 65))
        e = self.sep(sep).to(x_t.dtype)
        x = x_t
        states = [h]
        for layer in self.layers:
            h, x = layer(h, x, i, j, e)
            states.append(h)
        v_x = _remove_mean(x - x_t, rb, n)
        v_z = self.out_z(h)
        feats = [TokenSet(states[k], rb, x_t, n) for k in take]
        return (v_x, v_z), feats

    def forward(self, batch: ProteinBatch, x_t: Tensor, t: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_intermediates(batch, x_t, t, z_t, [])[0]


def flow_tiny(latent_dim: int = 4) -> ResidueVelocityNet:
    return ResidueVelocityNet(latent_dim, hidden=16, num_layers=2, edge_dim=8)


def flow_small(latent_dim: int = 8) -> ResidueVelocityNet:
    return ResidueVelocityNet(latent_dim, hidden=96, num_layers=5, edge_dim=16)


def load_autoencoder(checkpoint: str) -> ProteinAutoencoder:
    """The EMA autoencoder of a ``protein/slae`` run (a run folder or a ``step_N`` checkpoint), frozen."""
    from unirep.train import find_checkpoint, load_task

    if find_checkpoint(checkpoint) is None:
        raise FileNotFoundError(
            f"no autoencoder checkpoint at {checkpoint}: train it first with `unirep-train experiment=protein/slae` "
            f"(or point task.autoencoder.checkpoint at its run folder)"
        )
    task, _ = load_task(checkpoint, ema=True, device="cpu", trust_config=True)
    return task.model


def residue_skeleton(lengths: Sequence[int], device=None) -> ProteinBatch:
    """A batch of single-chain proteins with the given residue counts and no atoms (what sampling decodes into)."""
    lengths = [int(n) for n in lengths]
    r = torch.as_tensor(lengths, device=device)
    rb = torch.arange(len(lengths), device=device).repeat_interleave(r)
    return ProteinBatch(
        numbers=torch.zeros(0, dtype=torch.long, device=device),
        positions=torch.zeros(0, 3, device=device),
        batch=torch.zeros(0, dtype=torch.long, device=device),
        ptr=torch.zeros(len(lengths) + 1, dtype=torch.long, device=device),
        ids=[f"sample{k}" for k in range(len(lengths))],
        atom_residue=torch.zeros(0, dtype=torch.long, device=device),
        atom37_slot=torch.zeros(0, dtype=torch.long, device=device),
        residue_batch=rb,
        residue_type=torch.full((int(r.sum()),), UNK, dtype=torch.long, device=device),
        residue_chain=rb.clone(),
        residue_position=torch.cat([torch.arange(n, device=device) for n in lengths]),
        ca_atom=torch.full((int(r.sum()),), -1, dtype=torch.long, device=device),
    )


# ---------------------------------------------------------------------------------------------------------------
# validity
# ---------------------------------------------------------------------------------------------------------------
# Engh & Huber (1991) backbone ideals: bond lengths (Å) and angles (degrees)
IDEAL_BONDS = {"N-CA": 1.458, "CA-C": 1.525, "C-O": 1.231, "C-N+1": 1.329, "CA-CB": 1.530}
IDEAL_ANGLES = {"N-CA-C": 111.2, "CA-C-N+1": 116.2, "C-N+1-CA+1": 121.7}
_VDW = {"C": 1.70, "N": 1.55, "O": 1.52, "S": 1.80}  # Bondi radii (Å)


class RamachandranReference:
    """The region of the (phi, psi) plane that holds ``mass`` of the reference residues' torsions (a periodic
    histogram with 10° bins, smoothed over the neighbouring bins): a sample's residue is plausible when its
    torsions fall inside."""

    def __init__(self, torsions_deg: np.ndarray, mass: float = 0.98, bins: int = 36):
        self.bins = bins
        hist, _, _ = np.histogram2d(torsions_deg[:, 0], torsions_deg[:, 1], bins=bins, range=[[-180, 180], [-180, 180]])
        smooth = sum(np.roll(np.roll(hist, a, 0), b, 1) for a in (-1, 0, 1) for b in (-1, 0, 1)) / 9.0
        order = np.sort(smooth.ravel())[::-1]
        cum = np.cumsum(order) / max(order.sum(), 1e-12)
        self.threshold = order[min(int(np.searchsorted(cum, mass)), len(order) - 1)]
        self.density = smooth

    def allowed(self, torsions_deg: np.ndarray) -> np.ndarray:
        idx = np.clip(((torsions_deg + 180.0) / (360.0 / self.bins)).astype(int), 0, self.bins - 1)
        return self.density[idx[:, 0], idx[:, 1]] >= self.threshold


def _angle(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    u, v = a - b, c - b
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp_min(1e-9)
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


@torch.no_grad()
def structure_validity(
    atom37: Tensor,
    mask: Tensor,
    residue_batch: Tensor,
    chain: Tensor,
    rama: RamachandranReference | None = None,
    clash_overlap: float = 0.4,
) -> dict[str, float]:
    """Validity of all-atom structures ``atom37[R, 37, 3]`` (mask ``[R, 37]``): mean absolute deviation of the
    backbone bond lengths (Å) and angles (°) from their ideals, the share of bonds within 0.1 Å, consecutive
    C-alpha spacing, heavy-atom clashes (van der Waals overlap above ``clash_overlap`` Å between residues at
    least two apart, or on different chains) per residue, and the share of residues in the Ramachandran region of
    ``rama``."""
    n_, ca_, c_, o_, cb_ = (ATOM37_INDEX[a] for a in ("N", "CA", "C", "O", "CB"))
    r = atom37.shape[0]
    idx = torch.arange(r, device=atom37.device)
    nxt = (idx + 1).clamp_max(r - 1)
    link = (idx < r - 1) & (chain[nxt] == chain) & (residue_batch[nxt] == residue_batch)
    out: dict[str, float] = {}
    bonds = {
        "N-CA": ((n_, idx), (ca_, idx), mask[:, n_] & mask[:, ca_]),
        "CA-C": ((ca_, idx), (c_, idx), mask[:, ca_] & mask[:, c_]),
        "C-O": ((c_, idx), (o_, idx), mask[:, c_] & mask[:, o_]),
        "C-N+1": ((c_, idx), (n_, nxt), link & mask[:, c_] & mask[nxt, n_]),
        "CA-CB": ((ca_, idx), (cb_, idx), mask[:, ca_] & mask[:, cb_]),
    }
    devs = []
    for name, ((sa, ia), (sb, ib), ok) in bonds.items():
        if ok.any():
            d = (atom37[ia, sa] - atom37[ib, sb]).norm(dim=-1)[ok]
            dev = (d - IDEAL_BONDS[name]).abs()
            out[f"bond_mae/{name}"] = float(dev.mean())
            devs.append(dev)
    if devs:
        out["bond_within_0.1"] = float((torch.cat(devs) < 0.1).float().mean())
    angles = {
        "N-CA-C": (atom37[:, n_], atom37[:, ca_], atom37[:, c_], mask[:, n_] & mask[:, ca_] & mask[:, c_]),
        "CA-C-N+1": (atom37[:, ca_], atom37[:, c_], atom37[nxt, n_], link),
        "C-N+1-CA+1": (atom37[:, c_], atom37[nxt, n_], atom37[nxt, ca_], link),
    }
    for name, (a, b, c, ok) in angles.items():
        if ok.any():
            out[f"angle_mae/{name}"] = float((_angle(a, b, c)[ok] - IDEAL_ANGLES[name]).abs().mean())
    if link.any():
        d_ca = (atom37[nxt, ca_] - atom37[:, ca_]).norm(dim=-1)[link]
        out["ca_ca_mae"] = float((d_ca - 3.80).abs().mean())
        out["ca_ca_within_0.2"] = float(((d_ca - 3.80).abs() < 0.2).float().mean())
    # clashes: heavy atoms of residues >= 2 apart in the same chain (or on different chains) overlapping by more than
    # 0.4 Å of their van der Waals radii (MolProbity's criterion); N/O pairs (hydrogen bonds) only below 2.5 Å
    vdw = torch.tensor([_VDW[name[0]] for name in ATOM37], device=atom37.device, dtype=atom37.dtype)
    polar = torch.tensor([name[0] in "NO" for name in ATOM37], device=atom37.device)
    clashes, residues = 0, 0
    for b in torch.unique(residue_batch):
        sel = torch.nonzero(residue_batch == b).squeeze(1)
        m = mask[sel]
        pos = atom37[sel][m]  # [A, 3]
        slot = torch.arange(len(ATOM37), device=atom37.device)[None].expand_as(m)[m]
        res_of = torch.arange(sel.numel(), device=atom37.device)[:, None].expand_as(m)[m]
        ch = chain[sel][:, None].expand_as(m)[m]
        d = torch.cdist(pos, pos)
        limit = vdw[slot][:, None] + vdw[slot][None] - clash_overlap
        hbond = polar[slot][:, None] & polar[slot][None]
        limit = torch.where(hbond, torch.full_like(limit, 2.5), limit)
        far = ((res_of[:, None] - res_of[None]).abs() >= 2) | (ch[:, None] != ch[None])
        clashes += int(((d < limit) & far).triu(1).sum())
        residues += sel.numel()
    out["clashes_per_residue"] = clashes / max(residues, 1)
    if rama is not None:
        tor, ok = backbone_torsions(atom37, mask, chain)
        both = ok.all(-1)
        if both.any():
            out["rama_allowed"] = float(rama.allowed(np.degrees(tor[both].cpu().numpy())).mean())
    return out


def diversity(ca: Tensor, residue_batch: Tensor) -> dict[str, float]:
    """Mean pairwise C-alpha RMSD (Å, after Kabsch) between samples of the same length."""
    items = [ca[residue_batch == b] for b in torch.unique(residue_batch)]
    values = [float(kabsch_rmsd(a, b)) for k, a in enumerate(items) for b in items[k + 1 :] if a.shape[0] == b.shape[0]]
    return {"pairwise_ca_rmsd": float(np.mean(values)) if values else float("nan")}


# ---------------------------------------------------------------------------------------------------------------
# task
# ---------------------------------------------------------------------------------------------------------------
class ProteinFlowTask(Task):
    """Partially latent flow matching on a frozen :class:`~molecular.proteins.slae.ProteinAutoencoder`.

    Args:
        model: the :class:`ResidueVelocityNet` (its ``latent_dim`` must be the autoencoder's).
        autoencoder: the frozen autoencoder (``load_autoencoder(checkpoint)`` in the recipes).
        ca_scale: Å per unit of the trace in the flow state (La-Proteina works in nm).
        time_dist, time_mean, time_std: training-time distribution (:class:`unirep.flow.FlowMatching`).
        align: alignment terms by name (``configs/align/*.yaml``, e.g. ``protein_repa``) or an
            :class:`unirep.align.Alignment`: REPA on the trunk's residue tokens; teacher targets read the clean
            :class:`ProteinBatch` (``input_key: null``).
        teacher: the frozen encoder a teacher target without its own encoder uses (a
            :class:`~molecular.proteins.environments.ResidueEnvironmentEncoder`).
        sample_steps: Euler steps of the ODE sampler; eval_samples: samples drawn in ``evaluate``.
    """

    def __init__(
        self,
        model: ResidueVelocityNet,
        autoencoder: ProteinAutoencoder,
        ca_scale: float = 10.0,
        time_dist: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        align: Mapping[str, AlignmentTerm] | Alignment | None = None,
        teacher: nn.Module | None = None,
        sample_steps: int = 100,
        eval_samples: int = 16,
        eval_max_items: int = 64,
    ):
        super().__init__()
        if model.latent_dim != autoencoder.latent_dim:
            raise ValueError(
                f"velocity network latent_dim={model.latent_dim} but the autoencoder has {autoencoder.latent_dim} "
                f"latent channels: set task.model.latent_dim={autoencoder.latent_dim}"
            )
        self.model = model
        autoencoder.requires_grad_(False)
        self.autoencoder = autoencoder.eval()
        self.ca_scale = float(ca_scale)
        self.flow = FlowMatching(time_dist, time_mean, time_std)
        self.teacher = teacher
        self.alignment = align if isinstance(align, Alignment) else Alignment(dict(align) if align else None)
        self.alignment.bind(model, teacher=teacher)
        self.sample_steps, self.eval_samples, self.eval_max_items = sample_steps, eval_samples, eval_max_items
        self.register_buffer("stats_ready", torch.tensor(False))
        self.register_buffer("length_hist", torch.zeros(512))
        self._latent_cache: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> ProteinFlowTask:
        super().train(mode)
        self.autoencoder.eval()
        return self

    @torch.no_grad()
    def latents(self, batch: ProteinBatch) -> Tensor:
        """Normalised autoencoder latents of the clean proteins ``[R, L]`` (memoised by content: the encoder is
        frozen and deterministic)."""
        keys = batch.item_digests()
        if not all(k in self._latent_cache for k in keys):
            if not bool(self.stats_ready):  # latent statistics from the first training batch when none were fitted
                if torch.allclose(self.autoencoder.latent_std, torch.ones_like(self.autoencoder.latent_std)):
                    z = self.autoencoder._encode(batch)
                    self.autoencoder.latent_mean.copy_(z.mean(0))
                    self.autoencoder.latent_std.copy_(z.std(0).clamp_min(1e-3))
                self.stats_ready.fill_(True)
            z = self.autoencoder.encode(batch)
            for g, key in enumerate(keys):
                self._latent_cache[key] = z[batch.residue_batch == g].detach().cpu()
        return torch.cat([self._latent_cache[k] for k in keys]).to(batch.positions.device)

    def state(self, batch: ProteinBatch) -> Tensor:
        ca = batch.ca_positions()
        x = _remove_mean(ca, batch.residue_batch, batch.num_graphs) / self.ca_scale
        return torch.cat([x, self.latents(batch).to(x.dtype)], -1).float()

    def forward(self, batch: ProteinBatch, step: int = 0) -> dict[str, Tensor]:
        rb, n = batch.residue_batch, batch.num_graphs
        counts = torch.bincount(torch.bincount(rb, minlength=n).clamp_max(511), minlength=512)
        self.length_hist += counts.to(self.length_hist)
        s = self.state(batch)
        eps = torch.randn_like(s)
        eps[:, :3] = _remove_mean(eps[:, :3], rb, n)  # zero-CoM prior on the trace
        layers = self.alignment.student_layers()

        def model_fn(sample):
            (v_x, v_z), feats = self.model.forward_intermediates(
                batch, sample.x_t[:, :3], sample.t_in, sample.x_t[:, 3:], layers
            )
            return torch.cat([v_x, v_z], -1), dict(zip(layers, feats, strict=True))

        res = self.flow.objective(s, model_fn, eps=eps, batch=rb, num_items=n)
        with torch.no_grad():
            err = (res.pred - res.sample.target) ** 2
        logs = {"loss/flow": res.loss.detach(), "loss/ca": err[:, :3].mean(), "loss/latent": err[:, 3:].mean()}
        loss = res.loss
        if len(self.alignment):
            ctx = AlignContext(batch, res.aux, t=res.sample.t, device=s.device)
            align_loss, align_logs = self.alignment(ctx, step)
            if align_loss is not None:
                loss = loss + align_loss
            logs.update(align_logs)
        logs["loss"] = loss
        return logs

    def on_step_end(self, step: int) -> None:
        self.alignment.on_step_end(self.model)

    # -- sampling -------------------------------------------------------------------------------------------
    def _velocity_fn(self, skeleton: ProteinBatch) -> Callable[[Tensor, Tensor], Tensor]:
        def fn(s: Tensor, t: Tensor) -> Tensor:
            t_res = t[skeleton.residue_batch] if t.numel() == skeleton.num_graphs else t.expand(s.shape[0])
            v_x, v_z = self.model(skeleton, s[:, :3], t_res, s[:, 3:])
            return torch.cat([v_x, v_z], -1)

        return fn

    @torch.no_grad()
    def generate(self, lengths: Sequence[int], seed: int = 0, steps: int | None = None) -> dict[str, Tensor]:
        """Sample proteins of the given lengths; returns the decoded ``atom37``, ``mask``, ``types``, ``ca`` and the
        skeleton batch."""
        device = self.autoencoder.latent_mean.device
        skeleton = residue_skeleton(lengths, device)
        g = torch.Generator().manual_seed(int(seed))
        s1 = torch.randn(int(sum(lengths)), 3 + self.model.latent_dim, generator=g).to(device)
        s1[:, :3] = _remove_mean(s1[:, :3], skeleton.residue_batch, skeleton.num_graphs)

        def project(s: Tensor) -> Tensor:
            s = s.clone()
            s[:, :3] = _remove_mean(s[:, :3], skeleton.residue_batch, skeleton.num_graphs)
            return s

        s0 = sample_ode(
            self._velocity_fn(skeleton), s1, steps=steps or self.sample_steps, project=project, batch_time=False
        )
        return self.decode(s0, skeleton)

    def decode(self, s: Tensor, skeleton: ProteinBatch) -> dict:
        """Decode a flow state through the autoencoder on its own trace: all atoms of the predicted residue types."""
        ca = s[:, :3] * self.ca_scale
        out = self.autoencoder.decode(
            s[:, 3:].to(self.autoencoder.latent_mean.dtype), skeleton, ca.to(self.autoencoder.latent_mean.dtype)
        )
        types = out["type_logits"].argmax(-1)
        mask = torch.as_tensor(ATOM37_MASK, device=types.device)[types]
        return {"atom37": out["atom37"], "mask": mask, "types": types, "ca": ca, "skeleton": skeleton}

    def _lengths(self, num: int, seed: int) -> list[int]:
        hist = self.length_hist.double()
        if hist.sum() == 0:
            return [16] * num
        g = torch.Generator().manual_seed(int(seed))
        return torch.multinomial(hist / hist.sum(), num, replacement=True, generator=g).clamp_min(3).tolist()

    @torch.no_grad()
    def evaluate(self, data, out_dir: str | Path, step: int) -> dict[str, float]:
        from .task import iterate_batches

        was = self.training
        self.eval()
        val = data.val if getattr(data, "val", None) is not None else data.train
        rama = self.ramachandran_reference(data.train)
        ref_rows, rec_rows, lengths = [], [], []
        for b in iterate_batches(val, 8, self.eval_max_items):
            b = b.to(self.autoencoder.latent_mean.device)
            x37, m37 = _atom37(b)
            ref_rows.append(structure_validity(x37, m37, b.residue_batch, b.residue_chain, rama))
            rec = self.decode(self.state(b).to(x37.dtype), b)  # the autoencoder's decoding of the true state
            rec_rows.append(structure_validity(rec["atom37"], rec["mask"], b.residue_batch, b.residue_chain, rama))
            lengths += torch.bincount(b.residue_batch, minlength=b.num_graphs).tolist()
        # pairs of samples per length, so diversity compares structures of equal length
        num = max(2, min(self.eval_samples, 2 * len(lengths)))
        chosen = [n for n in lengths[: num // 2] for _ in (0, 1)] if lengths else self._lengths(num, step)
        gen = self.generate(chosen, seed=step)
        sk = gen["skeleton"]
        metrics = {
            f"sample/{k}": v
            for k, v in structure_validity(gen["atom37"], gen["mask"], sk.residue_batch, sk.residue_chain, rama).items()
        }
        metrics.update({f"sample/{k}": v for k, v in diversity(gen["ca"], sk.residue_batch).items()})
        metrics.update({f"reference/{k}": v for k, v in _mean_rows(ref_rows).items()})
        metrics.update({f"autoencoder/{k}": v for k, v in _mean_rows(rec_rows).items()})
        self.train(was)
        folder = Path(out_dir) / "eval" / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        _write_samples(gen, folder / "samples")
        return metrics

    def ramachandran_reference(self, dataset) -> RamachandranReference:
        from .task import iterate_batches

        tors = []
        for b in iterate_batches(dataset, 16, 256):
            x37, m37 = _atom37(b)
            t, ok = backbone_torsions(x37, m37, b.residue_chain)
            tors.append(np.degrees(t[ok.all(-1)].cpu().numpy()))
        return RamachandranReference(np.concatenate(tors))

    @torch.no_grad()
    def sample(self, out_dir: str | Path, num: int, seed: int, lengths: Sequence[int] | None = None, **kwargs) -> dict:
        """``unirep-sample``: ``num`` proteins (lengths from the training distribution unless given) as PDB files."""
        gen = self.generate(
            list(lengths) if lengths else self._lengths(num, seed), seed=seed, steps=kwargs.get("steps")
        )
        paths = _write_samples(gen, Path(out_dir) / "samples")
        return {"num": len(paths), "files": [str(p) for p in paths]}


def _atom37(b: ProteinBatch) -> tuple[Tensor, Tensor]:
    from .residues import to_atom37

    return to_atom37(b.positions, b)


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}


def _write_samples(gen: dict, folder: Path) -> list[Path]:
    """One PDB per sample (atoms of the predicted residue types, in atom37 order)."""
    from .io import ProteinStructure, write_pdb

    folder.mkdir(parents=True, exist_ok=True)
    sk = gen["skeleton"]
    paths = []
    elements = {"C": 6, "N": 7, "O": 8, "S": 16}
    for b in range(sk.num_graphs):
        sel = torch.nonzero(sk.residue_batch == b).squeeze(1)
        coords, names, res_idx, res_names = [], [], [], []
        for k, r in enumerate(sel.tolist()):
            t = int(gen["types"][r])
            for slot in torch.nonzero(gen["mask"][r]).squeeze(1).tolist():
                coords.append(gen["atom37"][r, slot].double().cpu().numpy())
                names.append(ATOM37[slot])
                res_idx.append(k)
                res_names.append(RESIDUES[t] if t < len(RESIDUES) else "UNK")
        p = ProteinStructure(
            numbers=np.array([elements[n[0]] for n in names]),
            positions=np.array(coords),
            id=f"sample{b}",
            atom_names=np.array(names),
            residue_index=np.array(res_idx),
            residue_names=np.array(res_names),
            residue_ids=np.array(res_idx) + 1,
            chain_ids=np.array(["A"] * len(names)),
        )
        path = folder / f"sample_{b:03d}.pdb"
        write_pdb(p, path)
        paths.append(path)
    return paths
