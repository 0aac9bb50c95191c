"""Statistics of feature sets: Fréchet distance, kernel inception distance, precision/recall.

All three compare two sets of feature vectors (rows), computed by the same feature network:

* :func:`frechet_distance` (FD; the FID when the features are the FID Inception's) between
  the Gaussians fitted to the two sets: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
  It needs only each set's mean and covariance (:class:`FeatureStats`).
* :func:`kernel_distance` (KID, Bińkowski et al. 2018): the unbiased estimate of the squared
  MMD with the kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets. Needs the
  features themselves.
* :func:`precision_recall` (Kynkäänniemi et al. 2019): the fraction of generated samples
  inside the real data's k-NN manifold, and the fraction of real samples inside the generated
  samples' one. Needs the features themselves.

Everything is computed in float64 and none of the results depends on the order of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


# ----------------------------------------------------------------------------- Gaussians
class FeatureStats:
    """Streaming mean and covariance of feature rows, in float64.

    Rows are accumulated relative to a shift (the first batch's mean), which keeps the
    ``sum(x x^T) - n mu mu^T`` formula accurate when features have a large mean.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> FeatureStats:
        x = _as_float64(features)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        if self._shift is None:
            self.dim = x.shape[1] if self.dim is None else self.dim
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, expected {self.dim}")
        centred = x - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += x.shape[0]
        return self

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (divides by N - 1)."""
        self._need(2)
        offset = self._sum / self.count
        cov = (self._outer - self.count * np.outer(offset, offset)) / (self.count - 1)
        return (cov + cov.T) / 2

    def _need(self, count: int) -> None:
        if self.count < count:
            raise ValueError(f"need at least {count} feature vectors, have {self.count}")


def gaussian(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of the rows of ``features``."""
    stats = FeatureStats().update(features)
    return stats.mean, stats.cov


def _clip_rounding(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (|value| below the usual rank
    tolerance ``max * n * eps``, or negative) set to zero before any square root."""
    tolerance = max(float(np.abs(values).max(initial=0.0)), 0.0) * len(values) * np.finfo(np.float64).eps
    return np.where(values > tolerance, values, 0.0)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_clip_rounding(values))) @ vectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2))`` for PSD S1, S2.

    S1 S2 is similar to the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``, so its square
    root's trace is the sum of the square roots of that matrix's (real, non-negative)
    eigenvalues: no complex square root, and singular covariances (fewer samples than
    dimensions) are fine.
    """
    root = sqrtm_psd(cov1)
    middle = root @ cov2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(_clip_rounding(values)).sum())


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64."""
    mu1, mu2 = _as_float64(mu1).ravel(), _as_float64(mu2).ravel()
    cov1, cov2 = np.atleast_2d(_as_float64(cov1)), np.atleast_2d(_as_float64(cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} {mu2.shape}, covariances {cov1.shape} {cov2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt_product(cov1, cov2)
    return max(float(value), 0.0)


def frechet_distance_to_samples(mu1, cov1, features) -> float:
    """FD between N(mu1, cov1) and the Gaussian fitted to ``features`` (rows).

    Exact, and much cheaper than :func:`frechet_distance` when there are fewer rows than
    dimensions: with ``S2 = B^T B`` (B the centred rows over sqrt(n - 1)), the non-zero
    eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` are those of the small matrix ``B S1 B^T``.
    """
    x = _as_float64(features)
    mu1, cov1 = _as_float64(mu1).ravel(), np.atleast_2d(_as_float64(cov1))
    count, dim = x.shape
    if dim != mu1.size or cov1.shape != (dim, dim):
        raise ValueError(f"mismatched statistics: features {x.shape}, mean {mu1.shape}, covariance {cov1.shape}")
    if count < 2:
        raise ValueError("need at least 2 feature vectors")
    mu2 = x.mean(axis=0)
    if count > dim:
        return frechet_distance(mu1, cov1, mu2, np.cov(x, rowvar=False))
    b = (x - mu2) / np.sqrt(count - 1)
    small = b @ cov1 @ b.T
    trace_sqrt = float(np.sqrt(_clip_rounding(np.linalg.eigvalsh((small + small.T) / 2))).sum())
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(cov1) + (b * b).sum() - 2 * trace_sqrt), 0.0)


def frechet_distance_of(features1, features2) -> float:
    """FD between the Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian(features1), *gaussian(features2))


# ----------------------------------------------------------------------------- KID
def canonical_order(features: np.ndarray) -> np.ndarray:
    """A permutation that sorts rows by content, so subsets do not depend on the input order."""
    direction = np.random.default_rng(12345).standard_normal(features.shape[1])
    keys = features @ direction
    return np.lexsort((features[:, 0], keys))


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        k = a @ b.T
        k /= d
        k += 1
        return k * k * k

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    m, n = x.shape[0], y.shape[0]
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


@dataclass
class KID:
    mean: float
    std: float
    subset_size: int
    subsets: int


def kernel_distance(real, fake, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> KID:
    """KID: the polynomial-kernel unbiased MMD^2, averaged over ``subsets`` random subsets of
    ``min(subset_size, len(real), len(fake))`` rows of each set (one exact estimate when the
    subsets are the whole sets)."""
    x, y = _as_float64(real), _as_float64(fake)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs two (N, D) feature sets of the same D, got {x.shape} and {y.shape}")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    x, y = x[canonical_order(x)], y[canonical_order(y)]
    if size == len(x) == len(y):
        value = _polynomial_mmd(x, y)
        return KID(value, 0.0, size, 1)
    rng = np.random.default_rng(seed)
    values = [
        _polynomial_mmd(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ]
    return KID(float(np.mean(values)), float(np.std(values)), size, subsets)


# ----------------------------------------------------------------------------- precision / recall
def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        # the k+1-th smallest: the point itself is its own nearest neighbour at distance 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_fraction(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = 0
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls."""
    x = torch.as_tensor(_as_float64(real))
    y = torch.as_tensor(_as_float64(fake))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"precision/recall needs two (N, D) feature sets of the same D, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(len(x), len(y)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors in each set")
    precision = _inside_fraction(y, x, _kth_neighbour_radii(x, k, chunk), chunk)
    recall = _inside_fraction(x, y, _kth_neighbour_radii(y, k, chunk), chunk)
    return precision, recall


def _as_float64(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
