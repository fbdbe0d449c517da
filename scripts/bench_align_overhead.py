"""Benchmark: what alignment costs per training step once the teacher's features are precomputed.

The vision quick start (REPA on digits) is timed three ways, on the same batches, from the same initial weights:

- ``unaligned``: the same SiT without alignment terms (``task.align=null``), the baseline;
- ``aligned``: REPA with the teacher's features read from the shards ``unirep-features`` wrote (the teacher never
  runs in a step; what is left is hashing the batch, reading the features and the projector + loss);
- ``aligned_teacher``: REPA with the cache off (``task.teacher_cache=false``): the teacher runs every step, the
  cost the precompute removes.

A step is ``task(batch, step)``, backward and an AdamW step: the part that differs between the modes (the trainer's
EMA, logging and checkpoints are the same for all three and left out). The modes are interleaved in chunks of
``--chunk`` steps within one process, so a shared machine's changing load hits all three alike; the time per step is
the median over chunks after the first (warm-up). Results go to ``outputs/bench/align_overhead.json`` with the
machine (CPU, threads, load average, device) and are resumable: a rerun skips the seeds already there.

    python scripts/bench_align_overhead.py                      # defaults: 200 steps per mode, 3 seeds, CPU
    python scripts/bench_align_overhead.py --steps 1000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
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


def _time_seed(args: argparse.Namespace, common: list[str], seed: int) -> dict[str, float]:
    """Median seconds per step of each mode, interleaved in chunks, same batches and initial weights."""
    from hydra.utils import instantiate
    from torch.utils.data import default_collate

    from unirep.cli import _device, compose
    from unirep.train import seed_everything, to_device

    device = _device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs = {}
    for mode in args.modes:
        cfg = compose("train", ["experiment=vision/quickstart", *common, *MODES[mode], f"seed={seed}"])
        seed_everything(seed)
        data = instantiate(cfg.data, _convert_="object")
        task = instantiate(cfg.task, _convert_="object").to(device).train()
        params = [p for p in task.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(cfg.optimizer.lr), weight_decay=float(cfg.optimizer.weight_decay))
        runs[mode] = (task, opt)
    collate = data.collate_fn or default_collate
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    bs = args.batch_size

    def batch(step: int):
        start = (step * bs) % (len(order) - bs)
        return to_device(collate([data.train[i] for i in order[start : start + bs]]), device)

    times: dict[str, list[float]] = {m: [] for m in args.modes}
    for c in range(max(2, args.steps // args.chunk)):
        batches = [batch(c * args.chunk + k) for k in range(args.chunk)]
        for mode, (task, opt) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for k, b in enumerate(batches):
                loss = task(b, c * args.chunk + k)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[mode].append((time.perf_counter() - t0) / args.chunk)
    for mode, (task, _) in runs.items():
        teacher = getattr(task, "teacher", None)
        if mode == "aligned" and teacher is not None and teacher.teacher_calls:
            print(f"[bench] warning: the aligned run called its teacher {teacher.teacher_calls} times", flush=True)
    return {m: statistics.median(v[1:]) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per mode and seed")
    ap.add_argument("--chunk", type=int, default=10, help="steps of one mode before the next mode runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (trainer.num_threads; 0: default)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--cache-dir", default=str(ROOT / "data" / "cache" / "vision" / "teacher_features"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "align_overhead"))
    args = ap.parse_args()

    from unirep.cli import compose
    from unirep.features import run_features
    from vision.teacher import ensure_digits_teacher

    ensure_digits_teacher()  # stops with the command that makes it
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path = out.with_suffix(".json")
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result.setdefault("runs", {})
    result["settings"] = dict(
        steps=args.steps,
        chunk=args.chunk,
        seeds=args.seeds,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        timed="task forward + backward + AdamW step, modes interleaved; median over chunks after the first",
    )
    result["machine"] = _machine(args.device)
    common = [f"++task.teacher_cache_dir={args.cache_dir}", f"trainer.device={args.device}"]

    # the features once, as `make demo` does (resumable: a rerun finds them all)
    run_features(compose("train", ["experiment=vision/quickstart", *common, "trainer.progress=false"]))

    for seed in range(args.seeds):
        key = f"seed{seed}"
        if key in result["runs"]:
            print(f"[bench] {key}: done before {result['runs'][key]}")
            continue
        result["runs"][key] = _time_seed(args, common, seed)
        tmp = result_path.with_name(result_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, result_path)  # resumable: every finished seed is kept
        shown = ", ".join(f"{m} {v * 1e3:.1f}" for m, v in result["runs"][key].items())
        print(f"[bench] {key}: ms/step {shown}", flush=True)

    def per_mode(mode: str) -> list[float]:
        return [r[mode] for r in result["runs"].values() if mode in r]

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
