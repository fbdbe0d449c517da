"""The MACE-REPA teacher table: which offline foundation model is worth aligning to, measured.

For every teacher the project can load offline (ANI-1x / ANI-1ccx, CHGNet, DIEP, SevenNet, SO3LR when installed,
the project's foundation MACEs, and a random MACE as the control) and for every one of its layers, on the labelled
GFN2-xTB frames of one molecule's MD (ethanol by default; aspirin with ``--molecule aspirin``):

- ``force_mae``: the teacher's force-component MAE (meV/Å) against the GFN2-xTB labels, when it predicts forces.
  Levels of theory differ (ANI-1x: wB97X/6-31G(d); ANI-1ccx: CCSD(T)*/CBS; CHGNet: PBE(+U); DIEP: r2SCAN;
  SevenNet-0: PBE; the project's MACEs: GFN2-xTB itself), so only the project's foundation is scored on its own level;
  for the others the MAE says how far apart the two levels (and the model's error) put the forces, not how good the
  model is at its own level.
- ``cos_conformers``: the mean cosine between the features of *the same atom* in two different frames (conformers) of
  the molecule (200 random frame pairs): near 1 means the feature barely moves with the geometry, i.e. it carries
  little conformational signal for a student to learn from (rs-gh/molecular-repa measured 0.998 for MACE-OFF).
- ``conf_share``: the share of the feature variance (over every atom token) that lies *within* an atom across frames,
  i.e. that the conformation explains; ``1 - conf_share`` is what atom identity alone explains.
- ``floor_element_mean``: the cosine of each atom's feature with its element's mean feature (the alignment floor a
  projector that only knows the element reaches; ``unirep.metrics.alignment_floors``' ``group_mean``).

Machine and command are stated with the table; results go to ``<out>/teachers.json`` and ``<out>/teachers.md``;
each teacher's part is saved as it finishes (``<out>/parts/<teacher>.json``) and skipped on a rerun.

    python scripts/bench_teachers.py --molecule ethanol --out outputs/bench/teachers
    python scripts/bench_teachers.py --teachers foundation ani1x --foundation data/molecular/foundation
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molecular.data import AtomsDataset, collate_graphs, read_structures  # noqa: E402
from molecular.quality import predict_forces  # noqa: E402

TEACHERS = ("ani1x", "ani1ccx", "chgnet", "diep", "sevennet", "so3lr", "foundation", "foundation_quick", "random")
LEVEL = {
    "ani1x": "wB97X/6-31G(d)",
    "ani1ccx": "CCSD(T)*/CBS",
    "chgnet": "PBE(+U) (MPtrj)",
    "diep": "r2SCAN (MatPES)",
    "sevennet": "PBE (MPtrj)",
    "so3lr": "PBE0+MBD (SPICE etc.)",
    "foundation": "GFN2-xTB (QM9 foundation set)",
    "foundation_quick": "GFN2-xTB (300 QM9 molecules)",
    "random": "none (random MACE)",
}
DATA = {"ethanol": "data/molecular/md_ethanol_300K.extxyz", "aspirin": "data/molecular/md_aspirin.extxyz"}


def build_teacher(name: str, args: argparse.Namespace):
    """The raw teacher module (no FrozenEncoder cache: every feature here is computed once)."""
    from molecular.teachers import external as ext

    if name in ("ani1x", "ani1ccx"):
        return ext.ANIEncoder(model="ANI1x" if name == "ani1x" else "ANI1ccx")
    if name == "chgnet":
        return ext.CHGNetEncoder()
    if name == "diep":
        return ext.DIEPEncoder()
    if name == "sevennet":
        return ext.SevenNetEncoder()
    if name == "so3lr":
        return ext.SO3LREncoder()
    from molecular.teachers.mace import mace_teacher, random_mace_teacher

    if name == "random":
        enc = random_mace_teacher([1, 6, 7, 8, 9], layers=[-1], cache_dir=None)
    else:
        path = args.foundation if name == "foundation" else args.foundation_quick
        if not Path(path).exists():
            raise FileNotFoundError(f"{name}: {path} does not exist (unirep-train experiment=molecular/{name})")
        enc = mace_teacher(str(path), layers=[-1], cache_dir=None)
    return getattr(enc, "encoder", enc)


def _mace_forces(teacher, batch) -> list[np.ndarray] | None:
    model = getattr(teacher, "model", None)
    if model is None or not hasattr(model, "forward"):
        return None
    from molecular.data import regraph
    from molecular.models import default_dtype

    with torch.enable_grad(), default_dtype(model.dtype):
        out, _ = model.forward_intermediates(regraph(batch, model.r_max), [], compute_forces=True, training=False)
    if "forces" not in out:
        return None
    forces = out["forces"].detach().double().numpy()
    ptr = batch.ptr.tolist()
    return [forces[a:b] for a, b in zip(ptr[:-1], ptr[1:], strict=True)]


def force_mae(teacher, data: AtomsDataset, limit: int, batch_size: int = 10) -> float | None:
    err, count = 0.0, 0
    for start in range(0, min(limit, len(data)), batch_size):
        batch = collate_graphs([data[i] for i in range(start, min(limit, len(data), start + batch_size))])
        pred = predict_forces(teacher, batch)
        if pred is None:
            pred = _mace_forces(teacher, batch)
        if pred is None:
            return None
        ref = batch.forces.double().numpy()
        err += float(np.abs(np.concatenate(pred) - ref).sum())
        count += ref.size
    return 1000.0 * err / count  # meV/Å


@torch.no_grad()
def layer_features(teacher, data: AtomsDataset, frames: int, batch_size: int = 10) -> list[torch.Tensor]:
    """Per-layer features ``[frames, atoms, D]`` of the first ``frames`` structures (one molecule)."""
    layers: list[list[torch.Tensor]] = []
    n_atoms = len(data.structures[0].numbers)
    for start in range(0, frames, batch_size):
        batch = collate_graphs([data[i] for i in range(start, min(frames, start + batch_size))])
        _, feats = teacher.forward_intermediates(batch, None)
        for k, ts in enumerate(feats):
            if len(layers) <= k:
                layers.append([])
            layers[k].append(ts.x.detach().double().reshape(-1, n_atoms, ts.x.shape[-1]))
    return [torch.cat(x) for x in layers]


def conformation_stats(f: torch.Tensor, numbers: np.ndarray, pairs: int = 200, seed: int = 0) -> dict[str, float]:
    """``f[frames, atoms, D]`` of one molecule: cosine of an atom with itself across frames, the share of variance
    within atoms across frames, and the element-mean floor."""
    g = torch.Generator().manual_seed(seed)
    n = f.shape[0]
    a = torch.randint(0, n, (pairs,), generator=g)
    b = (a + torch.randint(1, n, (pairs,), generator=g)) % n  # b != a
    cos = torch.nn.functional.cosine_similarity(f[a], f[b], dim=-1).mean().item()
    tokens = f.reshape(-1, f.shape[-1])
    total = (tokens - tokens.mean(0)).square().sum(-1).mean().item()
    within = (f - f.mean(0, keepdim=True)).square().sum(-1).mean().item()
    z = torch.as_tensor(numbers).repeat(n)
    means = torch.stack([tokens[z == e].mean(0) for e in z.unique()])
    idx = torch.searchsorted(z.unique(), z)
    floor = torch.nn.functional.cosine_similarity(tokens, means[idx], dim=-1).mean().item()
    return {"cos_conformers": cos, "conf_share": within / total if total > 0 else float("nan"), "floor": floor}


def run_teacher(name: str, data: AtomsDataset, args: argparse.Namespace) -> dict:
    t0 = time.time()
    teacher = build_teacher(name, args)
    mae = force_mae(teacher, data, args.force_frames)
    feats = layer_features(teacher, data, args.feature_frames)
    numbers = np.asarray(data.structures[0].numbers)
    names = list(getattr(teacher, "layer_names", []) or [])
    rows = []
    for k, f in enumerate(feats):
        stats = conformation_stats(f, numbers)
        rows.append({"layer": k, "name": names[k] if k < len(names) else str(k), "dim": int(f.shape[-1]), **stats})
    return {"teacher": name, "level": LEVEL[name], "force_mae": mae, "layers": rows, "seconds": time.time() - t0}


def _fmt(x: float | None, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def table(results: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| teacher | level of theory | force MAE vs GFN2 (meV/Å) | layer | dim | cos between conformers | "
        "conformational share of variance | element-mean floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for k, row in enumerate(r["layers"]):
            first = k == 0
            lines.append(
                f"| {r['teacher'] if first else ''} | {r['level'] if first else ''} | "
                f"{_fmt(r['force_mae'], 1) if first else ''} | {row['layer']} {row['name']} | {row['dim']} | "
                f"{_fmt(row['cos_conformers'])} | {_fmt(row['conf_share'])} | {_fmt(row['floor'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--molecule", choices=sorted(DATA), default="ethanol")
    p.add_argument("--data", default=None, help="labelled frames of one molecule (default: the molecule's MD set)")
    p.add_argument("--teachers", nargs="+", choices=TEACHERS, default=list(TEACHERS))
    p.add_argument("--foundation", default="data/molecular/foundation")
    p.add_argument("--foundation-quick", default="data/molecular/foundation_quick")
    p.add_argument("--force-frames", type=int, default=100)
    p.add_argument("--feature-frames", type=int, default=100)
    p.add_argument("--out", default="outputs/bench/teachers")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out) / args.molecule
    (out / "parts").mkdir(parents=True, exist_ok=True)
    path = args.data or DATA[args.molecule]
    structures = read_structures(path)[: max(args.force_frames, args.feature_frames)]
    data = AtomsDataset(structures, r_max=5.0, name=path)
    results = []
    for name in args.teachers:
        part = out / "parts" / f"{name}.json"
        if part.exists():
            results.append(json.loads(part.read_text()))
            continue
        try:
            r = run_teacher(name, data, args)
        except (ImportError, FileNotFoundError, OSError) as err:
            print(f"[teachers] {name}: skipped ({type(err).__name__}: {str(err).splitlines()[0]})", flush=True)
            continue
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(part)
        print(f"[teachers] {name}: force MAE {_fmt(r['force_mae'], 1)} meV/Å, {r['seconds']:.0f} s", flush=True)
        results.append(r)
    header = (
        f"Teachers on {len(structures)} GFN2-xTB frames of {args.molecule} ({path}); force MAE on the first "
        f"{args.force_frames}, features on the first {args.feature_frames}. Machine: {platform.machine()} CPU, "
        f"torch {torch.__version__}, 1 thread. Command: python scripts/bench_teachers.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    (out / "teachers.json").write_text(json.dumps(results, indent=1))
    (out / "teachers.md").write_text(table(results, header))
    print(table(results, header))


if __name__ == "__main__":
    main()
