"""Learning curves: MACE vs MACE-REPA (two teachers) vs a fine-tuned foundation MACE on GFN2-xTB MD sets.

Rows (``--rows``), each one recipe driven through hydra overrides and the real trainer (``unirep.cli.run_train``):

- ``mace``: ``experiment=molecular/mace``;
- ``mace_repa_best``: ``experiment=molecular/mace_repa teacher@task.teacher=molecular_<--best-teacher>`` (an
  offline pretrained potential: ani, chgnet, diep, so3lr; choose the one the teacher table ranks first);
- ``mace_repa_foundation``: ``experiment=molecular/mace_repa task.teacher.path=<--foundation>`` (the project's
  foundation MACE, ``experiment=molecular/foundation`` exports it);
- ``finetune``: ``experiment=molecular/mace model@task.model=molecular_mace_foundation task.model.path=<--foundation>``.

Data (``--molecule``): ``data/molecular/md_<molecule>.extxyz`` from ``scripts/make_molecular_data.py`` (ethanol:
300 K + 500 K Langevin MD, aspirin: 500 K) is split once, seeded, into a pool and a held-out test file
(``data/molecular/bench/<molecule>_{pool,test}.extxyz``; ``--n-test`` frames). Every run draws its validation frames
(``--n-val``, the same for every run: ``data.seed=0``) and its ``N`` training frames from the pool; ``seed`` varies
weights and data order. Early stopping under a fixed step budget: each run trains ``--steps`` optimiser steps
(batch ``min(10, N)``), evaluates and checkpoints every ``--eval-every``; the checkpoint with the lowest validation
force MAE is the run's model, and only it is evaluated on the test frames (energy MAE per structure and per atom,
force-component MAE). The figure states the budget.

Resumable in parts: each run writes ``runs/<row>_n<N>_s<seed>/result.json`` when it is done and is skipped on a
rerun; an interrupted run resumes from its newest checkpoint (``trainer.resume=auto``). ``--rows``, ``--sizes`` and
``--seeds`` select a part; ``--part`` names the documented ones (``--list-parts``), each sized to about 90 minutes
on two free CPU cores. ``--report`` only aggregates: ``results.json`` (mean and std over seeds) and
``learning_curve.png`` under ``--out``.

    python scripts/bench_mace_repa.py --part ethanol-mace          # one part (see --list-parts)
    python scripts/bench_mace_repa.py --molecule ethanol --rows mace mace_repa_best --sizes 25 250 --seeds 1 \
        --steps 300 --eval-every 50 --set task.model.num_channels=32     # the reduced run of docs/molecular.md
    python scripts/bench_mace_repa.py --molecule ethanol --report

Extra hydra overrides for every run: ``--set key=value ...`` (model size, dtype, EMA).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("mace", "mace_repa_best", "mace_repa_foundation", "finetune")
LABELS = {
    "mace": "MACE",
    "mace_repa_best": "MACE-REPA (offline teacher: {teacher})",
    "mace_repa_foundation": "MACE-REPA (project foundation)",
    "finetune": "fine-tuned foundation",
}
# parts of the full benchmark, each about 90 min on two free CPU cores at the default budget
PARTS = {
    "ethanol-mace": dict(molecule="ethanol", rows=["mace"], sizes=[25, 100, 250, 1000], seeds=3),
    "ethanol-repa-best": dict(molecule="ethanol", rows=["mace_repa_best"], sizes=[25, 100, 250, 1000], seeds=3),
    "ethanol-repa-foundation": dict(
        molecule="ethanol", rows=["mace_repa_foundation"], sizes=[25, 100, 250, 1000], seeds=3
    ),
    "ethanol-finetune": dict(molecule="ethanol", rows=["finetune"], sizes=[25, 100, 250, 1000], seeds=3),
    "aspirin": dict(molecule="aspirin", rows=list(ROWS), sizes=[25, 100, 250, 750], seeds=1),
}


def prepare(src: Path, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Split ``src`` once into a pool and a held-out test file (seeded; written atomically)."""
    from molecular.data import read_structures, split_indices, write_extxyz

    folder = ROOT / "data" / "molecular" / "bench"
    pool, test = folder / f"{src.stem}_pool{n_test}.extxyz", folder / f"{src.stem}_test{n_test}.extxyz"
    if pool.exists() and test.exists():
        return pool, test
    if not src.exists():
        raise SystemExit(f"{src} missing: run python scripts/make_molecular_data.py --sets {src.stem[3:]}")
    frames = read_structures(src)
    test_idx, pool_idx = split_indices(len(frames), sizes=[n_test, len(frames) - n_test], seed=seed)
    write_extxyz([frames[i] for i in test_idx], test)
    write_extxyz([frames[i] for i in pool_idx], pool)
    print(f"{src.name}: {len(pool_idx)} pool + {len(test_idx)} test frames", flush=True)
    return pool, test


