"""Time every unirep.metrics function against a dense reference on the same inputs; write outputs/bench/metrics.json.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_metrics.py [--sizes 1000 2000 10000] [--dim 1024]
        [--ref-max 2000] [--repeats 1] [--metrics cka_linear cknna ...]

The reference ("ref") column is a reimplementation, written below from the definitions in ANCHORS.md, of
platonic-rep's ``metrics.py`` code path (minyoungg/platonic-rep is not available here): full n x n kernels,
``K @ H @ L @ H`` for the biased HSIC, the zero-diagonal formula for the unbiased one, dense k-NN masks (argsort of
the whole similarity matrix) for mutual k-NN and CKNNA, ``+ 1e-6`` in the CKA/CKNNA denominators. The measures
platonic-rep does not have (distance correlation, TwoNN, information imbalance, anchor retrieval, permutation
nulls) are timed against the straightforward dense implementation of their papers' definitions. Each
measurement runs in a forked child process, so "peak_mb" is that metric's own peak resident memory above the
inputs (``ru_maxrss`` of the child minus its resident size at the start). References run up to ``--ref-max``
items (their O(n^3) matmuls and n x n matrices are the point of the comparison); "ratio" = ref time / unirep time
on the same inputs in the same run, and "abs_diff" the difference of their scores.

The two feature sets share a 32-dimensional latent plus noise, so every metric is neither 0 nor 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unirep import metrics as M


# -- dense references ------------------------------------------------------------------------------------------
def _hsic_biased(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return torch.trace(k @ h @ m @ h)


def _hsic_unbiased(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), m.clone().fill_diagonal_(0)
    val = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * (kt @ lt).sum() / (n - 2)
    return val / (n * (n - 3))


def _kernel(x: torch.Tensor, kind: str, sigma: float = 1.0) -> torch.Tensor:
    if kind == "ip":
        return x @ x.T
    return torch.exp(-torch.cdist(x, x).pow(2) / (2 * sigma**2))


def ref_cka(a, b, kind="ip", unbiased=False):
    k, m = _kernel(a, kind), _kernel(b, kind)
    h = _hsic_unbiased if unbiased else _hsic_biased
    return float(h(k, m) / (torch.sqrt(h(k, k) * h(m, m)) + 1e-6))


def _knn_dense(x: torch.Tensor, topk: int) -> torch.Tensor:
    return (x @ x.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :topk]


def ref_mutual_knn(a, b, topk=10):
    n = a.shape[0]
    ka, kb = _knn_dense(a, topk), _knn_dense(b, topk)
    r = torch.arange(n)[:, None]
    ma, mb = torch.zeros(n, n), torch.zeros(n, n)
    ma[r, ka], mb[r, kb] = 1.0, 1.0
    return float(((ma * mb).sum(1) / topk).mean())


def ref_cknna(a, b, topk=10):
    k, m = a @ a.T, b @ b.T

    def sim(k, m):
        kh, lh = k.clone().fill_diagonal_(float("-inf")), m.clone().fill_diagonal_(float("-inf"))
        mk = torch.zeros_like(k).scatter_(1, kh.topk(topk, dim=1).indices, 1)
        ml = torch.zeros_like(m).scatter_(1, lh.topk(topk, dim=1).indices, 1)
        mask = mk * ml
        return _hsic_unbiased(mask * k, mask * m)

    return float(sim(k, m) / (torch.sqrt(sim(k, k) * sim(m, m)) + 1e-6))


def ref_svcca(a, b, dim=10):
    def basis(x):
        x = x.double()
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        return u[:, :dim] * s[:dim]

    xa, xb = basis(a), basis(b)
    # textbook CCA: whiten each side with its covariance, singular values of the cross-covariance
    ca, cb, cab = xa.T @ xa, xb.T @ xb, xa.T @ xb
    wa = torch.linalg.inv(torch.linalg.cholesky(ca))
    wb = torch.linalg.inv(torch.linalg.cholesky(cb))
    return float(torch.linalg.svdvals(wa @ cab @ wb.T).clamp(max=1).mean())


def ref_dcor(a, b):
    def centred(x):
        d = torch.cdist(x.double(), x.double())
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    da, db = centred(a), centred(b)
    return float(((da * db).mean() / ((da * da).mean() * (db * db).mean()).sqrt()).sqrt())


def ref_twonn(x):
    d = torch.cdist(x, x).fill_diagonal_(float("inf"))
    r = d.topk(2, dim=1, largest=False).values
    mu = torch.sort((r[:, 1] / r[:, 0]).double()).values
    m = mu.numel()
    f = torch.arange(1, m + 1, dtype=torch.float64) / m
    keep = int(m * 0.9)
    xs, ys = torch.log(mu[:keep]), -torch.log(1 - f[:keep])
    return float((xs * ys).sum() / (xs * xs).sum())


def ref_information_imbalance(a, b):
    n = a.shape[0]
    da = torch.cdist(a, a).fill_diagonal_(float("inf"))
    db = torch.cdist(b, b).fill_diagonal_(float("inf"))
    nn = da.argmin(1)
    ranks = db.argsort(1).argsort(1)  # 0-based rank of every j in i's ordering (self last)
    return float(2.0 * (ranks[torch.arange(n), nn].double() + 1).mean() / n)


def ref_anchor_retrieval(a, b, anchors):
    keep = torch.ones(a.shape[0], dtype=torch.bool)
    keep[anchors] = False
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    ea, eb = (an @ an[anchors].T)[keep], (bn @ bn[anchors].T)[keep]
    d = torch.cdist(ea, eb)
    idx = torch.arange(ea.shape[0])
    return float(((d.argmin(1) == idx).double().mean() + (d.argmin(0) == idx).double().mean()) / 2)


def ref_cknna_null(a, b, permutations=49):
    g = torch.Generator().manual_seed(0)
    return float(sum(ref_cknna(a, b[torch.randperm(a.shape[0], generator=g)]) for _ in range(permutations)))


# -- the benchmark ---------------------------------------------------------------------------------------------
ANCHORS = torch.arange(64)

BENCH: dict[str, tuple[Callable, Callable | None]] = {
    "prepare_features": (lambda a, b: float(M.prepare_features(a).sum()), None),
    "mutual_knn": (lambda a, b: M.mutual_knn(a, b, topk=10), ref_mutual_knn),
    "cka_linear": (lambda a, b: M.cka(a, b), lambda a, b: ref_cka(a, b)),
    "cka_rbf": (lambda a, b: M.cka(a, b, kernel="rbf", sigma=1.0), lambda a, b: ref_cka(a, b, "rbf")),
    "unbiased_cka_linear": (lambda a, b: M.unbiased_cka(a, b), lambda a, b: ref_cka(a, b, unbiased=True)),
    "unbiased_cka_rbf": (
        lambda a, b: M.unbiased_cka(a, b, kernel="rbf", sigma=1.0),
        lambda a, b: ref_cka(a, b, "rbf", unbiased=True),
    ),
    "cknna": (lambda a, b: M.cknna(a, b, topk=10), ref_cknna),
    "svcca": (lambda a, b: M.svcca(a, b, dim=10), ref_svcca),
    "distance_correlation": (lambda a, b: M.distance_correlation(a, b), ref_dcor),
    "twonn_dimension": (lambda a, b: M.twonn_dimension(a), lambda a, b: ref_twonn(a)),
    "information_imbalance": (lambda a, b: M.information_imbalance(a, b), ref_information_imbalance),
    "anchor_retrieval": (
        lambda a, b: M.anchor_retrieval(a, b, ANCHORS),
        lambda a, b: ref_anchor_retrieval(a, b, ANCHORS),
    ),
    "anchor_ot_distance_300": (lambda a, b: M.anchor_ot_distance(a, b, ANCHORS, max_items=300), None),
    "cknna_null49": (
        lambda a, b: (
            M.permutation_null(
                lambda x, y: M.cknna(x, y, topk=10), a, b, 49, metric="cknna", metric_kwargs={"topk": 10}
            )["null_mean"]
            * 49
        ),
        ref_cknna_null,
    ),
}


def features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    a = z @ torch.randn(32, d, generator=g) + torch.randn(n, d, generator=g)
    b = torch.tanh(z @ torch.randn(32, d, generator=g)) + 0.5 * torch.randn(n, d, generator=g)
    return M.prepare_features(a), M.prepare_features(b)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(fn: Callable, a: torch.Tensor, b: torch.Tensor, repeats: int, queue: mp.Queue) -> None:
    base = _rss_mb()
    times, score = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        score = fn(a, b)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"seconds": min(times), "score": float(score), "peak_mb": max(peak - base, 0.0)})


def measure(fn: Callable, a: torch.Tensor, b: torch.Tensor, repeats: int, timeout: float) -> dict[str, float] | None:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, a, b, repeats, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return queue.get() if proc.exitcode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 10000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ref-max", type=int, default=2000, help="largest n at which the dense references run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement before it is abandoned")
    ap.add_argument("--metrics", nargs="+", default=list(BENCH), choices=list(BENCH))
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/metrics.json"))
    args = ap.parse_args()
    import scipy.optimize  # noqa: F401  (imported once here, not inside every timed child)
    import scipy.stats  # noqa: F401

    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for n in args.sizes:
        a, b = features(n, args.dim)
        for name in args.metrics:
            ours, ref = BENCH[name]
            row: dict[str, float | None] = {}
            got = measure(ours, a, b, args.repeats, args.timeout)
            if got is not None:
                row.update(seconds=got["seconds"], score=got["score"], peak_mb=got["peak_mb"])
            if ref is not None and n <= args.ref_max:
                r = measure(ref, a, b, args.repeats, args.timeout)
                if r is not None:
                    row.update(ref_seconds=r["seconds"], ref_score=r["score"], ref_peak_mb=r["peak_mb"])
                    if got is not None:
                        row["ratio"] = r["seconds"] / max(got["seconds"], 1e-9)
                        row["abs_diff"] = abs(r["score"] - got["score"])
            results.setdefault(name, {})[str(n)] = row
            fmt = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"{name:>24s} n={n:>6d} {fmt}", flush=True)

    meta = {
        "dim": args.dim,
        "ref_max": args.ref_max,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "reference": "dense reimplementation of platonic-rep metrics.py from ANCHORS.md (anchor repo not available)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
