"""RAE tokenizer: decoder shapes and presets, token normalisation, per-position statistics, noise augmentation,
the dimension-dependent shift, bit-exact reloading."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unirep.flow import dimension_shift, shift_time
from unirep.tokens import TokenSet
from vision.tokenizers.rae import RAE, RAEDecoder, noise_augment, rae_decoder_tiny, rae_decoder_xl


class PatchEncoder(nn.Module):
    """A tiny stand-in teacher: a strided conv patch embedding whose output is *not* standardised."""

    def __init__(self, dim: int = 16, patch: int = 4):
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(3, dim, patch, patch)
        nn.init.normal_(self.conv.weight, std=0.5)
        nn.init.normal_(self.conv.bias, mean=2.0)

    def encode(self, x: torch.Tensor) -> TokenSet:
        return TokenSet.from_dense(self.conv(x).flatten(2).transpose(1, 2))


def _rae(tau: float = 0.8, dim: int = 16) -> RAE:
    torch.manual_seed(0)
    return RAE(PatchEncoder(dim), rae_decoder_tiny(dim, grid=4, patch_size=4), noise_tau=tau, final_norm="apply")


def test_decoder_shapes_and_xl_preset():
    dec = RAEDecoder(16, grid=4, patch_size=4, width=32, depth=2, num_heads=2)
    out = dec(torch.randn(3, 16, 16))
    assert out.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="latent tokens"):
        dec(torch.randn(3, 9, 16))
    with torch.device("meta"):  # the anchor's XL decoder: 28 blocks at width 1152 with 16 heads
        xl = rae_decoder_xl(768, grid=16, patch_size=16)
    assert len(xl.blocks) == 28 and xl.embed.out_features == 1152 and xl.blocks[0].attn.num_heads == 16
    assert xl.head.out_features == 16 * 16 * 3


def test_encode_layout_and_token_norm():
    rae = _rae()
    x = torch.randn(2, 3, 16, 16)
    raw = rae._encode(x)
    assert raw.shape == (2, 16, 4, 4) == (2, *rae.latent_shape)
    # the latent of token (i, j) is the teacher's token i*g + j, standardised over channels (LN without affine)
    tokens = rae.encoder.encoder.encode(x).to_dense()[0]  # [B, N, D]
    ref = (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(raw[1, :, 2, 3], ref[1, 2 * 4 + 3], atol=1e-5)


def test_statistics_per_position_applied_and_inverted():
    rae = _rae()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    rae.fit_statistics(batches)
    raws = torch.cat([rae._encode(b) for b in batches]).double()  # [12, D, g, g]
    mean, var = raws.mean(0), raws.var(0)  # per channel and position
    assert torch.allclose(rae.latent_mean.double(), mean, atol=1e-5)
    assert torch.allclose(rae.latent_std.double(), torch.sqrt(var + 1e-5), atol=1e-5)
    x = batches[0]
    z = rae.encode(x)
    assert torch.allclose(z.double(), (rae._encode(x).double() - mean) / torch.sqrt(var + 1e-5), atol=1e-4)
    assert torch.allclose(rae.denormalize(z), rae._encode(x), atol=1e-5)
    rae.eval()
    assert torch.allclose(rae.decode(z), rae._decode(rae._encode(x)), atol=1e-5)
    assert set(dict(rae.named_buffers())) >= {"latent_mean", "latent_std"}


def test_noise_augmentation_matches_definition():
    z = torch.randn(5, 8, 4, 4)
    out = noise_augment(z, 0.8, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = 0.8 * torch.rand(5, 1, 1, 1, generator=g)
    eps = torch.randn(z.shape, generator=g)
    assert torch.equal(out, z + sigma * eps)
    assert torch.equal(noise_augment(z, 0.0), z)


def test_noise_on_in_training_off_in_eval():
    rae = _rae(tau=0.8)
    x = torch.randn(2, 3, 16, 16)
    rae.train()
    assert rae.encoder.training is False  # the frozen teacher never enters training mode
    a, b = rae(x), rae(x)
    assert not torch.allclose(a, b)
    rae.eval()
    c, d = rae(x), rae(x)
    assert torch.equal(c, d) and torch.equal(c, rae._decode(rae._encode(x)))
    # encode() never adds noise, even in training mode (diffusion trains on clean latents)
    rae.train()
    assert torch.equal(rae.encode(x), rae.encode(x))


def test_gradients_reach_decoder_only():
    rae = _rae()
    rae.train()
    loss = (rae(torch.randn(2, 3, 16, 16)) - torch.randn(2, 3, 16, 16)).abs().mean()
    loss.backward()
    for name, p in rae.decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(not p.requires_grad for p in rae.encoder.parameters())


def test_dimension_shift_on_rae_latent():
    m = 768 * 16 * 16  # the anchor's DINOv2-B latent
    assert dimension_shift(m) == pytest.approx(math.sqrt(m / 4096)) and dimension_shift(m) == pytest.approx(6.928, 1e-3)
    rae = _rae()
    s = dimension_shift(math.prod(rae.latent_shape))
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, s), s * t / (1 + (s - 1) * t))


def test_reload_reproduces_reconstructions_bit_for_bit(tmp_path):
    rae = _rae()
    rae.fit_statistics([torch.randn(4, 3, 16, 16)])
    rae.eval()
    save_file({k: v.contiguous() for k, v in rae.state_dict().items()}, str(tmp_path / "rae.safetensors"))
    torch.manual_seed(123)  # a differently initialised copy
    other = RAE(rae.encoder, rae_decoder_tiny(16, grid=4, patch_size=4), final_norm="apply")
    other.load_state_dict(load_file(str(tmp_path / "rae.safetensors")))
    other.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(other.decode(other.encode(x)), rae.decode(rae.encode(x)))


def test_bad_grid_is_named():
    rae = _rae()
    with pytest.raises(ValueError, match="grid"):
        rae.encode(torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="latent_dim"):
        RAE(PatchEncoder(8), rae_decoder_tiny(16, grid=4, patch_size=4), final_norm="apply")
    with pytest.raises(ValueError, match="final LayerNorm"):
        RAE(PatchEncoder(16), rae_decoder_tiny(16, grid=4, patch_size=4), final_norm="strip")


# -- decoder losses (vision.losses) ------------------------------------------------------------------------------
from vision.losses import (  # noqa: E402
    LPIPS,
    EncoderPerceptualLoss,
    PatchDiscriminator,
    gan_adaptive_weight,
    gan_losses,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_g_loss,
)


def test_gan_adaptive_weight_by_hand():
    w = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    rec = (w * torch.tensor([[3.0, 0.0], [4.0, 0.0]])).sum()  # gradient norm 5
    g = (w**2).sum()  # gradient 2w, norm 2 * sqrt(6)
    assert torch.allclose(gan_adaptive_weight(rec, g, w), torch.tensor(5.0 / (2 * 6**0.5 + 1e-6)))
    big = (w * 1e-9).sum()  # tiny GAN gradient: clamped at 1e4
    assert gan_adaptive_weight(rec, big, w) == 1e4


def test_gan_losses_update_each_player_with_its_own_objective():
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, ndf=8, n_layers=2)
    gen = torch.nn.Conv2d(3, 3, 3, padding=1)
    x, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    g_loss, d_loss = gan_losses(disc, x, gen(noise))
    (g_loss + d_loss).backward()  # one backward over the sum, as the trainer does
    d_grads = {k: p.grad.clone() for k, p in disc.named_parameters()}
    g_grads = {k: p.grad.clone() for k, p in gen.named_parameters()}
    disc.zero_grad()
    gen.zero_grad()
    # reference 1: the discriminator's gradient is that of the hinge D loss alone on (real, detached fake)
    logits = disc(torch.cat([x, gen(noise).detach()]))
    hinge_d_loss(logits[:4], logits[4:]).backward()
    for k, p in disc.named_parameters():
        assert torch.allclose(p.grad, d_grads[k], atol=1e-6), k
    assert gen.weight.grad is None
    disc.zero_grad()
    # reference 2: the generator's gradient is that of the hinge G loss alone (BatchNorm in training mode uses the
    # statistics of the fake batch in both computations)
    hinge_g_loss(disc(gen(noise))).backward()
    for k, p in gen.named_parameters():
        assert torch.allclose(p.grad, g_grads[k], atol=1e-5), k
        assert p.grad.abs().sum() > 0


def test_encoder_perceptual_loss():
    torch.manual_seed(0)
    loss = EncoderPerceptualLoss(PatchEncoder(16))
    x = torch.randn(2, 3, 16, 16)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    x_rec = torch.randn(2, 3, 16, 16, requires_grad=True)
    val = loss(x_rec, x)
    val.backward()
    assert 0 < val.item() <= 4 and x_rec.grad is not None and x_rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.encoder.parameters())


def test_lpips_from_local_files(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS(None, None)
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    lins = {f"lin{k}.model.1.weight": m.weight.abs() for k, m in enumerate(ref.lins)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "lpips_vgg.pth")
    m = LPIPS(tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert m(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert m(x, y).item() > 0 and m(x, y).item() == pytest.approx(m(y, x).item(), rel=1e-5)
    with pytest.raises(FileNotFoundError, match="LPIPS weights file"):
        LPIPS(tmp_path / "missing.pth", None)
    with pytest.raises(ValueError, match="not an LPIPS"):
        LPIPS(None, tmp_path / "vgg16.pth")


# -- recipes: stage 1 -> checkpoint -> stage 2, bit for bit --------------------------------------------------------
def _teacher_file(tmp_path) -> str:
    from safetensors.torch import save_file as save_st

    from vision.encoders import TimmViTEncoder

    torch.manual_seed(0)
    enc = TimmViTEncoder("unirep_vit_digits", grid_size=8, allow_random_init=True)
    path = tmp_path / "teacher.safetensors"
    save_st({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    return str(path)


def _run(name: str, out_dir, extra: list[str]):
    from unirep.cli import compose, run_train

    smoke = list(compose("train", [f"experiment=vision/{name}"]).smoke)
    cfg = compose(
        "train",
        [
            f"experiment=vision/{name}",
            "trainer.max_steps=2",
            f"out_dir={out_dir}",
            "trainer.progress=false",
            *smoke,
            *extra,
        ],
    )
    return run_train(cfg)


def test_stage1_checkpoint_feeds_stage2_bit_for_bit(tmp_path):
    from safetensors.torch import load_file as load_st

    from unirep.train import find_checkpoint, load_task
    from vision.tokenizers.tasks import load_tokenizer

    teacher = _teacher_file(tmp_path)
    fixed = [f"task.tokenizer.encoder.pretrained_path={teacher}", "task.tokenizer.encoder.allow_random_init=false"]
    _run("rae_stage1", tmp_path / "s1", fixed)
    ckpt = find_checkpoint(tmp_path / "s1")
    tok = load_tokenizer(str(tmp_path / "s1"), fit_statistics="never")
    # the loaded decoder is the EMA decoder of the checkpoint, exactly
    ema = load_st(str(ckpt / "ema.safetensors"))
    for k, v in tok.decoder.state_dict().items():
        match = [e for name, e in ema.items() if name.endswith(k)]
        assert match and torch.equal(match[0], v), k
    assert not any(p.requires_grad for p in tok.parameters())
    _run("rae_sit", tmp_path / "s2", [f"task.tokenizer.checkpoint={tmp_path / 's1'}"])
    task, _ = load_task(tmp_path / "s2")
    assert int(task.tokenizer.stats_items) > 0  # statistics fitted over the training images and saved with stage 2
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    tok2 = task.tokenizer
    tok.latent_mean.copy_(tok2.latent_mean)
    tok.latent_std.copy_(tok2.latent_std)
    z = tok2.encode(x)
    assert torch.equal(z, tok.encode(x))
    assert torch.equal(tok2.decode(z), tok.decode(z))


def test_generator_losses_match_rae_and_the_non_saturating_definition():
    from vision.losses import GEN_LOSSES, non_saturating_g_loss

    logits = torch.tensor([-3.0, 0.0, 2.0])
    # RAE's vanilla_g_loss (src/disc/gan_loss.py) is -mean(logits_fake), taming's generator loss
    assert torch.allclose(vanilla_g_loss(logits), torch.tensor(1.0 / 3.0))
    assert GEN_LOSSES["vanilla"](logits) == GEN_LOSSES["hinge"](logits)
    assert torch.allclose(non_saturating_g_loss(logits), torch.log1p(torch.exp(-logits)).mean())
    # unlike the constant slope of -mean D, its gradient is largest where the discriminator rejects the fake
    x = logits.clone().requires_grad_(True)
    non_saturating_g_loss(x).backward()
    assert x.grad[0].abs() > x.grad[1].abs() > x.grad[2].abs()


def test_discriminator_warm_up_then_generator_term():
    """Before ``disc_update_start`` no adversarial term; until ``disc_start`` only the discriminator learns; after
    that the decoder gets the adaptive-weighted generator loss as well."""
    from vision.tokenizers.tasks import RAEStage1Task

    torch.manual_seed(0)
    rae = RAE(
        PatchEncoder(16),
        rae_decoder_tiny(latent_dim=16, grid=4, patch_size=4, out_channels=3),
        noise_tau=0.0,
        final_norm="none",
    )
    disc = PatchDiscriminator(3, ndf=8, n_layers=2)
    task = RAEStage1Task(rae, perceptual_weight=0.0, discriminator=disc, disc_start=20, disc_update_start=10)
    batch = {"x": torch.randn(2, 3, 16, 16)}

    def grads(step):
        task.zero_grad()
        out = task(batch, step)
        out["loss"].backward()
        d = sum(float(p.grad.abs().sum()) for p in disc.parameters() if p.grad is not None)
        return out, d

    out, d = grads(5)
    assert "loss/gan_d" not in out and d == 0.0
    out, d = grads(10)
    assert "loss/gan_d" in out and "loss/gan_g" not in out and d > 0
    # the decoder's gradient is the reconstruction loss's alone during the warm-up
    g_warm = rae.decoder.last_layer.grad.clone()
    task.zero_grad()
    task._reconstruction_loss(rae.reconstruct(batch["x"]), batch["x"])[0].backward()
    assert torch.allclose(rae.decoder.last_layer.grad, g_warm, atol=1e-7) and g_warm.abs().sum() > 0
    out, d = grads(20)
    assert "loss/gan_g" in out and float(out["gan/weight"]) > 0
    with pytest.raises(ValueError, match="disc_update_start"):
        RAEStage1Task(rae, perceptual_weight=0.0, discriminator=disc, disc_start=5, disc_update_start=10)
