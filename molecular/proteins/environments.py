"""Local protein environments: per-residue embeddings from atomistic encoders, capped fragments, linear probes.

After Bojan et al. 2025 ("Representing local protein environments with atomistic foundation models"): a
pretrained interatomic potential's per-atom features, read at a residue's atoms, describe that residue's local
chemical environment; linear probes show what the embedding knows (secondary structure, backbone torsions, the
identity of a residue whose own side chain is hidden).

- :class:`ResidueEnvironmentEncoder` wraps any encoder with ``encode_layers(sample) -> list[TokenSet]`` over atoms
  (``molecular.teachers.external`` CHGNet / DIEP / ANI / SO3LR, ``molecular.descriptors`` SOAP / ACSF, a MACE
  teacher, :class:`RandomAtomEncoder`) and returns tokens over residues. ``mode="full"``: the whole protein goes
  through the encoder once (its own cutoff bounds what each atom sees) and atom tokens are pooled per residue
  (:func:`~molecular.proteins.residues.pool_residues`: the CA token, or the mean of the residue's atoms).
  ``mode="fragment"``: one capped fragment per residue, the atoms within ``cutoff`` of its CA, bonds cut at the
  sphere capped with hydrogens along the cut bond (:func:`residue_fragment`), optionally with the residue's own
  side chain removed (``mask_side_chain``, CB capped by a hydrogen: a glycine-like centre), the CA token read.
- :func:`residue_labels` gives the probe targets per residue, :func:`linear_probes` fits logistic / ridge probes
  on one split and scores another (split by protein).

The encoder's output is an ordinary :class:`~unirep.tokens.TokenSet`, so ``unirep-converge`` compares residue
environments of many models with the same metrics (``configs/converge/protein_quick.yaml``; data:
:class:`~molecular.proteins.data.ProteinSet`, whose ``token_groups`` are the residue types).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from molecular.data import AtomicGraph, GraphBatch, Structure, collate_graphs, regraph
from unirep.tokens import TokenSet

from .constants import BACKBONE, NUM_RESIDUE_TYPES, UNK
from .io import ProteinStructure, protein_to_atom_array
from .residues import ProteinBatch, backbone_torsions, collate_proteins, pool_residues, to_atom37

__all__ = [
    "RandomAtomEncoder",
    "ResidueEnvironmentEncoder",
    "residue_fragment",
    "residue_labels",
    "linear_probes",
    "SSE_CLASSES",
    "environment_probe_study",
]

SSE_CLASSES = ("a", "b", "c")  # biotite's P-SEA: helix, strand, coil
# covalent radii (Å) for bond detection and the X-H length of the capping hydrogens
_RCOV = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 16: 1.05, 15: 1.07, 34: 1.20}
_XH = {6: 1.09, 7: 1.01, 8: 0.97, 16: 1.34, 15: 1.42, 34: 1.47}


def _as_proteins(sample: Any) -> list[ProteinStructure]:
    if isinstance(sample, ProteinStructure):
        return [sample]
    if isinstance(sample, list | tuple) and all(isinstance(p, ProteinStructure) for p in sample):
        return list(sample)
    raise TypeError(
        f"fragment mode needs ProteinStructure items (a list, as ProteinSet gives before collation), got "
        f"{type(sample).__name__}"
    )


class RandomAtomEncoder(nn.Module):
    """A randomly initialised strictly local encoder (the project's ACE-style density ->
    invariants -> MLP, :class:`molecular.tokenizers.local_ae.LocalEnvironmentEncoder`): the floor any learned
    embedding should beat. Seeded, so its features are reproducible."""

    def __init__(self, r_max: float = 5.0, dim: int = 64, seed: int = 0, z_table: Sequence[int] | None = None):
        super().__init__()
        from molecular.tokenizers.local_ae import DEFAULT_Z_TABLE, LocalEnvironmentEncoder

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = LocalEnvironmentEncoder(z_table or DEFAULT_Z_TABLE, r_max, channels=16, hidden=64, latent_dim=dim)
        torch.random.set_rng_state(gen_state)
        self.net.double()
        self.r_max, self.dim = float(r_max), dim
        self.layer_names = ["random"]
        self.cache_key = f"random-local-r{r_max}-d{dim}-s{seed}"
        self.requires_grad_(False)

    def encode_layers(self, sample: Any) -> list[TokenSet]:
        if isinstance(sample, GraphBatch):
            g = sample.radius_graph(self.r_max) if sample.edge_index is None else regraph(sample, self.r_max)
        else:
            structures = [sample] if isinstance(sample, Structure) else list(sample)
            g = collate_graphs([AtomicGraph.from_structure(s, self.r_max) for s in structures])
        with torch.no_grad():
            z = self.net(g.numbers, g.positions.double(), g.edge_index, g.shifts)
        return [TokenSet(z.float(), g.batch, g.positions.float(), g.num_graphs)]

    def encode(self, sample: Any) -> TokenSet:
        return self.encode_layers(sample)[0]


def residue_fragment(
    protein: ProteinStructure, residue: int, cutoff: float = 6.0, mask_side_chain: bool = False, cap: bool = True
) -> tuple[Structure, int]:
    """The capped environment of one residue: atoms within ``cutoff`` Å of its CA; returns the fragment and the
    index of the CA in it.

    Bonds (heavy-atom pairs closer than 1.2 x the sum of covalent radii) between a kept and a removed atom are
    capped with a hydrogen on the kept atom along the bond, at the element's X-H length; hydrogens whose heavy
    atom was removed go too. ``mask_side_chain`` removes the residue's own side chain (every atom but N, CA, C, O
    and their hydrogens H/HN/HA), so the CA's environment says nothing direct about the residue's identity.
    """
    ca = int(protein.atom_index("CA")[residue])
    if ca < 0:
        raise ValueError(f"{protein.source or protein.id}: {protein.residue_label(residue)} has no CA atom")
    pos, z = protein.positions, protein.numbers
    keep = np.linalg.norm(pos - pos[ca], axis=1) < cutoff
    if mask_side_chain:
        own = protein.residue_index == residue
        backbone = np.isin(protein.atom_names, (*BACKBONE, "H", "HN", "H1", "H2", "H3", "HA", "HA2", "OXT"))
        keep &= ~(own & ~backbone)
    kept, removed = np.nonzero(keep)[0], np.nonzero(~keep)[0]
    caps: list[np.ndarray] = []
    drop_h = np.zeros(len(z), dtype=bool)
    if cap and len(removed):
        near = removed[np.linalg.norm(pos[removed] - pos[ca], axis=1) < cutoff + 2.5]  # bonded partners are close
        if len(near):
            d = np.linalg.norm(pos[kept][:, None] - pos[near][None], axis=-1)  # [K, M]
            r_k = np.array([_RCOV.get(int(e), 0.8) for e in z[kept]])
            r_m = np.array([_RCOV.get(int(e), 0.8) for e in z[near]])
            bonded = d < 1.2 * (r_k[:, None] + r_m[None])
            heavy_k, heavy_m = z[kept] > 1, z[near] > 1
            for a, b in zip(*np.nonzero(bonded), strict=True):
                i, j = kept[a], near[b]
                if heavy_k[a] and heavy_m[b]:
                    u = (pos[j] - pos[i]) / np.linalg.norm(pos[j] - pos[i])
                    caps.append(pos[i] + _XH.get(int(z[i]), 1.09) * u)
                elif not heavy_k[a] and heavy_m[b]:
                    drop_h[i] = True  # a hydrogen whose heavy atom is gone
    keep &= ~drop_h
    index = np.nonzero(keep)[0]
    centre = int(np.searchsorted(index, ca))
    positions = np.concatenate([pos[index], np.array(caps).reshape(-1, 3)])
    numbers = np.concatenate([z[index], np.ones(len(caps), dtype=np.int64)])
    return Structure(numbers, positions, id=f"{protein.id}#r{residue}"), centre


class ResidueEnvironmentEncoder(nn.Module):
    """Per-residue environment embeddings from an atom-level encoder (see the module docstring).

    Args:
        encoder: anything with ``encode_layers(sample) -> list[TokenSet]`` over atoms (or only ``encode``).
        mode: ``"full"`` (whole protein, pooled) or ``"fragment"`` (one capped fragment per residue).
        pool: full mode: ``"ca"`` (the CA atom's token) or ``"mean"`` (mean over the residue's heavy atoms).
        cutoff: fragment radius around the CA in Å.
        mask_side_chain: fragment mode: remove the residue's own side chain.
        fragment_batch: fragments per encoder call.
        stride: fragment mode: every ``stride``-th residue of each protein only (a subsample for slow encoders;
            tokens are those residues, in order).
    """

    def __init__(
        self,
        encoder: nn.Module,
        mode: str = "full",
        pool: str = "ca",
        cutoff: float = 6.0,
        mask_side_chain: bool = False,
        fragment_batch: int = 16,
        stride: int = 1,
    ):
        super().__init__()
        if mode not in ("full", "fragment"):
            raise ValueError(f"ResidueEnvironmentEncoder mode={mode!r}: use 'full' or 'fragment'")
        if pool not in ("ca", "mean"):
            raise ValueError(f"ResidueEnvironmentEncoder pool={pool!r}: use 'ca' or 'mean'")
        if mask_side_chain and mode != "fragment":
            raise ValueError("mask_side_chain needs mode='fragment' (one environment per residue)")
        self.encoder, self.mode, self.pool, self.cutoff = encoder, mode, pool, float(cutoff)
        self.mask_side_chain, self.fragment_batch, self.stride = mask_side_chain, fragment_batch, int(stride)
        if self.stride > 1 and mode != "fragment":
            raise ValueError("stride needs mode='fragment'")
        self.layer_names = list(getattr(encoder, "layer_names", None) or ["out"])
        self.dim = getattr(encoder, "dim", None)
        inner = getattr(encoder, "cache_key", None) or type(encoder).__name__
        self.cache_key = f"residues-{mode}-{pool}-{cutoff}-{int(mask_side_chain)}-s{stride}-{inner}"
        self.quality = getattr(encoder, "quality", None)

    def item_digests(self, sample: Any) -> list[str] | None:
        """Content keys of a batch's proteins (the teacher-feature cache of ``unirep.encoders.FrozenEncoder``)."""
        return sample.item_digests() if isinstance(sample, ProteinBatch) else None

    def _layers(self, sample: Any) -> list[TokenSet]:
        fn = getattr(self.encoder, "encode_layers", None)
        return list(fn(sample)) if fn is not None else [self.encoder.encode(sample)]

    @torch.no_grad()
    def encode_layers(self, sample: Any) -> list[TokenSet]:
        if self.mode == "full":
            batch = sample if isinstance(sample, ProteinBatch) else collate_proteins(_as_proteins(sample))
            heavy = batch.numbers > 1
            out = []
            for ts in self._layers(batch):
                ts = TokenSet(ts.x.float(), batch.batch, batch.positions.float(), batch.num_graphs)
                out.append(pool_residues(ts, batch, "ca" if self.pool == "ca" else "mean", heavy))
            return out
        proteins = _as_proteins(sample) if not isinstance(sample, ProteinBatch) else None
        if proteins is None:
            raise TypeError("fragment mode reads ProteinStructure items; give a list, not a collated ProteinBatch")
        frags, centres, owner = [], [], []
        for k, p in enumerate(proteins):
            for r in range(0, p.num_residues, self.stride):
                s, c = residue_fragment(p, r, self.cutoff, self.mask_side_chain)
                frags.append(s)
                centres.append(c)
                owner.append(k)
        per_layer: list[list[Tensor]] = []
        for a in range(0, len(frags), self.fragment_batch):
            chunk = frags[a : a + self.fragment_batch]
            g = collate_graphs([AtomicGraph.from_structure(s, self.cutoff) for s in chunk])
            layers = self._layers(g)
            if not per_layer:
                per_layer = [[] for _ in layers]
            idx = g.ptr[:-1] + torch.as_tensor(centres[a : a + self.fragment_batch])
            for li, ts in enumerate(layers):
                per_layer[li].append(ts.x[idx.to(ts.x.device)].float().cpu())
        batch = torch.as_tensor(owner)
        ca = torch.cat(
            [torch.as_tensor(p.positions[np.maximum(p.atom_index("CA"), 0)][:: self.stride]) for p in proteins]
        ).float()
        return [TokenSet(torch.cat(chunks), batch, ca, len(proteins)) for chunks in per_layer]

    def encode(self, sample: Any) -> TokenSet:
        return self.encode_layers(sample)[-1]


