"""Protein benchmarks for docs/proteins.md: environment probes, autoencoder reconstruction, flow validity.

Resumable: each part writes ``<out>/<part>.json`` and a rerun skips the parts already there (``--force`` redoes
them). Needs the protein set (``scripts/make_protein_data.py``). Every part fits well under 30 minutes on 2 cores.

    .venv/bin/python scripts/bench_proteins.py --parts probes          # teacher embeddings vs descriptors vs random
    .venv/bin/python scripts/bench_proteins.py --parts masked          # residue identity, own side chain removed
    .venv/bin/python scripts/bench_proteins.py --parts slae flow       # autoencoder, then the latent flow on it
    .venv/bin/python scripts/bench_proteins.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

PROBE_ENCODERS = ("random", "acsf", "soap", "chgnet", "diep")
MASKED_ENCODERS = ("random", "acsf", "soap", "chgnet")
MAX_PROBE_RESIDUES = 300  # proteins above this size are left out of the probe study (CPU time of the teachers)


def _atom_encoder(name: str):
    from molecular.descriptors import ACSFDescriptor, SOAPDescriptor
    from molecular.proteins.environments import RandomAtomEncoder

    species = [1, 6, 7, 8, 16]
    if name == "random":
        return RandomAtomEncoder(r_max=5.0, dim=64, seed=0)
    if name == "soap":
        return SOAPDescriptor(species=species, r_cut=5.0)
    if name == "acsf":
        return ACSFDescriptor(species=species, r_cut=5.0)
    if name == "chgnet":
        from molecular.teachers.external import CHGNetEncoder

        return CHGNetEncoder("0.3.0")
    if name == "diep":
        from molecular.teachers.external import DIEPEncoder

        return DIEPEncoder()
    raise ValueError(name)


def _probe_sets(root: str):
    from molecular.proteins.data import ProteinSet

    train = [p for p in ProteinSet(root, "train").items if p.num_residues <= MAX_PROBE_RESIDUES]
    test = [p for p in ProteinSet(root, "test").items if p.num_residues <= MAX_PROBE_RESIDUES]
    return train, test


def part_probes(args, name: str) -> dict:
    """Full-protein environments (CA token of each residue) -> SSE, residue type (side chain visible), torsions."""
    from molecular.proteins.environments import ResidueEnvironmentEncoder, environment_probe_study

    train, test = _probe_sets(args.root)
    enc = ResidueEnvironmentEncoder(_atom_encoder(name), mode="full", pool="ca")
    layers = list(range(len(enc.layer_names)))
    res = environment_probe_study(enc, train, test, layers=layers)
    res.update(encoder=name, mode="full", pool="ca", train_proteins=len(train), test_proteins=len(test))
    return res


def part_masked(args, name: str) -> dict:
    """Capped 6 A fragments with the residue's own side chain removed -> residue identity (and SSE, torsions)."""
    from molecular.proteins.environments import ResidueEnvironmentEncoder, environment_probe_study

    train, test = _probe_sets(args.root)
    enc = ResidueEnvironmentEncoder(
        _atom_encoder(name), mode="fragment", cutoff=6.0, mask_side_chain=True, stride=args.stride
    )
    res = environment_probe_study(enc, train, test, layers=[-1])
    res.update(encoder=name, mode="fragment", cutoff=6.0, stride=args.stride)
    return res


