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

Distribution metrics (generated vs real sets, the rows need not correspond):

- :func:`frechet_distance`: the FID formula (Heusel et al. 2017) on Gaussian fits of two feature sets
  (:func:`frechet_distance_gaussians` on stored means and covariances), with the
  trace of the matrix square root taken from eigenvalues (``torch.linalg.eigh``) instead of ``scipy.linalg.sqrtm``,
  whose complex parts and NaNs on near-singular products LightningDiT/pytorch-fid users report.
- :func:`knn_precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019, k = 3).

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
    "frechet_distance",
    "frechet_distance_gaussians",
    "knn_precision_recall",
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


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a[n, d]`` and ``b[m, d]`` (FID's formula).

    The means and unbiased covariances in float64 go to :func:`frechet_distance_gaussians`.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs [n, d] and [m, d] features, got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 items per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.detach().double(), b.detach().double()
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    return frechet_distance_gaussians(a.mean(0), cov_a, b.mean(0), cov_b)


def frechet_distance_gaussians(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` of two Gaussians (stored statistics such as ADM's
    reference batches' ``mu``/``sigma``), in float64.

    The trace of the square root equals the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    ``S_a^{1/2} S_b S_a^{1/2}`` (same spectrum as ``S_a S_b``), so two symmetric eigendecompositions replace
    ``sqrtm`` of a non-symmetric product: no complex parts, no NaN for rank-deficient covariances (n < d).
    """
    d = mu_a.numel()
    if mu_b.numel() != d or tuple(cov_a.shape) != (d, d) or tuple(cov_b.shape) != (d, d):
        raise ValueError(
            f"frechet_distance_gaussians needs means [d] and covariances [d, d] of one d, got {tuple(mu_a.shape)}, "
            f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}"
        )
    mu_a, mu_b = mu_a.detach().double().reshape(d), mu_b.detach().double().reshape(d)
    cov_a, cov_b = cov_a.detach().double(), cov_b.detach().double()
    ev_a, vec_a = torch.linalg.eigh(0.5 * (cov_a + cov_a.T))
    sqrt_a = (vec_a * ev_a.clamp_min(0).sqrt()) @ vec_a.T  # S_a^{1/2}
    mid = sqrt_a @ cov_b @ sqrt_a
    mid = 0.5 * (mid + mid.T)  # symmetric up to rounding: eigh reads one triangle
    tr_sqrt = torch.linalg.eigvalsh(mid).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt
    return max(float(fd), 0.0)  # >= 0 in exact arithmetic; rounding can leave -1e-15


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): the share of fake (real) points inside the union of the
    k-NN balls of the real (fake) points; a point's radius is the distance to its k-th nearest neighbour (self
    excluded)."""
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"knn_precision_recall needs more than k={k} items per set, got {real.shape[0]}, {fake.shape[0]}"
        )

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # k + 1: the zero distance to itself comes first

    def coverage(ref: Tensor, r: Tensor, query: Tensor) -> float:
        return float((torch.cdist(query, ref) <= r[None, :]).any(dim=1).float().mean())

    real, fake = real.detach().double(), fake.detach().double()
    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


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


# =============================================================================================================
# Calibration and the convergence papers' other measures (issue 18; owned by the convergence study)
#
# - distance_correlation: Székely, Rizzo & Bakirov 2007 (biased V-statistic dCor) or the bias-corrected squared
#   dCor of Székely & Rizzo 2014 (U-centred distance matrices); Edamadaka et al. 2025 report it next to CKNNA.
# - twonn_dimension: TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7, 12140).
# - information_imbalance: Glielmo, Zeni, Cheng, Csányi & Laio 2022 (PNAS Nexus 1, pgac039): Delta(A -> B) =
#   2/N <rank in B of each point's nearest neighbour in A>; ~0 when A predicts B's neighbourhoods, ~1 when it
#   carries no information about them.
# - permutation_null / gaussian_floor / benjamini_hochberg: calibration of any pair metric.
# - farthest_point_sampling, anchor_embedding, anchor_ot_distance, anchor_retrieval: Li & Walsh 2025's shared
#   anchor space (anchor-relative cosines to the same K items in every model) and direct comparison there.
# - spearman_bootstrap: rank correlation with a percentile bootstrap interval and a permutation p-value.
# Every n x n quantity is built in row chunks (``_chunk_rows``), so n = 10,000 never stores an n x n matrix.
# =============================================================================================================
__all__ += [  # noqa: PLE0605 (extends the list above)
    "distance_correlation",
    "twonn_dimension",
    "information_imbalance",
    "permutation_null",
    "permuted_scores",
    "gaussian_floor",
    "benjamini_hochberg",
    "farthest_point_sampling",
    "anchor_embedding",
    "anchor_ot_distance",
    "anchor_retrieval",
    "spearman_bootstrap",
    "PAIR_METRICS",
    "LOWER_IS_BETTER",
]