def residue_labels(protein: ProteinStructure) -> dict[str, np.ndarray]:
    """Probe targets per residue: ``sse`` (0 helix, 1 strand, 2 coil; biotite's P-SEA on the CA trace, -1 where
    undefined), ``residue_type`` (0..19, 20 = unknown), ``torsions`` ``[R, 4]`` (sin/cos of phi and psi) with
    ``torsion_mask`` ``[R]`` (both angles defined)."""
    import biotite.structure as struc

    arr = protein_to_atom_array(protein)
    try:
        sse = struc.annotate_sse(arr)
    except Exception:  # too few residues or no CA atoms
        sse = np.array([""] * protein.num_residues)
    lookup = {c: k for k, c in enumerate(SSE_CLASSES)}
    sse_idx = np.array([lookup.get(str(s), -1) for s in sse], dtype=np.int64)
    if len(sse_idx) != protein.num_residues:  # P-SEA skips residues without CA
        sse_idx = np.full(protein.num_residues, -1, dtype=np.int64)
    b = collate_proteins([protein])
    x37, m37 = to_atom37(b.positions, b)
    tor, ok = backbone_torsions(x37, m37, b.residue_chain)
    feats = torch.cat([torch.sin(tor), torch.cos(tor)], -1)[:, [0, 2, 1, 3]]  # sin phi, cos phi, sin psi, cos psi
    return {
        "sse": sse_idx,
        "residue_type": protein.residue_types,
        "torsions": feats.numpy(),
        "torsion_mask": ok.all(-1).numpy(),
    }


