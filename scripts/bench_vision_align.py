"""Benchmark: SiT vs REPA vs REG vs HASTE on digits, same steps, several seeds (run by ``make bench``).

For every recipe and seed it trains the ``configs/experiment/vision/<recipe>.yaml`` recipe with the self-trained
teacher, evaluates FD-teacher and the conditional accuracy at regular steps (EMA weights), and writes
``<out>/results.json`` and ``<out>/curves.png`` (mean ± standard deviation over seeds, per recipe). It also times
training steps of each recipe relative to ``sit`` in the same process, with the teacher-feature cache on (features
computed once per item) and off (the teacher runs every step).

    python scripts/bench_vision_align.py                       # defaults: 600 steps, 3 seeds, eval every 200
    python scripts/bench_vision_align.py --steps 3000 --seeds 3 --eval-every 500

The teacher file is trained first if missing (see docs/vision.md). GPU throughput is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _compose(recipe: str, overrides: list[str]):
    from unirep.cli import compose

    return compose("train", [f"experiment=vision/{recipe}", *overrides])


def train_curves(args: argparse.Namespace) -> dict:
    from unirep.cli import run_train

    runs: dict[str, list[dict]] = {}
    for recipe in args.recipes:
        for seed in range(args.seeds):
            out_dir = Path(args.out) / f"{recipe}_seed{seed}"
            overrides = [
                f"seed={seed}",
                f"out_dir={out_dir}",
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_every={args.eval_every}",
                f"trainer.batch_size={args.batch_size}",
                "trainer.progress=false",
                "trainer.tensorboard=false",
                "trainer.resume=none",
                "trainer.overwrite=true",
                f"trainer.ckpt_every={args.steps}",
                f"task.eval_samples={args.eval_samples}",
                f"task.sample_steps={args.sample_steps}",
            ]
            if args.ema_decay:
                overrides.append(f"trainer.ema_decay={args.ema_decay}")
            if recipe == "haste":  # REPA's stop; the attention term follows it (configs/experiment/vision/haste.yaml)
                overrides.append(f"task.align.repa.schedule.stop_step={args.haste_stop or args.steps // 3}")
            start = time.time()
            run_train(_compose(recipe, overrides))
            wall = time.time() - start
            evals = []
            for f in sorted((out_dir / "eval").glob("metrics_step_*.json")):
                m = json.loads(f.read_text())
                evals.append({k: m[k] for k in ("step", "fd_teacher", "cond_accuracy", "precision", "recall")})
            runs.setdefault(recipe, []).append({"seed": seed, "wall_seconds": round(wall, 1), "evals": evals})
            last = evals[-1]
            print(
                f"[bench] {recipe} seed {seed}: {wall:.0f}s, FD-teacher {last['fd_teacher']:.3f}, "
                f"cond. accuracy {last['cond_accuracy']:.3f}",
                flush=True,
            )
    return runs


def summarise(runs: dict) -> dict:
    out = {}
    for recipe, rs in runs.items():
        steps = [e["step"] for e in rs[0]["evals"]]
        rows = []
        for i, step in enumerate(steps):
            row = {"step": step}
            for key in ("fd_teacher", "cond_accuracy", "precision", "recall"):
                vals = [r["evals"][i][key] for r in rs if i < len(r["evals"])]
                row[key] = statistics.fmean(vals)
                row[key + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
        out[recipe] = rows
    return out


def time_steps(args: argparse.Namespace) -> dict:
    """Seconds per training step (forward, backward, AdamW) of each recipe, cache on and off, same batches."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    cfg = _compose("sit", [])
    data = instantiate(cfg.data, _convert_="object")
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    batches = [b for _, b in zip(range(args.time_batches), loader, strict=False)]
    result = {}
    for recipe in args.recipes:
        for cache in [False] if recipe == "sit" else [True, False]:
            task = instantiate(_compose(recipe, [f"+task.teacher_cache={str(cache).lower()}"]).task, _convert_="object")
            opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
            for b in batches:  # warm-up pass: fills the cache (when on) and the allocator
                task(b, 0)["loss"].backward()
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for _ in range(args.time_reps):
                for i, b in enumerate(batches):
                    out = task(b, 1 + i)
                    opt.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    opt.step()
            per_step = (time.perf_counter() - start) / (args.time_reps * len(batches))
            key = recipe if recipe == "sit" else f"{recipe}_{'cache' if cache else 'nocache'}"
            result[key] = per_step
            print(f"[bench] {key}: {per_step * 1000:.1f} ms/step", flush=True)
    base = result["sit"]  # same process, same batches: the ratio is what to read on a shared machine
    return {k: {"seconds_per_step": v, "relative_to_sit": v / base} for k, v in result.items()}


def plot(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "fd_teacher", "FD-teacher (lower is better)"),
        (axes[1], "cond_accuracy", "conditional accuracy (higher is better)"),
    ):
        for recipe, rows in summary.items():
            steps = [r["step"] for r in rows]
            mean = [r[key] for r in rows]
            std = [r[key + "_std"] for r in rows]
            ax.plot(steps, mean, marker="o", label=recipe)
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                alpha=0.2,
            )
        ax.set_xlabel("training step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["sit", "repa", "reg", "haste"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--haste-stop", type=int, default=0, help="HASTE's stop step (default: a third of --steps)")
    ap.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="EMA decay of the evaluated weights (default: the recipe's; use ~1 - 5/steps for short runs)",
    )
    ap.add_argument("--time-batches", type=int, default=5, help="batches per timing run (0: no timing)")
    ap.add_argument("--time-reps", type=int, default=2)
    ap.add_argument("--skip-training", action="store_true", help="only the per-step timing")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_vision_align"))
    args = ap.parse_args()
    if "sit" not in args.recipes:
        args.recipes = ["sit", *args.recipes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vision.teacher import ensure_digits_teacher

    ensure_digits_teacher()
    report: dict = {"args": vars(args), "torch_threads": torch.get_num_threads(), "device": "cpu"}
    if args.time_batches > 0:
        report["timing"] = time_steps(args)
    if not args.skip_training:
        runs = train_curves(args)
        report["runs"] = runs
        report["summary"] = summarise(runs)
        plot(report["summary"], out / "curves.png")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    extra = "" if args.skip_training else f" and {out / 'curves.png'}"
    print(f"[bench] wrote {out / 'results.json'}{extra}")
    for recipe, rows in report.get("summary", {}).items():
        last = rows[-1]
        print(
            f"[bench] {recipe:6s} step {last['step']}: FD-teacher {last['fd_teacher']:.3f} ± "
            f"{last['fd_teacher_std']:.3f}, cond. accuracy {last['cond_accuracy']:.3f} ± "
            f"{last['cond_accuracy_std']:.3f}"
        )


if __name__ == "__main__":
    main()
