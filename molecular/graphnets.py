"""Small graph potentials trained in the project, exposing per-atom features per layer for convergence studies.

Two architecturally different message-passing networks, trained on the same labelled data:

- :class:`SchNet` (Schütt et al. 2017, "SchNet: A continuous-filter convolutional neural network"): invariant,
  continuous-filter convolutions; the interaction blocks are ``torch_geometric.nn.models.schnet.InteractionBlock``
  (anchor: pyg-team/pytorch_geometric ``torch_geometric/nn/models/schnet.py``).
- :class:`PaiNN` (Schütt, Unke & Gastegger 2021, "Equivariant message passing for the prediction of tensorial
  properties and molecular spectra"; anchor: atomistic-machine-learning/schnetpack ``nn/representation/painn``):
  scalar and vector features with equivariant message and update blocks.

Neighbour graphs come from ``molecular.data`` (matscipy neighbour lists), never from pyg-lib/torch-cluster.
Energies are sums of per-atom outputs; forces are ``-dE/dr`` by autograd. Each model's ``forward_intermediates``
returns the per-atom scalar features after the embedding and after every interaction block as token sets.

:class:`MoleculeSet` builds the data (rdkit conformers of SMILES, Gaussian displacements, GFN2-xTB labels,
cached on disk) and :class:`GraphNetEncoder` wraps a model as an encoder that loads its checkpoint, or trains
itself in seconds when the checkpoint is missing (its held-out force MAE becomes its ``quality``).
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from molecular.data import (
    AtomsDataset,
    GraphBatch,
    collate_graphs,
    fit_atomic_energies,
    label_structures,
    species_index,
    structures_from_smiles,
    thermal_displacements,
    z_lookup,
)
from molecular.models import energy_forces_loss
from unirep.splits import split_indices
from unirep.tokens import TokenSet

__all__ = ["SchNet", "PaiNN", "MoleculeSet", "train_graphnet", "evaluate_forces", "GraphNetEncoder"]

log = logging.getLogger(__name__)


def _edges(batch: GraphBatch, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edge vectors ``[E, 3]`` (receiver minus sender, with periodic shifts), lengths ``[E]``, edge_index."""
    snd, rcv = batch.edge_index
    vec = positions[rcv] - positions[snd] + batch.shifts.to(positions.dtype)
    return vec, vec.norm(dim=-1), batch.edge_index


def _cosine_cutoff(r: Tensor, r_cut: float) -> Tensor:
    return 0.5 * (torch.cos(math.pi * r / r_cut) + 1.0) * (r < r_cut)