def _sq_dist_rows(x: Tensor, sl: slice) -> Tensor:
    """Squared Euclidean distances of rows ``sl`` to all rows ``[c, n]`` (float32, exact zeros on the diagonal)."""
    x = x.float()
    sq = x.pow(2).sum(1)
    d2 = (sq[sl, None] + sq[None, :] - 2.0 * x[sl] @ x.T).clamp_min_(0.0)
    r = torch.arange(d2.shape[0], device=x.device)
    d2[r, r + sl.start] = 0.0
    return d2


def _dist_rows(x: Tensor, sl: slice) -> Tensor:
    return _sq_dist_rows(x, sl).sqrt_()


def distance_correlation(a: Tensor, b: Tensor, unbiased: bool = False) -> float:
    """Distance correlation between ``a[n, d_a]`` and ``b[n, d_b]`` (Euclidean distances).

    ``unbiased=False``: Székely et al. 2007's dCor = sqrt(dCov^2(a, b) / sqrt(dVar^2(a) dVar^2(b))) with
    double-centred distance matrices (a V-statistic: in [0, 1], 1 for similarity transforms, positively biased
    for independent data at small n). ``unbiased=True``: the bias-corrected *squared* dCor of Székely & Rizzo 2014
    (U-centred matrices; ~0 for independent data, can be slightly negative). Double centring of a distance matrix
    is ``H D H``, so dCov^2 = tr(D_a H D_b H) / n^2 and the U-centred version is Song et al.'s unbiased HSIC on the
    distance matrices: both reuse the chunked HSIC sums.
    """
    a, b = _check(a, b, min_items=4 if unbiased else 2, what="distance_correlation")
    n = a.shape[0]
    st = _kernel_stats(a, b, _dist_rows)
    if unbiased:
        xy = _hsic_unbiased(st.kl, st.row_k, st.row_l, st.diag_k, st.diag_l, n)
        xx = _hsic_unbiased(st.kk, st.row_k, st.row_k, st.diag_k, st.diag_k, n)
        yy = _hsic_unbiased(st.ll, st.row_l, st.row_l, st.diag_l, st.diag_l, n)
        return _ratio(xy, xx, yy, 0.0, "distance_correlation")
    xy = _hsic_biased(st.kl, st.row_k, st.row_l, n)
    xx = _hsic_biased(st.kk, st.row_k, st.row_k, n)
    yy = _hsic_biased(st.ll, st.row_l, st.row_l, n)
    return math.sqrt(max(_ratio(xy, xx, yy, 0.0, "distance_correlation"), 0.0))