def part_adk(args, name: str) -> dict:
    """Open vs closed adenylate kinase from per-residue environments: a logistic probe trained on the residues of
    the first half of the sequence, scored on the second half (both states of every residue on the same side)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from molecular.proteins.data import ProteinSet
    from molecular.proteins.environments import ResidueEnvironmentEncoder

    states = {p.id: p for p in ProteinSet(args.root, "all", sources=["MDAnalysisTests/adk"]).items}
    if set(states) != {"adk_open", "adk_closed"}:
        raise FileNotFoundError("the protein set has no AdK states: install MDAnalysisTests and remake it")
    enc = ResidueEnvironmentEncoder(_atom_encoder(name), mode="full", pool="ca")
    feats = {k: enc.encode([p]).x.double().numpy() for k, p in states.items()}
    r = feats["adk_open"].shape[0]
    half = np.arange(r) < r // 2
    x = np.concatenate([feats["adk_open"], feats["adk_closed"]])
    y = np.concatenate([np.zeros(r, int), np.ones(r, int)])
    tr = np.concatenate([half, half])
    scaler = StandardScaler().fit(x[tr])
    clf = LogisticRegression(max_iter=1000, C=0.1).fit(scaler.transform(x[tr]), y[tr])
    acc = float((clf.predict(scaler.transform(x[~tr])) == y[~tr]).mean())
    moved = np.linalg.norm(feats["adk_open"] - feats["adk_closed"], axis=1) / (
        np.linalg.norm(feats["adk_open"], axis=1) + 1e-12
    )
    return {"encoder": name, "residues": int(r), "state_acc_second_half": acc, "chance": 0.5,
            "median_relative_feature_change": float(np.median(moved))}  # fmt: skip


def _slae_overrides(args, out: Path) -> list[str]:
    steps = args.steps or 600
    return [
        "experiment=protein/slae",
        f"data.root={args.root}",
        f"trainer.max_steps={steps}",
        "trainer.device=cpu",
        f"trainer.num_threads={args.threads}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.resume=auto",  # a rerun continues an interrupted training run
        f"trainer.ckpt_every={max(100, steps // 4)}",
        f"out_dir={out}",
    ]


def _test_reconstruction(task, root: str, crop: int = 32) -> dict:
    from molecular.proteins.data import ProteinSet
    from molecular.proteins.slae import reconstruction_metrics
    from molecular.proteins.task import iterate_batches

    test = ProteinSet(root, "test", crop=crop)
    sums, count = {}, 0
    for b in iterate_batches(test, 8):
        for k, v in reconstruction_metrics(task.model.eval(), b).items():
            if v == v:  # not NaN
                sums[k] = sums.get(k, 0.0) + v * b.num_graphs
        count += b.num_graphs
    return {"test_items": count, **{k: v / count for k, v in sums.items()}}


def part_slae(args) -> dict:
    """Train the SLAE-style autoencoder (recipe protein/slae) and measure reconstruction on the test split."""
    from unirep.cli import compose, run_train
    from unirep.train import load_task

    out = Path(args.out) / "slae_run"
    result = run_train(compose("train", _slae_overrides(args, out)))
    task, _ = load_task(result["checkpoint"], ema=True, device="cpu", trust_config=True)
    metrics = {"val": result["eval"], "test": _test_reconstruction(task, args.root), "steps": result["step"]}
    metrics["checkpoint"] = str(result["checkpoint"])
    return metrics


FLOW_TEACHERS = {
    "soap": ["task.teacher.encoder._target_=molecular.descriptors.SOAPDescriptor", "~task.teacher.encoder.model_name",
             "+task.teacher.encoder.species=[1,6,7,8,16]"],
    "chgnet": [],
}  # fmt: skip


def part_flow(args, teacher: str | None) -> dict:
    """Train the partially latent flow on the bench's autoencoder (part slae) and score decoded samples."""
    from unirep.cli import compose, run_train

    ae = Path(args.out) / "slae_run"
    if not (ae / "checkpoints").is_dir():
        raise FileNotFoundError(f"{ae} has no checkpoint: run the slae part first (--parts slae)")
    steps = args.flow_steps
    name = "flow" if teacher is None else f"flow_repa_{teacher}"
    out = Path(args.out) / f"{name}_run"
    overrides = [
        f"experiment=protein/{'flow' if teacher is None else 'flow_repa'}",
        f"data.root={args.root}",
        f"task.autoencoder.checkpoint={ae}",
        f"trainer.max_steps={steps}",
        "trainer.device=cpu",
        f"trainer.num_threads={args.threads}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.resume=auto",
        f"trainer.ckpt_every={max(100, steps // 4)}",
        "task.eval_samples=32",
        f"out_dir={out}",
        *(FLOW_TEACHERS[teacher] if teacher else []),
    ]
    result = run_train(compose("train", overrides))
    return {
        "eval": result["eval"],
        "steps": result["step"],
        "teacher": teacher,
        "checkpoint": str(result["checkpoint"]),
    }


def parts() -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    for n in PROBE_ENCODERS:
        table[f"probes_{n}"] = lambda a, n=n: part_probes(a, n)
    for n in MASKED_ENCODERS:
        table[f"masked_{n}"] = lambda a, n=n: part_masked(a, n)
    for n in ("random", "acsf", "soap", "chgnet"):
        table[f"adk_{n}"] = lambda a, n=n: part_adk(a, n)
    table["slae"] = part_slae
    table["flow"] = lambda a: part_flow(a, None)
    for t in FLOW_TEACHERS:
        table[f"flow_repa_{t}"] = lambda a, t=t: part_flow(a, t)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_proteins")
    ap.add_argument("--root", default="data/proteins")
    ap.add_argument("--parts", nargs="*", default=["probes", "masked", "slae", "flow"], help="names or prefixes")
    ap.add_argument("--stride", type=int, default=4, help="masked parts: every k-th residue")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="training steps of the slae part (600)")
    ap.add_argument("--flow-steps", type=int, default=1500, help="training steps of the flow parts")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    table = parts()
    if args.list:
        print("\n".join(table))
        return
    chosen = [k for k in table if any(k == p or k.startswith(p + "_") for p in args.parts)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key in chosen:
        path = out / f"{key}.json"
        if path.exists() and not args.force:
            print(f"[skip] {key}: {path} exists")
            continue
        print(f"[run] {key}", flush=True)
        start = time.perf_counter()
        result = table[key](args)
        result["wall_seconds"] = time.perf_counter() - start
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
        print(f"[done] {key} in {result['wall_seconds']:.0f} s: {json.dumps(result)[:400]}", flush=True)


if __name__ == "__main__":
    main()
