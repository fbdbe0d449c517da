"""Encode an image folder into the latent folder REPA, SiT and LightningDiT train on (REPA's preprocessing).

As sihyun-yu/REPA ``preprocessing/dataset_tools.py`` (``convert --transform=center-crop-dhariwal`` then ``encode``,
through ``preprocessing/encoders.py``'s ``StabilityVAEEncoder``), in one pass:

1. list ``--source`` (``<class>/<image>`` as ImageNet's ``train/``, labels from the sorted class folders, or a flat
   folder: unconditional) with :func:`vision.data.list_image_folder`;
2. centre-crop every image to ``--resolution`` with ADM's ``center_crop_arr`` (:func:`vision.data.center_crop_arr`),
   pixels to [-1, 1] (REPA: ``x / 127.5 - 1``); with ``--hflip`` (default) also its mirror image, as LightningDiT's
   ``extract_features.py`` stores ``latents_flip``;
3. encode with a tokenizer (default the SD-VAE, :class:`vision.tokenizers.SDVAE` from a diffusers folder; or any
   stage-1 checkpoint of this project, ``--checkpoint``) and store ``tokenizer.encode(x)``: the latent normalised by
   the tokenizer's named statistics (SD-VAE: ``z * 0.18215``, the scaling REPA applies), posterior mean unless
   ``--sample``; ``--raw`` stores the unnormalised latent;
4. write the folder :func:`vision.data.latent_folder_data` reads: one ``.npy`` per image under the image's relative
   path (``n01440764/n01440764_10026.npy``, the mirror ``n01440764/n01440764_10026.flip.npy``), ``dataset.json`` =
   ``{"labels": [[path, label], ...]}`` (labels ``null`` for a flat folder), and ``latent_stats.json``: per-channel
   ``mean``/``std`` of the stored latents and ``raw_mean``/``raw_std`` of the raw ones over every position of every
   stored latent (LightningDiT's ``latents_stats.pt``; ``vision.tokenizers.load_sdvae(statistics=...)`` reads it).

Work is split into shards of ``--shard-size`` images in sorted order; a shard's manifest (``.shards/<k>.json``:
entries, skipped files, moment sums) is written after its latents, each file to a temporary name then renamed, so an
interrupted run resumes where it stopped (finished shards are skipped) and never leaves half-written files behind.
``--workers N`` encodes shards in N processes (each with its own tokenizer copy and ``--threads`` torch threads).
A bad image stops the run naming it (``--on-error stop``, default) or is named and left out (``--on-error skip``;
listed in ``skipped.txt``).

    python scripts/encode_latents.py --source /data/imagenet/train --dest /data/imagenet256/sd-vae \
        --vae data/weights/sd-vae-ft-ema --resolution 256 --workers 8 --device cuda --batch-size 64
    python scripts/encode_latents.py --source my_images --dest my_latents --checkpoint outputs/vavae_stage1 \
        --resolution 32
    # throughput of the real SD-VAE architecture with random weights (no download): --random-sdvae
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHARDS = ".shards"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", required=True, help="image folder: <class>/<image> or flat")
    p.add_argument("--dest", required=True, help="latent folder to write (resumed when it exists)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vae", help="diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")
    tok.add_argument("--checkpoint", help="a stage-1 tokenizer checkpoint of this project (vavae_stage1, rae_stage1)")
    tok.add_argument(
        "--random-sdvae",
        action="store_true",
        help="an untrained SD-VAE (stabilityai/sd-vae-ft-* architecture, seed 0): throughput measurements only",
    )
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a Stable Diffusion pipeline folder")
    p.add_argument(
        "--statistics",
        default=None,
        help="latent_stats.json of an earlier run (its raw_mean/raw_std): store per-channel normalised latents",
    )
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="also store mirror images")
    p.add_argument("--raw", action="store_true", help="store unnormalised latents (default: tokenizer.encode)")
    p.add_argument("--sample", action="store_true", help="store a posterior sample (seeded per shard), not the mean")
    p.add_argument("--store-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop", help="a bad image: stop, or name and skip")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none", help="mixed precision on cuda")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images of the sorted list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("resolution", "shard_size", "batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# -- tokenizer -------------------------------------------------------------------------------------------------
def tokenizer_spec(args: argparse.Namespace) -> dict[str, Any]:
    """What every process needs to build the same tokenizer (plain data: sent to spawned workers)."""
    return {
        "vae": args.vae,
        "vae_subfolder": args.vae_subfolder,
        "checkpoint": args.checkpoint,
        "random_sdvae": bool(args.random_sdvae),
        "sample": bool(args.sample),
        "seed": int(args.seed),
        "statistics": args.statistics,
    }


def build_tokenizer(spec: dict[str, Any], device: str):
    from vision.tokenizers.sdvae import load_sdvae, sd_vae

    if spec["vae"]:
        tok = load_sdvae(spec["vae"], subfolder=spec["vae_subfolder"], sample_latents=spec["sample"])
    elif spec["checkpoint"]:
        from vision.tokenizers.tasks import load_tokenizer

        tok = load_tokenizer(spec["checkpoint"], fit_statistics="never")
        if hasattr(tok, "sample_latents"):
            tok.sample_latents = spec["sample"]
    else:
        torch.manual_seed(spec["seed"])
        tok = sd_vae(sample_latents=spec["sample"])
    if spec.get("statistics"):  # LightningDiT's latent_norm: per-channel statistics measured by a first pass
        stats = json.loads(Path(spec["statistics"]).read_text(encoding="utf-8"))
        shape = tok.latent_mean.shape
        if "raw_mean" not in stats or len(stats["raw_mean"]) != shape[0] or shape[1:] not in ((1, 1), ()):
            raise ValueError(
                f"{spec['statistics']} needs raw_mean/raw_std with {shape[0]} channels (encode_latents' latent_stats"
                f".json) for a tokenizer with channel statistics {tuple(shape)}"
            )
        tok.latent_mean.copy_(torch.tensor(stats["raw_mean"]).reshape(shape))
        tok.latent_std.copy_(torch.tensor(stats["raw_std"]).reshape(shape))
    tok.requires_grad_(False)
    return tok.eval().to(device)


def describe_tokenizer(tok) -> dict[str, Any]:
    desc: dict[str, Any] = {"class": f"{type(tok).__module__}.{type(tok).__name__}"}
    if hasattr(tok, "config"):
        desc["config"] = tok.config
    desc["latent_mean"] = tok.latent_mean.flatten().tolist()
    desc["latent_std"] = tok.latent_std.flatten().tolist()
    return desc


# -- one shard -------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(spec: dict[str, Any], device: str, threads: int, autocast: str) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(tok=build_tokenizer(spec, device), device=device, autocast=autocast, spec=spec)


def _to_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[R, R, C]`` images -> ``[B, C, R, R]`` in [-1, 1], the arithmetic of ``vision.data._load_image``."""
    x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return x * 2.0 - 1.0


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def latent_name(rel: str, flip: bool) -> str:
    """``a/b.JPEG`` -> ``a/b.npy`` (``a/b.flip.npy`` for the mirror image; ``vision.data.FLIP_TAG``)."""
    from vision.data import FLIP_TAG

    stem = rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel
    return f"{stem}{FLIP_TAG if flip else ''}.npy"


