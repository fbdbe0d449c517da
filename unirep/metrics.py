"""Representation similarity metrics with the Platonic Representation Hypothesis definitions.

Huh, Cheung, Wang & Isola 2024, "The Platonic Representation Hypothesis"; anchor minyoungg/platonic-rep
``metrics.py`` (the metrics) and ``measure_alignment.py`` (preprocessing and the best-layer-pair search).
Every metric takes two feature matrices ``a[n, d_a]``, ``b[n, d_b]`` whose rows describe the same n items and
returns a float (a :class:`~unirep.tokens.TokenSet` is taken as its token matrix, one row per token; pool it with
``TokenSet.pool()`` to compare items).

- :func:`mutual_knn`: k nearest neighbours by inner product (self excluded) in each space; mean over items of
  ``|N_a(i) ∩ N_b(i)| / k``.
- :func:`cka`: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the biased ``HSIC = tr(K H L H)``, linear
  (``K = a a^T``) or RBF (``K_ij = exp(-|a_i - a_j|^2 / (2 sigma^2))``) kernels.
- :func:`unbiased_cka`: the same with the unbiased HSIC of Song et al. 2012 (JMLR 13, eq. 5) on zero-diagonal
  kernels.
- :func:`cknna`: unbiased HSIC of the linear kernels masked to mutual k-NN pairs (pairs (i, j) with j among the
  k nearest neighbours of i in both spaces), normalised like CKA.
- :func:`svcca`: standardise features, keep the top ``dim`` left singular vectors of each, mean canonical
  correlation between the two subspaces.
- :func:`prepare_features`: clamp at the 0.95 quantile of |x|, then L2-normalise rows.

Scale (n = 10,000 items on a CPU): no n x n matrix is ever stored. Linear kernels use feature-space identities
(``tr(K H L H) = |A_c^T B_c|_F^2``, ``sum(K o L) = |A^T B|_F^2``); RBF kernels are built in row chunks and reduced
on the fly to the few sums HSIC needs; k-NN uses chunked matmul + top-k; CKNNA works on the <= n*k masked entries
only. Kernels are evaluated in float32 and every sum is accumulated in float64.

Two deliberate differences from the anchor: (1) its ``+ 1e-6`` in the CKA/CKNNA denominators is a guard, not part
of the definition, and makes CKA depend on the feature scale; here ``eps`` defaults to 0 (pass ``eps=1e-6`` to
reproduce the anchor's numbers); (2) SVCCA uses an exact SVD and closed-form CCA (singular values of ``U_a^T U_b``)
instead of ``svd_lowrank`` and sklearn's iterative CCA, so it is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unirep.tokens import TokenSet

__all__ = [
    "mutual_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "prepare_features",
    "pairwise_alignment",
    "knn_indices",
    "METRICS",
]

# target number of float32 entries in one chunk of kernel rows (~16 MB): bounds memory for any n
_CHUNK_ENTRIES = 1 << 22


def _check(
    a: Tensor | TokenSet, b: Tensor | TokenSet, min_items: int = 2, what: str = "metric"
) -> tuple[Tensor, Tensor]:
    """Validate two feature matrices (a TokenSet counts as its tokens: each token is one item)."""
    out = []
    for name, x in (("a", a), ("b", b)):
        if isinstance(x, TokenSet):
            x = x.x
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{what}: features {name} must be a 2-D tensor [n, d], got {shape}; pool tokens "
                "per item (TokenSet.pool) or flatten first"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{what}: features {name} contain NaN or inf values; clean them before comparing")
        out.append(x.detach())
    a, b = out
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what}: a has {a.shape[0]} items but b has {b.shape[0]}; rows must be the same items")
    if a.shape[0] < min_items:
        raise ValueError(f"{what} needs at least {min_items} items, got {a.shape[0]}")
    return a, b


def _chunk_rows(n: int) -> int:
    return max(1, min(n, _CHUNK_ENTRIES // max(n, 1)))


# -- nearest neighbours ---------------------------------------------------------------------------------------
def knn_indices(x: Tensor, topk: int, return_values: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Indices ``[n, topk]`` of each row's ``topk`` largest inner products ``x_i . x_j``, ``j != i``.

    Row chunks of ``x @ x^T`` keep memory at O(chunk * n); with ``return_values`` the inner products are returned
    too (float32).
    """
    n = x.shape[0]
    if not 1 <= topk <= n - 1:
        raise ValueError(f"topk must be in [1, n-1] = [1, {n - 1}], got {topk}")
    x = x.float()
    idx_out = torch.empty(n, topk, dtype=torch.long, device=x.device)
    val_out = torch.empty(n, topk, dtype=torch.float32, device=x.device)
    step = _chunk_rows(n)
    for s in range(0, n, step):
        e = min(n, s + step)
        sim = x[s:e] @ x.T  # [c, n]
        rows = torch.arange(e - s, device=x.device)
        sim[rows, rows + s] = float("-inf")  # exclude self
        vals, idx = torch.topk(sim, topk, dim=1)
        idx_out[s:e], val_out[s:e] = idx, vals
    return (idx_out, val_out) if return_values else idx_out


