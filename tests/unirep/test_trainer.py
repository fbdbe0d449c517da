"""Trainer: exact resume, NaN guard, accumulation, schedules, data order, logging, to_device."""

from __future__ import annotations

import csv
import functools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from unirep.train import DataModule, ResumableBatchSampler, Task, Trainer, load_checkpoint, lr_factor, to_device
from unirep.train.checkpoint import flatten_optimizer_state


class NoisyRegression(Task):
    """MSE regression with input noise and dropout drawn from the global RNG (so resume must restore it)."""

    def __init__(self, nan_steps: tuple[int, ...] = (), nan_from: int | None = None) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Dropout(0.1), nn.Linear(16, 2))
        self.nan_steps, self.nan_from = set(nan_steps), nan_from
        self.seen: dict[int, torch.Tensor] = {}  # step -> flat parameters at the start of that step

    def forward(self, batch, step):
        x, y = batch
        self.seen[step] = torch.cat([p.detach().flatten().clone() for p in self.model.parameters()])
        pred = self.model(x + 0.01 * torch.randn_like(x))
        loss = (pred - y).square().mean()
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            loss = loss * float("nan")
        return {"loss": loss, "loss/abs": (pred - y).abs().mean()}


def _data(n: int = 24) -> DataModule:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 3, generator=g)
    y = torch.stack([x.sum(1), x[:, 0] * x[:, 1]], dim=1)
    return DataModule(train=TensorDataset(x, y))


def _trainer(task, out_dir, **kw) -> Trainer:
    args = dict(
        max_steps=8,
        batch_size=8,
        grad_clip=0.5,
        ema_decay=0.9,
        log_every=2,
        ckpt_every=4,
        keep_last=5,
        accum_steps=2,
        precision="fp32",
        device="cpu",
        num_threads=1,
        warmup_steps=3,
        lr_schedule="cosine",
        seed=3,
        out_dir=out_dir,
        progress=False,
        tensorboard=False,
    )
    args.update(kw)
    return Trainer(task, _data(), functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01), **args)


def _opt_tensors(opt):
    return flatten_optimizer_state(opt.state_dict())


def test_resume_is_exact(tmp_path):
    """N steps + resume + N steps == 2N steps bit for bit: parameters, EMA, optimiser state, lr (crosses epochs)."""
    torch.manual_seed(0)
    full = _trainer(NoisyRegression(), tmp_path / "full")
    full.fit()

    torch.manual_seed(0)
    crashing = NoisyRegression()

    def crash(step):  # the run dies during step 4, after the checkpoint of step 4 was written
        if step == 4:
            raise KeyboardInterrupt

    crashing.on_step_end = crash
    with pytest.raises(KeyboardInterrupt):
        _trainer(crashing, tmp_path / "split").fit()
    torch.manual_seed(123)  # a different initialisation and RNG state: the checkpoint must overwrite both
    resumed = _trainer(NoisyRegression(), tmp_path / "split", resume="auto")
    result = resumed.fit()
    assert result["step"] == 8 and min(resumed.task.seen) == 4  # it really resumed at step 4

    for (k, a), (_, b) in zip(full.task.state_dict().items(), resumed.task.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    for k, v in full.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k
    ta, sa = _opt_tensors(full.optimizer)
    tb, sb = _opt_tensors(resumed.optimizer)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert sa == sb
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    # the resumed run's CSV reads as one run: rows up to step 4 kept once, then 6 and 8
    with open(tmp_path / "split" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [2, 4, 6, 8]


def test_resume_from_explicit_path_and_none(tmp_path):
    torch.manual_seed(0)
    _trainer(NoisyRegression(), tmp_path / "a", max_steps=4, ckpt_every=2).fit()
    t = _trainer(
        NoisyRegression(), tmp_path / "b", max_steps=5, resume=str(tmp_path / "a" / "checkpoints" / "step_00000002")
    )
    t.fit()
    assert min(t.task.seen) == 2
    with pytest.raises(FileExistsError, match="trainer.overwrite=true"):  # would mix two runs' checkpoints
        _trainer(NoisyRegression(), tmp_path / "a", max_steps=1, resume="none").fit()
    t = _trainer(NoisyRegression(), tmp_path / "a", max_steps=1, resume="none", overwrite=True)
    t.fit()
    assert min(t.task.seen) == 0
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        _trainer(NoisyRegression(), tmp_path / "c", resume=str(tmp_path / "nowhere")).fit()


def test_nan_guard_skips_and_stops(tmp_path):
    torch.manual_seed(0)
    task = NoisyRegression(nan_steps=(2, 3))
    trainer = _trainer(task, tmp_path / "nan", max_steps=6, ckpt_every=0, grad_clip=0.0)
    ema_before = {}

    def snapshot(step):
        ema_before[step] = {k: v.clone() for k, v in trainer.ema.state_dict().items()}

    task.on_step_end = snapshot
    result = trainer.fit()
    seen = task.seen
    assert not torch.equal(seen[1], seen[2])  # step 1 updated the parameters
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])  # steps 2 and 3 did not
    assert not torch.equal(seen[4], seen[5])  # training went on
    assert sorted(ema_before) == [0, 1, 4, 5]  # on_step_end (and the EMA update) only after applied steps
    assert result["bad_steps"] == 2
    with open(tmp_path / "nan" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["bad_steps"]) for r in rows] == [0, 2, 2]
    # the window of steps 3-4 had no applied step: no loss is logged for it, and NaN never reaches the log
    assert [r["loss"] != "" for r in rows] == [True, False, True]
    assert all(math.isfinite(float(r["loss"])) for r in rows if r["loss"])

    torch.manual_seed(0)
    task = NoisyRegression(nan_from=1)
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        _trainer(task, tmp_path / "stop", max_steps=10, max_bad_steps=3).fit()
    assert torch.equal(task.seen[1], task.seen[3])


