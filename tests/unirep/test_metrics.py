"""unirep.metrics against dense, independent definitions (platonic-rep formulas written out) and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unirep import metrics as M
from unirep.tokens import TokenSet


def _data(n: int = 120, da: int = 12, db: int = 9, seed: int = 0, noise: float = 0.7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    a = z @ torch.randn(6, da, generator=g) + noise * torch.randn(n, da, generator=g) + 0.3
    b = torch.tanh(z @ torch.randn(6, db, generator=g)) + noise * torch.randn(n, db, generator=g)
    return a, b


# -- dense references (float64, full n x n matrices) ----------------------------------------------------------
def _hsic_biased_dense(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return torch.trace(k @ h @ m @ h)


def _hsic_unbiased_dense(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), m.clone().fill_diagonal_(0)
    val = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * (kt @ lt).sum() / (n - 2)
    return val / (n * (n - 3))


def _kernel(x: torch.Tensor, kind: str, sigma: float = 1.0) -> torch.Tensor:
    x = x.double()
    if kind == "linear":
        return x @ x.T
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2))


def _cka_dense(a, b, kind="linear", sigma=1.0, unbiased=False) -> float:
    k, m = _kernel(a, kind, sigma), _kernel(b, kind, sigma)
    h = _hsic_unbiased_dense if unbiased else _hsic_biased_dense
    return float(h(k, m) / torch.sqrt(h(k, k) * h(m, m)))


def _knn_loop(x: torch.Tensor, k: int) -> list[set[int]]:
    x = x.double()
    out = []
    for i in range(x.shape[0]):
        sims = [(float(x[i] @ x[j]), j) for j in range(x.shape[0]) if j != i]
        sims.sort(reverse=True)
        out.append({j for _, j in sims[:k]})
    return out


def _cknna_dense(a, b, topk, eps: float = 0.0) -> float:
    """platonic-rep's cknna (unbiased branch) written densely."""
    k_, l_ = _kernel(a, "linear"), _kernel(b, "linear")
    n = k_.shape[0]

    def sim(k, m):
        kh = k.clone().fill_diagonal_(float("-inf"))
        lh = m.clone().fill_diagonal_(float("-inf"))
        mk = torch.zeros(n, n, dtype=torch.float64).scatter_(1, torch.topk(kh, topk, dim=1).indices, 1)
        ml = torch.zeros(n, n, dtype=torch.float64).scatter_(1, torch.topk(lh, topk, dim=1).indices, 1)
        mask = mk * ml
        return _hsic_unbiased_dense(mask * k, mask * m)

    return float(sim(k_, l_) / (torch.sqrt(sim(k_, k_) * sim(l_, l_)) + eps))


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# -- equality with the definitions ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,sigma", [("linear", 1.0), ("rbf", 3.0)])
def test_cka_matches_dense_definition(kind, sigma):
    a, b = _data()
    assert M.cka(a, b, kernel=kind, sigma=sigma) == pytest.approx(_cka_dense(a, b, kind, sigma), abs=1e-6)


@pytest.mark.parametrize("kind,sigma", [("linear", 1.0), ("rbf", 3.0)])
def test_unbiased_cka_matches_dense_definition(kind, sigma):
    a, b = _data(seed=1)
    ref = _cka_dense(a, b, kind, sigma, unbiased=True)
    assert M.unbiased_cka(a, b, kernel=kind, sigma=sigma) == pytest.approx(ref, abs=1e-6)


def test_linear_cka_gram_path_when_features_wider_than_items():
    # d > n switches to chunked Gram rows instead of d x d feature products: same value
    a, b = _data(n=20, da=40, db=30, seed=2)
    assert M.cka(a, b) == pytest.approx(_cka_dense(a, b), abs=1e-5)
    assert M.unbiased_cka(a, b) == pytest.approx(_cka_dense(a, b, unbiased=True), abs=1e-5)


def test_chunking_does_not_change_values(monkeypatch):
    a, b = _data(n=90, seed=3)
    full = (M.cka(a, b, "rbf", 2.0), M.unbiased_cka(a, b, "rbf", 2.0), M.cknna(a, b, 5), M.mutual_knn(a, b, 5))
    monkeypatch.setattr(M, "_CHUNK_ENTRIES", 7 * 90)  # 7 rows per chunk, last chunk partial
    chunked = (M.cka(a, b, "rbf", 2.0), M.unbiased_cka(a, b, "rbf", 2.0), M.cknna(a, b, 5), M.mutual_knn(a, b, 5))
    assert chunked == pytest.approx(full, abs=1e-9)