def mutual_knn(a: Tensor, b: Tensor, topk: int = 10) -> float:
    """Mean over items of ``|N_a(i) ∩ N_b(i)| / topk`` with inner-product neighbourhoods (self excluded)."""
    a, b = _check(a, b, min_items=topk + 1, what="mutual_knn")
    ka, kb = knn_indices(a, topk), knn_indices(b, topk)
    overlap = (ka[:, :, None] == kb[:, None, :]).any(-1).sum(-1)  # [n]
    return float(overlap.double().mean() / topk)


# -- kernel statistics ----------------------------------------------------------------------------------------
class _Stats:
    """The sums of two n x n kernels K, L that biased and unbiased HSIC need (float64).

    kl, kk, ll: sum of the elementwise products; row_k, row_l: row sums [n]; diag_k, diag_l: diagonals [n].
    """

    def __init__(self, kl, kk, ll, row_k, row_l, diag_k, diag_l) -> None:
        self.kl, self.kk, self.ll = kl, kk, ll
        self.row_k, self.row_l, self.diag_k, self.diag_l = row_k, row_l, diag_k, diag_l


def _linear_stats(a: Tensor, b: Tensor) -> _Stats:
    """Stats of K = a a^T, L = b b^T from features, O(n d^2); falls back to Gram rows when d > n."""
    n = a.shape[0]
    a64, b64 = a.double(), b.double()
    if max(a.shape[1], b.shape[1]) > n:
        return _kernel_stats(a, b, lambda x, rows: x[rows].float() @ x.float().T)
    sa, sb = a64.sum(0), b64.sum(0)  # [d]
    return _Stats(
        kl=(a64.T @ b64).pow(2).sum(),  # sum_ij (a_i.a_j)(b_i.b_j) = |A^T B|_F^2
        kk=(a64.T @ a64).pow(2).sum(),
        ll=(b64.T @ b64).pow(2).sum(),
        row_k=a64 @ sa,  # sum_j a_i.a_j
        row_l=b64 @ sb,
        diag_k=a64.pow(2).sum(1),
        diag_l=b64.pow(2).sum(1),
    )


def _rbf_rows(sigma: float) -> Callable[[Tensor, slice], Tensor]:
    if sigma <= 0:
        raise ValueError(f"rbf sigma must be > 0, got {sigma}")

    def rows(x: Tensor, sl: slice) -> Tensor:
        x = x.float()
        sq = x.pow(2).sum(1)
        d2 = (sq[sl, None] + sq[None, :] - 2.0 * x[sl] @ x.T).clamp_min_(0.0)  # [c, n] squared distances
        r = torch.arange(d2.shape[0], device=x.device)
        d2[r, r + sl.start] = 0.0  # exact zeros on the diagonal despite rounding
        return torch.exp(-d2 / (2.0 * sigma**2))

    return rows


