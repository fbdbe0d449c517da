"""Parity with mace-torch: the same MACE (32 channels, L = 1), the same split of GFN2-xTB ethanol, both trainers.

mace-torch's own training loop (``mace_run_train``, its CLI, as a mace user runs it) and ours
(``unirep-train experiment=molecular/mace``) train the same architecture (mace_run_train's defaults: two interactions,
``RealAgnosticInteractionBlock`` first, max_ell 3, correlation 3, radial MLP [64, 64, 64], ``use_reduced_cg=False``,
float64) with the same optimiser settings (Adam amsgrad, lr 0.01, weight decay 5e-7, batch 10, clip 10, no EMA,
λ_E 1 / λ_F 100) and identical E0s and scale (E0s fitted here on the training split and passed to mace as ``--E0s``;
scale = RMS force on both sides; shift 0 as mace's ``--model MACE``). Both trained models are evaluated by this
script on the same validation frames (mace's file is rebuilt with ``MACEModel.from_mace``, weights bit for bit).
Learning-rate schedule: constant on our side; mace's ReduceLROnPlateau (factor 0.8, patience 50 epochs) does not
fire within a run this short. mace evaluates every epoch and keeps its best-validation checkpoint (its default); ours
is the final weights.

Time per step: the optimiser step of each trainer's own code on the same batches (mace: ``mace.tools.train.take_step``
on its ``AtomicData`` batches; ours: ``MaceTask`` forward + backward + Adam step), after warm-up.

    python scripts/bench_mace_vs_macetorch.py                              # 750 steps, 3 seeds (slow on 2 cores)
    python scripts/bench_mace_vs_macetorch.py --steps 150 --seeds 1        # reduced

Writes ``outputs/bench/mace_vs_macetorch/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _split(args):
    from molecular.data import generate_set, train_val_split, write_extxyz

    data = Path(args.data)
    if not data.exists():
        generate_set(data, kind="md", molecule="ethanol", frames=args.n_train + args.n_val, interval=10)
    train, val = train_val_split(data, r_max=args.r_max, n_train=args.n_train, n_val=args.n_val, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_extxyz(train.structures, out / "train.xyz")
    write_extxyz(val.structures, out / "val.xyz")
    return train, val


def _statistics(train, z_table):
    from molecular.models import fit_atomic_energies, fit_scale_shift

    e0 = fit_atomic_energies(train.structures, z_table)
    scale, _ = fit_scale_shift(train.structures, z_table, e0)
    return e0, scale


def _mace_cli(args, seed: int, epochs: int, e0, z_table, work: Path) -> Path:
    e0s = "{" + ", ".join(f"{z}: {e!r}" for z, e in zip(z_table, e0, strict=True)) + "}"
    cmd = [
        str(ROOT / ".venv" / "bin" / "mace_run_train"),
        "--name=bench",
        f"--seed={seed}",
        f"--work_dir={work}",
        f"--train_file={Path(args.out) / 'train.xyz'}",
        f"--valid_file={Path(args.out) / 'val.xyz'}",
        f"--E0s={e0s}",
        "--model=MACE",
        f"--num_channels={args.channels}",
        f"--max_L={args.max_L}",
        f"--r_max={args.r_max}",
        "--batch_size=10",
        "--valid_batch_size=10",
        f"--max_num_epochs={epochs}",
        "--eval_interval=1",  # mace keeps the best-validation checkpoint of the epochs it evaluates
        "--lr=0.01",
        "--weight_decay=5e-7",
        "--energy_weight=1.0",
        "--forces_weight=100.0",
        "--default_dtype=float64",
        "--device=cpu",
        "--energy_key=energy",
        "--forces_key=forces",
        "--scaling=rms_forces_scaling",
        "--save_cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    log = work / "mace_run_train.log"
    work.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    print(f"[bench] mace_run_train seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    found = sorted(work.glob("bench*.model"))
    if not found:
        raise FileNotFoundError(f"mace_run_train wrote no bench*.model in {work} (see {log})")
    return [p for p in found if "swa" not in p.name and "stagetwo" not in p.name][0]


def _ours(args, seed: int, steps: int, out: Path):
    from unirep.cli import compose, run_train

    cfg = compose(
        "train",
        [
            "experiment=molecular/mace",
            f"data.train={Path(args.out) / 'train.xyz'}",
            f"data.val={Path(args.out) / 'val.xyz'}",
            "data.n_val=null",
            "data.generate=null",
            "data.cache_dir=null",
            f"data.r_max={args.r_max}",
            f"seed={seed}",
            f"task.model.num_channels={args.channels}",
            f"task.model.max_L={args.max_L}",
            "task.model.dtype=float64",
            "task.eval_batch_size=50",
            f"trainer.max_steps={steps}",
            "trainer.batch_size=10",
            "trainer.lr_schedule=constant",
            "trainer.ema_decay=0.0",
            "trainer.eval_every=0",
            f"trainer.ckpt_every={steps}",
            "trainer.progress=false",
            "trainer.tensorboard=false",
            "trainer.resume=none",
            "trainer.overwrite=true",
            "trainer.device=cpu",
            f"trainer.num_threads={args.threads}",
            f"out_dir={out}",
        ],
    )
    t0 = time.perf_counter()
    result = run_train(cfg)
    print(f"[bench] unirep-train seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    from unirep.train import load_task

    task, _ = load_task(result["checkpoint"], ema=False)
    return task.model


def _evaluate(model, val) -> dict[str, float]:
    from molecular.data import collate_graphs
    from molecular.task import predict, prediction_metrics

    p = predict(model, val, batch_size=50)
    ref = collate_graphs([val[i] for i in range(len(val))])
    m = prediction_metrics(p["energy"], p["forces"], ref.energy, ref.forces, ref.num_atoms)
    return {"f_mae_meV_A": m["f_mae_meV_A"], "e_mae_meV": m["e_mae_meV"]}


def _step_times(args, train, e0, scale, n_steps: int) -> dict[str, float]:
    """Seconds per optimiser step of each trainer's own step code on the same batches (after 3 warm-up steps)."""
    from molecular.data import collate_graphs
    from molecular.models import MACEModel, default_dtype, import_mace
    from molecular.task import MaceTask

    import_mace()
    from mace import data as mace_data
    from mace import modules as mace_modules
    from mace import tools as mace_tools
    from mace.tools.train import take_step
    from mace.tools.utils import AtomicNumberTable

    torch.set_num_threads(args.threads)
    z_table = sorted({int(z) for s in train.structures for z in s.numbers})
    torch.manual_seed(0)
    ours = MACEModel(z_table, r_max=args.r_max, num_channels=args.channels, max_L=args.max_L, dtype="float64")
    task = MaceTask(ours, statistics_from=train)
    theirs = ours.mace  # the same ScaleShiftMACE module class mace_run_train builds, same weights
    import copy

    theirs = copy.deepcopy(theirs)
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(train), 10, replace=False).tolist() for _ in range(n_steps + 3)]
    table = AtomicNumberTable(z_table)
    keys = mace_data.KeySpecification(info_keys={"energy": "energy"}, arrays_keys={"forces": "forces"})
    from ase import Atoms

    def atoms(s):
        a = Atoms(numbers=s.numbers, positions=s.positions)
        a.info["energy"], a.arrays["forces"] = float(s.energy), np.asarray(s.forces)
        return a

    configs = [mace_data.config_from_atoms(atoms(s), key_specification=keys) for s in train.structures]
    with default_dtype("float64"):  # mace_run_train sets torch's default dtype to --default_dtype for its data
        atomic = [mace_data.AtomicData.from_config(c, z_table=table, cutoff=args.r_max) for c in configs]
    from mace.tools.torch_geometric import Batch

    loss_fn = mace_modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
    out: dict[str, float] = {}
    for name in ("mace-torch", "unirep"):
        model = theirs if name == "mace-torch" else task
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=0.01, amsgrad=True, weight_decay=5e-7)
        times = []
        for k, idx in enumerate(picks):
            if name == "mace-torch":
                batch = Batch.from_data_list([atomic[i] for i in idx])
                t0 = time.perf_counter()
                with default_dtype("float64"):
                    take_step(
                        model=model,
                        loss_fn=loss_fn,
                        batch=batch,
                        optimizer=opt,
                        ema=None,
                        output_args={"forces": True, "virials": False, "stress": False},
                        max_grad_norm=10.0,
                        device=torch.device("cpu"),
                    )
            else:
                batch = collate_graphs([train[i] for i in idx])
                t0 = time.perf_counter()
                res = task(batch, k)
                opt.zero_grad(set_to_none=True)
                res["loss"].backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
            if k >= 3:
                times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    _ = mace_tools
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/molecular/md_ethanol_quick.extxyz")
    p.add_argument("--n-train", type=int, default=250)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--max-L", dest="max_L", type=int, default=1)
    p.add_argument("--r-max", dest="r_max", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--out", default="outputs/bench/mace_vs_macetorch")
    args = p.parse_args()
    os.chdir(ROOT)
    args.out = str(Path(args.out).resolve())  # mace_run_train runs in its own work_dir
    train, val = _split(args)
    z_table = sorted({int(z) for s in train.structures for z in s.numbers})
    e0, scale = _statistics(train, z_table)
    steps_per_epoch = len(train) // 10
    epochs = max(1, round(args.steps / steps_per_epoch))
    steps = epochs * steps_per_epoch
    print(f"[bench] {len(train)}/{len(val)} frames, {epochs} epochs = {steps} steps, z_table {z_table}", flush=True)
    from molecular.models import MACEModel

    rows = []
    for seed in range(args.seeds):
        work = Path(args.out) / f"seed{seed}"
        mace_file = _mace_cli(args, seed, epochs, e0, z_table, work / "mace")
        # the model file mace-torch wrote a moment ago in this run (trusted by construction; mace pickles modules)
        theirs = MACEModel.from_mace(torch.load(mace_file, map_location="cpu", weights_only=False))
        ours = _ours(args, seed, steps, work / "unirep")
        row = {"seed": seed, "mace-torch": _evaluate(theirs, val), "unirep": _evaluate(ours, val)}
        row["statistics_equal"] = {
            "e0": bool(np.allclose(theirs.config["atomic_energies"], ours.config["atomic_energies"], atol=1e-8)),
            "scale": abs(theirs.config["scale"] - ours.config["scale"]) < 1e-8,
            "shift": theirs.config["shift"] == ours.config["shift"] == 0.0,
            "avg_num_neighbors": abs(theirs.config["avg_num_neighbors"] - ours.config["avg_num_neighbors"]) < 1e-6,
        }
        print(f"[bench] seed {seed}: {json.dumps(row)}", flush=True)
        rows.append(row)
        (Path(args.out) / "runs.json").write_text(json.dumps(rows, indent=1))  # kept if a later part fails
    mean = {
        who: {k: float(np.mean([r[who][k] for r in rows])) for k in ("f_mae_meV_A", "e_mae_meV")}
        for who in ("mace-torch", "unirep")
    }
    ratio = {k: mean["unirep"][k] / mean["mace-torch"][k] for k in ("f_mae_meV_A", "e_mae_meV")}
    times = _step_times(args, train, e0, scale, args.timing_steps)
    result = {
        "settings": {**vars(args), "epochs": epochs, "steps": steps, "z_table": z_table},
        "runs": rows,
        "mean": mean,
        "ratio_unirep_over_mace": ratio,
        "seconds_per_step": times,
        "time_ratio_unirep_over_mace": times["unirep"] / times["mace-torch"],
    }
    path = Path(args.out) / "results.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("mean", "ratio_unirep_over_mace", "seconds_per_step")}, indent=1))
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
