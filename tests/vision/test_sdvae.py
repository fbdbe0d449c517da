"""SD-VAE (diffusers AutoencoderKL layout): parameter names and count, the layers against hand-written definitions,
diffusers-style folders loaded bit for bit, bad files refused by name, and (when diffusers is installed) the forward
against diffusers' own AutoencoderKL."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vision.tokenizers import SD_VAE_SCALING_FACTOR, SDVAE, load_sdvae, sd_vae
from vision.tokenizers.sdvae import SD_VAE_CONFIG, AttentionBlock, Downsample

TINY = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
)


def _tiny(seed: int = 0, **kw) -> SDVAE:
    torch.manual_seed(seed)
    vae = SDVAE(**{**TINY, **kw}).eval()
    with torch.no_grad():  # GroupNorm affines start at 1/0: randomise them too, so a swapped key would show
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def test_sd_vae_names_shapes_and_parameter_count():
    with torch.device("meta"):
        vae = sd_vae()
    sd = vae.diffusers_state_dict()
    # 83,653,863: diffusers.AutoencoderKL(**stabilityai/sd-vae-ft-ema's config.json), counted with diffusers 0.42.1
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down_blocks.0.downsamplers.0.conv.weight"] == (128, 128, 3, 3)
    assert shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert not any(k.startswith("encoder.down_blocks.3.downsamplers") for k in sd)  # the last level keeps its size
    assert shapes["encoder.mid_block.attentions.0.to_q.weight"] == (512, 512)
    assert shapes["encoder.mid_block.attentions.0.to_out.0.bias"] == (512,)
    assert shapes["encoder.mid_block.attentions.0.group_norm.weight"] == (512,)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)  # mean and log-variance of 4 channels
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1) and shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert "decoder.up_blocks.3.resnets.2.conv2.weight" in sd  # layers_per_block + 1 blocks per decoder level
    assert shapes["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"] == (256, 512, 1, 1)
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in sd)
    assert "latent_mean" not in sd and "latent_std" in vae.state_dict()
    assert vae.downsample == 8 and vae.latent_shape_for(256) == (4, 32, 32)
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = Downsample(3)
    x = torch.randn(2, 3, 8, 8)
    padded = torch.zeros(2, 3, 9, 9)
    padded[..., :8, :8] = x  # LDM: one row of zeros below and one column right, then a stride-2 valid conv
    ref = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    out = down(x)
    assert out.shape == (2, 3, 4, 4) and torch.allclose(out, ref, atol=1e-6)


def test_attention_block_is_single_head_softmax_attention_with_residual():
    torch.manual_seed(0)
    attn = AttentionBlock(8, groups=4)
    x = torch.randn(2, 8, 3, 5)
    h = F.group_norm(x, 4, attn.group_norm.weight, attn.group_norm.bias, eps=1e-6).flatten(2).transpose(1, 2)
    q, k, v = (lin(h) for lin in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(torch.einsum("bic,bjc->bij", q, k) / math.sqrt(8), dim=-1)
    ref = x + attn.to_out[0](torch.einsum("bij,bjc->bic", w, v)).transpose(1, 2).reshape(2, 8, 3, 5)
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_scaling_factor_is_the_named_statistics():
    vae = _tiny()
    assert SD_VAE_SCALING_FACTOR == 0.18215 and SD_VAE_CONFIG["scaling_factor"] == SD_VAE_SCALING_FACTOR
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.posterior(x).mean
        assert torch.allclose(vae.encode(x), mean * 0.18215, atol=1e-6)  # REPA: z * 0.18215
        z = torch.randn(2, 4, 8, 8)
        assert torch.allclose(vae.decode(z), vae._decode(z / 0.18215), atol=1e-5)
    shifted = _tiny(scaling_factor=2.0, shift_factor=0.5)  # SD3 / Flux: (z - shift) * scale
    assert torch.allclose(shifted.encode(x), (shifted.posterior(x).mean - 0.5) * 2.0, atol=1e-5)
    per_channel = _tiny(scaling_factor=0.5, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    m = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1)
    assert torch.allclose(per_channel.encode(x), (per_channel.posterior(x).mean - m) * 0.5 / s, atol=1e-5)
    with pytest.raises(ValueError, match="latents_std"):
        _tiny(latents_mean=[0.0] * 4)


def test_folder_round_trip_is_bit_exact(tmp_path):
    vae = _tiny(seed=3)
    vae.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["block_out_channels"] == [8, 16]
    assert cfg["scaling_factor"] == pytest.approx(0.18215, rel=1e-6) and cfg["latents_mean"] is None
    stored = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert set(stored) == set(vae.diffusers_state_dict())  # only diffusers' names, no tokenizer buffers
    back = SDVAE.from_pretrained(tmp_path / "vae").eval()
    for k, v in vae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x), back.encode(x))
        assert torch.equal(vae.decode(vae.encode(x)), back.decode(back.encode(x)))
    # fitted per-channel statistics travel as latents_mean / latents_std with scaling_factor 1
    vae.fit_statistics([x], reduce_dims=(0, 2, 3))
    vae.save_pretrained(tmp_path / "fitted")
    fitted = SDVAE.from_pretrained(tmp_path / "fitted")
    assert torch.allclose(fitted.latent_mean, vae.latent_mean) and torch.allclose(fitted.latent_std, vae.latent_std)
    assert json.loads((tmp_path / "fitted" / "config.json").read_text())["scaling_factor"] == 1.0


def test_deprecated_attention_names_and_conv_shapes_load(tmp_path):
    vae = _tiny(seed=1)
    old = {}
    for k, v in vae.diffusers_state_dict().items():  # diffusers < 0.15 names, 1x1-conv attention weights
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{dep}.")
                v = v[:, :, None, None] if v.dim() == 2 else v
        old[k] = v.clone()
    assert "encoder.mid_block.attentions.0.query.weight" in old
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY}))
    torch.save(old, folder / "diffusion_pytorch_model.bin")  # the .bin format, read with weights_only=True
    back = SDVAE.from_pretrained(folder)
    for k, v in vae.diffusers_state_dict().items():
        assert torch.equal(v, back.diffusers_state_dict()[k]), k


def test_bad_folders_stop_with_the_name(tmp_path):
    vae = _tiny()
    folder = vae.save_pretrained(tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    missing = dict(state)
    del missing["decoder.up_blocks.1.resnets.1.conv1.bias"]
    save_file(missing, str(weights))
    with pytest.raises(KeyError, match=r"missing 1 key\(s\): decoder\.up_blocks\.1\.resnets\.1\.conv1\.bias"):
        SDVAE.from_pretrained(folder)
    save_file({**state, "encoder.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(KeyError, match=r"unexpected 1 key\(s\): encoder\.extra\.weight"):
        SDVAE.from_pretrained(folder)
    save_file({**state, "quant_conv.weight": torch.zeros(8, 8, 3, 3)}, str(weights))
    with pytest.raises(ValueError, match="quant_conv.weight"):
        SDVAE.from_pretrained(folder)
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(KeyError, match="CompVis"):
        SDVAE.from_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "layers_per_blok": 2}))
    with pytest.raises(ValueError, match="layers_per_blok"):
        SDVAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        SDVAE.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema"):
        SDVAE.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        SDVAE(**{**TINY, "down_block_types": ["CrossAttnDownBlock2D", "DownEncoderBlock2D"]})


def test_load_sdvae_for_recipes(tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        vae = load_sdvae(random_init=TINY)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    stats = tmp_path / "latent_stats.json"
    stats.write_text(json.dumps({"raw_mean": [1.0, 2.0, 3.0, 4.0], "raw_std": [2.0] * 4}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = load_sdvae(random_init=TINY, statistics=str(stats))
    assert vae.latent_mean.flatten().tolist() == [1.0, 2.0, 3.0, 4.0] and vae.latent_std.flatten().tolist() == [2.0] * 4
    with pytest.raises(ValueError, match="path="):
        load_sdvae()


def test_matches_diffusers_autoencoder_kl(tmp_path):
    diffusers = pytest.importorskip("diffusers")  # optional: pip install -c constraints.txt diffusers
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "ref")  # diffusers writes the folder; this project reads it
    mine = SDVAE.from_pretrained(tmp_path / "ref").eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        d = ref.encode(x).latent_dist
        post = mine.posterior(x)
        assert torch.allclose(post.mean, d.mean, atol=1e-5) and torch.allclose(post.logvar, d.logvar, atol=1e-5)
        assert torch.allclose(mine._decode(z), ref.decode(z).sample, atol=1e-5)
    mine.save_pretrained(tmp_path / "mine")  # and the other way round
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "mine").eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
