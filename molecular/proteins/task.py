"""Training tasks of the protein models on the one trainer: the SLAE-style autoencoder (:class:`ProteinAETask`).

A task maps a :class:`~molecular.proteins.residues.ProteinBatch` to ``{"loss": ..., named scalars}``;
``evaluate`` writes ``eval/step_N/metrics.json`` with the reconstruction metrics of held-out proteins and linear
probes of the latents (secondary structure, residue type, split by protein).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unirep.train import Task

from .slae import ProteinAutoencoder, reconstruction_metrics

__all__ = ["ProteinAETask", "iterate_batches"]


def iterate_batches(dataset, batch_size: int, limit: int | None = None):
    """Collated batches of the first ``limit`` items of a protein data set."""
    n = len(dataset) if limit is None else min(len(dataset), limit)
    collate = getattr(dataset, "collate", None)
    if collate is None:
        from .residues import collate_proteins

        collate = collate_proteins
    for s in range(0, n, batch_size):
        yield collate([dataset[i] for i in range(s, min(n, s + batch_size))])


class ProteinAETask(Task):
    """Autoencoder training (losses: :meth:`ProteinAutoencoder.losses`).

    Args:
        model: the :class:`~molecular.proteins.slae.ProteinAutoencoder`.
        type_weight, ca_weight, local_weight, distogram_weight, distance_weight: loss weights.
        eval_max_items: cap on held-out proteins (crops) in evaluation; batch_size: evaluation batch size.
    """

    def __init__(
        self,
        model: ProteinAutoencoder,
        type_weight: float = 1.0,
        ca_weight: float = 1.0,
        local_weight: float = 1.0,
        distogram_weight: float = 0.5,
        distance_weight: float = 0.5,
        eval_max_items: int = 64,
        batch_size: int = 8,
    ):
        super().__init__()
        self.model = model
        self.weights = {
            "type": type_weight,
            "ca": ca_weight,
            "local": local_weight,
            "distogram": distogram_weight,
            "distance": distance_weight,
        }
        self.eval_max_items, self.batch_size = eval_max_items, batch_size

    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        total, logs, _ = self.model.losses(batch, noise=self.training, weights=self.weights)
        logs["loss"] = total
        return logs

    @torch.no_grad()
    def evaluate(self, data, out_dir: str | Path, step: int) -> dict[str, float]:
        device = self.model.latent_mean.device
        was = self.model.training
        self.model.eval()
        val = data.val if getattr(data, "val", None) is not None else data.train
        self.model.fit_statistics(
            b.to(device) for b in iterate_batches(data.train, self.batch_size, self.eval_max_items)
        )
        sums: dict[str, float] = {}
        count = 0
        for b in iterate_batches(val, self.batch_size, self.eval_max_items):
            b = b.to(device)
            for k, v in reconstruction_metrics(self.model, b).items():
                if np.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v * b.num_graphs
            count += b.num_graphs
        metrics = {f"ae_eval/{k}": v / max(count, 1) for k, v in sums.items()}
        metrics.update(self.latent_probes(data.train, val, device))
        self.model.train(was)
        folder = Path(out_dir) / "eval" / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    def latent_probes(self, train, val, device) -> dict[str, float]:
        """Linear probes from the raw latents to per-residue secondary structure and residue type."""
        from .environments import linear_probes, residue_labels

        def gather(dataset):
            zs, labels = [], []
            for k, b in enumerate(iterate_batches(dataset, self.batch_size, self.eval_max_items)):
                zs.append(self.model._encode(b.to(device)).double().cpu().numpy())
                for i in range(b.num_graphs):
                    labels.append(residue_labels(dataset[k * self.batch_size + i]))
            return np.concatenate(zs), {key: np.concatenate([d[key] for d in labels]) for key in labels[0]}

        try:
            (ztr, ytr), (zva, yva) = gather(train), gather(val)
            res = linear_probes(ztr, ytr, zva, yva)
        except ValueError:  # too few residues or classes in a smoke run
            return {}
        return {f"probe/{k}": v for k, v in res.items() if k in ("sse_acc", "residue_type_acc", "torsion_r2")}
