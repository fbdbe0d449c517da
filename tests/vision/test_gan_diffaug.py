"""DiffAugment and the frozen-encoder discriminator (vision.diffaug): hand-computed transforms, pairing, gradients."""

from __future__ import annotations

import pytest
import torch

from vision.diffaug import DiffAugGAN, DiffAugment, FrozenEncoderDiscriminator, quantize_8bit
from vision.encoders import TimmViTEncoder


def _vit(grid: int = 4) -> TimmViTEncoder:
    torch.manual_seed(0)
    return TimmViTEncoder(
        "vit_tiny_patch16_224",
        grid_size=grid,
        allow_random_init=True,
        model_kwargs=dict(patch_size=4, embed_dim=48, depth=2, num_heads=3),
    )


def test_translation_matches_hand_shift():
    aug = DiffAugment("translation", translation_ratio=0.25)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = {"batch": 1, "size": (4, 4), "shift": (torch.tensor([1]), torch.tensor([-1]))}
    y = aug.apply(x, p)
    # out[i, j] = x[i + 1, j - 1] inside the image, zero where that index leaves it (DiffAugment's zero padding)
    want = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            if 0 <= i + 1 < 4 and 0 <= j - 1 < 4:
                want[i, j] = x[0, 0, i + 1, j - 1]
    assert torch.equal(y[0, 0], want)


def test_colour_matches_closed_form():
    aug = DiffAugment("color")
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    p = {
        "batch": 2,
        "size": (5, 5),
        "brightness": torch.tensor([0.2, -0.3]),
        "saturation": torch.tensor([1.5, 0.0]),
        "contrast": torch.tensor([0.5, 1.2]),
    }
    y = aug.apply(x, p)
    for i in range(2):
        a = x[i] + p["brightness"][i]
        a = (a - a.mean(0, keepdim=True)) * p["saturation"][i] + a.mean(0, keepdim=True)
        a = (a - a.mean()) * p["contrast"][i] + a.mean()
        assert torch.allclose(y[i], a, atol=1e-6)
    # saturation 0 leaves every pixel grey: all channels equal
    assert torch.allclose(y[1, 0], y[1, 1]) and torch.allclose(y[1, 1], y[1, 2])


def test_cutout_zeroes_a_square_of_the_given_side():
    aug = DiffAugment("cutout", cutout_ratio=0.5)
    x = torch.ones(1, 1, 8, 8)
    p = {"batch": 1, "size": (8, 8), "cutout": ((4, 4), torch.tensor([4]), torch.tensor([4]))}
    y = aug.apply(x, p)
    assert y[0, 0, 2:6, 2:6].abs().sum() == 0 and y.sum() == 64 - 16


def test_same_seed_same_transform_for_real_and_fake():
    aug = DiffAugment("color,translation,cutout")
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    fake = real + 0.1 * torch.randn_like(real)
    p = aug.sample(4, 16, 16, torch.Generator().manual_seed(7))
    q = aug.sample(4, 16, 16, torch.Generator().manual_seed(7))
    assert all(torch.equal(p[k], q[k]) for k in ("brightness", "saturation", "contrast"))
    a, b = aug.apply(real, p), aug.apply(real, q)
    assert torch.equal(a, b)
    # the same transform on real and fake: their difference is the transform of the difference for the linear part
    # (translation and cutout move/zero the same pixels), so zeroed and shifted pixels coincide
    zr, zf = aug.apply(torch.ones_like(real), p) == 0, aug.apply(torch.ones_like(fake), p) == 0
    assert torch.equal(zr, zf)
    # a different seed gives a different transform
    r = aug.sample(4, 16, 16, torch.Generator().manual_seed(8))
    assert not torch.equal(aug.apply(real, r), a)


def test_diffaugment_is_differentiable():
    aug = DiffAugment("color,translation,cutout")
    x = (torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    p = aug.sample(2, 8, 8, torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,))
    y = aug.apply(x, p)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.abs().sum() > 0


def test_bad_policy_and_shape_are_named():
    with pytest.raises(ValueError, match="colour"):
        DiffAugment("colour")
    aug = DiffAugment("translation")
    with pytest.raises(ValueError, match="sample"):
        aug.apply(torch.zeros(2, 1, 8, 8), aug.sample(3, 8, 8))


def test_quantize_8bit():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.001, 1.0, 3.0])
    q = quantize_8bit(x)
    assert torch.allclose(q, torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)
    assert q.min() == -1 and q.max() == 1


def test_frozen_encoder_discriminator_shapes_and_frozen_backbone():
    disc = FrozenEncoderDiscriminator(_vit(), layers=[1, 2], ks=3)
    assert not any(p.requires_grad for p in disc.encoder.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    x = (torch.rand(3, 1, 16, 16) * 2 - 1).requires_grad_(True)
    logits = disc(x)
    assert logits.shape == (3, 2 * 16)  # two levels x 16 tokens
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator's gradient reaches the image
    assert all(p.grad is None for p in disc.encoder.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    with pytest.raises(ValueError, match="odd"):
        FrozenEncoderDiscriminator(_vit(), ks=4)


def test_diffaug_gan_players_get_only_their_own_gradients():
    torch.manual_seed(0)
    gan = DiffAugGAN(FrozenEncoderDiscriminator(_vit(), layers=[2], ks=3), DiffAugment("color,translation"))
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    fake = (real + 0.2 * torch.randn_like(real)).requires_grad_(True)
    g_loss, d_loss = gan.losses(real, fake)
    # generator loss: gradient to the fake image, none to the discriminator
    g_fake = torch.autograd.grad(g_loss, fake, retain_graph=True)[0]
    assert g_fake.abs().sum() > 0
    heads = list(gan.discriminator.heads.parameters())
    assert not g_loss.requires_grad or all(gr is None for gr in torch.autograd.grad(g_loss, heads, allow_unused=True))
    # discriminator loss: gradient to the heads, none to the fake image
    assert torch.autograd.grad(d_loss, fake, allow_unused=True)[0] is None
    assert any(gr is not None and gr.abs().sum() > 0 for gr in torch.autograd.grad(d_loss, heads, allow_unused=True))
    assert all(p.requires_grad for p in heads)  # switched back on after the generator's pass


class _Recorder(torch.nn.Module):
    """A discriminator that remembers what it was shown."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return (self.w * x).flatten(1).mean(1, keepdim=True)


@pytest.mark.parametrize("paired", [True, False])
def test_diffaug_gan_pairs_the_transform_of_real_and_fake(paired):
    torch.manual_seed(0)
    rec = _Recorder()
    gan = DiffAugGAN(rec, DiffAugment("color,translation,cutout"), paired=paired, quantize_fake=False)
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    gan.losses(real, real.clone(), generator=False)
    seen_real, seen_fake = rec.seen  # the discriminator's real pass, then its fake pass
    assert torch.equal(seen_real, seen_fake) == paired
    assert not torch.equal(seen_real, real)  # an augmentation was applied