def _kernel_stats(a: Tensor, b: Tensor, rows: Callable[[Tensor, slice], Tensor]) -> _Stats:
    """Stats from kernel rows built chunk by chunk (float32 kernels, float64 sums); nothing n x n is kept."""
    n = a.shape[0]
    f64 = dict(dtype=torch.float64, device=a.device)
    kl, kk, ll = (torch.zeros((), **f64) for _ in range(3))
    row_k, row_l, diag_k, diag_l = (torch.zeros(n, **f64) for _ in range(4))
    step = _chunk_rows(n)
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        kc, lc = rows(a, sl), rows(b, sl)  # [c, n] float32; products rounded in float32, summed in float64
        kl += (kc * lc).sum(dtype=torch.float64)
        kk += kc.pow(2).sum(dtype=torch.float64)
        ll += lc.pow(2).sum(dtype=torch.float64)
        row_k[sl], row_l[sl] = kc.sum(1, dtype=torch.float64), lc.sum(1, dtype=torch.float64)
        r = torch.arange(kc.shape[0], device=a.device)
        diag_k[sl], diag_l[sl] = kc[r, r + s].double(), lc[r, r + s].double()
    return _Stats(kl, kk, ll, row_k, row_l, diag_k, diag_l)


def _stats(a: Tensor, b: Tensor, kernel: str, sigma: float) -> _Stats:
    if kernel in ("linear", "ip"):
        return _linear_stats(a, b)
    if kernel == "rbf":
        return _kernel_stats(a, b, _rbf_rows(sigma))
    raise ValueError(f"unknown kernel {kernel!r}: use 'linear' or 'rbf'")


def _hsic_biased(s_xy: Tensor, row_x: Tensor, row_y: Tensor, n: int) -> Tensor:
    # tr(K H L H) = sum(K o L) - (2/n) rowK . rowL + sum(K) sum(L) / n^2   (K, L symmetric)
    return s_xy - 2.0 / n * (row_x @ row_y) + row_x.sum() * row_y.sum() / n**2


def _hsic_unbiased(s_xy: Tensor, row_x: Tensor, row_y: Tensor, diag_x: Tensor, diag_y: Tensor, n: int) -> Tensor:
    # Song et al. 2012 eq. 5 on K~, L~ = K, L with zeroed diagonals (symmetric):
    # [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))
    s = s_xy - (diag_x * diag_y).sum()
    rx, ry = row_x - diag_x, row_y - diag_y
    return (s + rx.sum() * ry.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rx @ ry)) / (n * (n - 3))


def _ratio(xy: Tensor, xx: Tensor, yy: Tensor, eps: float, what: str) -> float:
    denom = torch.sqrt(xx * yy)
    if not torch.isfinite(denom) or (eps == 0 and denom <= 0):
        raise ValueError(
            f"{what}: a representation has zero (or negative) self-similarity HSIC; constant or "
            "degenerate features cannot be compared (check for collapsed features)"
        )
    return float(xy / (denom + eps))


# -- CKA ------------------------------------------------------------------------------------------------------
def cka(a: Tensor, b: Tensor, kernel: str = "linear", sigma: float = 1.0, eps: float = 0.0) -> float:
    """Centered kernel alignment with the biased HSIC ``tr(K H L H)`` (Kornblith et al. 2019).

    Linear CKA centres the features and uses ``|A_c^T B_c|_F^2``; RBF CKA uses ``exp(-|x-y|^2 / (2 sigma^2))``.
    """
    a, b = _check(a, b, min_items=2, what="cka")
    n = a.shape[0]
    if kernel in ("linear", "ip"):
        # centring the features is H K H for the linear kernel: row sums vanish and HSIC = sum(K o L)
        a = a.double() - a.double().mean(0)
        b = b.double() - b.double().mean(0)
    st = _stats(a, b, kernel, sigma)
    return _ratio(
        _hsic_biased(st.kl, st.row_k, st.row_l, n),
        _hsic_biased(st.kk, st.row_k, st.row_k, n),
        _hsic_biased(st.ll, st.row_l, st.row_l, n),
        eps,
        "cka",
    )


def unbiased_cka(a: Tensor, b: Tensor, kernel: str = "linear", sigma: float = 1.0, eps: float = 0.0) -> float:
    """CKA with the unbiased HSIC estimator of Song et al. 2012 on zero-diagonal kernels (needs n >= 4)."""
    a, b = _check(a, b, min_items=4, what="unbiased_cka")
    n = a.shape[0]
    st = _stats(a, b, kernel, sigma)
    return _ratio(
        _hsic_unbiased(st.kl, st.row_k, st.row_l, st.diag_k, st.diag_l, n),
        _hsic_unbiased(st.kk, st.row_k, st.row_k, st.diag_k, st.diag_k, n),
        _hsic_unbiased(st.ll, st.row_l, st.row_l, st.diag_l, st.diag_l, n),
        eps,
        "unbiased_cka",
    )