def test_accumulation_matches_full_batch(tmp_path):
    """accum_steps splits the global batch; with a deterministic task the update is the same up to rounding."""

    class Deterministic(NoisyRegression):
        def __init__(self):
            super().__init__()
            self.model[2].p = 0.0

        def forward(self, batch, step):
            x, y = batch
            return {"loss": (self.model(x) - y).square().mean()}

    runs = []
    for accum in (1, 4):
        torch.manual_seed(0)
        t = _trainer(Deterministic(), tmp_path / f"acc{accum}", accum_steps=accum, ckpt_every=0, max_steps=5)
        t.fit()
        runs.append(torch.cat([p.flatten() for p in t.task.parameters()]))
    assert torch.allclose(runs[0], runs[1], atol=1e-6, rtol=0)


def test_lr_schedule():
    assert [lr_factor(s, 10, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, 14, 4, "cosine") == 1.0
    assert math.isclose(lr_factor(9, 14, 4, "cosine"), 0.5, abs_tol=1e-12)  # half way: cos(pi / 2)
    assert math.isclose(lr_factor(14, 14, 4, "cosine", 0.1), 0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(5, 10, 0, "linear")


def test_logged_lr_follows_schedule(tmp_path):
    torch.manual_seed(0)
    t = _trainer(NoisyRegression(), tmp_path, max_steps=6, log_every=1, warmup_steps=2, lr_schedule="cosine")
    t.fit()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # the lr logged after step s is the one the next step uses: lr_factor(s + 1)
    for r in rows:
        s = int(r["step"])
        assert math.isclose(float(r["lr"]), 1e-2 * lr_factor(s, 6, 2, "cosine"), rel_tol=1e-9)
    assert {"loss", "loss/abs", "grad_norm", "steps_per_sec", "epoch"} <= set(rows[0])


def test_batch_sampler_order():
    n, b = 20, 8
    full = ResumableBatchSampler(n, b, seed=5)
    it = iter(full)
    steps = [next(it) for _ in range(6)]  # 2 steps per epoch (drop_last): 3 epochs
    for e in range(3):
        epoch = steps[2 * e] + steps[2 * e + 1]
        assert len(set(epoch)) == 16 and set(epoch) <= set(range(n))
        assert epoch == torch.randperm(n, generator=torch.Generator().manual_seed(5 + e))[:16].tolist()
    # starting at step 3 replays the same stream
    it3 = iter(ResumableBatchSampler(n, b, seed=5, start_step=3))
    assert [next(it3) for _ in range(3)] == steps[3:]
    # 2 ranks x 2 micro-batches cover each global batch exactly once
    parts = [iter(ResumableBatchSampler(n, b, seed=5, rank=r, world_size=2, accum_steps=2)) for r in range(2)]
    for s in range(4):
        got = [i for p in parts for _ in range(2) for i in next(p)]
        assert sorted(got) == sorted(steps[s])
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumableBatchSampler(n, 6, world_size=4)
    with pytest.raises(ValueError, match="fewer than trainer.batch_size"):
        ResumableBatchSampler(5, 8)


def test_data_module_errors():
    with pytest.raises(ValueError, match="empty"):
        DataModule(train=TensorDataset(torch.zeros(0, 2)))
    with pytest.raises(TypeError, match="map-style"):
        DataModule(train=iter([1, 2]))


def test_to_device_nested():
    class Box:
        def __init__(self, t):
            self.t = t

        def to(self, device):
            return Box(self.t.to(device))

    batch = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(1), "s")], "c": Box(torch.ones(3)), "d": 3}
    out = to_device(batch, "cpu")
    assert isinstance(out["b"][1], tuple) and out["b"][1][1] == "s" and out["d"] == 3
    assert isinstance(out["c"], Box) and torch.equal(out["c"].t, torch.ones(3))