class _Potential(nn.Module, abc.ABC):
    """Shared parts: atom-type embedding over a ``z_table``, energy readout, forces by autograd."""

    def __init__(self, z_table: Sequence[int], hidden: int, r_max: float):
        super().__init__()
        self.z_table = [int(z) for z in z_table]
        self.register_buffer("z_lookup", z_lookup(self.z_table), persistent=False)
        self.embedding = nn.Embedding(len(self.z_table), hidden)
        self.readout = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.SiLU(), nn.Linear(hidden // 2, 1))
        self.hidden, self.r_max = hidden, float(r_max)
        # per-element reference energies and a scale, fitted on the training set (buffers: saved with the weights)
        self.register_buffer("atomic_energies", torch.zeros(len(self.z_table), dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    def species(self, numbers: Tensor) -> Tensor:
        return species_index(self.z_lookup, numbers, self.z_table, owner=type(self).__name__)

    @abc.abstractmethod
    def layers(self, batch: GraphBatch, positions: Tensor) -> list[Tensor]:
        """Per-atom features ``[T, hidden]`` after each interaction block, the last one read out."""

    def forward_intermediates(self, batch: GraphBatch, indices: Sequence[int] | None = None) -> list[TokenSet]:
        """Per-atom scalar features after the embedding (index 0) and after each interaction (1..L)."""
        feats = self.layers(batch, batch.positions.to(self.embedding.weight.dtype))
        idx = range(len(feats)) if indices is None else indices
        return [TokenSet(feats[i], batch.batch, batch.positions, batch.num_graphs) for i in idx]

    def forward(self, batch: GraphBatch, compute_forces: bool = True) -> dict[str, Tensor]:
        """``energy[B]`` in eV and ``forces[T, 3]`` in eV/Å."""
        pos = batch.positions.to(self.embedding.weight.dtype)
        if compute_forces:
            pos = pos.detach().requires_grad_(True)
        h = self.layers(batch, pos)[-1]
        atom_e = self.readout(h).squeeze(-1).double() * self.scale + self.atomic_energies[self.species(batch.numbers)]
        energy = torch.zeros(batch.num_graphs, dtype=atom_e.dtype, device=atom_e.device).index_add_(
            0, batch.batch, atom_e
        )
        out = {"energy": energy}
        if compute_forces:
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
            out["forces"] = -grad.double()
        return out


class SchNet(_Potential):
    """SchNet with torch_geometric's continuous-filter interaction blocks (residual updates, as in the paper)."""

    def __init__(
        self,
        z_table: Sequence[int] = (1, 6, 7, 8),
        hidden: int = 64,
        num_layers: int = 3,
        num_rbf: int = 32,
        r_max: float = 5.0,
    ):
        super().__init__(z_table, hidden, r_max)
        from torch_geometric.nn.models.schnet import GaussianSmearing, InteractionBlock

        self.rbf = GaussianSmearing(0.0, r_max, num_rbf)
        self.interactions = nn.ModuleList(InteractionBlock(hidden, num_rbf, hidden, r_max) for _ in range(num_layers))

    def layers(self, batch: GraphBatch, positions: Tensor) -> list[Tensor]:
        _, r, edge_index = _edges(batch, positions)
        h = self.embedding(self.species(batch.numbers))  # [T, F]
        attr = self.rbf(r)  # [E, num_rbf]
        out = [h]
        for block in self.interactions:
            h = h + block(h, edge_index, r, attr)
            out.append(h)
        return out


class _PaiNNMessage(nn.Module):
    def __init__(self, f: int, num_rbf: int, r_max: float):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(f, f), nn.SiLU(), nn.Linear(f, 3 * f))
        self.w = nn.Linear(num_rbf, 3 * f)
        self.f, self.r_max = f, r_max

    def forward(self, s: Tensor, v: Tensor, edge_index: Tensor, rbf: Tensor, r: Tensor, unit: Tensor):
        snd, rcv = edge_index
        x = self.phi(s)[snd] * self.w(rbf) * _cosine_cutoff(r, self.r_max)[:, None]  # [E, 3F]
        ds, dvv, dvs = x.split(self.f, dim=-1)  # [E, F] each
        dv = v[snd] * dvv[:, None, :] + unit[:, :, None] * dvs[:, None, :]  # [E, 3, F]
        s = s + torch.zeros_like(s).index_add_(0, rcv, ds)
        v = v + torch.zeros_like(v).index_add_(0, rcv, dv)
        return s, v


class _PaiNNUpdate(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.U = nn.Linear(f, f, bias=False)  # mixes vector channels: no bias keeps it equivariant
        self.V = nn.Linear(f, f, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * f, f), nn.SiLU(), nn.Linear(f, 3 * f))
        self.f = f

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        uv, vv = self.U(v), self.V(v)  # [T, 3, F]
        vnorm = torch.sqrt((vv**2).sum(1) + 1e-8)  # [T, F]; eps keeps the gradient finite at v = 0
        a_vv, a_sv, a_ss = self.mlp(torch.cat([s, vnorm], -1)).split(self.f, -1)
        return s + a_sv * (uv * vv).sum(1) + a_ss, v + a_vv[:, None, :] * uv


class PaiNN(_Potential):
    """PaiNN: scalar ``s[T, F]`` and vector ``v[T, 3, F]`` features; the exposed per-layer features are ``s``."""

    def __init__(
        self,
        z_table: Sequence[int] = (1, 6, 7, 8),
        hidden: int = 64,
        num_layers: int = 3,
        num_rbf: int = 20,
        r_max: float = 5.0,
    ):
        super().__init__(z_table, hidden, r_max)
        self.num_rbf = num_rbf
        self.messages = nn.ModuleList(_PaiNNMessage(hidden, num_rbf, r_max) for _ in range(num_layers))
        self.updates = nn.ModuleList(_PaiNNUpdate(hidden) for _ in range(num_layers))

    def layers(self, batch: GraphBatch, positions: Tensor) -> list[Tensor]:
        vec, r, edge_index = _edges(batch, positions)
        unit = vec / r[:, None]
        n = torch.arange(1, self.num_rbf + 1, device=r.device, dtype=r.dtype)
        rbf = torch.sin(n * math.pi * r[:, None] / self.r_max) / r[:, None]  # [E, num_rbf], PaiNN's sinc basis
        s = self.embedding(self.species(batch.numbers))
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        out = [s]
        for msg, upd in zip(self.messages, self.updates, strict=True):
            s, v = msg(s, v, edge_index, rbf, r, unit)
            s, v = upd(s, v)
            out.append(s)
        return out


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
class MoleculeSet:
    """Labelled small-molecule structures for training graph nets and for convergence studies.

    Structures: ETKDG conformers of ``smiles`` (MMFF-relaxed), each displaced ``num_displacements`` times with
    Gaussian noise of ``sigma`` Å, labelled with ``calculator`` (GFN2-xTB by default). The labelled set is cached
    under ``cache_dir`` (safetensors + JSON) keyed by every parameter, then split by structure with ``seed``.

    Implements the data protocol of :mod:`unirep.converge`: ``__len__``, ``__getitem__``, ``collate`` (a
    ``GraphBatch``), ``token_groups`` (atomic numbers) and ``fingerprint``.
    """

    def __init__(
        self,
        smiles: Sequence[str],
        num_confs: int = 2,
        num_displacements: int = 10,
        sigma: float = 0.05,
        seed: int = 0,
        calculator: str = "gfn2",
        r_max: float = 5.0,
        split: str = "test",
        fractions: Sequence[float] = (0.6, 0.1, 0.3),
        cache_dir: str | None = "data/cache/converge",
        limit: int | None = None,
    ):
        params = {
            "smiles": list(smiles),
            "num_confs": num_confs,
            "num_displacements": num_displacements,
            "sigma": sigma,
            "seed": seed,
            "calculator": calculator,
            "r_max": r_max,
        }
        self.key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        full = _load_or_build(params, self.key, cache_dir)
        names = ("train", "val", "test")
        if split not in (*names, "all"):
            raise ValueError(f"MoleculeSet(split={split!r}): use one of train, val, test, all")
        if split == "all":
            idx = list(range(len(full)))
        else:
            idx = split_indices(len(full), fractions, seed=seed)[names.index(split)]
        if limit is not None:
            idx = idx[: int(limit)]
        self.data = full.subset(idx)
        self.split, self.limit, self.fractions = split, limit, list(fractions)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]

    def collate(self, items: list) -> GraphBatch:
        return collate_graphs(items)

    def token_groups(self, i: int) -> Tensor:
        return self.data[i].numbers

    def fingerprint(self) -> str:
        return f"{self.key}-{self.split}-{self.fractions}-{self.limit}"

    @property
    def structures(self) -> list:
        return self.data.structures


def _load_or_build(params: dict[str, Any], key: str, cache_dir: str | None) -> AtomsDataset:
    path = Path(cache_dir) / key if cache_dir else None
    if path is not None and (path / "graphs.safetensors").exists():
        return AtomsDataset.load(path)
    t0 = time.time()
    confs = structures_from_smiles(params["smiles"], num_confs=params["num_confs"], seed=params["seed"])
    structures = []
    for k, s in enumerate(confs):
        structures += thermal_displacements(
            s,
            params["num_displacements"],
            params["sigma"],
            seed=params["seed"] * 100003 + k,
            prefix=f"{s.id or 'conf'}{k}",
        )
    structures = label_structures(structures, params["calculator"])
    ds = AtomsDataset(structures, params["r_max"], require_labels=True, name="MoleculeSet")
    log.info("labelled %d structures with %s in %.1f s", len(ds), params["calculator"], time.time() - t0)
    if path is not None:
        ds.save(path)
        (path / "params.json").write_text(json.dumps(params, indent=1))
    return ds


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def _fit_references(model: _Potential, data: AtomsDataset) -> None:
    """Least-squares per-element energies, and the force RMS as the output scale."""
    ref = fit_atomic_energies(data.structures, model.z_table)
    forces = np.concatenate([s.forces for s in data.structures])
    model.atomic_energies.copy_(torch.as_tensor(ref, dtype=torch.float64))
    model.scale.fill_(float(np.sqrt((forces**2).mean())))


def evaluate_forces(model: _Potential, data: Any, batch_size: int = 64) -> dict[str, float]:
    """Force MAE (eV/Å) and energy MAE per atom (eV) of a model on a labelled set."""
    model.eval()
    f_err, e_err, n_atoms, n_comp = 0.0, 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        b = collate_graphs([data[i] for i in range(start, min(len(data), start + batch_size))])
        out = model(b)
        f_err += float((out["forces"].detach() - b.forces).abs().sum())
        e_err += float(((out["energy"].detach() - b.energy).abs() / b.num_atoms).sum())
        n_comp += b.forces.numel()
        n_atoms += b.num_graphs
    return {"force_mae": f_err / n_comp, "energy_mae_per_atom": e_err / n_atoms}


def train_graphnet(
    model: _Potential,
    train: Any,
    val: Any | None = None,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    energy_weight: float = 1.0,
    forces_weight: float = 10.0,
) -> dict[str, float]:
    """Train on energies and forces (MSE in units of the force RMS) with AdamW and a cosine learning rate."""
    g = torch.Generator().manual_seed(seed)
    _fit_references(model, train.data if hasattr(train, "data") else train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    scale = float(model.scale)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train), (batch_size,), generator=g).tolist()
        b = collate_graphs([train[i] for i in idx])
        out = model(b)
        # MACE's weighted energy-forces loss (per-atom energy error) on force-RMS-scaled errors
        loss = energy_forces_loss(
            out["energy"], out["forces"], b.energy, b.forces, b.num_atoms, energy_weight, forces_weight, scale
        )["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
    model.eval()
    return evaluate_forces(model, val) if val is not None else {}


class GraphNetEncoder(nn.Module):
    """A project-trained graph potential as a frozen encoder (every layer exposed).

    Args:
        model: the network (built by hydra from a ``_target_``).
        checkpoint: folder with ``model.safetensors`` + ``meta.json``; loaded when present, written after training.
        train: ``None`` keeps the weights as they are (a randomly initialised floor when there is no checkpoint),
            or keyword arguments: ``data`` (keyword arguments of :class:`MoleculeSet`, split set here), ``steps``,
            ``lr``, ``batch_size``, ``seed``. The held-out force MAE on the ``val`` split becomes ``quality``.
        seed: initialisation seed (models differing only in seed are the same-architecture baseline).
    """

    def __init__(
        self, model: _Potential, checkpoint: str | None = None, train: dict[str, Any] | None = None, seed: int = 0
    ):
        super().__init__()
        self.model = model
        torch.manual_seed(seed)
        for m in self.model.modules():  # re-initialise from this seed: hydra built the model under another
            if m is not self.model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.quality: float | None = None
        self.meta: dict[str, Any] = {}
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and (ckpt / "model.safetensors").exists() and not self._stale(ckpt, train, seed):
            self._load(ckpt)
        elif train is not None:
            train = dict(train)
            data_kw = dict(train.pop("data"))
            self.model.train()
            t0 = time.time()
            metrics = train_graphnet(
                self.model,
                MoleculeSet(**data_kw, split="train"),
                MoleculeSet(**data_kw, split="val"),
                seed=seed,
                **train,
            )
            self.meta = {"seed": seed, "train": train, "data": data_kw, "seconds": time.time() - t0, **metrics}
            if ckpt is not None:
                self._save(ckpt)
        elif ckpt is not None:
            raise FileNotFoundError(
                f"graph-net checkpoint {ckpt} does not exist (no model.safetensors): train it "
                "(give `train:`) or fix the path"
            )
        self.quality = self.meta.get("force_mae")
        self.model.eval().requires_grad_(False)
        self.dim = self.model.hidden
        self.layer_names = ["embed"] + [f"interaction{i + 1}" for i in range(self._num_layers())]

    @staticmethod
    def _stale(path: Path, train: dict[str, Any] | None, seed: int) -> bool:
        """A checkpoint trained with other data, settings or seed than asked for is retrained, not reused."""
        if train is None or not (path / "meta.json").exists():
            return False
        meta = json.loads((path / "meta.json").read_text())
        train = json.loads(json.dumps(dict(train)))
        data_kw = train.pop("data", None)
        stale = meta.get("train") != train or meta.get("data") != data_kw or meta.get("seed") != seed
        if stale:
            log.warning("checkpoint %s was trained with other settings: retraining it", path)
        return stale

    def _num_layers(self) -> int:
        return len(getattr(self.model, "interactions", getattr(self.model, "messages", [])))

    def _save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f"model.safetensors.{os.getpid()}.tmp"
        save_model(self.model, str(tmp))  # handles SchNet's shared filter-network tensors (pyg shares them)
        os.replace(tmp, path / "model.safetensors")
        (path / "meta.json").write_text(json.dumps(self.meta, indent=1))

    def _load(self, path: Path) -> None:
        try:
            missing, unexpected = load_model(self.model, str(path / "model.safetensors"), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"checkpoint {path} does not fit {type(self.model).__name__}: {err}; was it trained with "
                "another architecture or size?"
            ) from err
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not fit {type(self.model).__name__}: missing {missing}, "
                f"unexpected {unexpected}; was it trained with another architecture or size?"
            )
        meta = path / "meta.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}

    def train(self, mode: bool = True) -> GraphNetEncoder:  # frozen encoder
        return super().train(False)

    def encode_layers(self, sample: GraphBatch) -> list[TokenSet]:
        # PaiNN's / SchNet's features need no gradient; forward_intermediates runs without autograd
        with torch.no_grad():
            return [t.detach() for t in self.model.forward_intermediates(sample)]

    def encode(self, sample: GraphBatch) -> TokenSet:
        return self.encode_layers(sample)[-1]
