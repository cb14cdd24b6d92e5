"""Gaussian statistics of features and the Fréchet distance between two Gaussians:
d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), in float64 with eigh: no complex
square roots, and a set against itself gives 0 up to rounding even when S is singular (fewer
images than feature dimensions), where scipy's sqrtm needs an eps fallback. With the features of
one side at hand and fewer of them than dimensions (a quick check on a few hundred images), S1 =
A^T A is low-rank and the same trace comes from the small matrix A S2 A^T: N x N instead of D x D."""
from __future__ import annotations

import os

import numpy as np

from flowtok_fast.errors import UserError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] -> mean [D], covariance [D, D] (unbiased, like clean-fid's np.cov(rowvar=False))."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise UserError(f"need at least 2 feature vectors [N, D] for statistics, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(sigma)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mean {mu1.shape} / {mu2.shape}, covariance {s1.shape} / {s2.shape}")
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    inner = root1 @ ((s2 + s2.T) / 2) @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_to_features(features: np.ndarray, mu2, sigma2) -> float:
    """frechet_distance(*gaussian_stats(features), mu2, sigma2), through the N x N route when N <= D."""
    feats = np.asarray(features, dtype=np.float64)
    n, d = feats.shape
    if n - 1 >= d:
        return frechet_distance(*gaussian_stats(feats), mu2, sigma2)
    mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (d,) or s2.shape != (d, d):
        raise UserError(f"statistics do not match: features have dimension {d}, mean {mu2.shape}, covariance {s2.shape}")
    mu1 = feats.mean(axis=0)
    a = (feats - mu1) / np.sqrt(n - 1)  # S1 = a^T a
    small = a @ ((s2 + s2.T) / 2) @ a.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + np.trace(s2) - 2 * tr_covmean)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    """mu, sigma (+ string metadata, e.g. the fingerprint of what they were computed from); atomic."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"  # np.savez appends .npz unless the name has it
    np.savez(tmp, mu=mu, sigma=sigma, **{k: np.array(str(v)) for k, v in meta.items()})
    os.replace(tmp, path)


def load_stats(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A .npz with mu [D] and sigma [D, D] (clean-fid's layout); D checked against `dim`."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - zip/format errors have many types
        raise UserError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from None
    if "mu" not in data or "sigma" not in data:
        raise UserError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(data)}")
    mu, sigma = data.pop("mu"), data.pop("sigma")
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d):
        raise UserError(f"{path}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if dim is not None and d != dim:
        raise UserError(f"{path}: statistics have dimension {d}, the Inception features have {dim}: "
                        "expected statistics of Inception pool3 features (2048)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu/sigma contain NaN or inf")
    return mu, sigma, {k: str(v) for k, v in data.items() if v.ndim == 0}