def test_eval_uses_ema_and_leaves_training_stream(tmp_path):
    """evaluate() sees the EMA weights, gets logged to CSV/JSON, and does not shift the training RNG stream."""

    class WithEval(NoisyRegression):
        def evaluate(self, data, out_dir, step):
            self.eval_params = torch.cat([p.detach().flatten().clone() for p in self.model.parameters()])
            torch.randn(100)  # consumes the global generator
            return {"score": float(step), "note": "text is kept in JSON only"}

    torch.manual_seed(0)
    a = _trainer(WithEval(), tmp_path / "a", eval_every=2, max_steps=4, ckpt_every=0, tensorboard=True)
    a.fit()
    torch.manual_seed(0)
    b = _trainer(NoisyRegression(), tmp_path / "b", max_steps=4, ckpt_every=0)
    b.fit()
    assert all(torch.equal(x, y) for x, y in zip(a.task.parameters(), b.task.parameters(), strict=True))
    ema_flat = torch.cat([a.ema.state_dict()[k].flatten() for k, _ in a.task.model.named_parameters()])
    assert torch.equal(a.task.eval_params, ema_flat)
    live = torch.cat([p.detach().flatten() for p in a.task.model.parameters()])
    assert not torch.equal(live, ema_flat)  # the live weights were restored after evaluation
    import json

    history = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4] and history[0]["note"].startswith("text")
    with open(tmp_path / "a" / "metrics.csv") as f:
        assert [float(r["eval/score"]) for r in csv.DictReader(f) if r.get("eval/score")] == [2.0, 4.0]
    assert any((tmp_path / "a" / "tb").iterdir())