def test_mutual_knn_matches_loop_definition():
    a, b = _data(n=60, seed=4)
    k = 5
    na, nb = _knn_loop(a, k), _knn_loop(b, k)
    ref = sum(len(x & y) for x, y in zip(na, nb, strict=True)) / (k * len(na))
    assert M.mutual_knn(a, b, topk=k) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("topk", [3, 10])
def test_cknna_matches_dense_anchor_formula(topk):
    a, b = _data(n=80, seed=5)
    a, b = M.prepare_features(a), M.prepare_features(b)
    assert M.cknna(a, b, topk=topk) == pytest.approx(_cknna_dense(a, b, topk), abs=1e-6)


def test_eps_reproduces_anchor_denominator():
    # platonic-rep divides by sqrt(.) + 1e-6; eps=1e-6 gives its numbers, eps=0 the scale-free definition
    a, b = _data(n=50, seed=6)
    a, b = M.prepare_features(a), M.prepare_features(b)
    guarded = M.cknna(a, b, 5, eps=1e-6)
    assert guarded == pytest.approx(_cknna_dense(a, b, 5, eps=1e-6), abs=1e-7)
    assert guarded != M.cknna(a, b, 5)
    k, m = _kernel(a, "linear"), _kernel(b, "linear")
    h = _hsic_biased_dense
    assert M.cka(a, b, eps=1e-6) == pytest.approx(float(h(k, m) / (torch.sqrt(h(k, k) * h(m, m)) + 1e-6)), abs=1e-9)


def test_svcca_matches_sklearn_cca_route():
    # the anchor: standardise, top-dim left singular vectors, sklearn CCA, mean correlation of the variates
    from sklearn.cross_decomposition import CCA

    a, b = _data(n=300, seed=7)
    dim = 4

    def basis(x):
        x = x.double()
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
        return torch.linalg.svd(x, full_matrices=False)[0][:, :dim].numpy()

    ua, ub = basis(a), basis(b)
    cca = CCA(n_components=dim, max_iter=5000, tol=1e-12).fit(ua, ub)
    xa, xb = cca.transform(ua, ub)
    ref = np.mean([np.corrcoef(xa[:, i], xb[:, i])[0, 1] for i in range(dim)])
    assert M.svcca(a, b, dim=dim) == pytest.approx(ref, abs=1e-4)


# -- invariances and closed forms -----------------------------------------------------------------------------
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling():
    a, b = _data(seed=8)
    q = _orthogonal(a.shape[1], 1)
    base = M.cka(a, b)
    assert M.cka(a @ q * 7.5, b) == pytest.approx(base, abs=1e-6)
    assert M.cka(a, 0.01 * b) == pytest.approx(base, abs=1e-6)
    assert M.unbiased_cka(a @ q * 3.0, b) == pytest.approx(M.unbiased_cka(a, b), abs=1e-6)
    assert M.cka(a, a @ q) == pytest.approx(1.0, abs=1e-9)


def test_cka_symmetric_and_bounded():
    a, b = _data(seed=9)
    v = M.cka(a, b)
    assert 0.0 < v < 1.0 and M.cka(b, a) == pytest.approx(v, abs=1e-12)
    assert M.cka(a, b, "rbf", 2.0) == pytest.approx(M.cka(b, a, "rbf", 2.0), abs=1e-12)


def test_mutual_knn_identical_is_one_and_independent_is_chance():
    g = torch.Generator().manual_seed(10)
    n, k = 800, 10
    a = M.prepare_features(torch.randn(n, 64, generator=g))
    b = M.prepare_features(torch.randn(n, 64, generator=g))
    assert M.mutual_knn(a, a, topk=k) == 1.0
    # independent neighbourhoods: each of b's k neighbours is in a's list with probability k/(n-1), so the mean
    # is k/(n-1) = 0.0125; the per-item overlap is ~hypergeometric with variance ~k p (1-p) / k^2 = 1.2e-3, so
    # the mean over n items has a standard deviation ~sqrt(1.2e-3 / n) = 1.2e-3: 0.006 is five of them
    assert M.mutual_knn(a, b, topk=k) == pytest.approx(k / (n - 1), abs=0.006)


