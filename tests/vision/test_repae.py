"""REPA-E (vision.repae): the gradient routing of the end-to-end step, the affine-free BatchNorm, the equivalence of
the one-optimiser step with the anchor's three sequential updates, and the exported tokenizer.

The reference in ``test_one_step_equals_the_anchors_three_updates`` is written here from End2End-Diffusion/REPA-E
``train_repae.py`` (VAE step with the SiT frozen in eval mode, discriminator step, SiT step on ``z.detach()``), with
its own optimisers, not with the task's code.
"""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unirep.align import AlignmentTerm, ProjectorMLP, TeacherTarget
from vision.encoders import TimmViTEncoder
from vision.losses import PatchDiscriminator
from vision.models.sit import SiT
from vision.repae import LatentBatchNorm, REPAETask, export_checkpoint, export_tokenizer, load_exported_tokenizer
from vision.tokenizers import VAVAE
from vision.tokenizers.tasks import load_tokenizer

B = 4


def _task(seed: int = 0, disc: bool = True, perceptual: float = 0.0) -> REPAETask:
    torch.manual_seed(seed)
    vae = VAVAE(in_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)  # 16 px -> 4 x 4 x 4
    with torch.no_grad():  # fitted-looking statistics, so the BatchNorm is not the identity
        vae.latent_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]).view(4, 1, 1))
        vae.latent_std.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0]).view(4, 1, 1))
    model = SiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():  # leave the zero init (adaLN, output) so every parameter's gradient is generic
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    teacher = TimmViTEncoder("unirep_vit_digits", grid_size=4, allow_random_init=True)
    term = AlignmentTerm(layer=1, projector=partial(ProjectorMLP, hidden_dim=16), target=TeacherTarget(), weight=0.5)
    return REPAETask(
        model,
        vae,
        teacher=teacher,
        align={"repa": term},
        perceptual_weight=perceptual,
        discriminator=PatchDiscriminator(in_channels=1, ndf=8, n_layers=2) if disc else None,
        eval_samples=4,
        eval_batch=4,
        sample_steps=2,
    )


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 16, 16, generator=g) * 2 - 1
    return {"x": x, "image": x, "y": torch.randint(0, 10, (B,), generator=g)}


def _grads(loss, params):
    return torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)


def _diffusion_params(task):
    return [*task.model.parameters(), *task.alignment.parameters()]


def test_batchnorm_is_affine_free_with_eps_1e_4_and_starts_from_the_vae_statistics():
    task = _task()
    bn = task.latent_norm
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(bn, LatentBatchNorm)
    assert bn.affine is False and bn.weight is None and bn.bias is None and list(bn.parameters()) == []
    assert bn.eps == 1e-4 and bn.momentum == 0.1 and bn.track_running_stats
    assert torch.equal(bn.running_mean, torch.tensor([0.3, -0.2, 0.1, 0.0]))
    assert torch.allclose(bn.running_var, torch.tensor([4.0, 0.25, 2.25, 9.0]))  # the anchor's init_bn: std^2


def test_flow_loss_never_reaches_the_vae():
    task = _task()
    parts = task.losses(_batch(), step=0)
    vae_params = list(task.tokenizer.parameters())
    for name in ("flow", "diffusion"):  # flow alone, and flow + 0.5 REPA of the diffusion step
        assert all(g is None for g in _grads(parts[name], vae_params)), name
        assert _grads(parts[name], [parts["z"]])[0] is None, name
    # ...while it does train the diffusion model (the test can fail)
    g = _grads(parts["diffusion"], _diffusion_params(task))
    assert all(x is not None for x in g) and sum(float(x.abs().sum()) for x in g) > 0


def test_repa_gradient_reaches_the_vae_through_the_batchnorm():
    task = _task()
    var0, mean0 = task.latent_norm.running_var.clone(), task.latent_norm.running_mean.clone()
    parts = task.losses(_batch(), step=0)
    z, z_vae = parts["z"], parts["z_vae"]
    # the VAE's REPA sees the latent normalised with the running statistics (eval mode), not the batch's
    ref = (z - mean0.view(1, -1, 1, 1)) / (var0.view(1, -1, 1, 1) + 1e-4).sqrt()
    assert torch.allclose(z_vae, ref, atol=1e-6)
    g_z, g_zn = torch.autograd.grad(parts["vae_align"], [z, z_vae], retain_graph=True)
    assert float(g_z.abs().sum()) > 0
    # the Jacobian of an affine-free eval BatchNorm is diag(1 / sqrt(running_var + eps)) per channel
    assert torch.allclose(g_z, g_zn / (var0.view(1, -1, 1, 1) + 1e-4).sqrt(), rtol=1e-5, atol=1e-9)
    enc = _grads(parts["vae_align"], task.tokenizer.encoder.parameters())
    assert all(g is not None for g in enc) and float(enc[0].abs().sum()) > 0
    # the latent is all REPA touches: the decoder gets nothing from it
    assert all(g is None for g in _grads(parts["vae_align"], task.tokenizer.decoder.parameters()))
    assert parts["vae_align"].item() == pytest.approx(1.5 * parts["logs"]["loss/vae_repa"].item(), rel=1e-6)


