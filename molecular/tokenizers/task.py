"""Training and evaluation of the local all-atom autoencoder (SLAE-style losses; see ``local_ae``).

Loss = type cross-entropy + coordinate MSE after Kabsch superposition + squared error of inter-atomic distances
within the cutoff (+ optional per-atom auxiliary targets, SLAE's energy terms, e.g. GFN2-xTB partial charges).
Evaluation: reconstruction RMSD and type accuracy on held-out structures, linear probes of per-atom chemistry
(aromaticity, hybridisation, ring membership) from the latent, and — with a teacher — the latent's alignment to
the teacher's per-atom features through the platonic metrics (``unirep.metrics``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from unirep.tokens import segment_mean
from unirep.train import Task

from .local_ae import LocalAtomicAutoencoder, kabsch_align

__all__ = ["LocalAETask", "reconstruction_metrics"]


def reconstruction_metrics(
    pred_pos: Tensor, true_pos: Tensor, type_logits: Tensor, types: Tensor, batch: Tensor, num_graphs: int
) -> dict[str, Tensor]:
    """Per-structure Kabsch RMSD (mean over structures, Å) and type accuracy (over atoms)."""
    aligned = kabsch_align(pred_pos, true_pos, batch, num_graphs)
    msd = segment_mean(((aligned - true_pos) ** 2).sum(-1, keepdim=True), batch, num_graphs).squeeze(1)
    return {"rmsd": msd.sqrt().mean(), "type_acc": (type_logits.argmax(-1) == types).float().mean()}


class LocalAETask(Task):
    """Autoencoder training task. Batches are ``GraphBatch`` of molecules (conformer data) or of any structures.

    Args:
        model: the :class:`LocalAtomicAutoencoder`.
        type_weight, coord_weight, dist_weight: loss weights.
        aux_weight: weight of the auxiliary per-atom regression (needs ``model.decoder`` built with ``num_aux``
            and batches with an ``aux`` attribute ``[T, num_aux]``).
        teacher, teacher_r_max: optional frozen atomistic encoder to measure the latent's alignment against.
        eval_max_structures: cap on held-out structures in evaluation.
    """

    def __init__(
        self,
        model: LocalAtomicAutoencoder,
        type_weight: float = 1.0,
        coord_weight: float = 1.0,
        dist_weight: float = 1.0,
        aux_weight: float = 0.0,
        teacher: nn.Module | None = None,
        teacher_r_max: float | None = 5.0,
        eval_max_structures: int = 200,
        batch_size: int = 16,
    ):
        super().__init__()
        self.model = model
        self.type_weight, self.coord_weight, self.dist_weight, self.aux_weight = (
            type_weight,
            coord_weight,
            dist_weight,
            aux_weight,
        )
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
        self.teacher_r_max = teacher_r_max
        self.eval_max_structures, self.batch_size = eval_max_structures, batch_size

    def losses(self, batch, noise: bool) -> tuple[dict[str, Tensor], Tensor]:
        g = self.model.as_graph_batch(batch)
        pos = g.positions.to(self.model.latent_mean.dtype)
        z = self.model._encode(g)  # raw latent [T, L]
        if noise and self.model.latent_noise > 0:
            # noise-augmented decoding (RAE, SLAE): the decoder must tolerate the errors a latent flow makes
            z = z + self.model.latent_noise * z.detach().std(0, keepdim=True) * torch.randn_like(z)
        out = self.model.decoder(z, g.batch, g.num_graphs)
        types = self.model.type_targets(g.numbers)
        loss_type = nn.functional.cross_entropy(out["type_logits"], types)
        aligned = kabsch_align(out["pos"], pos, g.batch, g.num_graphs)
        loss_coord = ((aligned - pos) ** 2).sum(-1).mean()
        i, j = g.edge_index[:, (g.shifts.abs().sum(-1) == 0)]  # within-structure pairs inside the cutoff
        within = (pos[i] - pos[j]).norm(dim=-1) < self.model.r_max
        i, j = i[within], j[within]
        d_pred = (out["pos"][i] - out["pos"][j]).norm(dim=-1)
        d_true = (pos[i] - pos[j]).norm(dim=-1)
        loss_dist = ((d_pred - d_true) ** 2).mean() if i.numel() else pos.new_zeros(())
        loss = self.type_weight * loss_type + self.coord_weight * loss_coord + self.dist_weight * loss_dist
        logs = {"loss/type": loss_type.detach(), "loss/coord": loss_coord.detach(), "loss/dist": loss_dist.detach()}
        if self.aux_weight and "aux" in out and getattr(batch, "aux", None) is not None:
            loss_aux = nn.functional.mse_loss(out["aux"], batch.aux.to(out["aux"]))
            loss = loss + self.aux_weight * loss_aux
            logs["loss/aux"] = loss_aux.detach()
        with torch.no_grad():
            m = reconstruction_metrics(out["pos"], pos, out["type_logits"], types, g.batch, g.num_graphs)
        logs.update({"ae/rmsd": m["rmsd"], "ae/type_acc": m["type_acc"]})
        return logs, loss

    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        logs, loss = self.losses(batch, noise=self.training)
        logs["loss"] = loss
        return logs

    # -- evaluation -----------------------------------------------------------------------------------------
    def _batches(self, dataset, limit: int):
        from molecular.conformers import collate_molecules

        n = min(len(dataset), limit)
        for s in range(0, n, self.batch_size):
            items = [dataset[i] for i in range(s, min(n, s + self.batch_size))]
            yield collate_molecules(items) if isinstance(items[0], tuple) else _collate_graphs(items)

    @torch.no_grad()
    def _latents(self, dataset, limit: int, device) -> tuple[Tensor, Tensor | None]:
        zs, feats = [], []
        for b in self._batches(dataset, limit):
            b = b.to(device)
            zs.append(self.model._encode(b).cpu())
            feats.append(b.atom_features.cpu() if b.atom_features is not None else None)
        f = None if any(x is None for x in feats) else torch.cat(feats)
        return torch.cat(zs), f

    @torch.no_grad()
    def evaluate(self, data, out_dir: str | Path, step: int) -> dict[str, float]:
        device = self.model.latent_mean.device
        was = self.model.training
        self.model.eval()
        val = data.val if getattr(data, "val", None) is not None else data.train
        # latent statistics from the training set: the normalisation a latent flow trains with
        self.model.fit_statistics(b.to(device) for b in self._batches(data.train, self.eval_max_structures))
        sums: dict[str, float] = {}
        count = 0
        for b in self._batches(val, self.eval_max_structures):
            logs, _ = self.losses(b.to(device), noise=False)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b.num_graphs
            count += b.num_graphs
        metrics = {f"ae_eval/{k.split('/')[-1]}": v / max(count, 1) for k, v in sums.items()}
        metrics.update(self._probes(data.train, val, device))
        if self.teacher is not None:
            metrics.update(self._teacher_alignment(val, device))
        self.model.train(was)
        folder = Path(out_dir) / "eval" / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    def _probes(self, train, val, device) -> dict[str, float]:
        """Ridge-regression probes from latents to per-atom chemistry (aromatic, hybridisation, in ring)."""
        from molecular.conformers.data import SUPPORTED_ELEMENTS

        z_tr, f_tr = self._latents(train, self.eval_max_structures, device)
        z_va, f_va = self._latents(val, self.eval_max_structures, device)
        if f_tr is None or f_va is None:
            return {}
        o = len(SUPPORTED_ELEMENTS) + 3  # after element and charge one-hots: aromatic, 4 hybridisation, ring
        cols = {"aromatic": [o], "hybridisation": list(range(o + 1, o + 5)), "ring": [o + 5]}
        x_tr = torch.cat([z_tr, torch.ones(len(z_tr), 1)], 1).double()
        x_va = torch.cat([z_va, torch.ones(len(z_va), 1)], 1).double()
        reg = 1e-3 * torch.eye(x_tr.shape[1], dtype=torch.float64)
        out = {}
        for name, c in cols.items():
            y = f_tr[:, c].double()
            w = torch.linalg.solve(x_tr.T @ x_tr + reg, x_tr.T @ y)
            pred = x_va @ w
            truth = f_va[:, c].double()
            if len(c) == 1:
                acc = ((pred[:, 0] > 0.5) == (truth[:, 0] > 0.5)).double().mean()
            else:
                acc = (pred.argmax(1) == truth.argmax(1)).double().mean()
            out[f"probe/{name}_acc"] = float(acc)
        return out

    def _teacher_alignment(self, val, device) -> dict[str, float]:
        from molecular.flows.task import teacher_tokens
        from unirep.metrics import cka, mutual_knn

        zs, ts = [], []
        for b in self._batches(val, self.eval_max_structures):
            b = b.to(device)
            zs.append(self.model._encode(b).float().cpu())
            ts.append(teacher_tokens(self.teacher, b, self.teacher_r_max).x.cpu())
        z, t = torch.cat(zs), torch.cat(ts)
        k = max(1, min(10, len(z) - 1))
        return {"align/mutual_knn": float(mutual_knn(z, t, topk=k)), "align/cka": float(cka(z, t))}


def _collate_graphs(items):
    from molecular.data import collate_graphs

    return collate_graphs(items)
