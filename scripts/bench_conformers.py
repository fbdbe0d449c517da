"""QM9 conformer benchmark: RDKit ETKDG (+ MMFF) against the learned flows on held-out molecules, seeds, few steps.

Data: ``scripts/make_conformer_benchmark.py`` (training ensembles ETKDG + MMFF for >= 1,000 QM9 molecules; held-out
molecules with GFN2-xTB reference ensembles, so no baseline made the references). Protocol: torsional diffusion /
ET-Flow (heavy-atom GetBestRMS after RemoveHs, 2 generated per reference conformer, COV/MAT recall and precision at
delta = 0.5 Å, per molecule then mean), validity (bond graph kept, specified stereo kept, same isomeric SMILES) and
generation time per conformer.

Resumable in parts; every part writes ``<out>/results/*.json`` and skips what is there, and a training run resumes
from its checkpoint. Each part is sized to finish within about 90 min on two CPU cores with the defaults of one
invocation (one model and one seed per ``train`` call). The full table:

    B=data/cache/qm9_conformers; O=outputs/bench_conformers
    python scripts/bench_conformers.py --bench $B --out $O --parts baselines --seeds 0 1 2
    for s in 0 1 2; do for m in egnn et egnn_repa; do
      python scripts/bench_conformers.py --bench $B --out $O --parts train eval --models $m --seeds $s --steps 20000
    done; done
    python scripts/bench_conformers.py --bench $B --out $O --parts reflow fewstep --models egnn --seeds 0
    python scripts/bench_conformers.py --bench $B --out $O --parts table

Models: ``egnn`` (ET-Flow's recipe with the EGNN), ``et`` (with the equivariant transformer), ``egnn_repa`` (plus
conformer REPA to the foundation MACE), ``egnn_plain`` (plain flow matching: no Kabsch, no bridge noise, MSE; the
ablation of ET-Flow's pieces), ``egnn_repa_random`` (REPA to a random MACE: a control for the teacher's content).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {
    "egnn": ("conformer_qm9", []),
    "et": ("conformer_qm9", ["model@task.model=molecular_conf_et", "task.model.heads=4"]),
    "egnn_plain": ("conformer_qm9", ["task.align_prior=false", "task.bridge_noise=0.0", "task.loss=mse"]),
    "egnn_repa": ("conformer_qm9_repa", []),
    "egnn_repa_random": ("conformer_qm9_repa", ["+task.teacher.random_init=true", "task.teacher.cache_dir=null"]),
}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def test_records(bench: Path, max_test: int | None):
    """Held-out molecules with their GFN2 references: ``test.sdf``, else the finished parts of an unfinished build."""
    from molecular.conformers import read_ensembles
    from molecular.conformers.ensembles import record_from_conformers

    if (bench / "test.sdf").exists():
        recs = read_ensembles(bench / "test.sdf")
    else:
        recs = []
        for f in sorted((bench / "test_parts").glob("*.json")):
            d = json.loads(f.read_text())
            if d["conformers"]:
                pos = [np.array(c["pos"]) for c in d["conformers"]]
                recs.append(record_from_conformers(d["smiles"], pos, [c["energy_eV"] for c in d["conformers"]]))
        _log(f"test.sdf missing: using the {len(recs)} finished molecules under {bench / 'test_parts'}")
    return recs[:max_test] if max_test else recs


def train_file(bench: Path, out: Path) -> Path:
    """``train.sdf``, else the finished chunks of an unfinished build joined into ``<out>/train_partial.sdf``."""
    if (bench / "train.sdf").exists():
        return bench / "train.sdf"
    from molecular.conformers import read_ensembles, write_ensembles

    chunks = sorted((bench / "train_parts").glob("*.sdf"))
    if not chunks:
        sys.exit(f"no training data under {bench}: run scripts/make_conformer_benchmark.py first")
    path = out / f"train_partial_{len(chunks)}chunks.sdf"
    if not path.exists():
        write_ensembles([r for c in chunks for r in read_ensembles(c)], path)
    _log(f"train.sdf missing: training on the {len(chunks)} finished chunks ({path})")
    return path


def etkdg(records, counts, seed: int, mmff: bool) -> tuple[list[np.ndarray], float]:
    from molecular.conformers import conformer_mols, etkdg_conformers

    t0 = time.perf_counter()
    out = []
    for rec, k in zip(records, counts, strict=True):
        try:
            pos = [m.GetConformer().GetPositions() for m in conformer_mols(etkdg_conformers(rec.mol, k, seed, mmff))]
        except RuntimeError:  # ETKDG cannot embed it (strained cages): a failure, coverage 0 as in the anchors
            out.append(np.full((k, rec.num_atoms, 3), np.nan))
            continue
        while len(pos) < k:  # ETKDG may return fewer than asked: repeat (counts as duplicates, as in the anchors)
            pos.append(pos[len(pos) % max(1, len(pos))])
        out.append(np.stack(pos[:k]))
    return out, (time.perf_counter() - t0) / max(1, sum(counts))


def score(records, generated, seconds: float, extra: dict) -> dict:
    from molecular.flows import evaluate_conformers

    agg, rows = evaluate_conformers(records, generated, delta=0.5)
    return {**agg, "seconds_per_conformer": seconds, **extra, "per_molecule": rows}


def run_dir(out: Path, model: str, seed: int) -> Path:
    return out / "runs" / f"{model}_s{seed}"


def train(model: str, seed: int, args, train_sdf: Path, out: Path) -> Path:
    from unirep.cli import compose, run_train

    recipe, extra = MODELS[model]
    run = run_dir(out, model, seed)
    overrides = [
        f"experiment=molecular/{recipe}",
        f"out_dir={run}",
        f"seed={seed}",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.ckpt_every={max(1, min(args.steps, 500))}",
        "trainer.eval_every=0",
        "trainer.eval_at_end=false",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.resume=auto",
        f"trainer.ema_decay={args.ema}",
        f"trainer.warmup_steps={min(500, args.steps // 10)}",
        f"optimizer.lr={args.lr}",
        f"data.train={train_sdf}",
        "data.val=null",
        f"data.max_train_molecules={args.max_train or 'null'}",
        f"task.model.hidden={args.width}",
        f"task.model.num_layers={args.depth}",
        *extra,
    ]
    if recipe.endswith("_repa") and args.teacher_path and "random_init" not in " ".join(extra):
        overrides.append(f"task.teacher.path={args.teacher_path}")
    t0 = time.perf_counter()
    run_train(compose("train", overrides))
    _write(out / "results" / f"train_{model}_s{seed}.json", {"seconds": time.perf_counter() - t0, "steps": args.steps})
    return run


def evaluate(model: str, seed: int, args, records, out: Path, steps: int, run: Path | None = None) -> dict:
    from unirep.train import load_task

    task, _ = load_task(run or run_dir(out, model, seed), ema=True)
    counts = [2 * r.conformers.shape[0] for r in records]
    t0 = time.perf_counter()
    gen = task.generate(records, counts, seed=1000 + seed, steps=steps)
    sec = (time.perf_counter() - t0) / max(1, sum(counts))
    meta = json.loads((out / "results" / f"train_{model}_s{seed}.json").read_text()) if run is None else {}
    return score(records, gen, sec, {"sample_steps": steps, "train_steps": meta.get("steps"), "flips": task.last_flips})


def table(out: Path) -> str:
    res = {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    groups: dict[str, list[dict]] = {}
    for name, r in res.items():
        if name.startswith(("train_", "fewstep_")):
            continue
        groups.setdefault(name.rsplit("_s", 1)[0], []).append(r)

    def ms(rs, key, scale=1.0, fmt="{:.1f}"):
        v = np.array([r.get(key, np.nan) for r in rs], dtype=float) * scale
        return fmt.format(np.nanmean(v)) + (f" ± {fmt.format(np.nanstd(v))}" if len(v) > 1 else "")

    lines = [
        "| method | seeds | train steps | COV-R (%) | MAT-R (Å) | COV-P (%) | MAT-P (Å) | bond graph (%) | "
        "stereo (%) | isomeric SMILES (%) | s / conformer | molecules |",
        "|---" * 12 + "|",
    ]
    for name, rs in groups.items():
        steps = rs[0].get("train_steps") or "—"
        lines.append(
            f"| {name} | {len(rs)} | {steps} | {ms(rs, 'cov_r_mean', 100)} | {ms(rs, 'mat_r_mean', 1, '{:.3f}')} | "
            f"{ms(rs, 'cov_p_mean', 100)} | {ms(rs, 'mat_p_mean', 1, '{:.3f}')} | {ms(rs, 'valid_graph', 100)} | "
            f"{ms(rs, 'valid_stereo', 100)} | {ms(rs, 'valid_smiles', 100)} | "
            f"{ms(rs, 'seconds_per_conformer', 1, '{:.4f}')} | {int(rs[0]['num_molecules'])} |"
        )
    few = {n: r for n, r in res.items() if n.startswith("fewstep_")}
    if few:
        lines += ["", "| model | sample steps | COV-R (%) | MAT-R (Å) | bond graph (%) | stereo (%) | s / conformer |"]
        lines.append("|---" * 7 + "|")
        for name, rows in few.items():
            for r in rows:
                lines.append(
                    f"| {name[len('fewstep_') :]} | {r['sample_steps']} | {100 * r['cov_r_mean']:.1f} | "
                    f"{r['mat_r_mean']:.3f} | {100 * r['valid_graph']:.1f} | {100 * r['valid_stereo']:.1f} | "
                    f"{r['seconds_per_conformer']:.4f} |"
                )
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default="data/cache/qm9_conformers", help="scripts/make_conformer_benchmark.py --out")
    p.add_argument("--out", default="outputs/bench_conformers")
    p.add_argument("--parts", nargs="+", default=["baselines", "train", "eval", "table"])
    p.add_argument("--models", nargs="+", default=["egnn"], choices=sorted(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=20000, help="training steps of every model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--train-sdf", default=None, help="training ensembles (default: the benchmark's train.sdf)")
    p.add_argument("--teacher-path", default=None, help="the REPA teacher (default: the recipe's foundation MACE)")
    p.add_argument("--max-train", type=int, default=None, help="cap on training molecules")
    p.add_argument("--max-test", type=int, default=None, help="cap on held-out molecules")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--few-steps", nargs="+", type=int, default=[1, 2, 5, 10, 20, 50])
    p.add_argument("--reflow-steps", type=int, default=2000)
    p.add_argument("--reflow-teacher-steps", type=int, default=20)
    args = p.parse_args(argv)
    bench, out = Path(args.bench), Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    records = test_records(bench, args.max_test) if set(args.parts) - {"train", "table"} else []
    if records:
        _log(f"{len(records)} held-out molecules, {sum(r.conformers.shape[0] for r in records)} reference conformers")
    counts = [2 * r.conformers.shape[0] for r in records]
    if "baselines" in args.parts:
        for seed in args.seeds:
            for name, mmff in (("rdkit_etkdg", False), ("rdkit_etkdg_mmff", True)):
                f = out / "results" / f"{name}_s{seed}.json"
                if f.exists():
                    continue
                gen, sec = etkdg(records, counts, 1000 + seed, mmff)
                _write(f, score(records, gen, sec, {"sample_steps": None, "train_steps": None}))
                _log(f"{name} seed {seed}: COV-R {100 * json.loads(f.read_text())['cov_r_mean']:.1f} %")
    train_sdf = Path(args.train_sdf) if args.train_sdf else None
    if train_sdf is None and {"train", "reflow"} & set(args.parts):
        train_sdf = train_file(bench, out)
    for model in args.models:
        for seed in args.seeds:
            if "train" in args.parts and not (out / "results" / f"train_{model}_s{seed}.json").exists():
                _log(f"training {model} seed {seed} for {args.steps} steps")
                train(model, seed, args, train_sdf, out)
            f = out / "results" / f"{model}_s{seed}.json"
            if "eval" in args.parts and not f.exists():
                r = evaluate(model, seed, args, records, out, args.sample_steps)
                _write(f, r)
                _log(f"{model} seed {seed}: COV-R {100 * r['cov_r_mean']:.1f} %, graph {100 * r['valid_graph']:.1f} %")
            if "reflow" in args.parts and not (out / "results" / f"train_reflow_{model}_s{seed}.json").exists():
                from unirep.cli import compose, run_train

                src = run_dir(out, model, seed)
                t0 = time.perf_counter()
                run_train(
                    compose(
                        "train",
                        [
                            "experiment=molecular/conformer_reflow",
                            f"out_dir={run_dir(out, 'reflow_' + model, seed)}",
                            f"seed={seed}",
                            f"task.model.checkpoint={src}",
                            f"task.teacher_model.checkpoint={src}",
                            f"task.teacher_steps={args.reflow_teacher_steps}",
                            f"trainer.max_steps={args.reflow_steps}",
                            f"trainer.batch_size={args.batch_size}",
                            "trainer.eval_at_end=false",
                            "trainer.progress=false",
                            "trainer.tensorboard=false",
                            "trainer.resume=auto",
                            f"trainer.ckpt_every={max(1, min(args.reflow_steps, 500))}",
                            f"data.train={train_sdf}",
                            "data.val=null",
                            f"data.max_train_molecules={args.max_train or 'null'}",
                        ],
                    )
                )
                _write(
                    out / "results" / f"train_reflow_{model}_s{seed}.json",
                    {"seconds": time.perf_counter() - t0, "steps": args.reflow_steps},
                )
            if "fewstep" in args.parts:
                for kind in (model, "reflow_" + model):
                    f = out / "results" / f"fewstep_{kind}_s{seed}.json"
                    run = run_dir(out, kind, seed)
                    if f.exists() or not run.exists():
                        continue
                    rows = []
                    for k in args.few_steps:
                        r = evaluate(kind, seed, args, records, out, k, run=run)
                        r.pop("per_molecule")
                        rows.append(r)
                        _log(f"{kind} seed {seed}, {k} steps: COV-R {100 * r['cov_r_mean']:.1f} %")
                    _write(f, rows)
    if "table" in args.parts or "eval" in args.parts:
        print(table(out), flush=True)


if __name__ == "__main__":
    main()
