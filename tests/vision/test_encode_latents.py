"""The latent data path: ADM's centre crop, the class-folder reader at scale (bad files named, skipped or refused),
and scripts/encode_latents.py round-tripping through ``vision.data.latent_folder_data`` (resume, workers, bad files).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision.data import ImageFolder, LatentFolder, center_crop_arr, latent_folder_data, list_image_folder
from vision.tokenizers import SDVAE

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)


def _script():
    spec = importlib.util.spec_from_file_location("encode_latents_script", ROOT / "scripts/encode_latents.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _png(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _source(root: Path) -> Path:
    sizes = [(40, 30), (17, 25), (16, 16)]
    for c, cls in enumerate(("b_dogs", "a_cats")):
        for i, size in enumerate(sizes):
            _png(root / cls / f"img.{i}.png", size, seed=10 * c + i)  # dots in the stem are kept
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = SDVAE(**TINY)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    return vae.save_pretrained(tmp_path_factory.mktemp("vae") / "tiny-sd-vae")


def _adm_reference(img: Image.Image, size: int) -> np.ndarray:
    # openai/guided-diffusion image_datasets.py center_crop_arr, written out step by step
    while img.size[0] >= 2 * size and img.size[1] >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
    a = np.array(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y : y + size, x : x + size]


@pytest.mark.parametrize("size,res", [((600, 300), 64), ((20, 12), 16), ((64, 64), 64), ((130, 513), 32)])
def test_center_crop_is_adms(size, res):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = center_crop_arr(img, res)
    assert out.shape == (res, res, 3) and np.array_equal(out, _adm_reference(img, res))
    if size == (res, res):
        assert np.array_equal(out, np.array(img))


def test_class_folder_listing_and_bad_files(tmp_path):
    _source(tmp_path)
    _png(tmp_path / "a_cats" / "deeper" / "x.png", (16, 16), 7)  # nested: the class is the top-level folder
    (tmp_path / "a_cats" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    files, labels, classes = list_image_folder(tmp_path)
    assert classes == ["a_cats", "b_dogs"]
    assert files[:4] == ["a_cats/deeper/x.png", "a_cats/img.0.png", "a_cats/img.1.png", "a_cats/img.2.png"]
    assert labels == [0, 0, 0, 0, 1, 1, 1]
    bad = tmp_path / "b_dogs" / "img.1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match="img.1.png.*on_error=skip"):
        ImageFolder(tmp_path, resolution=8)  # scanned at build (small folder)
    with pytest.warns(UserWarning, match="img.1.png"):
        ds = ImageFolder(tmp_path, resolution=8, on_error="skip")
    assert len(ds) == 12 and ds.skipped[0][0] == bad and ds.labels == [0, 0, 0, 0, 1, 1]
    lazy = ImageFolder(tmp_path, resolution=8, hflip=False, scan=False)  # large folders: checked when read
    assert len(lazy) == 7
    with pytest.raises(ValueError, match="img.1.png"):
        lazy[5]
    lazy_skip = ImageFolder(tmp_path, resolution=8, hflip=False, scan=False, on_error="skip")
    with pytest.warns(UserWarning, match="img.1.png"):
        item = lazy_skip[5]
    assert item["id"] == "b_dogs/img.2.png" and int(item["y"]) == 1  # the next readable image stands in
    with pytest.raises(ValueError, match="on_error"):
        ImageFolder(tmp_path, on_error="ignore")


def _run(mod, source, dest, vae_dir, *extra):
    argv = ["--source", str(source), "--dest", str(dest), "--vae", str(vae_dir), "--resolution", "16"]
    return mod.main([*argv, "--shard-size", "2", "--batch-size", "3", "--no-progress", "--threads", "1", *extra])


def test_encode_round_trips_through_the_latent_folder(tmp_path, vae_dir):
    mod = _script()
    source, dest = _source(tmp_path / "src"), tmp_path / "lat"
    result = _run(mod, source, dest, vae_dir)
    assert result["latents"] == 12 and result["skipped"] == 0
    entries = json.loads((dest / "dataset.json").read_text())["labels"]
    assert entries[:2] == [["a_cats/img.0.npy", 0], ["a_cats/img.0.flip.npy", 0]]
    assert [e[1] for e in entries] == [0] * 6 + [1] * 6
    data = latent_folder_data(str(dest), image_root=str(source), image_resolution=16)
    assert data.info["channels"] == 4 and data.info["resolution"] == 8 and data.info["num_classes"] == 2
    lat = data.train
    vae = SDVAE.from_pretrained(vae_dir).eval()
    images = ImageFolder(source, resolution=16, hflip=True)  # item i + n is item i mirrored
    n = len(images) // 2
    for k in range(n):
        plain, mirrored = lat[2 * k], lat[2 * k + 1]
        assert plain["id"] == images[k]["id"].replace(".png", ".npy")
        with torch.no_grad():
            ref = vae.encode(torch.stack([images[k]["x"], images[k + n]["x"]]))
        assert torch.allclose(plain["x"], ref[0], atol=1e-5) and torch.allclose(mirrored["x"], ref[1], atol=1e-5)
        assert torch.equal(mirrored["image"], images[k + n]["x"])  # the teacher sees the mirrored image too
        assert int(plain["y"]) == int(images[k]["y"])
    stored = torch.stack([lat[i]["x"] for i in range(len(lat))]).double()  # [12, 4, 8, 8]
    stats = json.loads((dest / "latent_stats.json").read_text())
    assert np.allclose(stats["mean"], stored.mean((0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(stats["std"], stored.transpose(0, 1).flatten(1).std(1).numpy(), rtol=1e-5)
    raw = stored * 1 / 0.18215  # SD-VAE: stored = raw * scaling_factor
    assert np.allclose(stats["raw_mean"], raw.mean((0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(stats["raw_std"], raw.transpose(0, 1).flatten(1).std(1).numpy(), rtol=1e-5)
    assert stats["latents"] == 12 and stats["positions"] == 12 * 64
    # a second pass with the first pass's raw statistics stores per-channel normalised latents (LightningDiT)
    _run(mod, source, tmp_path / "norm", vae_dir, "--statistics", str(dest / "latent_stats.json"))
    normed = json.loads((tmp_path / "norm" / "latent_stats.json").read_text())
    assert np.allclose(normed["mean"], 0.0, atol=1e-5) and np.allclose(normed["std"], 1.0, atol=1e-5)
    assert np.allclose(normed["raw_mean"], stats["raw_mean"], atol=1e-6)


def test_resume_skips_finished_shards_and_refuses_other_options(tmp_path, vae_dir):
    mod = _script()
    source, dest = _source(tmp_path / "src"), tmp_path / "lat"
    _run(mod, source, dest, vae_dir)
    before = {p: p.read_bytes() for p in dest.rglob("*.npy")}
    manifest = json.loads((dest / ".shards" / "000001.json").read_text())
    (dest / ".shards" / "000001.json").unlink()  # as if the run stopped inside shard 1
    (dest / manifest["entries"][0][0]).unlink()
    again = _run(mod, source, dest, vae_dir)
    assert again["encoded_images"] == 2 and again["latents"] == 12  # only shard 1 again
    assert {p: p.read_bytes() for p in dest.rglob("*.npy")} == before
    assert not list(dest.rglob(".*.tmp"))
    with pytest.raises(ValueError, match="resolution"):
        mod.main(["--source", str(source), "--dest", str(dest), "--vae", str(vae_dir), "--resolution", "32"])


def test_bad_image_stops_or_is_skipped_by_name(tmp_path, vae_dir):
    mod = _script()
    source = _source(tmp_path / "src")
    bad = source / "a_cats" / "img.1.png"
    bad.write_bytes(b"this is no png" * 4)
    with pytest.raises(ValueError, match=r"img\.1\.png.*--on-error skip"):
        _run(mod, source, tmp_path / "stop", vae_dir)
    result = _run(mod, source, tmp_path / "skip", vae_dir, "--on-error", "skip", "--no-hflip")
    assert result["latents"] == 5 and result["skipped"] == 1
    assert str(bad) in (tmp_path / "skip" / "skipped.txt").read_text()
    ds = LatentFolder(tmp_path / "skip")
    assert [f.relative_to(tmp_path / "skip").as_posix() for f in ds.files][:2] == [
        "a_cats/img.0.npy",
        "a_cats/img.2.npy",
    ]
    assert ds.labels == [0, 0, 1, 1, 1]


def test_workers_write_the_same_latents(tmp_path, vae_dir):
    mod = _script()
    source = _source(tmp_path / "src")
    _run(mod, source, tmp_path / "one", vae_dir)
    cmd = [sys.executable, str(ROOT / "scripts/encode_latents.py"), "--source", str(source), "--vae", str(vae_dir)]
    cmd += ["--dest", str(tmp_path / "two"), "--resolution", "16", "--shard-size", "2", "--batch-size", "3"]
    cmd += ["--workers", "2", "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.npy")}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.npy")}
    assert len(one) == 12 and one == two
    assert (tmp_path / "one" / "dataset.json").read_text() == (tmp_path / "two" / "dataset.json").read_text()