def _euclid_knn(x: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """Indices and Euclidean distances ``[n, topk]`` of each row's nearest neighbours (self excluded), chunked."""
    n = x.shape[0]
    idx_out = torch.empty(n, topk, dtype=torch.long, device=x.device)
    dist_out = torch.empty(n, topk, dtype=torch.float32, device=x.device)
    step = _chunk_rows(n)
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        d2 = _sq_dist_rows(x, sl)
        r = torch.arange(d2.shape[0], device=x.device)
        d2[r, r + s] = float("inf")  # exclude self
        vals, idx = torch.topk(d2, topk, dim=1, largest=False)
        idx_out[sl], dist_out[sl] = idx, vals.sqrt()
    return idx_out, dist_out


def twonn_dimension(x: Tensor, discard_fraction: float = 0.1, method: str = "fit") -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017) of the points ``x[n, d]`` (Euclidean distances).

    mu_i = r2 / r1 (distances to the second and first nearest neighbours) is Pareto distributed with exponent d on a
    locally uniform d-manifold. ``method="fit"`` is the paper's estimator: the slope through the origin of
    ``-log(1 - F(mu))`` against ``log(mu)`` with the largest ``discard_fraction`` of mu left out (they are the
    noisiest); ``"mle"`` is the maximum-likelihood ``(n - 1) / sum(log mu)``. Points with a duplicate (r1 = 0)
    are dropped.
    """
    if isinstance(x, TokenSet):
        x = x.x
    if x.dim() != 2 or x.shape[0] < 3:
        raise ValueError(f"twonn_dimension needs [n >= 3, d] points, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("twonn_dimension: points contain NaN or inf values")
    _, dist = _euclid_knn(x.detach(), 2)
    r1, r2 = dist[:, 0].double(), dist[:, 1].double()
    keep = r1 > 0
    mu = (r2[keep] / r1[keep]).clamp_min(1.0)
    if mu.numel() < 3:
        raise ValueError("twonn_dimension: fewer than 3 points without a duplicate")
    if method == "mle":
        return float((mu.numel() - 1) / torch.log(mu).sum())
    if method != "fit":
        raise ValueError(f"twonn_dimension method must be 'fit' or 'mle', got {method!r}")
    mu = torch.sort(mu).values
    m = mu.numel()
    f = torch.arange(1, m + 1, dtype=torch.float64) / m  # empirical CDF
    keep_n = max(2, int(math.floor(m * (1.0 - discard_fraction))))
    xs, ys = torch.log(mu[:keep_n]), -torch.log1p(-f[:keep_n].clamp(max=1 - 1e-12))
    return float((xs * ys).sum() / (xs * xs).sum().clamp_min(1e-300))


def information_imbalance(a: Tensor, b: Tensor) -> float:
    """Information imbalance Delta(a -> b) (Glielmo et al. 2022): ``2/n * mean_i rank_b(i, nn_a(i))``.

    ``nn_a(i)`` is i's nearest neighbour in ``a`` (Euclidean, self excluded), ``rank_b(i, j)`` is j's rank among
    i's neighbours in ``b`` (1 = nearest; ties count in j's favour). 0: a's neighbourhoods predict b's; ~1: a says
    nothing about b. Asymmetric: Delta(b -> a) is ``information_imbalance(b, a)``.
    """
    a, b = _check(a, b, min_items=3, what="information_imbalance")
    n = a.shape[0]
    nn_a = _euclid_knn(a, 1)[0][:, 0]  # [n]
    ranks = torch.empty(n, dtype=torch.float64)
    step = _chunk_rows(n)
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        d2 = _sq_dist_rows(b, sl)  # [c, n]
        r = torch.arange(d2.shape[0])
        target = d2[r, nn_a[sl]]  # distance in b to a's nearest neighbour
        d2[r, r + s] = float("inf")  # self is not a neighbour
        ranks[sl] = 1.0 + (d2 < target[:, None]).sum(1).double()
    return float(2.0 * ranks.mean() / n)


# -- calibration ----------------------------------------------------------------------------------------------
def permutation_null(
    fn: Callable[[Tensor, Tensor], float],
    a: Tensor | Sequence[Tensor],
    b: Tensor | Sequence[Tensor],
    permutations: int = 99,
    seed: int = 0,
    higher_is_better: bool = True,
    weights: Sequence[float] | None = None,
    value: float | None = None,
    metric: str | None = None,
    metric_kwargs: dict[str, object] | None = None,
) -> dict[str, float]:
    """Permutation null of a pair metric: shuffle the rows (items) of ``b``, recompute, ``permutations`` times.

    ``a``/``b`` may be lists of parts (e.g. one per element group) scored as ``sum_k w_k fn(a_k, b_k)``; each part
    is shuffled within itself. Returns ``value`` (the observed score), ``null_mean``, ``null_std``, ``p_value`` =
    (1 + #{null at least as good as the observed}) / (1 + permutations) (the +1 correction: the observed order is
    one of the permutations, so p is never 0), ``z`` = (value - null_mean) / null_std, and ``corrected`` = the gain
    over the null mean, signed so that positive means better than chance (value - null_mean, or null_mean - value
    for lower-is-better metrics). ``metric`` (a name of :data:`METRICS`/:data:`PAIR_METRICS`, with its
    ``metric_kwargs``) enables the exact fast paths of :func:`permuted_scores` (same permutations, same values).
    """
    pa = list(a) if not isinstance(a, Tensor) else [a]
    pb = list(b) if not isinstance(b, Tensor) else [b]
    w = list(weights) if weights is not None else [1.0] * len(pa)
    if not (len(pa) == len(pb) == len(w)):
        raise ValueError(f"permutation_null: {len(pa)} parts of a, {len(pb)} of b, {len(w)} weights")
    if permutations < 1:
        raise ValueError(f"permutation_null needs permutations >= 1, got {permutations}")

    def score(parts_b: list[Tensor]) -> float:
        return float(sum(wk * fn(xa, xb) for wk, xa, xb in zip(w, pa, parts_b, strict=True)))

    obs = score(pb) if value is None else float(value)
    g = torch.Generator().manual_seed(seed)
    perms = [[torch.randperm(xb.shape[0], generator=g) for xb in pb] for _ in range(permutations)]  # [K][part]
    fast = None
    if metric is not None:
        fast = [
            permuted_scores(metric, xa, xb, [p[k] for p in perms], **(metric_kwargs or {}))
            for k, (xa, xb) in enumerate(zip(pa, pb, strict=True))
        ]
        fast = None if any(f is None for f in fast) else fast
    if fast is not None:
        null = sum(wk * f for wk, f in zip(w, fast, strict=True)).double()
    else:
        null = torch.tensor([score([xb[p] for xb, p in zip(pb, ps, strict=True)]) for ps in perms], dtype=torch.float64)
    sign = 1.0 if higher_is_better else -1.0
    as_good = int((sign * null >= sign * obs - 1e-12).sum())
    mean, std = float(null.mean()), float(null.std()) if permutations > 1 else 0.0
    return {
        "value": obs,
        "null_mean": mean,
        "null_std": std,
        "p_value": (1 + as_good) / (1 + permutations),
        "z": (obs - mean) / std if std > 0 else float("nan"),
        "corrected": sign * (obs - mean),
    }


_DENSE_MAX = 6000  # fast nulls keep n x n distance/rank matrices up to this n (6000^2 float32 = 144 MB)


def permuted_scores(name: str, a: Tensor, b: Tensor, perms: Sequence[Tensor], **kwargs: object) -> Tensor | None:
    """``[metric(a, b[p]) for p in perms]`` without recomputing what a permutation only relabels, or ``None`` when
    the metric has no fast path (then :func:`permutation_null` recomputes). Exact, not approximate:

    - ``mutual_knn``, ``cknna``: the k-NN lists of b[p] are b's lists relabelled (``p^-1[N_b(p_i)]``) and the
      kernel values move with them; HSIC(L^, L^) is invariant. O(n k^2) per permutation instead of O(n^2 d).
    - ``distance_correlation``: distance matrix of b[p] = D_b[p][:, p]; O(n^2) per permutation (n <= 6000).
    - ``information_imbalance``: b's neighbour-rank matrix relabelled; O(n) per permutation (n <= 6000).
    - ``cka`` (linear): ``|A_c^T B_c[p]|_F^2`` with the centred features computed once.
    """
    a, b = _check(a, b, min_items=4, what=name)
    n = a.shape[0]
    if name in ("mutual_knn", "cknna"):
        topk = int(kwargs.get("topk", 10))
        if name == "cknna" and kwargs.get("eps", 0.0) != 0.0:
            return None
        ia, va = knn_indices(a, topk, return_values=True)
        ib, vb = knn_indices(b, topk, return_values=True)
        rows = torch.arange(n)[:, None].expand(n, topk)
        if name == "cknna":
            ri, ja = rows.reshape(-1), ia.reshape(-1)
            sim_kk = _sparse_hsic_unbiased(ri, ja, va.reshape(-1), va.reshape(-1), n)
            sim_ll = _sparse_hsic_unbiased(ri, ib.reshape(-1), vb.reshape(-1), vb.reshape(-1), n)
        out = []
        for p in perms:
            inv = torch.empty_like(p)
            inv[p] = torch.arange(n)
            ibp, vbp = inv[ib[p]], vb[p]  # k-NN of row i of b[p]: b's neighbours of p_i, relabelled
            eq = ia[:, :, None] == ibp[:, None, :]  # [n, k, k]
            if name == "mutual_knn":
                out.append(float(eq.any(-1).sum(-1).double().mean() / topk))
                continue
            r, s_, q = eq.nonzero(as_tuple=True)
            sim_kl = _sparse_hsic_unbiased(r, ia[r, s_], va[r, s_], vbp[r, q], n)
            out.append(_ratio(sim_kl, sim_kk, sim_ll, 0.0, "cknna"))
        return torch.tensor(out, dtype=torch.float64)
    if name == "cka" and kwargs.get("kernel", "linear") in ("linear", "ip") and kwargs.get("eps", 0.0) == 0.0:
        ac = a.double() - a.double().mean(0)
        bc = b.double() - b.double().mean(0)
        kk, ll = (ac.T @ ac).pow(2).sum(), (bc.T @ bc).pow(2).sum()
        return torch.tensor(
            [float((ac.T @ bc[p]).pow(2).sum() / torch.sqrt(kk * ll)) for p in perms], dtype=torch.float64
        )
    if n > _DENSE_MAX:
        return None
    if name == "distance_correlation":
        unbiased = bool(kwargs.get("unbiased", False))
        da = torch.cat([_dist_rows(a, slice(s, min(n, s + 512))) for s in range(0, n, 512)])  # [n, n] float32
        db = torch.cat([_dist_rows(b, slice(s, min(n, s + 512))) for s in range(0, n, 512)])
        ra, rb = da.sum(1, dtype=torch.float64), db.sum(1, dtype=torch.float64)
        kk, ll = da.pow(2).sum(dtype=torch.float64), db.pow(2).sum(dtype=torch.float64)
        zero = torch.zeros(n, dtype=torch.float64)
        if unbiased:
            xx, yy = _hsic_unbiased(kk, ra, ra, zero, zero, n), _hsic_unbiased(ll, rb, rb, zero, zero, n)
        else:
            xx, yy = _hsic_biased(kk, ra, ra, n), _hsic_biased(ll, rb, rb, n)
        out = []
        for p in perms:
            kl = (da * db[p][:, p]).sum(dtype=torch.float64)
            if unbiased:
                out.append(_ratio(_hsic_unbiased(kl, ra, rb[p], zero, zero, n), xx, yy, 0.0, name))
            else:
                out.append(math.sqrt(max(_ratio(_hsic_biased(kl, ra, rb[p], n), xx, yy, 0.0, name), 0.0)))
        return torch.tensor(out, dtype=torch.float64)
    if name == "information_imbalance":
        nn_a = _euclid_knn(a, 1)[0][:, 0]
        rank = torch.empty(n, n, dtype=torch.int32)  # rank[i, j]: 1 + #{m != i: d_b(i, m) < d_b(i, j)}
        for s in range(0, n, 512):
            sl = slice(s, min(n, s + 512))
            d2 = _sq_dist_rows(b, sl)
            r = torch.arange(d2.shape[0])
            d2[r, r + s] = float("-inf")  # self first: it takes rank 0 and is never asked for
            sd = torch.sort(d2, dim=1).values
            rank[sl] = torch.searchsorted(sd, d2.contiguous(), right=False).to(torch.int32)  # ties count in favour
        return torch.tensor([2.0 * float(rank[p, p[nn_a]].double().mean()) / n for p in perms], dtype=torch.float64)
    return None


def gaussian_floor(
    fn: Callable[[Tensor, Tensor], float],
    n: int,
    dim_a: int,
    dim_b: int,
    draws: int = 3,
    seed: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Width floor: mean score of two independent standard Gaussian feature sets ``[n, dim_a]``, ``[n, dim_b]``.

    Most metrics have a chance level that depends on the widths and n (biased CKA of independent features grows
    with ``sqrt(d_a d_b) / n``; mutual k-NN with the dimension), so scores of models of different widths are only
    comparable above this floor. ``transform`` applies the study's preprocessing to each draw.
    """
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(draws):
        xa, xb = torch.randn(n, dim_a, generator=g), torch.randn(n, dim_b, generator=g)
        if transform is not None:
            xa, xb = transform(xa), transform(xb)
        vals.append(fn(xa, xb))
    return float(sum(vals) / len(vals))


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    p = torch.as_tensor(list(p_values), dtype=torch.float64)
    m = p.numel()
    if m == 0:
        return []
    order = torch.argsort(p)
    scaled = p[order] * m / torch.arange(1, m + 1, dtype=torch.float64)
    adj = torch.flip(torch.cummin(torch.flip(scaled, [0]), 0).values, [0]).clamp(max=1.0)
    out = torch.empty_like(adj)
    out[order] = adj
    return out.tolist()


