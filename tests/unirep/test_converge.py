"""unirep.converge: metric values through the command equal direct unirep.metrics calls and independent
re-derivations of the levels; identical models align at 1; random features sit near chance; the feature cache
returns what a fresh computation returns; bad configs fail naming the model."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

import unirep.metrics as M
from unirep.converge import (
    ModelFeatures,
    anchor_relative,
    compare,
    expand_models,
    extract_features,
    group_centre,
    run_convergence,
)
from unirep.tokens import TokenSet

# configs name the toy classes below by `_target_: test_converge.X`; make that resolvable under any import mode
sys.modules.setdefault("test_converge", sys.modules[__name__])

# ---------------------------------------------------------------------------------------------------------------
# a toy domain: items with 3..7 tokens of 3 groups; every token has a latent 8-d "true" state
# ---------------------------------------------------------------------------------------------------------------
_N_ITEMS = 60


class ToyData:
    """Items are dicts with latent token states; groups are token types (like elements)."""

    def __init__(self, n: int = _N_ITEMS, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(3, 8, (n,), generator=g)
        self.items = []
        for c in counts.tolist():
            groups = torch.randint(0, 3, (c,), generator=g)
            # the latent state carries a strong group offset (as element identity does for atoms)
            latent = torch.randn(c, 8, generator=g) + 4.0 * torch.nn.functional.one_hot(groups, 8).float()
            self.items.append({"latent": latent, "groups": groups})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collate(self, items: list[dict]) -> list[dict]:
        return items

    def token_groups(self, i: int) -> torch.Tensor:
        return self.items[i]["groups"]


class ToyEncoder:
    """Two layers: a fixed random map of the latent state plus noise (``noise`` sets how far from the truth)."""

    calls = 0

    def __init__(
        self,
        dim: int = 16,
        seed: int = 0,
        noise: float = 0.0,
        random: bool = False,
        drop_item: bool = False,
        quality: float | None = None,
        map_seed: int | None = None,
    ):
        g = torch.Generator().manual_seed(seed if map_seed is None else map_seed)
        self.w1 = torch.randn(8, dim, generator=g)
        self.w2 = torch.randn(dim, dim, generator=g)
        self.noise, self.random, self.drop_item, self.seed = noise, random, drop_item, seed
        self.dim = dim
        self.layer_names = ["l1", "l2"]
        self.cache_key = f"toy-{dim}-{seed}-{noise}-{random}-{drop_item}-{map_seed}"
        if quality is not None:
            self.quality = quality

    def encode_layers(self, sample: list[dict]) -> list[TokenSet]:
        ToyEncoder.calls += 1
        items = sample[:-1] if self.drop_item else sample
        lat = torch.cat([it["latent"] for it in items])
        batch = torch.cat([torch.full((len(it["latent"]),), k) for k, it in enumerate(items)])
        # noise is a deterministic function of the token content, so batching never changes features
        h = torch.Generator().manual_seed(1000 + self.seed)
        if self.random:
            content_seed = int(lat.abs().sum() * 1e4)
            h1 = torch.randn(lat.shape[0], self.dim, generator=torch.Generator().manual_seed(content_seed))
        else:
            h1 = lat @ self.w1 + self.noise * torch.sin(lat @ torch.randn(8, self.dim, generator=h) * 7.0)
        h2 = torch.tanh(h1 @ self.w2 / math.sqrt(self.dim))
        return [TokenSet(h1, batch, None, len(items)), TokenSet(h2, batch, None, len(items))]

    def encode(self, sample: list[dict]) -> TokenSet:
        return self.encode_layers(sample)[-1]


def _cfg(tmp_path, models, **kw):
    cfg = {
        "name": "toy",
        "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "data": {"_target_": "test_converge.ToyData"},
        "models": models,
        "levels": ["item"],
        "metrics": ["mutual_knn"],
    }
    cfg.update(kw)
    return cfg


def _toy(name, **kw):
    return {"name": name, "encoder": {"_target_": "test_converge.ToyEncoder", **kw}}


ALL_METRICS = [
    {"name": "mutual_knn", "topk": 5},
    "cka",
    "unbiased_cka",
    {"name": "cknna", "topk": 5},
    {"name": "svcca", "dim": 4},
]


def test_values_through_the_command_equal_direct_metric_calls(tmp_path):
    out = run_convergence(
        _cfg(
            tmp_path,
            [_toy("a", seed=1, noise=0.3), _toy("b", seed=2, dim=12, noise=0.5)],
            levels=["item", "token", "token_centred", "token_per_group"],
            metrics=ALL_METRICS,
            max_tokens=None,
            min_group_tokens=1,
        )
    )
    data = ToyData()
    fa = extract_features(ToyEncoder(seed=1, noise=0.3), data, "a", batch_size=7, progress=False)
    fb = extract_features(ToyEncoder(seed=2, dim=12, noise=0.5), data, "b", batch_size=13, progress=False)
    groups = torch.cat([it["groups"] for it in data.items])
    batch = torch.cat([torch.full((len(it["groups"]),), k) for k, it in enumerate(data.items)])

    def prep(x):
        return M.prepare_features(x.double(), clamp_quantile=0.95, normalize=True)

    def views(f, layer, level):
        x = f.tokens[layer]
        if level == "item":  # mean over each item's tokens, written out independently
            return [(1.0, torch.stack([x[batch == k].mean(0) for k in range(len(data))]))]
        if level == "token":
            return [(1.0, x)]
        if level == "token_centred":
            centred = x.clone()
            for grp in groups.unique():
                centred[groups == grp] -= x[groups == grp].mean(0)
            return [(1.0, centred)]
        return [((groups == grp).sum().item() / len(groups), x[groups == grp]) for grp in groups.unique()]

    fns = {
        "mutual_knn_topk5": lambda a, b: M.mutual_knn(a, b, topk=5),
        "cka": M.cka,
        "unbiased_cka": M.unbiased_cka,
        "cknna_topk5": lambda a, b: M.cknna(a, b, topk=5),
        "svcca_dim4": lambda a, b: M.svcca(a, b, dim=4),
    }
    rows = out["result"].rows
    assert len(rows) == 4 * 4 * 5  # levels x layer pairs x metrics
    for r in rows:
        la, lb = fa.layers.index(r["layer_a"]), fb.layers.index(r["layer_b"])
        expect = sum(
            w * fns[r["metric"]](prep(xa), prep(xb))
            for (w, xa), (_, xb) in zip(views(fa, la, r["level"]), views(fb, lb, r["level"]), strict=True)
        )
        assert r["value"] == pytest.approx(expect, abs=1e-6), r

    # the tidy CSV holds exactly these rows; best.csv keeps the best layer pair per (pair, level, metric)
    with open(tmp_path / "out" / "alignment.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["model_a", "layer_a", "model_b", "layer_b", "level", "metric", "value"]
    assert [float(t["value"]) for t in table] == pytest.approx([r["value"] for r in rows])
    with open(tmp_path / "out" / "best.csv") as fh:
        best = list(csv.DictReader(fh))
    assert len(best) == 4 * 5
    for b in best:
        same = [r["value"] for r in rows if r["level"] == b["level"] and r["metric"] == b["metric"]]
        assert float(b["value"]) == pytest.approx(max(same))
    for metric in fns:
        assert (tmp_path / "out" / f"heatmap_{metric}.png").stat().st_size > 1000


def test_identical_models_align_at_one_and_random_features_near_chance(tmp_path):
    out = run_convergence(
        _cfg(
            tmp_path,
            [_toy("a", seed=3), _toy("a_again", seed=3), _toy("rand", seed=4, random=True)],
            levels=["item", "token_centred"],
            metrics=[{"name": "mutual_knn", "topk": 5}, "cka"],
            max_tokens=None,
        )
    )
    rows = out["result"].rows
    same = [r for r in rows if {r["model_a"], r["model_b"]} == {"a", "a_again"} and r["layer_a"] == r["layer_b"]]
    assert same and all(r["value"] == pytest.approx(1.0, abs=1e-6) for r in same)
    n_tokens = sum(len(it["groups"]) for it in ToyData().items)
    for r in rows:
        if "rand" not in (r["model_a"], r["model_b"]):
            continue
        n = _N_ITEMS if r["level"] == "item" else n_tokens
        if r["metric"].startswith("mutual_knn"):
            chance = 5 / (n - 1)  # expected overlap of two independent random 5-NN sets
            assert r["value"] < chance + 0.1, r
        else:  # linear CKA of independent features is O(d/n), far below the identical pair's 1
            assert r["value"] < 0.35, r


def test_feature_cache_returns_recomputed_features(tmp_path):
    data = ToyData()
    ToyEncoder.calls = 0
    first = extract_features(
        ToyEncoder(seed=5), data, "m", batch_size=16, cache_dir=tmp_path, cache_key="k1", progress=False
    )
    calls = ToyEncoder.calls
    assert calls == math.ceil(len(data) / 16)
    cached = extract_features(
        ToyEncoder(seed=5), data, "m", batch_size=16, cache_dir=tmp_path, cache_key="k1", progress=False
    )
    assert ToyEncoder.calls == calls  # served from disk
    fresh = extract_features(ToyEncoder(seed=5), data, "m", batch_size=5, progress=False)
    for a, b, c in zip(first.tokens, cached.tokens, fresh.tokens, strict=True):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    assert torch.equal(cached.batch, fresh.batch) and torch.equal(cached.groups, fresh.groups)
    assert cached.layers == ["l1", "l2"]
    # through the command: a second run reads the cache; another encoder config gets another cache entry
    cfg = _cfg(tmp_path, [_toy("a", seed=1), _toy("b", seed=2)])
    run_convergence(cfg)
    calls = ToyEncoder.calls
    again = run_convergence(cfg)
    assert ToyEncoder.calls == calls
    run_convergence(_cfg(tmp_path, [_toy("a", seed=1), _toy("b", seed=6)]))
    assert ToyEncoder.calls > calls
    assert len(list((tmp_path / "cache").glob("b-*.safetensors"))) == 2
    assert len(again["result"].rows) == 4


def test_bad_configs_name_the_item(tmp_path):
    with pytest.raises(RuntimeError, match="model 'ghost'.*"):
        run_convergence(_cfg(tmp_path, [_toy("a"), {"name": "ghost", "encoder": {"_target_": "test_converge.Nope"}}]))
    with pytest.raises(ValueError, match="model 'short' returned 6 items for a batch of 7"):
        run_convergence(_cfg(tmp_path, [_toy("a"), _toy("short", drop_item=True)], batch_size=7))
    with pytest.raises(ValueError, match="models\\[1\\].*unknown keys \\['layer'\\]"):
        run_convergence(_cfg(tmp_path, [_toy("a"), {**_toy("b"), "layer": 1}]))
    with pytest.raises(ValueError, match="unknown config keys \\['metric'\\]"):
        run_convergence(_cfg(tmp_path, [_toy("a"), _toy("b")], metric="cka"))
    with pytest.raises(ValueError, match="unknown metric 'cca'"):
        run_convergence(_cfg(tmp_path, [_toy("a"), _toy("b")], metrics=["cca"]))
    with pytest.raises(ValueError, match="model 'b': layer 'l9' does not exist"):
        run_convergence(_cfg(tmp_path, [_toy("a"), {**_toy("b"), "layers": ["l9"]}]))
    # an optional model that cannot be built is skipped and reported
    out = run_convergence(
        _cfg(
            tmp_path,
            [_toy("a"), _toy("b"), {"name": "gone", "encoder": {"_target_": "test_converge.Nope"}, "optional": True}],
        )
    )
    assert "gone" in out["summary"]["skipped"]
    # features of different item counts cannot be compared: the message names both models
    fa = ModelFeatures("x", ["0"], [torch.randn(10, 3)], torch.arange(10))
    fb = ModelFeatures("y", ["0"], [torch.randn(9, 3)], torch.arange(9))
    with pytest.raises(ValueError, match="model 'y' has 9 items but 'x' has 10"):
        compare([fa, fb])


def test_quality_scatter_reports_the_rank_correlation(tmp_path):
    # noisier copies of the same map align less with the others; quality = noise (lower is better)
    noises = [0.0, 1.0, 2.0, 4.0, 8.0]
    models = [{**_toy(f"n{k}", seed=7 + k, noise=z, map_seed=0), "quality": z} for k, z in enumerate(noises)]
    out = run_convergence(_cfg(tmp_path, models, metrics=["cka"], levels=["token"], max_tokens=None))
    s = out["summary"]
    align = s["mean_alignment"]["cka"]["token"]
    rho = spearmanr([-z for z in noises], [align[f"n{k}"] for k in range(len(noises))]).statistic
    assert s["spearman"]["cka"]["token"] == pytest.approx(rho)
    assert rho == pytest.approx(1.0)  # the better (less noisy) models are the more aligned ones
    assert (tmp_path / "out" / "quality_vs_alignment_cka.png").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["quality"]["n0"] == 0.0


def test_anchor_relative_embeddings_share_a_space():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    anchors = torch.tensor([3, 7, 11, 20])
    rel = anchor_relative(x, anchors)
    expect = torch.stack(
        [torch.stack([torch.dot(x[i], x[a]) / (x[i].norm() * x[a].norm()) for a in anchors]) for i in range(50)]
    )
    assert torch.allclose(rel, expect)
    # a rotated (and rescaled) copy has identical anchor-relative embeddings: alignment 1 under any metric
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    fa = ModelFeatures("a", ["0"], [x], torch.arange(50))
    fb = ModelFeatures("b", ["0"], [3.0 * x @ q], torch.arange(50))
    rows = compare(
        [fa, fb], metrics=[{"name": "svcca", "dim": 4}], levels=["token"], anchors=8, preprocess=None, progress=False
    ).rows
    assert rows[0]["value"] == pytest.approx(1.0, abs=1e-8)


def test_group_centre_and_sweep_expansion():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0]])
    assert torch.equal(group_centre(x, torch.tensor([0, 0, 1])), torch.tensor([[-1.0, -2.0], [1.0, 2.0], [0.0, 0.0]]))
    specs = expand_models(
        [
            {
                "name": "net",
                "encoder": {"_target_": "x.Y", "ckpt": "runs/{name}", "train": {"steps": 1}},
                "sweep": {"seed": [0, 1], "train.steps": [10, 20]},
            }
        ]
    )
    assert [s["name"] for s in specs] == [
        "net_seed0_steps10",
        "net_seed0_steps20",
        "net_seed1_steps10",
        "net_seed1_steps20",
    ]
    assert specs[3]["encoder"] == {
        "_target_": "x.Y",
        "ckpt": "runs/net_seed1_steps20",
        "train": {"steps": 20},
        "seed": 1,
    }
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        expand_models([{"name": "a", "encoder": {}}, {"name": "a", "encoder": {}}])


def test_converge_configs_have_a_schema_that_names_a_misspelt_key():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from unirep.converge import register_converge_config

    register_converge_config()
    configs = Path(__file__).resolve().parents[2] / "configs" / "converge"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        for name in ("molecular_quick", "molecular_study"):
            cfg = compose(name)
            assert cfg.models and cfg.levels
        with pytest.raises(ConfigCompositionException) as err:
            compose("molecular_quick", ["anchorz=4"])
        assert "anchorz" in str(err.value) + str(err.value.__cause__)
        with pytest.raises(ConfigCompositionException) as err:
            compose("molecular_quick", ["anchors=many"])
        assert "anchors" in str(err.value) + str(err.value.__cause__)


# ---------------------------------------------------------------------------------------------------------------
# calibration, the papers' other measures, anchor space, families, out of distribution (issue 18)
# ---------------------------------------------------------------------------------------------------------------
NEW_METRICS = [
    "distance_correlation",
    "information_imbalance",
    "anchor_retrieval",
    "anchor_ot_distance",
]


def test_new_metrics_nulls_and_floors_through_the_command(tmp_path):
    models = [_toy("a", seed=1, noise=0.3), _toy("b", seed=2, dim=12, noise=0.5), _toy("r", seed=3, random=True)]
    out = run_convergence(
        _cfg(
            tmp_path,
            models,
            metrics=[{"name": "cka"}, *NEW_METRICS],
            levels=["item", "token_per_group"],
            anchor_space=10,
            null_permutations=19,
            width_floor=True,
            floor_draws=2,
        )
    )
    res = out["result"]
    feats = {f.name: f for f in out["features"]}
    best = {(r["model_a"], r["model_b"], r["level"], r["metric"]): r for r in res.best()}
    # values equal direct calls on the same preprocessed features (item level: pooled, clamp + L2)
    pa = M.prepare_features(feats["a"].pooled(1).double())
    pb = M.prepare_features(feats["b"].pooled(1).double())
    rows = {
        (r["layer_a"], r["layer_b"], r["metric"]): r["value"]
        for r in res.rows
        if r["level"] == "item" and r["model_a"] == "a" and r["model_b"] == "b"
    }
    assert rows[("l2", "l2", "distance_correlation")] == pytest.approx(M.distance_correlation(pa, pb), abs=1e-9)
    assert rows[("l2", "l2", "information_imbalance")] == pytest.approx(M.information_imbalance(pa, pb), abs=1e-9)
    # information imbalance is asymmetric: both directions are rows, the best layer pair is the minimum
    back = [
        r for r in res.rows if r["model_a"] == "b" and r["model_b"] == "a" and r["metric"] == "information_imbalance"
    ]
    assert back and "information_imbalance" in res.lower and "information_imbalance" in res.asymmetric
    ii = [
        r["value"]
        for r in res.rows
        if r["level"] == "item"
        and r["model_a"] == "a"
        and r["model_b"] == "b"
        and r["metric"] == "information_imbalance"
    ]
    assert best[("a", "b", "item", "information_imbalance")]["value"] == pytest.approx(min(ii))
    # the two related models beat their null at p = 1/20, the random one does not beat the others
    ab = best[("a", "b", "item", "cka")]
    assert ab["p_value"] == pytest.approx(1 / 20) and ab["corrected"] > 0.2 and "p_adj" in ab
    assert best[("a", "r", "item", "cka")]["p_value"] > 0.05
    assert best[("a", "b", "token_per_group", "anchor_retrieval")]["corrected"] > 0
    for metric in ("cka", "distance_correlation", "anchor_retrieval"):
        r = best[("a", "r", "item", metric)]
        assert r["floor"] == r["floor"] and abs(r["floor_gain"]) < 0.5 + abs(r["value"])
    # one heatmap per metric (with the corrected row), intrinsic dimension per model, layer and level
    s = out["summary"]
    for metric in ("cka", *NEW_METRICS):
        assert (tmp_path / "out" / f"heatmap_{metric}.png").exists()
    assert s["calibration"]["cka"]["item"]["pairs"] == 3
    # Li & Walsh's picture: every model's items in the shared anchor space
    assert (tmp_path / "out" / "anchor_space.png").exists()
    assert res.anchor_embeddings["a"].shape == (_N_ITEMS, 10)
    ids = {(r["model"], r["layer"], r["level"]): r["value"] for r in res.per_model}
    assert ids[("a", "l2", "item")] == pytest.approx(M.twonn_dimension(pa))
    assert set(s["intrinsic_dimension"]["item"]) == {"a", "b", "r"}
    with open(tmp_path / "out" / "best.csv") as fh:
        header = next(csv.reader(fh))
    assert {"p_value", "p_adj", "corrected", "floor", "floor_gain"} <= set(header)


def test_shared_anchors_are_farthest_points_of_the_joint_space():
    from unirep.converge import shared_anchors

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [-5.0, 0.0, 0.0]])
    x = torch.cat([c + 0.2 * torch.randn(30, 3, generator=g) for c in centres]).double()
    y = x @ torch.randn(3, 5, generator=g, dtype=torch.float64)
    idx = shared_anchors([x, y], 4, "fps", seed=0, preprocess=None)
    assert sorted((idx // 30).tolist()) == [0, 1, 2, 3]
    assert torch.equal(shared_anchors([x, y], 2, "fps", seed=0), idx[:2])  # greedy: prefixes are nested
    assert shared_anchors([x, y], 4, "random", seed=1).unique().numel() == 4


def test_mean_alignment_excludes_duplicates_and_floors(tmp_path):
    # an "ensemble" of 3 near-identical members, two other models, one random floor
    models = [
        {**_toy("ens", noise=0.2, map_seed=0), "sweep": {"seed": [10, 11, 12]}},
        _toy("p", seed=1, noise=1.0, map_seed=0),
        _toy("q", seed=2, noise=2.0, map_seed=0),
        {**_toy("floor", seed=3, random=True), "tags": ["floor"]},
    ]
    out = run_convergence(_cfg(tmp_path, models, metrics=["cka"], exclude_from_mean=["floor"]))
    s = out["summary"]
    assert s["families"]["ens_seed10"] == s["families"]["ens_seed12"] == "ens"
    assert s["excluded_from_mean"] == ["floor"]
    m = out["result"].matrix(s["models"], "item", "cka")
    idx = {n: i for i, n in enumerate(s["models"])}
    ens = [idx[f"ens_seed{k}"] for k in (10, 11, 12)]
    # p's mean: the ensemble family counts once (its members averaged), q once; neither p's floor nor itself
    expect = (float(m[idx["p"], ens].mean()) + float(m[idx["p"], idx["q"]])) / 2
    assert s["mean_alignment"]["cka"]["item"]["p"] == pytest.approx(expect)
    # an ensemble member is never scored against its own family
    expect_e = (float(m[ens[0], idx["p"]]) + float(m[ens[0], idx["q"]])) / 2
    assert s["mean_alignment"]["cka"]["item"]["ens_seed10"] == pytest.approx(expect_e)
    assert "floor" not in s["quality"]


def test_quality_fn_and_bootstrap_interval(tmp_path):
    noises = [0.0, 1.0, 2.0, 4.0, 8.0]
    models = [_toy(f"n{k}", seed=7 + k, noise=z, map_seed=0) for k, z in enumerate(noises)]
    out = run_convergence(
        _cfg(
            tmp_path,
            models,
            metrics=["cka"],
            levels=["token"],
            max_tokens=None,
            bootstrap=300,
            quality_fn={"_target_": "test_converge.noise_quality", "_partial_": True},
        )
    )
    s = out["summary"]
    assert s["quality"] == {f"n{k}": z for k, z in enumerate(noises)}
    assert set(s["quality_source"].values()) == {"quality_fn"}
    ci = s["spearman_ci"]["cka"]["token"]
    assert ci["rho"] == pytest.approx(1.0) and ci["lo"] <= 1.0 <= ci["hi"] + 1e-12 and ci["n"] == 5


def noise_quality(encoder) -> float:
    """A quality function (a common test every model takes): here the toy encoder's noise."""
    return float(encoder.noise)


