"""Benchmark: the RAE and VA-VAE papers' claims at small scale, on the embedded digits with the self-trained teacher.

One run trains every row with the same number of steps and the same seed, through the project's own recipes
(``configs/experiment/vision/{rae_stage1,vavae_stage1,rae_sit,rae_ditdh,vavae_sit}.yaml`` plus overrides), then
scores each diffusion model on the same footing:

- FD-teacher: Fréchet distance between the teacher's pooled features of generated samples and of training images
  (the offline stand-in for FID; ``unirep.metrics.frechet_distance``), with k-NN precision/recall (k = 3);
- conditional accuracy: a logistic-regression classifier on training pixels applied to class-conditional samples
  (labels 0..9 in turn);
- tokenizers: PSNR, SSIM and FD-teacher of reconstructions on the held-out split (each stage-1 task's evaluation).

Rows:
1. generation: SiT on pixels, REPA SiT on pixels, SiT on VA-VAE latents, SiT on RAE latents;
2. RAE ablations: SiT width 64 (< 96 latent channels) vs 128; with vs without the dimension-dependent shift;
   samples of the same diffusion model decoded by a decoder trained with vs without noise augmentation; DiT vs
   DiT^DH (trunk 64 + head 192);
3. VA-VAE with vs without the VF loss (reconstruction and generation).

Writes ``<out>/results.json``, ``<out>/results.md`` (the table for docs/vision_tokenizers.md) and ``<out>/bench.png``.

    python scripts/bench_tokenizers.py                     # the documented run: ~70 min on 2 CPU cores
    python scripts/bench_tokenizers.py --quick             # 2 steps per row: checks that everything runs
    python scripts/bench_tokenizers.py --stage1-from outputs/bench_tokenizers --diffusion-steps 500 \
        --out outputs/bench_tokenizers_500                 # the diffusion rows at another budget, same tokenizers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unirep.cli import compose, run_train  # noqa: E402
from unirep.flow import dimension_shift  # noqa: E402
from unirep.metrics import frechet_distance, knn_precision_recall  # noqa: E402
from unirep.train import load_task  # noqa: E402

LATENT_RAE = (96, 8, 8)  # the digits teacher: 96-d tokens on an 8x8 grid at 32x32


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_tokenizers")
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher weights (default: data/vision/teacher_vit_digits.safetensors, trained if missing)",
    )
    p.add_argument("--stage1-steps", type=int, default=1500)
    p.add_argument("--diffusion-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=500, help="generated samples per row")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stat-items", type=int, default=512, help="training images the latent statistics are fitted on")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="EMA decay of every row (default: 1 - 10/steps, so the evaluated EMA has forgotten the init)",
    )
    p.add_argument(
        "--diffusion-lr",
        type=float,
        default=1e-3,
        help="learning rate of every diffusion row (at 2e-4-3e-4 a small SiT ignores its class label for "
        "the first thousands of steps; docs/vision.md)",
    )
    p.add_argument("--stage1-lr", type=float, default=2e-4, help="learning rate of every tokenizer row")
    p.add_argument(
        "--gan",
        action="store_true",
        help="train the tokenizers with the adversarial term (RAE's schedule scaled to the budget: "
        "discriminator alone from 3/8 of the stage-1 steps, decoder term from 1/2); off by default: "
        "at this scale it wrecked the RAE decoder (34.9 -> 22.1 dB PSNR; docs/vision_tokenizers.md)",
    )
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale of every row")
    p.add_argument(
        "--stage1-from",
        default=None,
        metavar="DIR",
        help="reuse the tokenizers of an earlier run's output folder instead of training them (e.g. to "
        "score the diffusion rows at another step budget on the same tokenizers)",
    )
    p.add_argument("--quick", action="store_true", help="2 steps per row, few samples (a run check, not a result)")
    return p.parse_args()


def train(experiment: str, out_dir: Path, overrides: list[str]) -> dict:
    cfg = compose("train", [f"experiment=vision/{experiment}", f"out_dir={out_dir}", *overrides])
    t0 = time.time()
    result = run_train(cfg)
    seconds = round(time.time() - t0, 1)
    return {"eval": result.get("eval", {}), "seconds": seconds, "checkpoint": str(result["checkpoint"])}


def common(args: argparse.Namespace, steps: int) -> list[str]:
    return [
        f"seed={args.seed}",
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={args.batch_size}",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        f"trainer.log_every={max(1, steps // 10)}",
        f"trainer.ckpt_every={steps}",
        "trainer.keep_last=1",
        "trainer.warmup_steps=" + str(min(50, steps // 10)),
        "trainer.resume=none",
        "trainer.overwrite=true",
        "trainer.device=cpu",
        # a short run evaluated with a long-horizon EMA scores the initial weights: tie the horizon to the budget
        f"trainer.ema_decay={args.ema_decay if args.ema_decay is not None else min(0.9999, max(0.0, 1 - 10 / steps))}",
    ]


def teacher_overrides(prefix: str, teacher: str) -> list[str]:
    return [f"{prefix}.pretrained_path={teacher}", f"{prefix}.allow_random_init=false"]


def diffusion_overrides(args: argparse.Namespace, teacher: str) -> list[str]:
    return [
        *teacher_overrides("task.teacher", teacher),
        "++task.flow._target_=unirep.flow.FlowMatching",
        "++task.flow.time_dist=logit_normal",
        f"task.sample_steps={args.sample_steps}",
        f"task.cfg_scale={args.cfg_scale}",
        "task.eval_samples=" + str(min(args.samples, 200)),
        "trainer.eval_at_end=false",
    ]


@torch.no_grad()
def score(checkpoint: str, data, clf, real_feats: torch.Tensor, num: int, seed: int, tokenizer=None) -> dict:
    """FD-teacher, precision/recall and conditional accuracy of ``num`` class-balanced samples."""
    task, _ = load_task(checkpoint, ema=True)
    if tokenizer is not None:  # decode the same latents with another decoder (RAE noise-augmentation ablation)
        task.tokenizer = tokenizer
    labels = torch.arange(num) % max(task.num_classes, 1)
    fake, labels = task.generate(num, seed=seed, labels=labels)
    feats = torch.cat([task.teacher.encode_pooled(f) for f in fake.split(250)])
    p, r = knn_precision_recall(real_feats, feats, k=3)
    acc = float((clf.predict(fake.flatten(1).numpy()) == labels.numpy()).mean())
    params = sum(q.numel() for q in task.model.parameters())
    return {
        "fd_teacher": frechet_distance(real_feats, feats),
        "precision": p,
        "recall": r,
        "cond_accuracy": acc,
        "params_M": round(params / 1e6, 3),
        "samples": fake[:50],
    }


def main() -> None:
    args = parse()
    if args.quick:
        args.stage1_steps, args.diffusion_steps, args.samples, args.sample_steps, args.stat_items = 2, 2, 20, 2, 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    from vision.data import digits_data
    from vision.teacher import digits_teacher, ensure_digits_teacher
    from vision.tokenizers.tasks import load_tokenizer

    if args.teacher:
        teacher = str(Path(args.teacher))
    elif args.quick:  # an untrained teacher saved to a file: the run check needs no teacher training
        from safetensors.torch import save_file

        torch.manual_seed(args.seed)
        random_teacher = digits_teacher(grid_size=8, allow_random_init=True)
        teacher = str(out / "teacher_random.safetensors")
        save_file({k: v.contiguous() for k, v in random_teacher.model.state_dict().items()}, teacher)
    else:
        teacher = str(ensure_digits_teacher())
    t_start = time.time()
    s1, s2 = args.stage1_steps, args.diffusion_steps
    # RAE's schedule scaled to the budget: discriminator alone from 6/16, adversarial term from 8/16 of the steps
    gan = (
        [f"task.disc_start={s1 // 2}", f"task.disc_update_start={3 * s1 // 8}"]
        if args.gan
        else ["task.discriminator=null"]
    )

    # -- stage 1: tokenizers -------------------------------------------------------------------------------------
    stage1 = {
        "rae": ("rae_stage1", [*teacher_overrides("task.tokenizer.encoder", teacher), *gan]),
        "rae_no_noise": (
            "rae_stage1",
            [*teacher_overrides("task.tokenizer.encoder", teacher), *gan, "task.tokenizer.noise_tau=0"],
        ),
        "vavae": ("vavae_stage1", [*teacher_overrides("task.teacher", teacher), *gan]),
        "kl_vae": ("vavae_stage1", [*teacher_overrides("task.teacher", teacher), *gan, "task.align=null"]),
    }
    results: dict = {"config": {k: v for k, v in vars(args).items()}, "tokenizers": {}, "generation": {}}
    tok_dir = Path(args.stage1_from) if args.stage1_from else out
    if args.stage1_from:
        earlier = json.loads((tok_dir / "results.json").read_text())
        missing = [n for n in stage1 if n not in earlier.get("tokenizers", {})]
        if missing:
            raise SystemExit(
                f"--stage1-from {tok_dir}: its results.json has no tokenizer rows {missing}; run the "
                f"full benchmark into that folder first"
            )
        results["tokenizers"] = {n: earlier["tokenizers"][n] for n in stage1}
        results["config"]["stage1_steps"] = earlier["config"]["stage1_steps"]
        results["config"]["stage1_lr"] = earlier["config"].get("stage1_lr", 2e-4)
        results["config"]["gan"] = earlier["config"].get("gan", False)
        stage1 = {}
    for name, (exp, ov) in stage1.items():
        print(f"[bench] stage 1: {name}", flush=True)
        r = train(
            exp,
            out / name,
            [
                *common(args, s1),
                f"optimizer.lr={args.stage1_lr}",
                *ov,
                f"task.eval_items={16 if args.quick else 100}",
                f"task.fit_statistics_items={args.stat_items}",
            ],
        )
        results["tokenizers"][name] = {k: v for k, v in r["eval"].items() if k.startswith("recon/")}
        results["tokenizers"][name].update(seconds=r["seconds"], checkpoint=r["checkpoint"])
        (out / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive a later failure

    # -- stage 2: diffusion rows ---------------------------------------------------------------------------------
    s_rae = dimension_shift(math.prod(LATENT_RAE))
    fit = f"task.tokenizer.fit_statistics_items={args.stat_items}"  # latent statistics over that many images
    rae_tok = [f"task.tokenizer.checkpoint={tok_dir / 'rae'}", "task.tokenizer.random_init=null", fit]
    pixel = [
        "task.tokenizer=null",
        "task.model.input_size=32",
        "task.model.patch_size=4",
        "task.model.in_channels=1",
        "++task.flow.shift=1.0",
        "task.sample_shift=1.0",
    ]
    rows = {
        "SiT pixels": ("rae_sit", pixel),
        "REPA SiT pixels": (
            "rae_sit",
            [
                *pixel,
                "+align@task.align.repa=repa",
                "task.align.repa.layer=2",
                "task.align.repa.projector.hidden_dim=256",
            ],
        ),
        "SiT VA-VAE": (
            "vavae_sit",
            [f"task.tokenizer.checkpoint={tok_dir / 'vavae'}", "task.tokenizer.random_init=null", fit],
        ),
        "SiT KL-VAE (no VF)": (
            "vavae_sit",
            [f"task.tokenizer.checkpoint={tok_dir / 'kl_vae'}", "task.tokenizer.random_init=null", fit],
        ),
        "SiT RAE (w128, shift)": ("rae_sit", [*rae_tok, f"++task.flow.shift={s_rae}", f"task.sample_shift={s_rae}"]),
        "SiT RAE (w64 < 96 channels)": (
            "rae_sit",
            [*rae_tok, "task.model.hidden_size=64", f"++task.flow.shift={s_rae}", f"task.sample_shift={s_rae}"],
        ),
        "SiT RAE (w128, no shift)": ("rae_sit", [*rae_tok, "++task.flow.shift=1.0", "task.sample_shift=1.0"]),
        "DiT^DH RAE (64 + head 192)": (
            "rae_ditdh",
            [*rae_tok, f"++task.flow.shift={s_rae}", f"task.sample_shift={s_rae}"],
        ),
    }
    data = digits_data(resolution=32, channels=1)
    from sklearn.linear_model import LogisticRegression

    xs = torch.stack([data.train[i]["image"] for i in range(len(data.train))])
    ys = np.array([int(data.train[i]["y"]) for i in range(len(data.train))])
    clf = LogisticRegression(max_iter=1000, C=0.5).fit(xs.flatten(1).numpy(), ys)
    vx = torch.stack([data.val[i]["image"] for i in range(len(data.val))])
    vy = np.array([int(data.val[i]["y"]) for i in range(len(data.val))])
    enc = digits_teacher(grid_size=8, pretrained_path=teacher, train_if_missing=False)
    with torch.no_grad():
        real_feats = torch.cat([enc.encode_pooled(b) for b in xs.split(250)])
        val_feats = enc.encode_pooled(vx)
    results["reference"] = {
        "fd_teacher_heldout_vs_train": frechet_distance(real_feats, val_feats),
        "classifier_heldout_accuracy": float(clf.score(vx.flatten(1).numpy(), vy)),
    }
    grids = {}
    for name, (exp, ov) in rows.items():
        print(f"[bench] diffusion: {name}", flush=True)
        r = train(
            exp,
            out / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"),
            [*common(args, s2), f"optimizer.lr={args.diffusion_lr}", *diffusion_overrides(args, teacher), *ov],
        )
        sc = score(r["checkpoint"], data, clf, real_feats, args.samples, args.seed)
        grids[name] = sc.pop("samples")
        results["generation"][name] = {**sc, "train_seconds": r["seconds"]}
        if name == "SiT RAE (w128, shift)":  # same diffusion model, latents decoded by the noise-free decoder
            tok = load_tokenizer(str(tok_dir / "rae_no_noise"), fit_statistics="never")
            main_tok = load_task(r["checkpoint"])[0].tokenizer
            tok.latent_mean.copy_(main_tok.latent_mean)  # same frozen encoder, hence the same statistics
            tok.latent_std.copy_(main_tok.latent_std)
            sc = score(r["checkpoint"], data, clf, real_feats, args.samples, args.seed, tokenizer=tok)
            grids["SiT RAE (decoder without noise aug.)"] = sc.pop("samples")
            results["generation"]["SiT RAE (decoder without noise aug.)"] = {**sc, "train_seconds": 0.0}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results["total_seconds"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    plot(results, grids, out / "bench.png")
    print(table(results))
    print(f"[bench] wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'bench.png'}", flush=True)


def table(results: dict) -> str:
    c = results["config"]
    guidance = f"CFG {c.get('cfg_scale', 1.0)}" if c.get("cfg_scale", 1.0) != 1.0 else "no guidance"
    lines = [
        f"Digits 32x32, self-trained ViT teacher; stage 1: {c['stage1_steps']} steps at lr "
        f"{c.get('stage1_lr', 2e-4):g}, {'with' if c.get('gan') else 'without'} the adversarial term; diffusion: "
        f"{c['diffusion_steps']} steps at lr {c.get('diffusion_lr', 2e-4):g}; batch {c['batch_size']}, seed "
        f"{c['seed']}; {c['samples']} samples, Euler {c['sample_steps']} steps, {guidance}"
        + (f"; tokenizers from {c['stage1_from']}." if c.get("stage1_from") else "."),
        "",
        "| tokenizer | PSNR | SSIM | FD-teacher (recon) |",
        "|---|---|---|---|",
    ]
    for name, r in results["tokenizers"].items():
        lines.append(
            f"| {name} | {r.get('recon/psnr', float('nan')):.2f} | {r.get('recon/ssim', float('nan')):.3f} | "
            f"{r.get('recon/fd_teacher', float('nan')):.3f} |"
        )
    ref = results["reference"]
    lines += [
        "",
        f"Reference: FD-teacher of held-out vs training images {ref['fd_teacher_heldout_vs_train']:.3f}; "
        f"classifier accuracy on held-out images {ref['classifier_heldout_accuracy']:.3f}.",
        "",
        "| model | params (M) | FD-teacher | precision | recall | cond. accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["generation"].items():
        lines.append(
            f"| {name} | {r['params_M']:.2f} | {r['fd_teacher']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['cond_accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, grids: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = results["generation"]
    names = list(gen)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("fd_teacher", "cond_accuracy"), strict=True):
        ax.barh(names, [gen[n][key] for n in names], color="tab:blue")
        ax.set_xlabel(key)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    # one row of samples per model
    rows = [torch.cat(list(g[:10].clamp(-1, 1)), dim=-1)[0] for g in grids.values()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.9 * len(rows) + 0.5))
    for ax, name, img in zip(np.atleast_1d(axes), grids, rows, strict=True):
        ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path.with_name("samples.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
