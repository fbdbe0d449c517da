"""vision.analysis (unirep-align-analysis): REPA's figure-2 alignment over layers, noise levels and checkpoints.

A two-checkpoint run of the REPA recipe (tiny SiT, untrained digits teacher) is trained here; the analysis must score
every layer at every t for both checkpoints with unirep-converge's metric code, and its numbers must equal the
metrics computed directly from the checkpoint's model and teacher.
"""

import json

import pytest
import torch

from unirep.cli import compose, run_train
from unirep.flow import interpolate
from unirep.metrics import cka, cknna, prepare_features
from unirep.train import load_task


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repa_run")
    cfg = compose("train", ["experiment=vision/repa", "debug=smoke"])
    overrides = ["experiment=vision/repa", "debug=smoke", *cfg.smoke, f"out_dir={out}", "trainer.ckpt_every=1"]
    overrides += ["trainer.keep_last=2", "trainer.eval_at_end=false", "task.model.depth=3"]
    run_train(compose("train", overrides))
    return out


def _cfg(run, tmp_path, *extra):
    from vision.analysis import register_config

    register_config()
    base = [f"run={run}", f"out_dir={tmp_path / 'analysis'}", "num_items=40", "batch_size=16", "times=[0.0,0.5,1.0]"]
    return compose("align_analysis", [*base, "device=cpu", *extra])


def test_every_layer_time_and_checkpoint_is_scored(run, tmp_path):
    from vision.analysis import run_align_analysis

    out = run_align_analysis(_cfg(run, tmp_path))
    rows = out["rows"]
    assert sorted({r["step"] for r in rows}) == [1, 2]
    assert sorted({r["t"] for r in rows}) == [0.0, 0.5, 1.0]
    assert sorted({r["layer"] for r in rows}) == [0, 1, 2, 3]  # embedding + 3 blocks
    metrics = {r["metric"] for r in rows}
    assert metrics == {"cknna_topk10", "mutual_knn_topk10", "cka_linear"}
    assert len(rows) == 2 * 3 * 4 * 3
    folder = out["out_dir"]
    for name in ("alignment.json", "alignment.csv", "summary.json", "heatmap_cknna_topk10_item.png",
                 "curves_cknna_topk10_item.png"):  # fmt: skip
        assert (folder / name).is_file(), name
    saved = json.loads((folder / "alignment.json").read_text())
    assert saved["steps"] == [1, 2] and len(saved["rows"]) == len(rows)
    best = json.loads((folder / "summary.json").read_text())["best"]["cknna_topk10/item"]["2"]["0.5"]
    at = [r for r in rows if r["step"] == 2 and r["t"] == 0.5 and r["metric"] == "cknna_topk10"]
    assert best["value"] == pytest.approx(max(r["value"] for r in at))


def test_values_equal_the_metrics_on_the_checkpoint_features(run, tmp_path):
    """Recompute one cell independently: layer 2 of step 1 at t = 0.5, mean-pooled, platonic-rep preprocessing."""
    from vision.analysis import run_align_analysis

    cfg = _cfg(run, tmp_path, "steps=[1]", "labels=false")
    rows = run_align_analysis(cfg)["rows"]
    torch.manual_seed(0)
    task, run_cfg = load_task(run / "checkpoints" / "step_00000001", device="cpu")
    from hydra.utils import instantiate

    ds = instantiate(run_cfg.data).val
    x = torch.stack([ds[i]["x"] for i in range(40)]).float()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((40,), 0.5)
    null = torch.full((40,), task.num_classes)
    with torch.no_grad():
        h = task.model.forward_intermediates(interpolate(x, eps, t), t, null, [2])[1][0]
        teach = task.teacher.compute_tokens(x)
    a = prepare_features(h.pool("mean").double())
    b = prepare_features(teach.pool("mean").double())
    got = {r["metric"]: r["value"] for r in rows if r["layer"] == 2 and r["t"] == 0.5}
    assert got["cknna_topk10"] == pytest.approx(cknna(a, b, topk=10), rel=1e-6, abs=1e-9)
    assert got["cka_linear"] == pytest.approx(cka(a, b), rel=1e-6)


def test_bad_requests_name_the_fix(run, tmp_path):
    from vision.analysis import run_align_analysis

    with pytest.raises(ValueError, match=r"no checkpoint for steps \[7\]"):
        run_align_analysis(_cfg(run, tmp_path, "steps=[7]"))
    with pytest.raises(ValueError, match="noise levels in"):
        run_align_analysis(_cfg(run, tmp_path, "times=[1.5]"))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        run_align_analysis(_cfg(tmp_path / "empty", tmp_path))
    with pytest.raises(Exception, match="timez"):  # a misspelt key
        _cfg(run, tmp_path, "timez=[0.5]")
    with pytest.raises(Exception, match="num_items"):  # the schema types every key
        _cfg(run, tmp_path, "num_items=many")
