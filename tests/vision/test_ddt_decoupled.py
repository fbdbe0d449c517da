"""DDT (decoupled encoder/decoder) and encoder sharing, checked against independent definitions: a hand-written Euler
loop with the encoder recomputed on the schedule, the NFE a schedule implies, brute force over every recompute
schedule, complex-number rotary embedding, and the anchor's z_t = SiLU(t_emb + s)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vision.models.ddt_decoupled import (
    DDT,
    apply_rope,
    ddt_tiny,
    ddt_xl2,
    rope_angles_2d,
    sharing_brute_force,
    sharing_cost,
    sharing_dp_schedule,
    uniform_schedule,
)
from vision.task import VisionFlowTask


def _model(**kw) -> DDT:
    torch.manual_seed(0)
    m = ddt_tiny(input_size=8, patch_size=2, in_channels=2, num_classes=3, **kw)
    for p in m.final_layer.parameters():  # leave the zero output so that samples depend on the network
        torch.nn.init.normal_(p, std=0.1)
    return m


def _euler_by_hand(
    m: DDT, num: int, steps: int, seed: int, recompute: set[int] | None, batch: int | None = None
) -> torch.Tensor:
    """Euler from t = 1 to 0 on linspace(1, 0, steps + 1) in float64, the encoder run on the steps in ``recompute``;
    the noise of all items from one seeded generator, integrated ``batch`` items at a time."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, 2 * 8 * 8, generator=gen).double().reshape(num, 2, 8, 8)
    labels = torch.arange(num) % 3
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    outs = []
    m.eval()  # no label dropout
    for x, y in zip(noise.split(batch or num), labels.split(batch or num), strict=True):
        z = None
        with torch.no_grad():
            for i in range(steps):
                t = torch.full((x.shape[0],), grid[i], dtype=torch.float32)
                if recompute is None or i in recompute or z is None:
                    z, _ = m.encode(x.float(), t, y)
                v, _ = m.decode(x.float(), z)
                x = x + (grid[i + 1] - grid[i]) * v.double()
        outs.append(x.float())
    return torch.cat(outs)


def test_encoder_output_is_the_self_condition_and_indices():
    m = _model()
    m.eval()
    x, t, y = torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 2])
    out, feats = m.forward_intermediates(x, t, y, indices=[0, 3, 4, -1])
    assert out.shape == x.shape and m.num_layers == 4 and m.feature_dim(-1) == 64
    assert [f.x.shape for f in feats] == [(32, 64)] * 4 and torch.equal(feats[2].x, feats[3].x)
    # the anchor: z_t = SiLU(t_emb + s) with s the last encoder block's output; the decoder reads z_t only
    z, _ = m.encode(x, t, y)
    t_emb = m.t_mlp(
        torch.cat(
            [
                torch.cos(t[:, None] * 10.0 ** (-torch.arange(128) / 128)),
                torch.sin(t[:, None] * 10.0 ** (-torch.arange(128) / 128)),
            ],
            -1,
        )
    )  # DDT's timestep embedding: cos then sin, max_period 10
    s = feats[1].x.reshape(2, 16, 64)
    assert torch.allclose(z, F.silu(t_emb[:, None] + s), atol=1e-5)
    assert torch.allclose(m.decode(x, z)[0], out, atol=1e-6)
    with pytest.raises(ValueError, match="num_encoder_blocks"):
        DDT(input_size=8, patch_size=2, in_channels=2, depth=2, num_encoder_blocks=2, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="sharing"):
        _model(sharing="every-other")


