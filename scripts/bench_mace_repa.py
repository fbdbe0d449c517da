"""Benchmark: MACE vs MACE-REPA learning curves on a narrow set held out from the teacher, plus per-step cost.

For each number of training structures (default 25 / 100 / 400) and seed (default 3), the `mace` and `mace_repa`
recipes train with the same model, steps and batch through the real trainer (``unirep.cli.run_train``) on the
aspirin GFN2-xTB MD set (aspirin is not in QM9 and is held out of the teacher's broad pre-training set), and are
evaluated on the same 100 held-out frames (the split is fixed by ``data.seed=0``; ``seed`` varies weights and data
order). The teacher is the project's foundation MACE (``data/molecular/foundation_quick``, made if missing, as in
the quick start). Per-step time of ``mace_repa`` relative to ``mace`` is measured in the same process, with the
teacher-feature cache warm and with the teacher recomputed every step.

    python scripts/bench_mace_repa.py                       # full (CPU: about 20-40 min on 2 cores)
    python scripts/bench_mace_repa.py --sizes 25 100 --seeds 1 --steps 150     # a quick look
    python scripts/bench_mace_repa.py --data data/molecular/md_ethanol_quick.extxyz --molecule ethanol \
        --sizes 25 100 200 --seeds 2 --steps 200 --channels 16     # the quick start's ethanol set (held out too)

Writes ``outputs/bench/mace_repa/results.json`` and ``learning_curve.png``. Reports whatever comes out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _overrides(args, recipe: str, n: int, seed: int, out: Path) -> list[str]:
    o = [
        f"experiment=molecular/{recipe}",
        f"data.train={args.data}",
        f"data.generate={{kind:md,molecule:{args.molecule},frames:{args.frames},interval:10}}",
        "data.n_val=100",
        f"data.n_train={n}",
        "data.seed=0",
        f"seed={seed}",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={min(args.batch_size, n)}",
        "trainer.eval_every=0",
        f"trainer.ema_decay={args.ema_decay}",
        f"trainer.ckpt_every={args.steps}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.resume=none",
        f"trainer.device={args.device}",
        f"out_dir={out}",
        f"task.model.num_channels={args.channels}",
        "task.model.dtype=float32",
    ]
    if recipe == "mace_repa":
        o += [
            f"task.teacher.path={args.teacher}",
            f"task.align_weight={args.align_weight}",
            f"task.baseline_steps={args.baseline_steps}",
        ]
    return o


def _step_times(args, n_steps: int = 20) -> dict[str, float]:
    """Seconds per optimiser step (forward + backward + Adam) for mace, mace_repa (cache) and mace_repa (no cache)."""
    from hydra.utils import instantiate

    from unirep.cli import compose

    out: dict[str, float] = {}
    for label, recipe, cache in (
        ("mace", "mace", True),
        ("mace_repa_cached", "mace_repa", True),
        ("mace_repa_uncached", "mace_repa", False),
    ):
        cfg = compose("train", _overrides(args, recipe, 100, 0, Path("/tmp/unused")))
        torch.manual_seed(0)
        data = instantiate(cfg.data, _convert_="object")
        task = instantiate(cfg.task, _convert_="object")
        if recipe == "mace_repa":
            task.teacher_cache = cache
        opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=0.01, amsgrad=True)
        rng = np.random.default_rng(0)
        batches = [
            data.collate_fn([data.train[int(i)] for i in rng.choice(len(data.train), args.batch_size)])
            for _ in range(n_steps + 3)
        ]
        if recipe == "mace_repa" and cache:  # warm the cache: the steady state of a fixed data set
            for b in batches:
                task.teacher.encode(b, ids=b.ids)
        times = []
        for k, b in enumerate(batches):
            t0 = time.perf_counter()
            res = task(b, k)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            opt.step()
            if k >= 3:  # the first steps include one-off set-up
                times.append(time.perf_counter() - t0)
        out[label] = float(np.median(times))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 400])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.99,
        help="MACE's 0.99; lower it for runs of a few hundred steps (the EMA still holds ~0.99^steps of "
        "the initial weights)",
    )
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--align-weight", type=float, default=0.5)
    p.add_argument("--baseline-steps", type=int, default=100)
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--data", default="data/molecular/md_aspirin.extxyz")
    p.add_argument("--molecule", default="aspirin", help="molecule of the MD set made when --data is missing")
    p.add_argument("--teacher", default="data/molecular/foundation_quick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="outputs/bench/mace_repa")
    args = p.parse_args()

    import os

    os.chdir(ROOT)
    from unirep.cli import compose, run_train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    runs = []
    for n in args.sizes:
        for seed in range(args.seeds):
            for recipe in ("mace", "mace_repa"):
                run_dir = out / "runs" / f"{recipe}_n{n}_s{seed}"
                t0 = time.time()
                result = run_train(compose("train", _overrides(args, recipe, n, seed, run_dir)))
                ev = result["eval"]
                row = {
                    "recipe": recipe,
                    "n_train": n,
                    "seed": seed,
                    "wall_s": time.time() - t0,
                    "f_mae_meV_A": ev["val/f_mae_meV_A"],
                    "e_mae_meV": ev["val/e_mae_meV"],
                    "e_mae_meV_per_atom": ev["val/e_mae_meV_per_atom"],
                }
                row.update({k: v for k, v in ev.items() if k.startswith("align/")})
                runs.append(row)
                print(json.dumps(row), flush=True)

    summary = {}
    for recipe in ("mace", "mace_repa"):
        for n in args.sizes:
            rows = [r for r in runs if r["recipe"] == recipe and r["n_train"] == n]
            f = np.array([r["f_mae_meV_A"] for r in rows])
            e = np.array([r["e_mae_meV"] for r in rows])
            summary[f"{recipe}/n{n}"] = {
                "f_mae_meV_A_mean": float(f.mean()),
                "f_mae_meV_A_std": float(f.std()),
                "e_mae_meV_mean": float(e.mean()),
                "e_mae_meV_std": float(e.std()),
            }
    timing = _step_times(args)
    timing["repa_over_mace_cached"] = timing["mace_repa_cached"] / timing["mace"]
    timing["repa_over_mace_uncached"] = timing["mace_repa_uncached"] / timing["mace"]
    record = {
        "args": vars(args),
        "runs": runs,
        "summary": summary,
        "step_time_s": timing,
        "torch_threads": torch.get_num_threads(),
        "total_wall_s": time.time() - t_start,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for recipe, color in (("mace", "C0"), ("mace_repa", "C3")):
        panels = ((axes[0], "f_mae_meV_A", "force MAE (meV/Å)"), (axes[1], "e_mae_meV", "energy MAE (meV)"))
        for ax, key, label in panels:
            m = [summary[f"{recipe}/n{n}"][f"{key}_mean"] for n in args.sizes]
            s = [summary[f"{recipe}/n{n}"][f"{key}_std"] for n in args.sizes]
            ax.errorbar(args.sizes, m, yerr=s, marker="o", color=color, label=recipe, capsize=3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("training structures")
            ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(f"{Path(args.data).stem} (GFN2-xTB MD), {args.steps} steps, {args.seeds} seeds")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=110)
    print(json.dumps({"summary": summary, "step_time_s": timing}, indent=1))
    print(f"wrote {out / 'results.json'} and {out / 'learning_curve.png'} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
