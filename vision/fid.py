"""FID, sFID and Inception Score with the TF-ported Inception weights from a local file; ADM reference batches.

- FID (Heusel et al. 2017): the Fréchet distance of Gaussians fitted to the 2048-d pool features. Computed by the
  project's one eigh-based implementation, :func:`unirep.metrics.frechet_distance_gaussians`.
- sFID (Nash et al. 2021; the ADM evaluator, openai/guided-diffusion ``evaluations/evaluator.py``): the same on the
  first 7 channels of ``mixed_6/conv`` (17 x 17 x 7 = 2023 values per image, NHWC order).
- Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` per split, mean and std over 10 splits,
  on the 1008 logits without the bias (torch-fidelity ``metric_isc.py``; it shuffles the samples with seed 2020
  first, here the splits are contiguous as in ADM's evaluator, whose splits are 5,000 samples each).

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (mseitzer/pytorch-fid, release ``fid_weights``) or
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (same parameter names), or a safetensors
conversion (``python -m vision.fid convert IN.pth OUT.safetensors``). Read with ``torch.load(weights_only=True)``
(no pickled code runs) or safetensors; nothing is ever downloaded: a missing file stops with where to put it.

Preprocessing as pytorch-fid: images in [-1, 1] (grey images repeated to 3 channels) are first quantised to the 256
levels of an 8-bit image (samples are compared as the PNGs or ``uint8`` npz a user would save; ``quantize=False``
skips it), then resized to 299 x 299 bilinearly (``align_corners=False``). pytorch-fid resizes in [0, 1] and maps to
[-1, 1] afterwards; bilinear weights sum to one, so the order does not matter. ADM's TF graph resizes inside the graph
with TF1's ``resize_bilinear``, which samples slightly differently: at 256 px, numbers agree with ADM's to about the
first decimal, not bit for bit (torch-fidelity reimplements TF's resize for that reason).

Reference statistics (:func:`load_reference`): an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``: ``mu``,
``sigma``, and ``mu_s``, ``sigma_s`` for sFID), a file written by :func:`save_reference`, or a npz of raw images
(``arr_0``, ``uint8`` NHWC, as ADM's sample batches), whose statistics are computed with the network.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unirep.metrics import frechet_distance_gaussians
from vision.inception import FIDInceptionV3

__all__ = [
    "WEIGHTS_FILE",
    "WEIGHTS_URL",
    "load_inception",
    "save_inception",
    "preprocess",
    "inception_features",
    "GaussianStats",
    "ReferenceStats",
    "fid_from_stats",
    "inception_score",
    "load_reference",
    "save_reference",
    "reference_from_images",
    "InceptionMetrics",
]

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
INPUT_SIZE = 299
_NETS: dict[tuple[str, float, str], FIDInceptionV3] = {}


def _missing_weights(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights {path} not found. Nothing is downloaded at run time: fetch {WEIGHTS_FILE} once "
        f"({WEIGHTS_URL}, pytorch-fid's release; torch-fidelity's weights-inception-2015-12-05-6726825d.pth works "
        f"too), put it at {path} (or anywhere, and point task.inception_path / --weights at it)"
    )


def _read_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (pickle refuses objects outside weights_only's allow-list)
        raise ValueError(
            f"{path}: not a plain state dict loadable with torch.load(weights_only=True) ({err}); use pytorch-fid's "
            f"{WEIGHTS_FILE} or a safetensors file"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (an Inception state dict), got {type(state).__name__}")
    return state


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception network with the weights of ``path`` (``.pth`` or ``.safetensors``), in eval mode, frozen.

    Every parameter and buffer must be in the file with its shape (``num_batches_tracked`` may be absent: it is not
    used in eval mode); extra keys are refused, naming them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing_weights(path)
    state = _read_state(path)
    net = FIDInceptionV3()
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} (needs {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not an FID Inception-v3 state dict (pytorch-fid's {WEIGHTS_FILE}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, wrong shapes {wrong[:5]}"
        )
    net.load_state_dict(state, strict=False)
    return net.eval().requires_grad_(False).to(device)


def _cached_inception(path: str | os.PathLike, device: torch.device) -> FIDInceptionV3:
    p = Path(path).expanduser()
    key = (str(p.resolve()), p.stat().st_mtime if p.is_file() else 0.0, str(device))
    if key not in _NETS:
        _NETS.clear()  # one network (about 95 MB) in memory at a time
        _NETS[key] = load_inception(p, device)
    return _NETS[key]


def save_inception(net: FIDInceptionV3, path: str | os.PathLike) -> Path:
    """Write ``net``'s state dict: safetensors for ``.safetensors``, else ``torch.save`` (tensors only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def preprocess(images: Tensor, size: int = INPUT_SIZE, quantize: bool = True) -> Tensor:
    """``images[B, C, H, W]`` (float in [-1, 1], or ``uint8`` in [0, 255]; C = 1 or 3) -> ``[B, 3, size, size]``."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"Inception input must be images [B, C, H, W] with C = 1 or 3, got {tuple(images.shape)} (NHWC arrays: "
            "permute to NCHW; latents: decode them first)"
        )
    if images.dtype == torch.uint8:
        x = images.float() / 127.5 - 1.0
    else:
        x = images.float().clamp(-1, 1)
        if quantize:
            x = ((x + 1) * 127.5).round() / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def inception_features(
    net: FIDInceptionV3,
    images: Tensor,
    batch_size: int = 50,
    size: int = INPUT_SIZE,
    quantize: bool = True,
    progress: bool = False,
) -> dict[str, Tensor]:
    """``pool [N, 2048]``, ``logits [N, 1008]``, ``spatial [N, 2023]`` (float64, CPU) of ``images[N, C, H, W]``."""
    if images.shape[0] == 0:
        raise ValueError("inception_features got no images")
    device = next(net.parameters()).device
    out: dict[str, list[Tensor]] = {"pool": [], "logits": [], "spatial": []}
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="inception", unit="batch")
    for s in starts:
        x = preprocess(images[s : s + batch_size].to(device), size, quantize)
        for k, v in net(x).items():
            out[k].append(v.double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@dataclass
class GaussianStats:
    """Mean ``mu[d]`` and covariance ``sigma[d, d]`` (float64) of a feature set, as ADM and pytorch-fid store them."""

    mu: Tensor
    sigma: Tensor

    @classmethod
    def from_features(cls, feats: Tensor) -> GaussianStats:
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"statistics need at least 2 feature rows [n, d], got {tuple(feats.shape)}")
        feats = feats.double()
        return cls(feats.mean(0), torch.cov(feats.T).reshape(feats.shape[1], feats.shape[1]))  # unbiased, as np.cov


def fid_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """The Fréchet distance of two :class:`GaussianStats` (:func:`unirep.metrics.frechet_distance_gaussians`)."""
    if a.mu.numel() != b.mu.numel():
        raise ValueError(f"statistics of different widths: {a.mu.numel()} vs {b.mu.numel()} features")
    return frechet_distance_gaussians(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score of ``logits[N, C]``: per contiguous split ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``;
    returns the mean and (population) std over splits, as torch-fidelity."""
    n = logits.shape[0]
    if logits.dim() != 2 or not 1 <= splits <= n:
        raise ValueError(
            f"inception_score needs logits [N, C] and 1 <= splits <= N, got {tuple(logits.shape)}, {splits}"
        )
    log_p = logits.double().log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = part.exp().mean(0).log()  # log p(y) of the split
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class ReferenceStats:
    """FID statistics of the reference set (``pool``) and, when known, sFID's (``spatial``); ``source`` names it."""

    pool: GaussianStats
    spatial: GaussianStats | None = None
    source: str = ""