# -- anchor space (Li & Walsh 2025) ---------------------------------------------------------------------------
def farthest_point_sampling(x: Tensor, k: int, start: int = 0) -> Tensor:
    """Indices of ``k`` rows of ``x[n, d]`` chosen greedily, each the farthest (Euclidean) from those already
    chosen, starting at row ``start``: anchors that cover the data rather than its densest region (the aim of
    Li & Walsh's DIRECT sampling), deterministic, O(n k d)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"farthest_point_sampling: k must be in [1, n] = [1, {n}], got {k}")
    x = x.detach().double()
    chosen = [int(start)]
    dmin = (x - x[start]).pow(2).sum(1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(dmin))
        chosen.append(nxt)
        dmin = torch.minimum(dmin, (x - x[nxt]).pow(2).sum(1))
    return torch.tensor(chosen, dtype=torch.long)


def anchor_embedding(x: Tensor, anchors: Tensor) -> Tensor:
    """Cosine of every row of ``x[n, d]`` to the anchor rows ``x[anchors]`` -> ``[n, K]`` (Li & Walsh): models of
    any width land in one K-dimensional space whose axes are the same items for every model."""
    xn = F.normalize(x.float(), dim=1)
    return xn @ xn[anchors].T


def _non_anchor(n: int, anchors: Tensor) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[anchors] = False  # an anchor's own coordinate is 1 in every model: a giveaway, not a comparison
    return keep.nonzero().squeeze(1)


def anchor_retrieval(a: Tensor, b: Tensor, anchors: Tensor) -> float:
    """Cross-model retrieval in the shared anchor space: the share of items whose nearest neighbour (Euclidean)
    among the other model's anchor-space embeddings is the same item, averaged over both directions (anchors
    excluded; chance = 1 / number of items)."""
    a, b = _check(a, b, min_items=3, what="anchor_retrieval")
    anchors = torch.as_tensor(anchors, dtype=torch.long)
    keep = _non_anchor(a.shape[0], anchors)
    ea, eb = anchor_embedding(a, anchors)[keep], anchor_embedding(b, anchors)[keep]
    m = ea.shape[0]
    hits = 0
    step = _chunk_rows(m)
    for q, t in ((ea, eb), (eb, ea)):
        for s in range(0, m, step):
            e = min(m, s + step)
            nn = torch.cdist(q[s:e], t).argmin(1)  # [c]
            hits += int((nn == torch.arange(s, e)).sum())
    return hits / (2.0 * m)


def anchor_ot_distance(a: Tensor, b: Tensor, anchors: Tensor, max_items: int = 2000, seed: int = 0) -> float:
    """Optimal-transport (earth mover's) distance between two models' anchor-space embedding clouds.

    Equal-size uniform point clouds: the optimal plan is a permutation (Birkhoff), found exactly by
    ``scipy.optimize.linear_sum_assignment`` on the Euclidean cost; the value is the mean matched distance. It
    compares the two clouds as sets (no item correspondence is used), which is what Li & Walsh's OT comparison
    measures; ``anchor_retrieval`` uses the correspondence. Anchors are left out; above ``max_items`` a seeded
    random subset (the same items for both models) keeps the cubic assignment affordable.
    """
    from scipy.optimize import linear_sum_assignment

    a, b = _check(a, b, min_items=3, what="anchor_ot_distance")
    anchors = torch.as_tensor(anchors, dtype=torch.long)
    keep = _non_anchor(a.shape[0], anchors)
    if keep.numel() > max_items:
        g = torch.Generator().manual_seed(seed)
        keep = keep[torch.randperm(keep.numel(), generator=g)[:max_items]]
    ea, eb = anchor_embedding(a, anchors)[keep].double(), anchor_embedding(b, anchors)[keep].double()
    cost = torch.cdist(ea, eb).numpy()
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].mean())


# -- the hypothesis test --------------------------------------------------------------------------------------
def spearman_bootstrap(
    x: Sequence[float], y: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Spearman's rho of ``x`` and ``y`` with a percentile bootstrap interval (resampling pairs) and a
    permutation p-value (two-sided, +1 corrected, ``n_boot`` shuffles). Resamples with fewer than 3 distinct
    points or a constant side are skipped."""
    import numpy as np
    from scipy.stats import spearmanr

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.size < 3:
        raise ValueError(
            f"spearman_bootstrap needs two equal-length sequences of >= 3 values, got {xs.size}, {ys.size}"
        )
    rho = float(spearmanr(xs, ys).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, xs.size, xs.size)
        if np.unique(i).size < 3 or np.ptp(xs[i]) == 0 or np.ptp(ys[i]) == 0:
            continue
        boots.append(spearmanr(xs[i], ys[i]).statistic)
    boots = np.asarray(boots, dtype=float)
    boots = boots[np.isfinite(boots)]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) if boots.size else (np.nan, np.nan)
    perm = np.asarray([spearmanr(xs, rng.permutation(ys)).statistic for _ in range(n_boot)])
    p = (1 + int(np.sum(np.abs(perm) >= abs(rho) - 1e-12))) / (1 + n_boot)
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "p_value": float(p), "n": int(xs.size), "level": level}