# -- CKNNA ----------------------------------------------------------------------------------------------------
def _sparse_hsic_unbiased(i: Tensor, j: Tensor, kv: Tensor, lv: Tensor, n: int) -> Tensor:
    """Unbiased HSIC (the anchor's formula, with ``K~ o L~^T``) of sparse, zero-diagonal, possibly asymmetric K~, L~.

    ``(i, j)`` are the non-zero positions (each at most once, i != j), ``kv``/``lv`` the kernel values there.
    """
    kv, lv = kv.double(), lv.double()
    # sum_ij K~_ij L~_ji: match each entry (i, j) with the entry (j, i) if it exists
    key = i * n + j
    order = torch.argsort(key)
    key_sorted = key[order]
    rev = j * n + i
    pos = torch.searchsorted(key_sorted, rev).clamp_max(key.numel() - 1)
    hit = key_sorted[pos] == rev
    term_t = (kv[hit] * lv[order[pos[hit]]]).sum()
    # 1^T K~ L~ 1 = (column sums of K~) . (row sums of L~)
    col_k = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, j, kv)
    row_l = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, i, lv)
    return (term_t + kv.sum() * lv.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (col_k @ row_l)) / (n * (n - 3))


def cknna(a: Tensor, b: Tensor, topk: int = 10, eps: float = 0.0) -> float:
    """Centered kernel nearest-neighbour alignment (Huh et al. 2024), platonic-rep's unbiased variant.

    K = a a^T and L = b b^T are kept only at pairs (i, j) where j is among the ``topk`` nearest neighbours of i
    (inner product, self excluded) in both spaces; CKNNA = HSIC_u(K~, L~) / sqrt(HSIC_u(K^, K^) HSIC_u(L^, L^)) where
    K^ (L^) keeps K (L) at its own k-NN pairs. Only the <= n*topk kept entries are ever materialised.
    """
    a, b = _check(a, b, min_items=max(4, topk + 1), what="cknna")
    if topk < 2:
        raise ValueError(f"cknna needs topk >= 2, got {topk}")
    n = a.shape[0]
    ia, va = knn_indices(a, topk, return_values=True)  # [n, k] neighbours and K values there
    ib, vb = knn_indices(b, topk, return_values=True)
    rows = torch.arange(n, device=a.device)[:, None].expand(n, topk)
    # mutual pairs: slot p of a's list equals slot q of b's list -> (i, ia[i, p]) with K = va[i, p], L = vb[i, q]
    eq = ia[:, :, None] == ib[:, None, :]  # [n, k, k]
    r, p, q = eq.nonzero(as_tuple=True)
    sim_kl = _sparse_hsic_unbiased(r, ia[r, p], va[r, p], vb[r, q], n)
    ri, ja, jb = rows.reshape(-1), ia.reshape(-1), ib.reshape(-1)
    sim_kk = _sparse_hsic_unbiased(ri, ja, va.reshape(-1), va.reshape(-1), n)
    sim_ll = _sparse_hsic_unbiased(ri, jb, vb.reshape(-1), vb.reshape(-1), n)
    return _ratio(sim_kl, sim_kk, sim_ll, eps, "cknna")


