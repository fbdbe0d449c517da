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

Models: ``egnn`` (ET-Flow's recipe with the EGNN), ``et`` (with the equivariant transformer), ``egnn_repa`` and
``et_repa`` (each plus the same conformer REPA term to the foundation MACE; ``--teacher-path`` another teacher),
``egnn_plain`` (plain flow matching: no Kabsch, no bridge noise, MSE; the ablation of ET-Flow's pieces),
``egnn_repa_random`` (REPA to a random MACE: a control for the teacher's content), ``mace`` (a MACE velocity
network, ``molecular.flows.MACEVelocityNet``, random trunk of the foundation force field's architecture;
``--mace-channels`` / ``--mace-interactions`` resize it) and ``mace_ff`` (the same network with its trunk
initialised from a MACE force field, bit for bit: the shared-backbone row; ``--ff-path``, default the recipe's
``data/molecular/foundation``, made by ``unirep-train experiment=molecular/foundation``). ``--width`` / ``--depth``
size the EGNN and ET only; the MACE rows keep the force field's architecture, so that ``mace`` and ``mace_ff``
differ only in their initialisation:

    for s in 0 1 2; do for m in mace mace_ff et_repa; do
      python scripts/bench_conformers.py --bench $B --out $O --parts train eval --models $m --seeds $s --steps 20000
    done; done

Post-generation relaxation (``--relax mmff``, with ``eval``): every generated conformer of a model is optimised with
RDKit's MMFF94 for ``--relax-steps`` iterations (500, as the ETKDG + MMFF baseline; topology from the molecule, so
the bonds are the molecule's, whatever the generator produced) and scored as a separate method ``<model>+mmff``,
whose seconds per conformer include generation and optimisation. That row is a force-field refinement of the
generator's output, not the generator alone; compare it with ``rdkit_etkdg_mmff``, and the generator alone with
``rdkit_etkdg``. Generated coordinates are kept under ``<out>/generated/`` so the relaxed row of an evaluated model
is made without sampling again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

_ET = ["model@task.model=molecular_conf_et", "task.model.heads=4"]
_QM9 = ["data=molecular_conf_qm9"]  # the MACE recipes start from the quick start's data config
# name: (recipe, overrides, how --width/--depth apply: "hidden" for the EGNN / ET, "mace" for a random MACE trunk,
# None where the architecture is a force field's)
MODELS = {
    "egnn": ("conformer_qm9", [], "hidden"),
    "et": ("conformer_qm9", _ET, "hidden"),
    "egnn_plain": ("conformer_qm9", ["task.align_prior=false", "task.bridge_noise=0.0", "task.loss=mse"], "hidden"),
    "egnn_repa": ("conformer_qm9_repa", [], "hidden"),
    "et_repa": ("conformer_qm9_repa", _ET, "hidden"),
    "egnn_repa_random": (
        "conformer_qm9_repa",
        ["+task.teacher.random_init=true", "task.teacher.cache_dir=null"],
        "hidden",
    ),
    "mace": ("conformer_mace", _QM9, "mace"),
    "mace_ff": ("conformer_mace_ff", _QM9, None),
}
RELAX = ("mmff",)


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

    recipe, extra, arch = MODELS[model]
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
        *extra,
    ]
    if arch == "hidden":
        overrides += [f"task.model.hidden={args.width}", f"task.model.num_layers={args.depth}"]
    elif arch == "mace":
        if args.mace_channels:
            overrides.append(f"task.model.trunk.num_channels={args.mace_channels}")
        if args.mace_interactions:
            overrides.append(f"task.model.trunk.num_interactions={args.mace_interactions}")
    if recipe.endswith("_repa") and args.teacher_path and "random_init" not in " ".join(extra):
        overrides.append(f"task.teacher.path={args.teacher_path}")
    if model == "mace_ff" and args.ff_path:
        overrides.append(f"task.model.path={args.ff_path}")
    t0 = time.perf_counter()
    result = run_train(compose("train", overrides))
    if result.get("interrupted"):  # a signal stopped it: not done (a rerun resumes from its checkpoint)
        sys.exit(result.get("exit_code") or 143)
    _write(out / "results" / f"train_{model}_s{seed}.json", {"seconds": time.perf_counter() - t0, "steps": args.steps})
    return run


def generated_file(out: Path, model: str, seed: int) -> Path:
    return out / "generated" / f"{model}_s{seed}.npz"


def save_generated(path: Path, records, gen: list[np.ndarray], seconds: float, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"mol{i}": g for i, g in enumerate(gen)}
    info = json.dumps({"smiles": [r.smiles for r in records], "seconds_per_conformer": seconds, **meta})
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, info=np.array(info), **arrays)
    tmp.replace(path)