def reference_from_images(
    net: FIDInceptionV3, images: Tensor, batch_size: int = 50, source: str = "", progress: bool = False
) -> ReferenceStats:
    """Statistics of real images ``[N, C, H, W]`` (float in [-1, 1] or ``uint8``)."""
    feats = inception_features(net, images, batch_size, progress=progress)
    return ReferenceStats(
        GaussianStats.from_features(feats["pool"]), GaussianStats.from_features(feats["spatial"]), source
    )


def _stats(npz: Any, mu: str, sigma: str, dim: int, path: Path) -> GaussianStats:
    m, s = np.asarray(npz[mu], dtype=np.float64).reshape(-1), np.asarray(npz[sigma], dtype=np.float64)
    if m.shape != (dim,) or s.shape != (dim, dim):
        raise ValueError(f"{path}: {mu} {m.shape} / {sigma} {s.shape} must be ({dim},) / ({dim}, {dim})")
    return GaussianStats(torch.from_numpy(m), torch.from_numpy(s))


def load_reference(
    path: str | os.PathLike, net: FIDInceptionV3 | None = None, batch_size: int = 50, progress: bool = False
) -> ReferenceStats:
    """Reference statistics from a npz: ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``), else raw ``arr_0`` images."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID reference {path} not found: give an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), a "
            "file written by vision.fid.save_reference, or a npz of uint8 images (arr_0)"
        )
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        if {"mu", "sigma"} <= keys:
            spatial = _stats(npz, "mu_s", "sigma_s", 2023, path) if {"mu_s", "sigma_s"} <= keys else None
            return ReferenceStats(_stats(npz, "mu", "sigma", 2048, path), spatial, str(path))
        if "arr_0" in keys:
            images = torch.from_numpy(np.asarray(npz["arr_0"]))
        else:
            raise ValueError(f"{path} has keys {sorted(keys)}: a reference needs mu and sigma (ADM), or images arr_0")
    if images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be images [N, H, W, C] (uint8, NHWC as ADM), got {tuple(images.shape)}")
    if net is None:
        raise ValueError(f"{path} holds raw images (arr_0): computing their statistics needs the Inception network")
    return reference_from_images(net, images.permute(0, 3, 1, 2).contiguous(), batch_size, str(path), progress)


def save_reference(path: str | os.PathLike, ref: ReferenceStats) -> Path:
    """Write ``mu``, ``sigma`` (and ``mu_s``, ``sigma_s``) as ADM's reference batches name them (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": ref.pool.mu.numpy(), "sigma": ref.pool.sigma.numpy()}
    if ref.spatial is not None:
        arrays.update(mu_s=ref.spatial.mu.numpy(), sigma_s=ref.spatial.sigma.numpy())
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