def test_svcca_one_for_invertible_linear_maps():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(200, 8, generator=g)
    m = torch.randn(8, 8, generator=g) + 3 * torch.eye(8)
    assert M.svcca(a, a @ m + 2.0, dim=8) == pytest.approx(1.0, abs=1e-6)
    # rank-dim data: the top-dim subspaces coincide for any invertible map, whatever d
    z = torch.randn(200, 5, generator=g)
    x = z @ torch.randn(5, 12, generator=g)
    y = x @ (torch.randn(12, 12, generator=g) + 3 * torch.eye(12))
    assert M.svcca(x, y, dim=5) == pytest.approx(1.0, abs=1e-6)
    assert M.svcca(a, torch.randn(200, 8, generator=g), dim=8) < 0.5


def test_cknna_identical_is_one():
    a, _ = _data(n=70, seed=12)
    assert M.cknna(a, a, topk=6) == pytest.approx(1.0, abs=1e-9)


def test_prepare_features_quantile_clamp_and_norm():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(50, 40, generator=g)
    q_rows = torch.quantile(x.abs(), 0.95, dim=1).mean()
    ref = torch.nn.functional.normalize(x.clamp(-q_rows, q_rows), dim=-1)
    assert torch.allclose(M.prepare_features(x), ref)
    flat = x.abs().flatten().sort().values
    q_exact = flat[int(0.95 * flat.numel())]
    assert torch.allclose(M.prepare_features(x, exact=True, normalize=False), x.clamp(-q_exact, q_exact))
    assert torch.equal(M.prepare_features(x, clamp_quantile=1.0, normalize=False), x)
    three = M.prepare_features(torch.randn(10, 3, 8, generator=g))
    assert torch.allclose(three.norm(dim=-1), torch.ones(10, 3))


def test_pairwise_alignment_finds_the_matching_layer():
    g = torch.Generator().manual_seed(14)
    base = torch.randn(150, 16, generator=g)
    layers_a = [torch.randn(150, 16, generator=g), base, torch.randn(150, 16, generator=g)]
    layers_b = torch.stack([torch.randn(150, 16, generator=g), base @ _orthogonal(16, 2)], dim=1)  # [n, L, d]
    best, (i, j), scores = M.pairwise_alignment(layers_a, layers_b, "cka")
    assert (i, j) == (1, 1) and best == pytest.approx(1.0, abs=1e-5)
    assert scores.shape == (3, 2) and float(scores.max()) == best
    best_knn, ij, _ = M.pairwise_alignment(layers_a, layers_b, metric="mutual_knn", topk=5)
    assert ij == (1, 1) and best_knn == pytest.approx(1.0)


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    a, b = _data(n=30)
    with pytest.raises(ValueError, match="same items"):
        M.cka(a, b[:20])
    with pytest.raises(ValueError, match="NaN"):
        M.cka(a, b.clone().fill_(math.nan))
    with pytest.raises(ValueError, match="topk"):
        M.cknna(a, b, topk=1)
    with pytest.raises(ValueError, match="2-D"):
        M.mutual_knn(a[None], b[None])
    with pytest.raises(ValueError, match="degenerate"):
        M.cka(torch.ones(30, 4), b)
    with pytest.raises(ValueError, match="kernel"):
        M.cka(a, b, kernel="poly")
    with pytest.raises(ValueError, match="unknown metric"):
        M.pairwise_alignment([a], [b], metric="cca")


def test_token_sets_are_compared_token_by_token():
    a, b = _data(n=40, seed=15)
    batch = torch.arange(40) // 4
    ta, tb = TokenSet(a, batch), TokenSet(b, batch)
    assert M.cka(ta, tb) == pytest.approx(M.cka(a, b), abs=1e-12)
    assert M.mutual_knn(ta, b, topk=3) == pytest.approx(M.mutual_knn(a, b, topk=3))
    best, ij, _ = M.pairwise_alignment([ta], [tb], "unbiased_cka")
    assert ij == (0, 0) and best == pytest.approx(
        M.unbiased_cka(M.prepare_features(a, 1.0), M.prepare_features(b, 1.0))
    )


# -- the convergence papers' other measures and calibration (issue 18) ----------------------------------------
def _dist(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).sqrt()


def _dcor_dense(a, b) -> float:
    """Székely et al. 2007, written out: double-centred distance matrices, V-statistics."""

    def centred(d):
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    A, B = centred(_dist(a)), centred(_dist(b))
    return float(((A * B).mean() / ((A * A).mean() * (B * B).mean()).sqrt()).sqrt())


def _dcor_u_dense(a, b) -> float:
    """Székely & Rizzo 2014's U-centring (their eq. 3.1) and the bias-corrected squared dCor."""

    def u_centred(d):
        n = d.shape[0]
        u = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
        return u.fill_diagonal_(0)

    A, B = u_centred(_dist(a)), u_centred(_dist(b))
    return float((A * B).sum() / ((A * A).sum() * (B * B).sum()).sqrt())