def encode_shard(job: dict[str, Any], progress=None) -> dict[str, Any]:
    """Encode one shard's images, write their latents, then its manifest; returns the manifest."""
    from vision.data import read_image_array

    tok, device = _WORKER["tok"], _WORKER["device"]
    source, dest = Path(job["source"]), Path(job["dest"])
    if _WORKER["spec"]["sample"]:
        torch.manual_seed(job["seed"] * 1_000_003 + job["shard"])  # a shard's samples do not depend on the workers
    entries: list[list[Any]] = []
    skipped: list[list[str]] = []
    sums: dict[str, np.ndarray] = {}
    count = 0
    items = list(zip(job["files"], job["labels"], strict=True))
    store = np.float16 if job["store_dtype"] == "float16" else np.float32
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_WORKER["autocast"])
    for start in range(0, len(items), job["batch_size"]):
        arrays, names, labels = [], [], []
        for rel, label in items[start : start + job["batch_size"]]:
            try:
                arr = read_image_array(source / rel, job["resolution"], 3)
            except ValueError as err:
                if job["on_error"] == "stop":
                    raise ValueError(f"{err} (or pass --on-error skip to leave bad files out)") from None
                skipped.append([str(source / rel), str(err)])
                print(f"encode_latents: skipping {source / rel}: {err}", file=sys.stderr)
                continue
            views = [(arr, False)] + ([(arr[:, ::-1], True)] if job["hflip"] else [])
            for a, flip in views:
                arrays.append(a)
                names.append(latent_name(rel, flip))
                labels.append(label)
        if arrays:
            x = _to_pixels(arrays).to(device)
            with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
                raw = tok._encode(x)
            raw = raw.float()
            stored = raw if job["raw"] else tok.normalize(raw)
            reduce = (0, *range(2, raw.dim()))
            for key, z in (("stored", stored), ("raw", raw)):
                z64 = z.double()
                sums[f"{key}_sum"] = sums.get(f"{key}_sum", 0) + z64.sum(reduce).cpu().numpy()
                sums[f"{key}_sumsq"] = sums.get(f"{key}_sumsq", 0) + z64.square().sum(reduce).cpu().numpy()
            count += raw.numel() // raw.shape[1]
            out = stored.cpu().numpy().astype(store)
            for name, label, z in zip(names, labels, out, strict=True):
                path = dest / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_npy(path, z)
                entries.append([name, label])
        if progress is not None:
            progress(len(items[start : start + job["batch_size"]]))
    manifest = {
        "shard": job["shard"],
        "images": len(items),
        "entries": entries,
        "skipped": skipped,
        "count": count,
        **{k: v.tolist() for k, v in sums.items()},
    }
    _write_json(dest / SHARDS / f"{job['shard']:06d}.json", manifest)
    return manifest