def test_vae_step_leaves_the_diffusion_model_and_the_running_statistics_alone():
    task = _task()
    mean0, var0 = task.latent_norm.running_mean.clone(), task.latent_norm.running_var.clone()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    parts = task.losses(_batch(), step=0)
    assert task.model.training and all(p.requires_grad for p in _diffusion_params(task))  # restored after (a)
    parts["vae"].backward(retain_graph=True)
    assert all(p.grad is None for p in _diffusion_params(task))
    assert all(p.grad is None for p in task.discriminator.parameters())  # the generator loss sees a detached D
    assert all(p.grad is not None for p in task.tokenizer.parameters())
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    opt.step()
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # one running-statistics update, from the diffusion step's detached latent: (a) did not move them
    z = parts["z"].detach()
    mean_b = z.mean(dim=(0, 2, 3))
    var_b = z.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    assert torch.allclose(task.latent_norm.running_mean, 0.9 * mean0 + 0.1 * mean_b, atol=1e-6)
    assert torch.allclose(task.latent_norm.running_var, 0.9 * var0 + 0.1 * var_b, rtol=1e-5)


def _anchor_step(task: REPAETask, batch: dict, lr: float) -> None:
    """train_repae.py's step with three SGD optimisers: VAE (SiT frozen, eval), discriminator, SiT on z.detach()."""
    vae, model, disc, bn = task.tokenizer, task.model, task.discriminator, task.latent_norm
    proj = task.alignment.terms["repa"].projector
    sit_params = [*model.parameters(), *proj.parameters()]
    opt_vae = torch.optim.SGD(vae.parameters(), lr=lr)
    opt_d = torch.optim.SGD(disc.parameters(), lr=lr)
    opt_sit = torch.optim.SGD(sit_params, lr=lr)
    x, y = batch["image"], batch["y"]
    target = F.normalize(task.teacher.encode(x).x.float(), dim=-1)  # [B * 16, D] teacher tokens

    def repa(h):
        return -(F.normalize(proj(h).float(), dim=-1) * target).sum(-1).mean()

    x_rec, z, post = vae(x, sample=True)
    for p in sit_params:
        p.requires_grad_(False)
    model.eval()
    for p in disc.parameters():
        p.requires_grad_(False)
    g_loss = -disc(x_rec).mean()
    for p in disc.parameters():
        p.requires_grad_(True)
    kl = 0.5 * (post.mean**2 + post.logvar.exp() - 1 - post.logvar).sum() / B
    vae_loss = (x_rec - x).abs().mean() + 1e-6 * kl + 0.1 * g_loss
    zn = F.batch_norm(z, bn.running_mean.clone(), bn.running_var.clone(), training=False, eps=1e-4)
    t = torch.rand(B)
    eps = torch.randn_like(zn)
    tb = t.view(-1, 1, 1, 1)
    h = model.forward_intermediates((1 - tb) * zn + tb * eps, t, y, [1])[1][0].x
    (vae_loss + 1.5 * repa(h)).backward()
    opt_vae.step()
    logits = disc(torch.cat([x.detach(), x_rec.detach()]))  # the project's one-pass discriminator batch
    d_loss = 0.5 * (F.relu(1 - logits[:B]).mean() + F.relu(1 + logits[B:]).mean())
    d_loss.backward()
    opt_d.step()
    for p in sit_params:
        p.requires_grad_(True)
    model.train()
    zs = bn(z.detach())
    drop = torch.rand(B) < 0.1
    pred, feats = model.forward_intermediates((1 - tb) * zs + tb * eps, t, y, [1], force_drop_ids=drop)
    (((pred - (eps - zs)) ** 2).mean() + 0.5 * repa(feats[0].x)).backward()
    opt_sit.step()