def overrides(args, row: str, n: int, seed: int, pool: Path, out: Path) -> list[str]:
    recipe = "mace" if row in ("mace", "finetune") else "mace_repa"
    o = [
        f"experiment=molecular/{recipe}",
        f"data.train={pool}",
        "data.generate=null",
        f"data.n_val={args.n_val}",
        f"data.n_train={n}",
        "data.seed=0",
        f"seed={seed}",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={min(args.batch_size, n)}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.ckpt_every={args.eval_every}",
        f"trainer.keep_last={args.steps // args.eval_every + 2}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.resume=auto",
        f"trainer.device={args.device}",
        f"out_dir={out}",
    ]
    if row == "mace_repa_best":
        o.append(f"teacher@task.teacher=molecular_{args.best_teacher}")
    elif row == "mace_repa_foundation":
        o.append(f"task.teacher.path={args.foundation}")
    elif row == "finetune":
        o += ["model@task.model=molecular_mace_foundation", f"task.model.path={args.foundation}"]
    return o + list(args.set)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def test_errors(ckpt: Path, test: Path, max_frames: int | None = None) -> dict[str, float]:
    """Energy and force errors of a checkpoint on the test frames, through the project's ASE calculator."""
    from molecular.calculator import MACECalculator
    from molecular.data import read_structures

    try:
        calc = MACECalculator.from_checkpoint(ckpt, ema=True)
    except (KeyError, ValueError, RuntimeError):  # a run without EMA weights
        calc = MACECalculator.from_checkpoint(ckpt, ema=False)
    frames = read_structures(test)[:max_frames]
    de, de_atom, df = [], [], []
    for s in frames:
        atoms = s.to_atoms()
        atoms.calc = calc
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        de.append(e - s.energy)
        de_atom.append((e - s.energy) / len(s))
        df.append((f - s.forces).reshape(-1))
    de, de_atom, df = np.array(de), np.array(de_atom), np.concatenate(df)
    return {
        "test/e_mae_meV": float(np.abs(de).mean() * 1000),
        "test/e_mae_meV_atom": float(np.abs(de_atom).mean() * 1000),
        "test/f_mae_meV_A": float(np.abs(df).mean() * 1000),
        "test/f_rmse_meV_A": float(np.sqrt((df**2).mean()) * 1000),
        "test/frames": len(frames),
    }


def best_checkpoint(run_dir: Path) -> tuple[int, float, list[dict]]:
    """The evaluated step with the lowest validation force MAE (early stopping) and the validation curve."""
    curve = []
    for f in sorted(run_dir.glob("eval_step*.json")):
        rec = json.loads(f.read_text())
        m = rec["metrics"]
        curve.append({"step": rec["step"], "val_f_mae": m["val/f_mae_meV_A"], "val_e_mae": m.get("val/e_mae_meV")})
    if not curve:
        raise RuntimeError(f"{run_dir}: no eval_step*.json: was trainer.eval_every 0?")
    best = min(curve, key=lambda r: r["val_f_mae"])
    return int(best["step"]), float(best["val_f_mae"]), curve


def steps_per_sec(run_dir: Path) -> float | None:
    """The trainer's logged optimiser steps per second (mean over log lines; evaluation excluded)."""
    import csv

    f = run_dir / "metrics.csv"
    if not f.exists():
        return None
    with open(f) as fh:
        v = [float(r["steps_per_sec"]) for r in csv.DictReader(fh) if r.get("steps_per_sec")]
    return float(np.mean(v)) if v else None


def run_one(args, row: str, n: int, seed: int, pool: Path, test: Path, out: Path) -> dict | None:
    from unirep.cli import compose, run_train

    run_dir = out / "runs" / f"{row}_n{n}_s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    t0, c0 = time.time(), _cpu_s()
    if not (run_dir / "checkpoints" / f"step_{args.steps:08d}").exists():  # trained already: only evaluate
        run_train(compose("train", overrides(args, row, n, seed, pool, run_dir)))
    train_wall, train_cpu = time.time() - t0, _cpu_s() - c0
    step, val_f, curve = best_checkpoint(run_dir)
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    result = {
        "row": row,
        "n_train": n,
        "seed": seed,
        "molecule": args.molecule,
        "teacher": args.best_teacher if row == "mace_repa_best" else ("foundation" if "foundation" in row else None),
        "budget_steps": args.steps,
        "batch_size": min(args.batch_size, n),
        "best_step": step,
        "val/f_mae_meV_A": val_f,
        "val_curve": curve,
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "steps_per_sec": steps_per_sec(run_dir),
        "overrides": overrides(args, row, n, seed, pool, run_dir),
        **test_errors(ckpt, test, args.max_test),
    }
    tmp = done.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)
    print(
        f"{row} N={n} seed={seed}: best step {step}, test F MAE {result['test/f_mae_meV_A']:.1f} meV/A, "
        f"E MAE {result['test/e_mae_meV']:.1f} meV ({train_wall / 60:.1f} min)",
        flush=True,
    )
    return result


