"""vision.data (splits, flips, folders, bad inputs); vision.encoders (grid matching, weights-file path, fail-fast)."""

import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vision.data import DigitsDataset, ImageFolder, LatentFolder, NaturalCrops, split_indices
from vision.encoders import TimmViTEncoder


def test_split_is_fixed_by_seed_and_disjoint():
    a_tr, a_va = split_indices(100, 0.2, seed=3)
    b_tr, b_va = split_indices(100, 0.2, seed=3)
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_va, b_va)
    assert len(a_va) == 20 and not set(a_tr) & set(a_va) and len(set(a_tr) | set(a_va)) == 100
    assert not np.array_equal(split_indices(100, 0.2, seed=4)[1], a_va)


def test_digits_dataset():
    tr, va = DigitsDataset("train", resolution=16), DigitsDataset("val", resolution=16)
    assert len(tr) + len(va) == 1797 and len(va) == 180
    item = tr[0]
    assert item["x"].shape == (1, 16, 16) and item["x"].min() >= -1 and item["x"].max() <= 1
    assert 0 <= int(item["y"]) < 10 and item["id"].startswith("digits/")
    assert not {tr[i]["id"] for i in range(len(tr))} & {va[i]["id"] for i in range(len(va))}
    flipped = DigitsDataset("val", resolution=16, hflip=True)
    assert len(flipped) == 2 * len(va)
    assert torch.equal(flipped[len(va)]["x"], va[0]["x"].flip(-1)) and flipped[len(va)]["id"].endswith(":flip")


def test_natural_crops_are_deterministic():
    a, b = NaturalCrops("train", resolution=16, num_crops=64), NaturalCrops("train", resolution=16, num_crops=64)
    assert torch.equal(a.images, b.images) and a[0]["x"].shape == (3, 16, 16)
    assert not set(a.ids) & set(NaturalCrops("val", resolution=16, num_crops=64).ids)