PAIR_METRICS: dict[str, Callable[..., float]] = {
    "distance_correlation": distance_correlation,
    "information_imbalance": information_imbalance,
    "anchor_retrieval": anchor_retrieval,
    "anchor_ot_distance": anchor_ot_distance,
}
# metrics where a lower value means more alike (best layer pair = minimum; nulls and gains signed accordingly)
LOWER_IS_BETTER = frozenset({"information_imbalance", "anchor_ot_distance"})


def alignment_floors(
    student: Tensor,
    target: Tensor,
    groups: Tensor | None = None,
    projector: Callable[[int, int], torch.nn.Module] | None = None,
    hidden_dim: int = 256,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """What alignment cosine is cheap to get: the floors against which a trained projector's cosine is read.

    REPA-family losses report the mean cosine between projected student tokens ``student[T, D]`` and target tokens
    ``target[T, D']``. A projector fitted afresh (full batch, Adam, ``steps``) reaches ``fit_real`` on the real pairs;
    on targets shuffled across tokens it reaches ``fit_shuffled``, the cosine that needs no correspondence at all;
    with ``groups[T]`` (atoms: the element; images: a class) ``group_mean`` is the cosine of each target with its
    group's mean target, what a projector that only knows the group gets (per-element offsets dominate atomistic
    features; rs-gh/molecular-repa found a projector on random inputs at 0.86). ``projector(in_dim, out_dim)`` builds
    the fresh projector (default: REPA's three-layer SiLU MLP of width ``hidden_dim``).
    """
    x = student.detach().float()
    y = target.detach().float()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"alignment_floors: {x.shape[0]} student tokens vs {y.shape[0]} target tokens")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.shape[0], generator=g)

    def build() -> torch.nn.Module:
        if projector is not None:
            return projector(x.shape[1], y.shape[1])
        return torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden_dim),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden_dim, hidden_dim),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden_dim, y.shape[1]),
        )

    def fit(tgt: Tensor) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            proj = build()
        opt = torch.optim.Adam(proj.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = -F.cosine_similarity(proj(x), tgt, dim=-1).mean()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return float(F.cosine_similarity(proj(x), tgt, dim=-1).mean())

    out = {"fit_real": fit(y), "fit_shuffled": fit(y[perm])}
    if groups is not None:
        groups = groups.long().cpu()
        _, inverse = torch.unique(groups, return_inverse=True)
        means = torch.zeros(int(inverse.max()) + 1, y.shape[1]).index_add_(0, inverse, y)
        means /= torch.bincount(inverse).clamp_min(1)[:, None].float()
        out["group_mean"] = float(F.cosine_similarity(means[inverse], y, dim=-1).mean())
    return out