def report(out: Path, teacher: str) -> dict:
    """Aggregate every finished run under ``out``: mean/std over seeds, the figure, the goal checks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/result.json"))]
    if not runs:
        raise SystemExit(f"{out}: no finished runs yet")
    table: dict[str, dict[int, dict]] = {}
    for r in runs:
        table.setdefault(r["row"], {}).setdefault(r["n_train"], []).append(r)
    summary: dict = {"runs": len(runs), "rows": {}}
    for row, by_n in table.items():
        summary["rows"][row] = {}
        for n, rs in sorted(by_n.items()):
            entry = {"seeds": len(rs), "budget_steps": sorted({r["budget_steps"] for r in rs})}
            for key in ("test/f_mae_meV_A", "test/e_mae_meV", "test/e_mae_meV_atom", "train_cpu_s", "best_step"):
                v = np.array([r[key] for r in rs], dtype=float)
                entry[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            summary["rows"][row][str(n)] = entry
    mace = summary["rows"].get("mace", {})
    if "1000" in mace:
        m = mace["1000"]
        summary["goal_mace_1000_le_12meV_in_60cpu_min"] = bool(
            m["test/f_mae_meV_A"]["mean"] <= 12 and m["train_cpu_s"]["mean"] <= 3600
        )
    for row in ("mace_repa_best", "mace_repa_foundation"):
        if "1000" in mace and "250" in summary["rows"].get(row, {}):
            a, b = summary["rows"][row]["250"]["test/f_mae_meV_A"], mace["1000"]["test/f_mae_meV_A"]
            summary[f"claim_{row}_250_as_good_as_mace_1000"] = bool(a["mean"] - a["std"] <= b["mean"] + b["std"])
    speed = {
        row: float(
            np.mean([r["steps_per_sec"] for rs in by_n.values() for r in rs if r.get("steps_per_sec")] or [np.nan])
        )
        for row, by_n in table.items()
    }
    summary["steps_per_sec"] = speed
    if "mace" in speed:  # the cost of alignment per step (teacher features cached after the first epoch)
        summary["time_per_step_vs_mace"] = {row: speed["mace"] / v for row, v in speed.items() if row != "mace"}
    budgets = sorted({r["budget_steps"] for r in runs})
    molecule = runs[0]["molecule"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row, by_n in summary["rows"].items():
        ns = sorted(int(n) for n in by_n)
        for ax, key in zip(axes, ("test/f_mae_meV_A", "test/e_mae_meV"), strict=True):
            mean = [by_n[str(n)][key]["mean"] for n in ns]
            std = [by_n[str(n)][key]["std"] for n in ns]
            seeds = max(by_n[str(n)]["seeds"] for n in ns)
            label = LABELS.get(row, row).format(teacher=teacher) + f" ({seeds} seed{'s' * (seeds > 1)})"
            ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=label)
    for ax, name in zip(axes, ("force MAE (meV/Å)", "energy MAE (meV)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training structures N")
        ax.set_ylabel(f"test {name}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{molecule}, GFN2-xTB MD: budget {budgets} steps, early stopping on validation force MAE "
        f"(mean ± std over seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "results.json")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), help="a documented part of the full benchmark")
    p.add_argument("--list-parts", action="store_true")
    p.add_argument("--molecule", default="ethanol", choices=["ethanol", "aspirin"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 250, 1000])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..k-1")
    p.add_argument("--steps", type=int, default=3000, help="the step budget of every run")
    p.add_argument("--eval-every", type=int, default=250, help="validation (and checkpoint) interval")
    p.add_argument("--batch-size", type=int, default=10, help="mace_run_train's 10 (N smaller: N)")
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--data", default=None, help="the MD file (default data/molecular/md_<molecule>.extxyz)")
    p.add_argument("--n-test", type=int, default=None, help="held-out test frames (ethanol 400, aspirin 200)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first k test frames only")
    p.add_argument("--best-teacher", default="ani", help="teacher group molecular_<name>: ani, chgnet, diep, so3lr")
    p.add_argument("--foundation", default="data/molecular/foundation", help="the project foundation (export dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], help="extra hydra overrides for every run")
    p.add_argument("--out", default=None, help="default outputs/bench/mace_repa_<molecule>")
    p.add_argument("--report", action="store_true", help="only aggregate finished runs")
    args = p.parse_args()
    if args.list_parts:
        for name, part in PARTS.items():
            print(f"{name}: {part}")
        return
    if args.part:
        part = PARTS[args.part]
        args.molecule, args.rows, args.sizes, args.seeds = part["molecule"], part["rows"], part["sizes"], part["seeds"]
    os.chdir(ROOT)
    out = Path(args.out or f"outputs/bench/mace_repa_{args.molecule}")
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        n_test = args.n_test or (400 if args.molecule == "ethanol" else 200)
        src = Path(args.data or f"data/molecular/md_{args.molecule}.extxyz")
        pool, test = prepare(ROOT / src if not src.is_absolute() else src, n_test)
        for n in args.sizes:
            for seed in range(args.seeds):
                for row in args.rows:
                    run_one(args, row, n, seed, pool, test, out)
    summary = report(out, args.best_teacher)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    for row, by_n in summary["rows"].items():
        for n, e in by_n.items():
            f, en = e["test/f_mae_meV_A"], e["test/e_mae_meV"]
            print(f"{row:22s} N={n:>5s}: F {f['mean']:7.2f} ± {f['std']:5.2f} meV/A   E {en['mean']:7.2f} meV")


if __name__ == "__main__":
    main()