def linear_probes(
    train_x: np.ndarray, train_labels: dict[str, np.ndarray], test_x: np.ndarray, test_labels: dict[str, np.ndarray]
) -> dict[str, float]:
    """Logistic probes (secondary structure, residue type: accuracy and the majority-class baseline) and a ridge
    probe (sin/cos of phi and psi: R² and the mean absolute angle error in degrees); features standardised on
    the training split. Labels are dicts of :func:`residue_labels` arrays concatenated over proteins."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    xtr, xte = scaler.transform(train_x), scaler.transform(test_x)
    out: dict[str, float] = {}
    for task, classes in (("sse", len(SSE_CLASSES)), ("residue_type", NUM_RESIDUE_TYPES)):
        ytr, yte = train_labels[task], test_labels[task]
        mtr = (ytr >= 0) & (ytr != (UNK if task == "residue_type" else -1))
        mte = (yte >= 0) & (yte != (UNK if task == "residue_type" else -1))
        if mtr.sum() < 2 or mte.sum() < 1 or len(np.unique(ytr[mtr])) < 2:
            continue
        clf = LogisticRegression(max_iter=500, C=0.5).fit(xtr[mtr], ytr[mtr])
        out[f"{task}_acc"] = float((clf.predict(xte[mte]) == yte[mte]).mean())
        majority = np.bincount(ytr[mtr], minlength=classes).argmax()
        out[f"{task}_majority"] = float((yte[mte] == majority).mean())
    mtr, mte = train_labels["torsion_mask"], test_labels["torsion_mask"]
    if mtr.sum() > 4 and mte.sum() > 0:
        reg = RidgeCV(alphas=np.logspace(-2, 3, 8)).fit(xtr[mtr], train_labels["torsions"][mtr])
        pred, true = reg.predict(xte[mte]), test_labels["torsions"][mte]
        ss_res = ((pred - true) ** 2).sum(0)
        ss_tot = ((true - true.mean(0)) ** 2).sum(0)
        out["torsion_r2"] = float(np.mean(1 - ss_res / np.maximum(ss_tot, 1e-12)))
        err = []
        for s, c in ((0, 1), (2, 3)):
            a_pred, a_true = np.arctan2(pred[:, s], pred[:, c]), np.arctan2(true[:, s], true[:, c])
            err.append(np.degrees(np.abs(np.angle(np.exp(1j * (a_pred - a_true))))).mean())
        out["phi_mae_deg"], out["psi_mae_deg"] = float(err[0]), float(err[1])
    return out


def environment_probe_study(
    encoder: ResidueEnvironmentEncoder,
    train: Sequence[ProteinStructure],
    test: Sequence[ProteinStructure],
    layers: Sequence[int] = (-1,),
    batch_size: int = 1,
) -> dict[str, Any]:
    """Embed every residue of ``train`` and ``test`` (different proteins) and fit :func:`linear_probes` per layer;
    returns ``{"layers": {name: metrics}, "num_train": ..., "num_test": ..., "dim": ...}``."""
    import time

    start = time.perf_counter()
    out: dict[str, Any] = {"layers": {}}
    names = encoder.layer_names
    cache: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for layer in layers:
        # one pass per split returns every layer; keep them all
        for split, proteins in (("train", train), ("test", test)):
            if split not in cache:
                feats, labels = [], []
                for a in range(0, len(proteins), batch_size):
                    chunk = list(proteins[a : a + batch_size])
                    feats.append([ts.x.double().numpy() for ts in encoder.encode_layers(chunk)])
                    for p in chunk:
                        lab = residue_labels(p)
                        labels.append({k: v[:: encoder.stride] for k, v in lab.items()})
                per_layer = [np.concatenate([f[li] for f in feats]) for li in range(len(feats[0]))]
                cache[split] = (per_layer, {k: np.concatenate([d[k] for d in labels]) for k in labels[0]})
        (xtr, ytr), (xte, yte) = cache["train"], cache["test"]
        li = layer if layer >= 0 else len(xtr) + layer
        name = names[li] if li < len(names) else str(li)
        out["layers"][name] = linear_probes(xtr[li], ytr, xte[li], yte)
        out["dim"] = int(xtr[li].shape[1])
    out["num_train"], out["num_test"] = int(len(cache["train"][1]["sse"])), int(len(cache["test"][1]["sse"]))
    out["seconds"] = time.perf_counter() - start
    return out