class InceptionMetrics:
    """FID, sFID and Inception Score of generated images against a reference file or a set of real images.

    Args:
        weights: the Inception weights file (see the module docstring).
        reference: a reference npz (:func:`load_reference`), or ``None``: real images are passed to each call.
        batch_size: images per Inception forward.
        device: where the network runs.
        is_splits: Inception Score splits (10, fewer when there are fewer samples).
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        reference: str | os.PathLike | None = None,
        batch_size: int = 50,
        device: str | torch.device = "cpu",
        is_splits: int = 10,
    ) -> None:
        self.device = torch.device(device)
        self.net = _cached_inception(weights, self.device)
        self.batch_size, self.is_splits = int(batch_size), int(is_splits)
        self.reference = load_reference(reference, self.net, self.batch_size) if reference is not None else None

    def __call__(self, fake: Tensor, real: Tensor | None = None) -> dict[str, float]:
        ref = self.reference
        if ref is None:
            if real is None:
                raise ValueError("InceptionMetrics without a reference file needs real images to compare with")
            ref = reference_from_images(self.net, real, self.batch_size, "real images")
        feats = inception_features(self.net, fake, self.batch_size)
        out = {"fid": fid_from_stats(GaussianStats.from_features(feats["pool"]), ref.pool)}
        if ref.spatial is not None:
            out["sfid"] = fid_from_stats(GaussianStats.from_features(feats["spatial"]), ref.spatial)
        out["inception_score"], out["inception_score_std"] = inception_score(
            feats["logits"], min(self.is_splits, len(fake))
        )
        return out


def _load_images(path: Path) -> Tensor:
    """Images of a npz: ``images`` (unirep-sample: float [-1, 1], NCHW) or ``arr_0`` (ADM: uint8 NHWC)."""
    with np.load(path, allow_pickle=False) as npz:
        if "images" in npz.files:
            return torch.from_numpy(np.asarray(npz["images"]))
        if "arr_0" in npz.files:
            return torch.from_numpy(np.asarray(npz["arr_0"])).permute(0, 3, 1, 2).contiguous()
        raise ValueError(f"{path} has keys {npz.files}: expected images (unirep-sample's samples.npz) or arr_0 (ADM)")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vision.fid {score,reference,convert} ...`` (``--help`` on each)."""
    ap = argparse.ArgumentParser(prog="python -m vision.fid", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("score", help="FID/sFID/IS of a samples npz against a reference npz")
    sc.add_argument("samples"), sc.add_argument("reference")
    rf = sub.add_parser("reference", help="write mu/sigma/mu_s/sigma_s of an images npz")
    rf.add_argument("images"), rf.add_argument("out")
    for p in (sc, rf):
        p.add_argument("--weights", default=WEIGHTS_FILE), p.add_argument("--device", default="cpu")
        p.add_argument("--batch-size", type=int, default=50)
    cv = sub.add_parser("convert", help="re-save a .pth weights file as .safetensors")
    cv.add_argument("src"), cv.add_argument("dst")
    args = ap.parse_args(argv)
    if args.cmd == "convert":
        print(save_inception(load_inception(args.src), args.dst))
        return
    net = _cached_inception(args.weights, torch.device(args.device))
    if args.cmd == "reference":
        ref = reference_from_images(net, _load_images(Path(args.images)), args.batch_size, args.images, progress=True)
        print(save_reference(args.out, ref))
        return
    metrics = InceptionMetrics(args.weights, args.reference, args.batch_size, args.device)
    print(metrics(_load_images(Path(args.samples))))


if __name__ == "__main__":
    main()