def test_one_step_equals_the_anchors_three_updates():
    task = _task()
    ref, start = copy.deepcopy(task), copy.deepcopy(task.state_dict())
    batch = _batch()
    lr = 0.05
    torch.manual_seed(123)
    out = task(batch, 0)
    out["loss"].backward()
    torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=lr).step()
    torch.manual_seed(123)
    _anchor_step(ref, batch, lr)
    mine, theirs = task.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    moved = 0
    for k, v in mine.items():
        if v.is_floating_point():
            assert torch.allclose(v, theirs[k], atol=1e-6, rtol=1e-5), k
            moved += int(not torch.equal(v, start[k]))
    assert moved > 10  # the VAE, the SiT, the projector and the discriminator all moved


def test_exported_tokenizer_round_trips_bit_for_bit(tmp_path):
    task = _task(perceptual=1.0)
    out = task(_batch(), 0)
    out["loss"].backward()
    torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3).step()
    task.on_step_end(0)
    path = export_tokenizer(task, tmp_path / "tokenizer", step=1)
    meta = json.loads((path / "tokenizer.json").read_text())
    assert meta["normalisation"]["eps"] == 1e-4 and meta["normalisation"]["affine"] is False
    bn = task.latent_norm
    for loaded in (load_exported_tokenizer(path), load_tokenizer(checkpoint=str(path), fit_statistics="auto")):
        assert isinstance(loaded, VAVAE) and not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        mine, theirs = task.tokenizer.state_dict(), loaded.state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
        # the BatchNorm's running statistics are the tokenizer's named state (eval normaliser, nothing refitted)
        assert torch.equal(loaded.latent_mean.flatten(), bn.running_mean)
        assert torch.equal(loaded.latent_std.flatten(), (bn.running_var + 1e-4).sqrt())
        assert int(loaded.stats_items) == B  # no fitted statistics at init (0) + one batch seen by the BatchNorm
        x = _batch(seed=5)["image"]
        task.tokenizer.eval()
        with torch.no_grad():
            z = loaded.encode(x)
            assert torch.equal(z, task.tokenizer.encode(x))
            assert torch.equal(loaded.decode(z), task.tokenizer.decode(z))
            ref = bn.eval().frozen(task.tokenizer.posterior(x).mode())
            assert torch.allclose(z, ref, atol=1e-5)
        task.train()


def test_bad_inputs_name_the_fix(tmp_path):
    vae = VAVAE(in_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)
    model = SiT(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="in_channels=4"):
        REPAETask(model, vae, perceptual_weight=0.0)
    with pytest.raises(TypeError, match="VAVAE"):
        REPAETask(model, nn.Identity(), perceptual_weight=0.0)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_exported_tokenizer(tmp_path)
    path = export_tokenizer(vae, tmp_path / "tok")
    meta = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps(dict(meta, target="os.system")))
    with pytest.raises(ValueError, match="not a tokenizer class"):
        load_exported_tokenizer(path)


def test_recipes_chain_repae_then_a_sit_on_the_export(tmp_path):
    """``repae`` (2 smoke steps) exports its VAE at the final evaluation; ``repae_sit`` trains on that folder."""
    from safetensors.torch import load_file

    from unirep.cli import compose, run_train

    def smoke(name, out, *extra):
        base = compose("train", [f"experiment=vision/{name}"])
        return compose("train", [f"experiment=vision/{name}", "debug=smoke", f"out_dir={out}", *base.smoke, *extra])

    run_train(smoke("repae", tmp_path / "repae"))
    export = tmp_path / "repae" / "tokenizer"
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer.safetensors").is_file()
    result = run_train(smoke("repae_sit", tmp_path / "sit", f"task.tokenizer.checkpoint={export}"))
    exported = load_file(str(export / "tokenizer.safetensors"))
    trained = load_file(str(result["checkpoint"] / "model.safetensors"))
    for key in ("latent_mean", "latent_std", "encoder.conv_in.weight", "decoder.conv_out.weight"):
        assert torch.equal(trained[f"tokenizer.{key}"], exported[f"tokenizer/{key}"]), key
    again = export_checkpoint(tmp_path / "repae", tmp_path / "again")  # `python -m vision.repae <run> <out>`
    redone = load_file(str(again / "tokenizer.safetensors"))
    assert set(redone) == set(exported) and all(torch.equal(redone[k], exported[k]) for k in exported)
    bn_var = exported["latent_norm/running_var"]
    assert torch.equal(exported["tokenizer/latent_std"].flatten(), (bn_var + 1e-4).sqrt())