# -- SVCCA ----------------------------------------------------------------------------------------------------
def svcca(a: Tensor, b: Tensor, dim: int = 10) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation of the top-``dim`` singular subspaces.

    Features are centred and scaled to unit standard deviation (+1e-8, as the anchor); the left singular
    vectors U_a, U_b ``[n, dim]`` are orthonormal and centred, so the canonical correlations are the singular
    values of ``U_a^T U_b``.
    """
    a, b = _check(a, b, min_items=dim + 1, what="svcca")
    if dim < 1 or dim > min(a.shape[1], b.shape[1]):
        raise ValueError(f"svcca dim must be in [1, min(d_a, d_b)] = [1, {min(a.shape[1], b.shape[1])}], got {dim}")

    def basis(x: Tensor) -> Tensor:
        x = x.double()
        x = x - x.mean(0)
        x = x / (x.std(0) + 1e-8)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        if s[dim - 1] <= 1e-10 * s[0]:
            raise ValueError(f"svcca: features have rank < dim = {dim}; lower dim")
        return u[:, :dim]  # [n, dim]

    rho = torch.linalg.svdvals(basis(a).T @ basis(b)).clamp(max=1.0)
    return float(rho.mean())


# -- preprocessing and layer search ---------------------------------------------------------------------------
def prepare_features(x: Tensor, clamp_quantile: float = 0.95, normalize: bool = True, exact: bool = False) -> Tensor:
    """platonic-rep preprocessing: clamp to ±q-quantile of |x|, then L2-normalise the last dimension.

    ``exact=False`` (the anchor's default) takes the q-quantile of |x| of each item (over all its remaining
    dimensions) and averages it over items; ``exact=True`` takes the global quantile of all |x|.
    ``clamp_quantile=1`` skips clamping. Works on ``[n, d]`` and ``[n, L, d]`` (all layers of a model).
    """
    if not 0.0 < clamp_quantile <= 1.0:
        raise ValueError(f"clamp_quantile must be in (0, 1], got {clamp_quantile}")
    x = x.float()
    if clamp_quantile < 1.0:
        if exact:
            flat = x.abs().flatten().sort().values
            q_val = flat[min(int(clamp_quantile * flat.numel()), flat.numel() - 1)]
        else:
            per_item = x.abs().flatten(start_dim=1)
            # torch.quantile refuses very large inputs: take the quantile in row chunks
            step = max(1, (1 << 22) // max(per_item.shape[1], 1))
            qs = [torch.quantile(per_item[s : s + step], clamp_quantile, dim=1) for s in range(0, len(per_item), step)]
            q_val = torch.cat(qs).mean()
        x = x.clamp(-q_val, q_val)
    if normalize:
        x = F.normalize(x, p=2, dim=-1)
    return x


METRICS: dict[str, Callable[..., float]] = {
    "mutual_knn": mutual_knn,
    "cka": cka,
    "unbiased_cka": unbiased_cka,
    "cknna": cknna,
    "svcca": svcca,
}


def _layers(feats: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(feats, Tensor):
        if feats.dim() == 2:
            return [feats]
        if feats.dim() == 3:  # [n, L, d] as platonic-rep stores them
            return [feats[:, i] for i in range(feats.shape[1])]
        raise ValueError(f"layer features must be [n, d], [n, L, d] or a list of [n, d], got {tuple(feats.shape)}")
    return [f.x if isinstance(f, TokenSet) else f for f in feats]


def pairwise_alignment(
    feats_a: Sequence[Tensor] | Tensor,
    feats_b: Sequence[Tensor] | Tensor,
    metric: str | Callable[..., float] = "mutual_knn",
    normalize: bool = True,
    **kwargs,
) -> tuple[float, tuple[int, int], Tensor]:
    """Score every (layer of a, layer of b) pair and keep the best, as platonic-rep's ``compute_score``.

    ``normalize`` L2-normalises each layer's rows first (the anchor's default). Returns
    ``(best score, (i, j), scores[L_a, L_b])``.
    """
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: use one of {sorted(METRICS)} or a callable")
        metric = METRICS[metric]
    la, lb = _layers(feats_a), _layers(feats_b)
    if not la or not lb:
        raise ValueError("pairwise_alignment needs at least one layer on each side")
    scores = torch.empty(len(la), len(lb), dtype=torch.float64)
    for i, x in enumerate(la):
        x = F.normalize(x.float(), dim=-1) if normalize else x
        for j, y in enumerate(lb):
            y = F.normalize(y.float(), dim=-1) if normalize else y
            scores[i, j] = metric(x, y, **kwargs)
    flat = int(torch.argmax(scores))
    i, j = divmod(flat, len(lb))
    best = float(scores[i, j])
    if math.isnan(best):
        raise ValueError("pairwise_alignment: every score is NaN")
    return best, (i, j), scores