def _png(path, size=(20, 12), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_resize_crop_labels_and_errors(tmp_path):
    _png(tmp_path / "cats" / "a.png")
    _png(tmp_path / "dogs" / "b.png", size=(8, 8), color=(0, 0, 255))
    ds = ImageFolder(tmp_path, resolution=16, hflip=False)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 2
    item = ds[1]
    assert item["x"].shape == (3, 16, 16) and int(item["y"]) == 1
    assert torch.allclose(item["x"][2], torch.ones(16, 16), atol=1e-2)
    assert torch.allclose(item["x"][0], -torch.ones(16, 16), atol=1e-2)
    (tmp_path / "cats" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):  # found when the folder is scanned, before training
        ImageFolder(tmp_path, resolution=16, hflip=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")


def test_latent_folder(tmp_path):
    (tmp_path / "lat" / "00").mkdir(parents=True)
    np.save(tmp_path / "lat" / "00" / "a.npy", np.ones((4, 8, 8), np.float32))
    np.savez(tmp_path / "lat" / "00" / "b.npz", np.zeros((1, 4, 8, 8), np.float32))
    _png(tmp_path / "img" / "00" / "a.png")
    _png(tmp_path / "img" / "00" / "b.png")
    (tmp_path / "lat" / "dataset.json").write_text(json.dumps({"labels": [["00/a.npy", 1], ["00/b.npz", 0]]}))
    ds = LatentFolder(tmp_path / "lat", image_root=tmp_path / "img", image_resolution=16)
    assert ds.num_classes == 2 and ds[0]["x"].shape == (4, 8, 8) and ds[1]["x"].shape == (4, 8, 8)
    assert ds[0]["image"].shape == (3, 16, 16) and int(ds[0]["y"]) == 1
    with pytest.raises(ValueError, match="outside"):
        LatentFolder(tmp_path / "lat", num_classes=1)


def test_teacher_grid_matches_student_and_resamples():
    enc = TimmViTEncoder("unirep_vit_digits", grid_size=8, allow_random_init=True)
    assert enc.img_size == 32 and enc.dim == 96
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    tokens = enc.encode(x)
    assert tokens.x.shape == (3 * 64, 96) and tokens.num_items == 3
    # the encoder resizes to 32 and drops the class token: compare with timm's forward_features by hand
    ref = enc.model.forward_features(enc.preprocess(x))[:, 1:].reshape(-1, 96)
    assert torch.allclose(tokens.x, ref, atol=1e-6)
    pooled = enc.encode_pooled(x)
    assert torch.allclose(pooled, enc.model.forward_features(enc.preprocess(x))[:, 0], atol=1e-6)
    # a grid that cannot be reached by resizing (patch 14 teacher, odd grids) is resampled bilinearly
    odd = TimmViTEncoder("unirep_vit_digits", img_size=32, allow_random_init=True)
    odd.grid_size = 4
    assert odd.encode(x).x.shape == (3 * 16, 96)


def test_teacher_forward_intermediates_index_convention():
    torch.manual_seed(0)
    enc = TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    L = enc.num_layers
    out, feats = enc.forward_intermediates(x, [0, 1, L, -1, -(L + 1)])
    torch.testing.assert_close(out.x, enc.encode(x).x)  # out is what encode returns, from the same pass
    # timm numbers blocks from 0 and returns them un-normed: our index k is timm's k - 1
    ref = enc.model.forward_intermediates(enc.preprocess(x), indices=[0, L - 1], norm=False, intermediates_only=True)
    torch.testing.assert_close(feats[1].x, ref[0].flatten(2).transpose(1, 2).reshape(-1, enc.dim))
    torch.testing.assert_close(feats[2].x, ref[1].flatten(2).transpose(1, 2).reshape(-1, enc.dim))
    torch.testing.assert_close(feats[3].x, feats[2].x)  # -1 is block L
    torch.testing.assert_close(feats[4].x, feats[0].x)  # -(L + 1) is the embedded input
    assert feats[0].x.shape == (2 * 16, enc.dim) and not torch.allclose(feats[0].x, feats[1].x)
    with pytest.raises(ValueError, match="outside"):
        enc.forward_intermediates(x, [L + 1])
    assert enc.feature_dim(2) == enc.dim and enc.cache_settings()["grid_size"] == 4


def test_weights_file_path_with_registers_and_pos_embed_resampling(tmp_path):
    torch.manual_seed(0)
    # a DINOv2-with-registers ViT-S state dict at timm's native 518 px (37x37 grid), random values, same keys
    src = TimmViTEncoder("dinov2_vits14_reg", allow_random_init=True)
    state = {k: torch.randn_like(v) * 0.02 for k, v in src.model.state_dict().items()}
    path = tmp_path / "dinov2_vits14_reg.safetensors"
    save_file(state, str(path))
    enc = TimmViTEncoder("dinov2_vits14_reg", grid_size=4, pretrained_path=str(path))
    assert enc.img_size == 56 and enc.num_prefix_tokens == 5  # class + 4 registers dropped
    loaded = enc.model.state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert torch.equal(loaded["reg_token"], state["reg_token"])
    assert loaded["pos_embed"].shape[1] == 16  # 37x37 resampled to 4x4 by timm's checkpoint filter
    tokens = enc.encode(torch.zeros(2, 3, 32, 32))
    assert tokens.x.shape == (2 * 16, 384) and torch.isfinite(tokens.x).all()


def test_missing_weights_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # a cold cache
    import vision.encoders as ve

    monkeypatch.setattr(ve, "_hf_cached_file", lambda name: None)

    def no_network(*args, **kwargs):  # failing fast means never waiting on a connection (timm retries ~47 s)
        raise AssertionError("the encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FileNotFoundError, match="pretrained_path") as err:
        TimmViTEncoder("dinov2_vitb14", grid_size=16)
    assert "vit_base_patch14_dinov2.lvd142m" in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.safetensors")):
        TimmViTEncoder("dinov2_vitb14", pretrained_path=str(tmp_path / "nope.safetensors"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