def load_generated(path: Path, records) -> tuple[list[np.ndarray], float, dict] | None:
    """Saved generations of exactly these molecules (else ``None``: the held-out set changed, sample again)."""
    if not path.exists():
        return None
    with np.load(path) as z:
        info = json.loads(str(z["info"]))
        if info.pop("smiles") != [r.smiles for r in records]:
            return None
        gen = [z[f"mol{i}"] for i in range(len(records))]
    return gen, info.pop("seconds_per_conformer"), info


def evaluate(
    model: str, seed: int, args, records, out: Path, steps: int, run: Path | None = None, keep: bool = False
) -> dict:
    from unirep.train import load_task

    task, _ = load_task(run or run_dir(out, model, seed), ema=True)
    counts = [2 * r.conformers.shape[0] for r in records]
    t0 = time.perf_counter()
    gen = task.generate(records, counts, seed=1000 + seed, steps=steps)
    sec = (time.perf_counter() - t0) / max(1, sum(counts))
    meta = json.loads((out / "results" / f"train_{model}_s{seed}.json").read_text()) if run is None else {}
    extra = {"sample_steps": steps, "train_steps": meta.get("steps"), "flips": task.last_flips}
    if keep:
        save_generated(generated_file(out, model, seed), records, gen, sec, extra)
    return score(records, gen, sec, extra)


def mmff_relax(records, generated: list[np.ndarray], steps: int) -> tuple[list[np.ndarray], float, dict]:
    """MMFF94-optimise every generated conformer for ``steps`` iterations, the topology (bonds, charges) taken from
    the molecule; returns the relaxed coordinates, seconds per conformer and counts of what could not be relaxed.

    A non-finite generation stays a failure; a molecule MMFF94 has no parameters for keeps its generated coordinates
    (counted in ``mmff_unparametrised``)."""
    from rdkit.Chem import AllChem

    from molecular.conformers import with_coordinates

    t0 = time.perf_counter()
    out, unparam, not_converged, total = [], 0, 0, 0
    for rec, pos in zip(records, generated, strict=True):
        total += len(pos)
        ok = [k for k in range(len(pos)) if np.isfinite(pos[k]).all()]
        relaxed = np.array(pos, dtype=float, copy=True)
        if not ok:
            out.append(relaxed)
            continue
        if not AllChem.MMFFHasAllMoleculeParams(rec.mol):
            unparam += len(ok)
            out.append(relaxed)
            continue
        mol = with_coordinates(rec.mol, pos[ok[0]])
        mol.RemoveAllConformers()
        for k in ok:
            mol.AddConformer(with_coordinates(rec.mol, pos[k]).GetConformer(), assignId=True)
        res = AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=steps)
        not_converged += sum(1 for flag, _ in res if flag == 1)
        for conf, k in zip(mol.GetConformers(), ok, strict=True):
            relaxed[k] = conf.GetPositions()
        out.append(relaxed)
    sec = (time.perf_counter() - t0) / max(1, total)
    return out, sec, {"mmff_unparametrised": unparam, "mmff_not_converged": not_converged, "relax_steps": steps}


def relax_row(model: str, seed: int, args, records, out: Path) -> dict:
    """``<model>+mmff``: the model's generations (saved by ``eval``, else sampled again) after MMFF94 optimisation."""
    saved = load_generated(generated_file(out, model, seed), records)
    if saved is None:
        evaluate(model, seed, args, records, out, args.sample_steps, keep=True)
        saved = load_generated(generated_file(out, model, seed), records)
    gen, gen_sec, meta = saved
    relaxed, relax_sec, info = mmff_relax(records, gen, args.relax_steps)
    extra = {**meta, **info, "generation_seconds_per_conformer": gen_sec, "relax_seconds_per_conformer": relax_sec}
    return score(records, relaxed, gen_sec + relax_sec, extra)


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
    p.add_argument(
        "--ff-path",
        default=None,
        help="mace_ff: the MACE force field (default: the recipe's data/molecular/foundation)",
    )
    p.add_argument("--mace-channels", type=int, default=None, help="mace: trunk channels (default: the recipe's)")
    p.add_argument("--mace-interactions", type=int, default=None, help="mace: trunk interactions (default: recipe's)")
    p.add_argument(
        "--relax",
        nargs="*",
        default=[],
        choices=RELAX,
        help="also score each model's conformers after a force-field relaxation, as method <model>+<kind>",
    )
    p.add_argument("--relax-steps", type=int, default=500, help="MMFF94 iterations (ETKDG + MMFF uses 500)")
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
                r = evaluate(model, seed, args, records, out, args.sample_steps, keep=bool(args.relax))
                _write(f, r)
                _log(f"{model} seed {seed}: COV-R {100 * r['cov_r_mean']:.1f} %, graph {100 * r['valid_graph']:.1f} %")
            for kind in args.relax if "eval" in args.parts else []:
                f = out / "results" / f"{model}+{kind}_s{seed}.json"
                if not f.exists():
                    r = relax_row(model, seed, args, records, out)
                    _write(f, r)
                    _log(f"{model}+{kind} seed {seed}: COV-R {100 * r['cov_r_mean']:.1f} %")
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