def test_distance_correlation_matches_the_definitions():
    a, b = _data(n=80)
    assert M.distance_correlation(a, b) == pytest.approx(_dcor_dense(a, b), abs=2e-6)
    assert M.distance_correlation(a, b, unbiased=True) == pytest.approx(_dcor_u_dense(a, b), abs=2e-6)


def test_distance_correlation_closed_forms():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 5, generator=g)
    # a similarity transform (rotation, scale, shift) keeps every distance ratio: dCor = 1 exactly
    y = 2.5 * x @ _orthogonal(5, 1) + 3.0
    assert M.distance_correlation(x, y) == pytest.approx(1.0, abs=1e-5)
    assert M.distance_correlation(x, y, unbiased=True) == pytest.approx(1.0, abs=1e-5)
    # independent data: the U-statistic is ~0; the V-statistic is small but biased upwards
    z = torch.randn(300, 4, generator=g)
    assert abs(M.distance_correlation(x, z, unbiased=True)) < 0.02
    assert 0.0 < M.distance_correlation(x, z) < 0.25
    # a nonlinear (non-monotone) dependence that linear correlation misses
    u = torch.rand(300, 1, generator=g) * 4 - 2
    assert abs(float(torch.corrcoef(torch.cat([u, u**2], 1).T)[0, 1])) < 0.2
    assert M.distance_correlation(u, u**2, unbiased=True) > 0.2


def test_chunked_new_metrics_do_not_depend_on_the_chunk(monkeypatch):
    a, b = _data(n=90)
    full = (M.distance_correlation(a, b), M.information_imbalance(a, b), M.twonn_dimension(a))
    monkeypatch.setattr(M, "_CHUNK_ENTRIES", 7 * 90)  # 7 rows per chunk
    chunked = (M.distance_correlation(a, b), M.information_imbalance(a, b), M.twonn_dimension(a))
    assert chunked == pytest.approx(full, abs=1e-9)


@pytest.mark.parametrize("d", [2, 5, 8, 12])
def test_twonn_recovers_the_dimension_of_a_linear_subspace(d):
    g = torch.Generator().manual_seed(d)
    basis = torch.linalg.qr(torch.randn(40, d, generator=g))[0]  # a d-dimensional subspace of R^40
    # Gaussian coordinates: no boundary (a uniform cube's faces bias TwoNN low above d ~ 5, as Facco et al. note)
    x = torch.randn(4000, d, generator=g) @ basis.T
    assert M.twonn_dimension(x) == pytest.approx(d, rel=0.12)
    assert M.twonn_dimension(x, method="mle") == pytest.approx(d, rel=0.12)


def test_information_imbalance_limits_and_loop_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    assert M.information_imbalance(x, x) == pytest.approx(2.0 / 200)  # the nearest neighbour has rank 1
    assert M.information_imbalance(x, torch.randn(200, 6, generator=g)) == pytest.approx(1.0, abs=0.12)
    # a space that keeps only some coordinates: the full space predicts it better than the reverse
    full, part = x, x[:, :2]
    assert M.information_imbalance(full, part) < M.information_imbalance(part, full)
    # loop definition on a small set
    a, b = _data(n=40)
    da, db = _dist(a), _dist(b)
    ranks = []
    for i in range(40):
        j = min((float(da[i, k]), k) for k in range(40) if k != i)[1]
        order = sorted((float(db[i, k]), k) for k in range(40) if k != i)
        ranks.append(1 + [k for _, k in order].index(j))
    assert M.information_imbalance(a, b) == pytest.approx(2.0 * np.mean(ranks) / 40, abs=1e-9)


def test_permutation_null_p_values_and_correction():
    a, b = _data(n=100, noise=0.3)
    out = M.permutation_null(M.cka, a, b, permutations=49, seed=0)
    assert out["value"] == pytest.approx(M.cka(a, b))
    assert out["p_value"] == pytest.approx(1 / 50)  # the +1 correction: never 0
    assert out["corrected"] == pytest.approx(out["value"] - out["null_mean"])
    assert out["z"] > 3
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(100, 5, generator=g), torch.randn(100, 5, generator=g)
    null = M.permutation_null(M.cka, x, y, permutations=49, seed=0)
    assert null["p_value"] > 0.05 and abs(null["z"]) < 3
    # lower-is-better metrics: the sign of the gain flips, p counts nulls at least as low
    ii = M.permutation_null(M.information_imbalance, a, b, permutations=19, higher_is_better=False)
    assert ii["corrected"] == pytest.approx(ii["null_mean"] - ii["value"]) and ii["corrected"] > 0.3
    assert ii["p_value"] == pytest.approx(1 / 20)
    # parts (groups) are shuffled within themselves and weighted
    two = M.permutation_null(M.cka, [a[:50], a[50:]], [b[:50], b[50:]], permutations=5, weights=[0.5, 0.5])
    assert two["value"] == pytest.approx(0.5 * M.cka(a[:50], b[:50]) + 0.5 * M.cka(a[50:], b[50:]))