class ShiftedToyData(ToyData):
    """The toy items far out of distribution: latent states scaled up 6x (like strongly distorted geometries)."""

    def __init__(self, n: int = _N_ITEMS, seed: int = 5):
        super().__init__(n, seed)
        for it in self.items:
            it["latent"] = 6.0 * it["latent"]


def test_out_of_distribution_split_is_compared_with_the_same_models(tmp_path):
    models = [_toy("a", seed=1, noise=0.3), _toy("b", seed=2, dim=12, noise=0.5), _toy("c", seed=4, noise=1.0)]
    out = run_convergence(
        _cfg(tmp_path, models, metrics=["cka"], ood_data={"_target_": "test_converge.ShiftedToyData"})
    )
    assert out["ood"] is not None and (tmp_path / "out" / "ood" / "best.csv").exists()
    assert (tmp_path / "out" / "ood_shift.png").exists()
    with open(tmp_path / "out" / "ood_shift.csv") as fh:
        rows = list(csv.DictReader(fh))
    measures = {r["measure"] for r in rows}
    assert measures == {"twonn_id", "mean_cka"}
    s = out["summary"]["ood_shift"]
    assert set(s) == {"twonn_id", "mean_cka"} and "median_ood" in s["mean_cka"]["item"]


def test_unknown_metric_and_missing_anchors_fail_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'dcorr'"):
        run_convergence(_cfg(tmp_path, [_toy("a"), _toy("b", seed=2)], metrics=["dcorr"]))
    with pytest.raises(ValueError, match="anchor_space"):
        run_convergence(_cfg(tmp_path, [_toy("a"), _toy("b", seed=2)], metrics=["anchor_retrieval"], anchor_space=0))
