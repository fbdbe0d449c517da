"""vision.inception / vision.fid: the FID Inception network, weights files, FID/sFID/IS, reference batches.

No real weights exist offline: a randomly initialised network of the same architecture is written to a file and read
back. Architecture checks are against torchvision's Inception-v3 with pytorch-fid's documented patches (avg pools
without the padding, max pool in Mixed_7c, 1008 classes); the Fréchet distance against closed forms and scipy's sqrtm;
the Inception Score against its closed forms.
"""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vision.fid import (
    GaussianStats,
    InceptionMetrics,
    fid_from_stats,
    inception_features,
    inception_score,
    load_inception,
    load_reference,
    preprocess,
    reference_from_images,
    save_inception,
    save_reference,
)
from vision.inception import FIDInceptionV3


@functools.lru_cache(maxsize=1)
def _random_net() -> FIDInceptionV3:
    """A random network whose batch-norm statistics keep activations O(1) (one train-mode pass sets them)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := the stats of the one batch below
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    with torch.no_grad():
        net.train()(torch.randn(2, 3, 299, 299))
    torch.nn.init.normal_(net.fc.bias)  # non-zero: the IS logits must leave it out
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    save_inception(_random_net(), path)
    return path


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_names_and_shapes_match_torchvision_inception_of_pytorch_fid():
    tv = pytest.importorskip("torchvision.models.inception")
    ref = tv.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_forward_equals_torchvision_with_pytorch_fid_patches(monkeypatch):
    """torchvision's network with the same weights, its pools patched as pytorch-fid's FIDInception blocks."""
    tv = pytest.importorskip("torchvision.models.inception")
    ref = tv.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    ref.load_state_dict(_random_net().state_dict())
    ref.eval()
    avg = F.avg_pool2d
    in_7c = {"on": False}

    def patched_avg(x, kernel_size, stride=None, padding=0, *args, **kwargs):
        if in_7c["on"]:  # FIDInceptionE_2: max pooling
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return avg(x, kernel_size, stride, padding, count_include_pad=False)  # FIDInceptionA/C/E_1

    monkeypatch.setattr(tv.F, "avg_pool2d", patched_avg)
    ref.Mixed_7c.register_forward_pre_hook(lambda *a: in_7c.update(on=True))
    ref.Mixed_7c.register_forward_hook(lambda *a: in_7c.update(on=False))
    seen = {}
    ref.Mixed_6d.register_forward_hook(lambda m, i, o: seen.update(m6d=o))
    ref.avgpool.register_forward_hook(lambda m, i, o: seen.update(pool=o.flatten(1)))
    x = preprocess(_images(1, 64))
    with torch.no_grad():
        logits_biased = ref(x)
    monkeypatch.undo()
    with torch.no_grad():
        out = _random_net()(x)
    torch.testing.assert_close(out["pool"], seen["pool"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], logits_biased - ref.fc.bias, rtol=1e-4, atol=1e-4)
    # ADM: mixed_6/conv[..., :7] of an NHWC tensor, flattened
    spatial = seen["m6d"][:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    torch.testing.assert_close(out["spatial"], spatial, rtol=1e-4, atol=1e-5)
    assert out["spatial"].shape == (1, 17 * 17 * 7) and out["pool"].std() > 1e-3  # a non-degenerate network


def test_weights_file_round_trip_bit_for_bit(weights, tmp_path):
    net = load_inception(weights)
    src = _random_net().state_dict()
    assert set(net.state_dict()) == set(src)
    assert all(torch.equal(v, src[k]) for k, v in net.state_dict().items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    st = save_inception(net, tmp_path / "inception.safetensors")
    again = load_inception(st)
    assert all(torch.equal(v, src[k]) for k, v in again.state_dict().items())
    x = _images(1, 40)
    assert torch.equal(inception_features(net, x)["pool"], inception_features(again, x)["pool"])


def test_missing_weights_say_where_to_put_them(tmp_path):
    target = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as err:
        load_inception(target)
    assert str(target) in str(err.value) and "Nothing is downloaded" in str(err.value)


def test_bad_weights_files_are_refused(tmp_path):
    state = FIDInceptionV3().state_dict()
    del state["Mixed_6d.branch1x1.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"Mixed_6d\.branch1x1\.conv\.weight.*AuxLogits"):
        load_inception(tmp_path / "partial.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pth")  # a pickled object, not a state dict
    with pytest.raises(ValueError, match="weights_only"):
        load_inception(tmp_path / "pickled_module.pth")


def test_state_dict_without_num_batches_tracked_loads(tmp_path):
    state = {k: v for k, v in _random_net().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    net = load_inception(tmp_path / "old.pth")
    assert torch.equal(net.fc.weight, _random_net().fc.weight)


def test_preprocess_quantises_resizes_and_repeats_grey():
    grey = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    x = preprocess(grey)
    assert x.shape == (1, 3, 299, 299) and torch.equal(x[:, 0], x[:, 2])
    as_uint8 = ((grey + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(x, preprocess(as_uint8))  # float input = its 8-bit image
    # pytorch-fid's order (resize in [0, 1], then 2x - 1) gives the same image
    q = as_uint8.float().expand(-1, 3, -1, -1) / 255
    fid_order = 2 * F.interpolate(q, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(x, fid_order, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        preprocess(torch.zeros(1, 16, 16, 3))


def test_frechet_distance_of_gaussians_closed_form():
    g = torch.Generator().manual_seed(1)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ea, eb = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = GaussianStats(mu_a, q @ torch.diag(ea) @ q.T), GaussianStats(mu_b, q @ torch.diag(eb) @ q.T)
    # commuting covariances: |mu_a - mu_b|^2 + sum (sqrt(ea) - sqrt(eb))^2
    expect = float((mu_a - mu_b).square().sum() + (ea.sqrt() - eb.sqrt()).square().sum())
    assert fid_from_stats(a, b) == pytest.approx(expect, rel=1e-10)
    assert fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-10)
    # general covariances: against scipy's sqrtm of the product
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    c = GaussianStats(mu_b, m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64))
    sq = scipy_linalg.sqrtm(a.sigma.numpy() @ c.sigma.numpy()).real
    ref = float((mu_a - mu_b).square().sum()) + float(np.trace(a.sigma.numpy() + c.sigma.numpy() - 2 * sq))
    assert fid_from_stats(a, c) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="different widths"):
        fid_from_stats(a, GaussianStats(mu_a[:3], a.sigma[:3, :3]))


def test_inception_score_closed_forms():
    assert inception_score(torch.zeros(40, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)  # uniform: KL = 0
    # confident and balanced over C classes in every split: IS = C
    logits = 50.0 * F.one_hot(torch.arange(40) % 8, 1008).double()
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(8.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # splits are scored separately: one split all class 0 (IS 1), the other balanced over 4 classes (IS 4)
    mixed = torch.cat([50.0 * F.one_hot(torch.zeros(4, dtype=torch.long), 10), 50.0 * F.one_hot(torch.arange(4), 10)])
    assert inception_score(mixed.double(), splits=2) == pytest.approx((2.5, 1.5), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(3, 10), splits=4)


def test_reference_npz_round_trip_and_adm_layout(weights, tmp_path):
    net = load_inception(weights)
    real = _images(3, 32, seed=3)
    ref = reference_from_images(net, real)
    assert ref.pool.mu.shape == (2048,) and ref.spatial.sigma.shape == (2023, 2023)
    back = load_reference(save_reference(tmp_path / "ref.npz", ref))
    for got, want in ((back.pool, ref.pool), (back.spatial, ref.spatial)):
        assert torch.equal(got.mu, want.mu) and torch.equal(got.sigma, want.sigma)
    # an ADM reference batch: precomputed statistics, plus the images as uint8 NHWC under arr_0
    u8 = ((real + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "adm.npz", arr_0=u8, mu=ref.pool.mu.numpy(), sigma=ref.pool.sigma.numpy())
    adm = load_reference(tmp_path / "adm.npz")
    assert adm.spatial is None and torch.equal(adm.pool.mu, ref.pool.mu)
    np.savez(tmp_path / "images.npz", arr_0=u8)  # raw images only: statistics computed with the network
    from_images = load_reference(tmp_path / "images.npz", net)
    torch.testing.assert_close(from_images.pool.mu, ref.pool.mu, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="needs the Inception network"):
        load_reference(tmp_path / "images.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match=r"mu \(10,\)"):
        load_reference(tmp_path / "bad.npz")


def test_inception_metrics_of_a_set_against_its_own_reference_file(weights, tmp_path):
    """Each Fréchet distance at 2048 dimensions costs seconds on one thread: two here, two in the task test."""
    real = _images(3, 24, seed=4)
    ref = reference_from_images(load_inception(weights), real)
    save_reference(tmp_path / "ref.npz", ref)
    same = InceptionMetrics(weights, reference=tmp_path / "ref.npz", batch_size=3)(real)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert same["inception_score"] >= 1.0
    with pytest.raises(ValueError, match="needs real images"):
        InceptionMetrics(weights, batch_size=3)(real)


def test_vision_flow_task_reports_fid_with_a_weights_file(weights, tmp_path):
    import json

    from unirep.train import DataModule
    from vision.data import DigitsDataset
    from vision.encoders import TimmViTEncoder
    from vision.models.sit import create_sit
    from vision.task import VisionFlowTask

    torch.manual_seed(0)
    kw = dict(resolution=16, channels=1)
    data = DataModule(train=DigitsDataset("train", **kw), val=DigitsDataset("val", **kw), info={})
    model = create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10)
    teacher = TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True)
    task = VisionFlowTask(
        model, teacher=teacher, eval_samples=4, eval_batch=4, sample_steps=2, inception_path=str(weights)
    )
    metrics = task.evaluate(data, tmp_path, step=3)  # against the held-out images (no reference file)
    assert {"fid", "sfid", "inception_score"} <= set(metrics) and metrics["fid"] > 0 and metrics["sfid"] > 0
    record = json.loads((tmp_path / "eval" / "metrics_step_00000003.json").read_text())
    assert record["fid"] == pytest.approx(metrics["fid"])
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        VisionFlowTask(
            model, eval_samples=4, eval_batch=4, sample_steps=1, inception_path=str(tmp_path / "x.pth")
        ).evaluate(data, tmp_path, step=1)