def _encode_shard_in_worker(job: dict[str, Any]) -> dict[str, Any]:
    return encode_shard(job)


# -- the whole folder ------------------------------------------------------------------------------------------
def _moments(manifests: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    n = sum(m["count"] for m in manifests if m["count"])
    s = sum(np.asarray(m[f"{key}_sum"]) for m in manifests if m["count"])
    sq = sum(np.asarray(m[f"{key}_sumsq"]) for m in manifests if m["count"])
    mean = s / n
    var = np.maximum(sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    return mean.tolist(), np.sqrt(var).tolist()


def finish(dest: Path, manifests: list[dict[str, Any]], run_config: dict[str, Any]) -> dict[str, Any]:
    """``dataset.json``, ``latent_stats.json`` and ``skipped.txt`` from every shard's manifest, in shard order."""
    manifests = sorted(manifests, key=lambda m: m["shard"])
    entries = [e for m in manifests for e in m["entries"]]
    if not entries:
        raise ValueError(f"no image of {run_config['source']} could be encoded: nothing to write to {dest}")
    skipped = [s for m in manifests for s in m["skipped"]]
    labelled = all(e[1] is not None for e in entries)
    _write_json(dest / "dataset.json", {"labels": entries if labelled else [[e[0], None] for e in entries]})
    mean, std = _moments(manifests, "stored")
    raw_mean, raw_std = _moments(manifests, "raw")
    stats = {
        "mean": mean,
        "std": std,
        "raw_mean": raw_mean,
        "raw_std": raw_std,
        "latents": len(entries),
        "positions": sum(m["count"] for m in manifests),
        "stored": "raw" if run_config["raw"] else "tokenizer.encode (normalised by the tokenizer's statistics)",
        "tokenizer": run_config["tokenizer"],
        "resolution": run_config["resolution"],
        "hflip": run_config["hflip"],
    }
    _write_json(dest / "latent_stats.json", stats)
    tmp = dest / ".skipped.txt.tmp"
    tmp.write_text("".join(f"{p}\t{r}\n" for p, r in skipped), encoding="utf-8")
    os.replace(tmp, dest / "skipped.txt")
    return {"latents": len(entries), "skipped": len(skipped), "stats": stats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vision.data import list_image_folder

    args = parse_args(argv)
    source, dest = Path(args.source), Path(args.dest)
    t0 = time.perf_counter()
    files, labels, classes = list_image_folder(source)
    if args.max_images is not None:
        files, labels = files[: args.max_images], labels[: args.max_images]
    label_of = labels if classes else [None] * len(files)
    spec = tokenizer_spec(args)
    tok = build_tokenizer(spec, "cpu")  # the description goes into the fingerprint; workers build their own
    listing = hashlib.sha1("\n".join(files).encode("utf-8")).hexdigest()
    run_config = {
        "source": str(source.resolve()),
        "images": len(files),
        "listing_sha1": listing,
        "classes": len(classes),
        "resolution": args.resolution,
        "hflip": args.hflip,
        "raw": args.raw,
        "sample": args.sample,
        "seed": args.seed,
        "store_dtype": args.store_dtype,
        "shard_size": args.shard_size,
        "tokenizer": describe_tokenizer(tok),
    }
    (dest / SHARDS).mkdir(parents=True, exist_ok=True)
    cfg_path = dest / "encode_config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
        if diff:
            raise ValueError(
                f"{dest} holds latents of another run (differs in {diff}): resume with the same options, or choose "
                "a new --dest (or remove the folder)"
            )
    else:
        _write_json(cfg_path, run_config)
    n_shards = (len(files) + args.shard_size - 1) // args.shard_size
    done: list[dict[str, Any]] = []
    jobs = []
    for k in range(n_shards):
        manifest = dest / SHARDS / f"{k:06d}.json"
        if manifest.exists():
            done.append(json.loads(manifest.read_text(encoding="utf-8")))
            continue
        lo, hi = k * args.shard_size, min(len(files), (k + 1) * args.shard_size)
        jobs.append(
            {
                "shard": k,
                "files": files[lo:hi],
                "labels": label_of[lo:hi],
                "source": str(source),
                "dest": str(dest),
                "resolution": args.resolution,
                "hflip": args.hflip,
                "raw": args.raw,
                "store_dtype": args.store_dtype,
                "on_error": args.on_error,
                "batch_size": args.batch_size,
                "seed": args.seed,
            }
        )
    todo = sum(len(j["files"]) for j in jobs)
    print(
        f"encode_latents: {len(files)} images in {n_shards} shards, {len(done)} done, {len(jobs)} to encode "
        f"({todo} images, {'with' if args.hflip else 'without'} mirror copies)",
        file=sys.stderr,
    )
    from tqdm import tqdm

    bar = tqdm(total=todo, unit="img", disable=args.no_progress, file=sys.stderr, smoothing=0.05)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    t_enc, cpu = time.perf_counter(), None
    if args.workers == 1 or len(jobs) <= 1:
        _init_worker(spec, args.device, threads, args.autocast)
        c0 = time.process_time()
        for job in jobs:
            done.append(encode_shard(job, progress=bar.update))
        cpu = time.process_time() - c0  # this process's CPU time: a throughput figure that contention does not skew
    else:
        ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread pool inherited through fork
        with ctx.Pool(args.workers, _init_worker, (spec, args.device, threads, args.autocast)) as pool:
            for manifest in pool.imap_unordered(_encode_shard_in_worker, jobs):
                done.append(manifest)
                bar.update(manifest["images"])
    bar.close()
    elapsed = time.perf_counter() - t_enc
    result = finish(dest, done, run_config)
    result.update(
        encoded_images=todo,
        encode_seconds=elapsed,
        images_per_second=todo / elapsed if todo and elapsed > 0 else None,
        encode_cpu_seconds=cpu,
        total_seconds=time.perf_counter() - t0,
    )
    print(
        f"encode_latents: wrote {result['latents']} latents to {dest} ({result['skipped']} skipped); "
        f"encoded {todo} images in {elapsed:.1f} s"
        + (f" ({result['images_per_second']:.3f} images/s)" if result["images_per_second"] else "")
        + (f", {cpu:.1f} CPU s on {threads} thread(s)" if cpu else ""),
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as err:
        sys.exit(f"encode_latents: {err}")
