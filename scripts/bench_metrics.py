"""Time the unirep.metrics at n = 1,000 / 5,000 / 10,000 items (d = 256) on CPU; write outputs/bench/metrics.json.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_metrics.py [--sizes 1000 5000 10000] [--dim 256] [--repeats 1]

The two feature sets share a 32-dimensional latent plus noise, so every metric is neither 0 nor 1. The JSON holds,
per metric and n, the best wall time over the repeats, the score, and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from unirep import metrics as M

BENCH = {
    "prepare_features": lambda a, b: M.prepare_features(a),
    "mutual_knn": lambda a, b: M.mutual_knn(a, b, topk=10),
    "cka_linear": lambda a, b: M.cka(a, b),
    "cka_rbf": lambda a, b: M.cka(a, b, kernel="rbf", sigma=1.0),
    "unbiased_cka_linear": lambda a, b: M.unbiased_cka(a, b),
    "unbiased_cka_rbf": lambda a, b: M.unbiased_cka(a, b, kernel="rbf", sigma=1.0),
    "cknna": lambda a, b: M.cknna(a, b, topk=10),
    "svcca": lambda a, b: M.svcca(a, b, dim=10),
}


def features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    a = z @ torch.randn(32, d, generator=g) + torch.randn(n, d, generator=g)
    b = torch.tanh(z @ torch.randn(32, d, generator=g)) + 0.5 * torch.randn(n, d, generator=g)
    return M.prepare_features(a), M.prepare_features(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--metrics", nargs="+", default=list(BENCH), choices=list(BENCH))
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/metrics.json"))
    args = ap.parse_args()

    results: dict[str, dict[str, dict[str, float]]] = {}
    for n in args.sizes:
        a, b = features(n, args.dim)
        for name in args.metrics:
            times, score = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = BENCH[name](a, b)
                times.append(time.perf_counter() - t0)
                score = out if isinstance(out, float) else None
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            results.setdefault(name, {})[str(n)] = {"seconds": min(times), "score": score, "peak_rss_mb": peak_mb}
            print(f"{name:>22s}  n={n:>6d}  {min(times):8.3f} s  score={score}  peak_rss={peak_mb:.0f} MB", flush=True)

    meta = {
        "dim": args.dim,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