def test_checkpoint_written_at_end_and_loadable(tmp_path):
    torch.manual_seed(0)
    t = _trainer(NoisyRegression(), tmp_path, max_steps=5, ckpt_every=2, keep_last=2)
    result = t.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"]
    fresh = NoisyRegression()
    state = load_checkpoint(result["checkpoint"], task=fresh)
    assert state["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), t.task.parameters(), strict=True))


def test_worker_processes_do_not_change_the_run(tmp_path):
    """The batch order comes from the sampler, not from worker scheduling: 0 and 2 workers train identically."""
    runs = []
    for workers in (0, 2):
        torch.manual_seed(0)
        t = _trainer(NoisyRegression(), tmp_path / f"w{workers}", num_workers=workers, max_steps=4, ckpt_every=0)
        t.fit()
        runs.append([p.detach().clone() for p in t.task.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_non_scalar_output_is_refused(tmp_path):
    class PerItem(NoisyRegression):
        def forward(self, batch, step):
            out = super().forward(batch, step)
            out["per_item"] = torch.zeros(3)
            return out

    with pytest.raises(ValueError, match="'per_item' with shape \\(3,\\)"):
        _trainer(PerItem(), tmp_path, max_steps=1).fit()


def test_checkpoint_records_data_position(tmp_path):
    torch.manual_seed(0)
    _trainer(NoisyRegression(), tmp_path, max_steps=4, ckpt_every=4).fit()
    import json

    state = json.loads((tmp_path / "checkpoints" / "step_00000004" / "state.json").read_text())
    # 24 items / 8 per step: 3 steps per epoch, so step 4 is epoch 1, step 1 within it
    assert state["extra"]["data"] == {
        "seed": 3, "batch_size": 8, "world_size": 1, "accum_steps": 2, "steps_per_epoch": 3, "epoch": 1,
        "step_in_epoch": 1,
    }  # fmt: skip


def test_ema_closed_form_and_frozen_teacher_left_out():
    from unirep.encoders import FrozenEncoder
    from unirep.train import EMA

    class Enc(nn.Module):
        dim = 2

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model.teacher = FrozenEncoder(Enc())
    ema = EMA(model, decay=0.9)
    assert not any(k.startswith("teacher.") for k in ema.state_dict())
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(5.0)
    for _ in range(3):
        ema.update(model)
    # constant target p: ema_k = p + decay^k (ema_0 - p); buffers are copied, not averaged
    assert torch.allclose(ema.state_dict()["0.weight"], 1.0 + 0.9**3 * (start - 1.0), atol=1e-6)
    assert torch.equal(ema.state_dict()["1.running_mean"], torch.full((3,), 5.0))
    with ema.swapped_into(model):
        assert torch.equal(model[0].weight, ema.state_dict()["0.weight"])
    assert torch.all(model[0].weight == 1.0)  # the live weights are back
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(model, decay=1.0)


def test_custom_scheduler_is_used_and_resumed(tmp_path):
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    torch.manual_seed(0)
    t = _trainer(NoisyRegression(), tmp_path, max_steps=4, log_every=1, ckpt_every=2, scheduler=sched)
    t.fit()
    with open(tmp_path / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == [1e-2, 5e-3, 5e-3, 2.5e-3]
    resumed = _trainer(NoisyRegression(), tmp_path, max_steps=6, ckpt_every=2, scheduler=sched)
    resumed.fit()
    assert resumed.scheduler.last_epoch == 6 and math.isclose(resumed.optimizer.param_groups[0]["lr"], 1.25e-3)


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    """A pre-emption signal mid-run: the step finishes, a checkpoint is written, and resuming equals no signal."""
    import os
    import signal

    torch.manual_seed(0)
    full = _trainer(NoisyRegression(), tmp_path / "full", ckpt_every=0)
    full.fit()

    torch.manual_seed(0)
    task = NoisyRegression()
    task.on_step_end = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None
    stopped = _trainer(task, tmp_path / "cut", ckpt_every=0)
    before = signal.getsignal(signal.SIGTERM)
    result = stopped.fit()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is uninstalled after fit
    assert result["interrupted"] and result["step"] == 3 and max(task.seen) == 2
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_00000003"]

    resumed = _trainer(NoisyRegression(), tmp_path / "cut", ckpt_every=0)
    assert not resumed.fit()["interrupted"]
    assert all(torch.equal(a, b) for a, b in zip(full.task.parameters(), resumed.task.parameters(), strict=True))


def test_num_threads_applies_during_fit_only(tmp_path):
    class Threads(NoisyRegression):
        def forward(self, batch, step):
            self.threads = torch.get_num_threads()
            return super().forward(batch, step)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        task = Threads()
        _trainer(task, tmp_path, max_steps=1, num_threads=1).fit()
        assert task.threads == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        _trainer(task, tmp_path, num_threads=-1)


def test_ema_warmup_closed_form_and_resume(tmp_path):
    """mace-torch / torch_ema ``use_num_updates``: the n-th update (1-based) uses min(d, (1 + n) / (10 + n))."""
    from unirep.train import EMA

    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=True)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    expected_factor = 1.0
    for n in range(1, 31):
        ema.update(model)
        expected_factor *= min(0.9, (1 + n) / (10 + n))
    # constant target p: ema_k = p + prod_n decay_n (ema_0 - p)
    assert torch.allclose(ema.state_dict()["weight"], 1.0 + expected_factor * (start - 1.0), atol=1e-6)
    assert ema.num_updates == 30 and ema.current_decay() == 32 / 41
    ema.num_updates = 80
    assert ema.current_decay() == 0.9  # (1 + 81) / (10 + 81) > 0.9: the flat decay from here on
    assert EMA(model, decay=0.9).current_decay() == 0.9  # without warm-up: flat from the first update

    # the count is saved and restored, so a resumed warm-up continues where it stopped
    torch.manual_seed(0)
    t = _trainer(NoisyRegression(), tmp_path, max_steps=4, ckpt_every=4, ema_decay=0.99)
    t.fit()
    import json

    assert json.loads((tmp_path / "checkpoints" / "step_00000004" / "state.json").read_text())["ema_num_updates"] == 4
    resumed = _trainer(NoisyRegression(), tmp_path, max_steps=5, ckpt_every=4, ema_decay=0.99)
    resumed.fit()
    assert resumed.ema.num_updates == 5


def test_trainer_defaults_live_in_the_dataclass():
    """One source of trainer defaults: TrainerConfig. The yaml restates none and the Trainer takes them from it."""
    import dataclasses
    from pathlib import Path

    import yaml

    from unirep.config import TrainerConfig

    default_yaml = Path(__file__).resolve().parents[2] / "configs" / "trainer" / "default.yaml"
    assert set(yaml.safe_load(default_yaml.read_text())) == {"defaults"}
    t = Trainer(NoisyRegression(), _data(), functools.partial(torch.optim.AdamW, lr=1e-3))
    assert t.cfg == TrainerConfig()
    t = Trainer(NoisyRegression(), _data(), torch.optim.AdamW, trainer_cfg=TrainerConfig(max_steps=7), batch_size=4)
    assert (t.cfg.max_steps, t.cfg.batch_size, t.cfg.keep_last) == (7, 4, TrainerConfig.keep_last)
    assert {"overwrite", "ema_warmup", "reset_ema", "max_weight_growth"} <= {
        f.name for f in dataclasses.fields(TrainerConfig)
    }
    with pytest.raises(TypeError, match="unknown option.*max_step"):
        Trainer(NoisyRegression(), _data(), torch.optim.AdamW, max_step=3)


def test_trainer_values_validated_at_construction():
    for bad, word in [
        (dict(lr_schedule="cosin"), "lr_schedule"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(keep_last=-1), "keep_last"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(precision="bf32"), "precision"),
        (dict(device="tpu"), "device"),
    ]:
        with pytest.raises(ValueError, match=word):
            _trainer(NoisyRegression(), "unused", **bad)


def test_functions_fit_on_a_screen():
    """Issue 11: no function of the trainer, checkpoints, EMA, logging, CLI or config is over 80 lines."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "unirep"
    files = ["train/trainer.py", "train/checkpoint.py", "train/ema.py", "train/logging.py", "train/distributed.py"]
    for rel in [*files, "cli.py", "config.py"]:
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{rel}:{node.lineno} {node.name}"


class _ConstantEval(NoisyRegression):
    def evaluate(self, data, out_dir, step):
        return {"val/loss": 1.0}  # never improves: a patience-0 plateau halves the lr at every evaluation after the 1st


def test_plateau_schedule_steps_on_the_monitored_evaluation_metric_and_resumes(tmp_path):
    plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0)
    kw = dict(eval_every=2, monitor="val/loss", warmup_steps=0, lr_schedule="constant", eval_at_end=False)
    t = Trainer(_ConstantEval(), _data(), functools.partial(torch.optim.AdamW, lr=1e-2), scheduler=plateau,
                **_args(tmp_path / "a", max_steps=6, **kw))  # fmt: skip
    t.fit()
    # evaluations at 2, 4, 6: the first sets the best, the next two halve the lr
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    t2 = Trainer(_ConstantEval(), _data(), functools.partial(torch.optim.AdamW, lr=1e-2), scheduler=plateau,
                 **_args(tmp_path / "a", max_steps=8, resume="auto", **kw))  # fmt: skip
    t2.fit()
    assert t2.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.125)  # the plateau state was resumed
    with pytest.raises(ValueError, match="trainer.monitor"):
        Trainer(_ConstantEval(), _data(), torch.optim.AdamW, scheduler=plateau,
                **_args(tmp_path / "b", max_steps=2, eval_every=2)).fit()  # fmt: skip


def _args(out_dir, **kw):
    args = dict(max_steps=8, batch_size=8, precision="fp32", device="cpu", num_threads=1, seed=3, out_dir=out_dir,
                progress=False, tensorboard=False, log_every=2, ckpt_every=2)  # fmt: skip
    args.update(kw)
    return args


def test_final_lr_holds_from_its_step_over_the_schedule_and_on_resume(tmp_path):
    """mace's stage two lowers the lr to --swa_lr for the last part of training: trainer.final_lr from final_lr_from."""
    torch.manual_seed(0)
    t = _trainer(NoisyRegression(), tmp_path, max_steps=8, log_every=1, final_lr=1e-4, final_lr_from=0.5)
    assert t.final_lr_start() == 4
    t.fit()
    with open(tmp_path / "metrics.csv") as f:
        rows = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    for s, lr in rows.items():
        expected = 1e-4 if s >= 4 else 1e-2 * lr_factor(s, 8, 3, "cosine")
        assert math.isclose(lr, expected, rel_tol=1e-9), (s, lr, expected)
    # resumed from the step-4 checkpoint, the next steps still use final_lr (the schedule alone would not)
    t2 = _trainer(NoisyRegression(), tmp_path, max_steps=8, final_lr=1e-4, final_lr_from=0.5, resume="auto")
    t2._setup()
    t2._apply_final_lr(5)
    assert all(g["lr"] == 1e-4 for g in t2.optimizer.param_groups)
    with pytest.raises(ValueError, match="final_lr"):
        _trainer(NoisyRegression(), tmp_path / "bad", final_lr=0.0).fit()
