"""Benchmark: what alignment costs per training step once the teacher's features are precomputed.

The vision quick start (REPA on digits) is timed three ways, same steps, same seeds, one process after another:

- ``unaligned``: the same SiT without alignment terms (``task.align=null``), the baseline;
- ``aligned``: REPA with the teacher's features read from the shards ``unirep-features`` wrote (the teacher never
  runs in a step; the cost left is hashing the batch, reading the shard and the projector + loss);
- ``aligned_teacher``: REPA with the cache off (``task.teacher_cache=false``): the teacher runs every step, the
  cost the precompute removes.

The time per step is the median of the trainer's logged ``steps_per_sec`` windows after the first (warm-up), so
start-up, evaluation and checkpoints are not counted. Results go to ``outputs/bench/align_overhead.json`` with the
machine (CPU, threads, load average, device) and are resumable: a rerun skips the (mode, seed) runs already there.

    python scripts/bench_align_overhead.py                      # defaults: 300 steps, 3 seeds, CPU
    python scripts/bench_align_overhead.py --steps 1000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "unaligned": ["task.align=null"],
    "aligned": [],
    "aligned_teacher": ["++task.teacher_cache=false"],
}


def _machine(device: str) -> dict:
    info = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        device=device,
    )
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _seconds_per_step(metrics_csv: Path) -> float:
    import csv

    with open(metrics_csv) as f:
        rates = [float(r["steps_per_sec"]) for r in csv.DictReader(f) if r.get("steps_per_sec")]
    rates = [r for r in rates if r > 0][1:] or rates  # the first window holds the warm-up
    if not rates:
        raise RuntimeError(f"{metrics_csv} has no steps_per_sec column: cannot time the run")
    return 1.0 / statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (trainer.num_threads; 0: default)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--cache-dir", default=str(ROOT / "data" / "cache" / "vision" / "teacher_features"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "align_overhead"))
    args = ap.parse_args()

    from unirep.cli import compose, run_train
    from unirep.features import run_features
    from vision.teacher import ensure_digits_teacher

    ensure_digits_teacher()  # stops with the command that makes it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out.with_suffix(".json")
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result.setdefault("runs", {})
    result["settings"] = dict(
        steps=args.steps, seeds=args.seeds, batch_size=args.batch_size, device=args.device, threads=args.threads
    )
    result["machine"] = _machine(args.device)
    common = [
        f"++task.teacher_cache_dir={args.cache_dir}",
        f"trainer.device={args.device}",
        f"trainer.num_threads={args.threads}",
    ]

    # the features once, as `make demo` does (resumable: a rerun finds them all)
    run_features(compose("train", ["experiment=vision/quickstart", *common, "trainer.progress=false"]))

    log_every = max(1, args.steps // 6)
    for seed in range(args.seeds):
        for mode in args.modes:
            key = f"{mode}/seed{seed}"
            if key in result["runs"]:
                print(f"[bench] {key}: done before ({result['runs'][key]['sec_per_step'] * 1e3:.1f} ms/step)")
                continue
            run_dir = out / f"{mode}_seed{seed}"
            cfg = compose(
                "train",
                [
                    "experiment=vision/quickstart",
                    *common,
                    *MODES[mode],
                    f"seed={seed}",
                    f"out_dir={run_dir}",
                    f"trainer.max_steps={args.steps}",
                    f"trainer.batch_size={args.batch_size}",
                    f"trainer.log_every={log_every}",
                    f"trainer.ckpt_every={args.steps}",
                    "trainer.eval_at_end=false",
                    "trainer.resume=none",
                    "trainer.overwrite=true",
                    "trainer.progress=false",
                    "trainer.tensorboard=false",
                ],
            )
            run_train(cfg)
            sec = _seconds_per_step(run_dir / "metrics.csv")
            result["runs"][key] = dict(mode=mode, seed=seed, sec_per_step=sec)
            tmp = result_path.with_name(result_path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, result_path)  # resumable: every finished run is kept
            print(f"[bench] {key}: {sec * 1e3:.1f} ms/step", flush=True)

    def per_mode(mode: str) -> list[float]:
        return [r["sec_per_step"] for r in result["runs"].values() if r["mode"] == mode]

    summary = {}
    base = per_mode("unaligned")
    for mode in args.modes:
        vals = per_mode(mode)
        if not vals:
            continue
        row = dict(ms_per_step_mean=1e3 * statistics.mean(vals), ms_per_step_sd=1e3 * statistics.pstdev(vals))
        if base and mode != "unaligned":
            ratios = [a / b for a, b in zip(vals, base, strict=False)]
            row.update(ratio_to_unaligned_mean=statistics.mean(ratios), ratio_to_unaligned_sd=statistics.pstdev(ratios))
        summary[mode] = row
    result["summary"] = summary
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    print(json.dumps(dict(summary=summary, machine=result["machine"]), indent=1))
    print(f"[bench] wrote {result_path}")


if __name__ == "__main__":
    main()