def test_rope_is_a_complex_rotation_with_relative_positions():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 16, 8)
    ang = rope_angles_2d(8, 4, 4)
    # independent definition: multiply consecutive channel pairs, read as complex numbers, by exp(i angle)
    qc = torch.view_as_complex(q.reshape(1, 2, 16, 4, 2))
    ref = torch.view_as_real(qc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    assert torch.allclose(apply_rope(q, ang), ref, atol=1e-6)
    # the anchor's positions: linspace(0, 16, 4) per axis; pair 0 turns with x, pair 1 with y at frequency 1
    assert torch.allclose(ang[:, 0], torch.linspace(0, 16, 4).repeat(4)) and torch.allclose(
        ang[:, 1], torch.linspace(0, 16, 4).repeat_interleave(4)
    )
    # rotary: <R_m q, R_n k> depends on m - n only (tokens 0->1 and 4->5 are one step right each)
    k = torch.randn(1, 2, 16, 8)
    rq, rk = apply_rope(q[:, :, :1].expand(1, 2, 16, 8), ang), apply_rope(k[:, :, :1].expand(1, 2, 16, 8), ang)
    assert torch.allclose((rq[..., 0, :] * rk[..., 1, :]).sum(-1), (rq[..., 4, :] * rk[..., 5, :]).sum(-1), atol=1e-5)


def test_sharing_with_k1_equals_no_sharing_exactly():
    m = _model()
    plain = VisionFlowTask(m, sample_steps=6, eval_batch=3)
    ref = _euler_by_hand(m, 5, 6, seed=1, recompute=None, batch=3)
    for mode in ("none", "uniform", "dp"):
        m.sharing, m.sharing_rate = mode, 1
        out, _ = plain.generate(5, seed=1)
        assert torch.equal(out, ref), mode
        assert plain.last_nfe == {"encoder": 6 * 2, "decoder": 6 * 2}  # 2 batches (3 + 2 items) x 6 steps


def test_uniform_sharing_reuses_the_encoder_every_k_steps():
    m = _model(sharing="uniform", sharing_rate=3)
    task = VisionFlowTask(m, sample_steps=7, eval_batch=4)
    out, _ = task.generate(4, seed=2)
    assert torch.equal(out, _euler_by_hand(m, 4, 7, seed=2, recompute={0, 3, 6}))
    assert not torch.allclose(out, _euler_by_hand(m, 4, 7, seed=2, recompute=None))  # sharing changes samples
    assert task.last_nfe == {"encoder": 3, "decoder": 7}
    assert uniform_schedule(7, 3) == [0, 3, 6] and uniform_schedule(250, 1) == list(range(250))


def test_nfe_counts_under_guidance_and_heun(tmp_path):
    m = _model()
    # 6 Euler steps on t = 1, 5/6, ..., 1/6; guidance for t <= 0.7 (steps 2..5) doubles the batch from step 2 on
    st = m.make_sampler_state(6, sharing="uniform", sharing_rate=3)
    task = VisionFlowTask(m, sample_steps=6, cfg_scale=2.0, guidance_interval=(0.0, 0.7), eval_batch=8)
    m.sharing, m.sharing_rate = "uniform", 3
    task.generate(2, seed=0)
    # recompute steps {0, 3}; step 2 needs the unconditional half it has never encoded: one more encoder call
    assert st.recompute == [0, 3] and task.last_nfe == {"encoder": 3, "decoder": 6}
    info = task.sample(tmp_path, num=2, seed=0)
    assert info["nfe"] == {"encoder": 3, "decoder": 6}
    # Heun: 2 calls per step except the last; its corrector at t_{i+1} shares step i+1's encoder output
    task = VisionFlowTask(m, sampler="heun", sample_steps=4, eval_batch=8)
    m.sharing, m.sharing_rate = "uniform", 2
    task.generate(2, seed=0)
    assert task.last_nfe == {"encoder": 2, "decoder": 7}


def test_dp_schedule_is_the_brute_force_optimum():
    # hand-made: two plateaus of similar states (steps 0-2 and 3-5), 2 recomputes: the answer is [0, 3]
    sim = torch.full((6, 6), 0.2, dtype=torch.float64)
    sim[:3, :3] = sim[3:, 3:] = 0.95
    sim.fill_diagonal_(1.0)
    assert sharing_dp_schedule(1 - sim, 2) == [0, 3]
    assert sharing_brute_force(1 - sim, 2) == ([0, 3], pytest.approx(4 * 0.05))
    # hand-computed cost of [0, 4]: steps 1-3 reuse 0 (0.05, 0.05, 0.8), step 5 reuses 4 (0.05)
    assert sharing_cost(1 - sim, [0, 4]) == pytest.approx(0.95)
    g = torch.Generator().manual_seed(0)
    for n, m in [(7, 1), (7, 3), (8, 4), (9, 5), (8, 8)]:
        a = torch.rand(n, n, generator=g, dtype=torch.float64)
        err = 1 - (a + a.T) / 2  # a symmetric "similarity" in [0, 1]
        err.fill_diagonal_(0.0)
        starts = sharing_dp_schedule(err, m)
        best, cost = sharing_brute_force(err, m)
        assert len(starts) == m and starts[0] == 0
        assert sharing_cost(err, starts) == pytest.approx(cost, abs=1e-12)
        assert starts == best  # random costs have a unique optimum
    with pytest.raises(ValueError, match="num_recompute"):
        sharing_dp_schedule(torch.zeros(4, 4), 5)


def test_dp_sharing_calibrates_on_the_encoder_states():
    m = _model(sharing="dp", sharing_rate=2)
    sim = m.calibrate_sharing(8)
    assert sim.shape == (8, 8) and torch.allclose(sim.diagonal(), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(sim, sim.T)
    st = m.make_sampler_state(8)
    assert st.recompute == sharing_dp_schedule(1 - sim, 4) and len(st.recompute) == 4
    task = VisionFlowTask(m, sample_steps=8, eval_batch=3)
    out, _ = task.generate(3, seed=4)
    assert torch.equal(out, _euler_by_hand(m, 3, 8, seed=4, recompute=set(st.recompute)))
    assert task.last_nfe == {"encoder": 4, "decoder": 8}


def test_backward_reaches_every_parameter_and_xl_preset():
    m = _model()
    m.train()
    out, feats = m.forward_intermediates(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([0, 1]), indices=[2])
    (out.square().mean() + feats[0].x.mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "embedding_table" not in n)
    with torch.device("meta"):
        xl = ddt_xl2(input_size=32, in_channels=4)
    assert (xl.depth, xl.num_encoder_blocks, xl.hidden_size, xl.num_heads) == (28, 22, 1152, 16)


def test_sampler_options_choose_the_sharing_from_the_cli(tmp_path):
    from unirep.cli import compose, run_sample, run_train

    run = tmp_path / "run"
    smoke = list(compose("train", ["experiment=vision/ddt"]).smoke)
    run_train(compose("train", ["experiment=vision/ddt", "debug=smoke", *smoke, f"out_dir={run}"]))
    cfg = compose(
        "sample",
        [
            f"checkpoint={run}",
            "num=4",
            "device=cpu",
            "+sample.steps=6",
            "+sample.sampler_options.sharing=uniform",
            "+sample.sampler_options.sharing_rate=2",
        ],
    )
    assert run_sample(cfg)["nfe"] == {"encoder": 3, "decoder": 6}
    with pytest.raises(ValueError, match="make_sampler_state"):
        VisionFlowTask(_sit()).generate(1, steps=1, sampler_options={"sharing": "dp"})


def _sit():
    from vision.models.sit import SiT

    return SiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3)