def test_gaussian_floor_grows_with_width_for_biased_cka():
    narrow = M.gaussian_floor(M.cka, 200, 4, 4, draws=3)
    wide = M.gaussian_floor(M.cka, 200, 128, 128, draws=3)
    assert narrow < 0.1 < wide  # independent wide features already look "aligned" to biased CKA


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.0533, 0.0533, 0.5 after the running minimum from the top
    assert M.benjamini_hochberg(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])


def test_farthest_point_sampling_covers_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    idx = M.farthest_point_sampling(x, 4)
    assert sorted((idx // 50).tolist()) == [0, 1, 2, 3]  # one anchor per cluster, unlike most random draws
    assert idx.unique().numel() == 4


def test_anchor_space_retrieval_and_optimal_transport():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 8, generator=g)
    anchors = M.farthest_point_sampling(x, 20)
    y = x @ _orthogonal(8, 3)  # the same geometry in other coordinates: identical anchor-space embeddings
    assert M.anchor_retrieval(x, y, anchors) == pytest.approx(1.0)
    assert M.anchor_ot_distance(x, y, anchors) == pytest.approx(0.0, abs=1e-5)
    z = torch.randn(150, 8, generator=g)
    assert M.anchor_retrieval(x, z, anchors) < 0.1
    assert M.anchor_ot_distance(x, z, anchors) > 0.1
    # OT never exceeds the cost of the identity matching, and equals a brute-force optimum on a tiny set
    ea, ez = M.anchor_embedding(x, anchors), M.anchor_embedding(z, anchors)
    keep = torch.ones(150, dtype=torch.bool)
    keep[anchors] = False
    assert M.anchor_ot_distance(x, z, anchors) <= float((ea[keep] - ez[keep]).norm(dim=1).mean()) + 1e-6
    import itertools

    small_a, small_b = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    anc = torch.tensor([0, 1])
    pa, pb = M.anchor_embedding(small_a, anc)[2:].double(), M.anchor_embedding(small_b, anc)[2:].double()
    cost = torch.cdist(pa, pb)
    brute = min(float(cost[range(5), list(p)].mean()) for p in itertools.permutations(range(5)))
    assert M.anchor_ot_distance(small_a, small_b, anc) == pytest.approx(brute, abs=1e-6)


def test_spearman_bootstrap_interval():
    x = list(range(12))
    y = [v + (0.5 if v % 3 == 0 else -0.5) for v in x]
    out = M.spearman_bootstrap(x, y, n_boot=500)
    assert out["rho"] > 0.9 and out["lo"] <= out["rho"] <= out["hi"] and out["p_value"] < 0.01
    g = np.random.default_rng(0)
    noise = M.spearman_bootstrap(g.normal(size=12), g.normal(size=12), n_boot=500)
    assert noise["lo"] < 0 < noise["hi"]


@pytest.mark.parametrize(
    "name,kw",
    [
        ("mutual_knn", {"topk": 5}),
        ("cknna", {"topk": 5}),
        ("cka", {}),
        ("distance_correlation", {}),
        ("distance_correlation", {"unbiased": True}),
        ("information_imbalance", {}),
    ],
)
def test_fast_permutation_nulls_equal_recomputation(name, kw):
    a, b = _data(n=70, noise=0.5)
    a, b = M.prepare_features(a), M.prepare_features(b)
    fn = {**M.METRICS, **M.PAIR_METRICS}[name]
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(70, generator=g) for _ in range(4)]
    fast = M.permuted_scores(name, a, b, perms, **kw)
    slow = torch.tensor([fn(a, b[p], **kw) for p in perms], dtype=torch.float64)
    assert fast is not None and torch.allclose(fast, slow, atol=1e-6)
    out_fast = M.permutation_null(lambda x, y: fn(x, y, **kw), a, b, 9, seed=2, metric=name, metric_kwargs=kw)
    out_slow = M.permutation_null(lambda x, y: fn(x, y, **kw), a, b, 9, seed=2)
    assert out_fast == pytest.approx(out_slow, abs=1e-6)
