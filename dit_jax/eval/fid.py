"""Fréchet distance between Gaussians fitted to features, in float64, robust to rank deficiency.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

The standard evaluators (ADM `evaluations/evaluator.py`, pytorch-fid) take `scipy.linalg.sqrtm(S1 @ S2)`,
a non-symmetric Schur-based square root that loses accuracy, returns complex values or fails outright
when the covariances are singular (fewer samples than feature dimensions) or ill-conditioned; they
then retry with 1e-6 added to the diagonals, which changes the answer.

Here the trace term is computed from symmetric decompositions only. With S = U diag(l) U^T and
P = S^{1/2} = U diag(sqrt(l)) U^T (eigenvalues clipped at 0), the eigenvalues of S1 S2 are those of
(P1 P2)(P1 P2)^T, so tr((S1 S2)^{1/2}) is the nuclear norm (sum of singular values) of

    P1 P2 ~ diag(sqrt(l1)) (U1^T U2) diag(sqrt(l2)),

computed with a backward-stable SVD. This equals the sqrtm formula when the covariances are well
conditioned, needs no diagonal offset, and never takes the square root of a rounding error of the
product (the eigenvalue route, sqrt(eig(P1 S2 P1)), turns 1e-16 errors into 1e-8 ones).

From features, `fid_from_features` goes further when a set has fewer samples than dimensions: with
centred features A (n x d) and B (m x d), S1 = A^T A / (n-1) and the singular values of
A B^T / sqrt((n-1)(m-1)) (n x m) give the trace term without forming any square root at all.
"""

from __future__ import annotations

import numpy as np

from dit_jax.eval.samples_io import EvalError

# Factor the features directly (n x m matrix) instead of the d x d covariances when n * m <= this.
_MAX_FACTOR_ELEMENTS = 16_000_000


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and covariance [d, d] (unbiased, `np.cov(rowvar=False)`) of features [N, d], in float64."""
    feats = _check_features(feats, "features")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (see module docstring).

    Covariances must be symmetric positive semi-definite up to rounding; they may be singular.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_statistics(mu1, sigma1, "first")
    _check_statistics(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise EvalError(
            f"feature dimensions differ: mean of {mu1.shape[0]} vs {mu2.shape[0]}; both statistics must "
            "come from the same feature extractor"
        )
    diff = mu1 - mu2
    trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N, d] and [M, d]."""
    feats_a = _check_features(feats_a, "first feature set")
    feats_b = _check_features(feats_b, "second feature set")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise EvalError(
            f"feature dimensions differ: {feats_a.shape[1]} vs {feats_b.shape[1]}; both feature sets "
            "must come from the same feature extractor"
        )
    n, m, d = len(feats_a), len(feats_b), feats_a.shape[1]
    if min(n, m) - 1 >= d or n * m > _MAX_FACTOR_ELEMENTS:
        return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))
    # Rank-deficient: work with the centred features themselves (exact, no square roots).
    mu_a, mu_b = feats_a.mean(axis=0), feats_b.mean(axis=0)
    centred_a, centred_b = feats_a - mu_a, feats_b - mu_b
    scale_a, scale_b = 1.0 / np.sqrt(n - 1), 1.0 / np.sqrt(m - 1)
    trace_a = np.sum(centred_a * centred_a) * scale_a**2
    trace_b = np.sum(centred_b * centred_b) * scale_b**2
    cross = (centred_a * scale_a) @ (centred_b * scale_b).T
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(max(diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt, 0.0))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) for symmetric PSD matrices, as the nuclear norm of P1 P2."""
    root1, vecs1 = _psd_sqrt_eigh(sigma1)
    root2, vecs2 = _psd_sqrt_eigh(sigma2)
    keep1, keep2 = root1 > 0, root2 > 0  # zeros contribute nothing; skip them
    core = root1[keep1, None] * (vecs1[:, keep1].T @ vecs2[:, keep2]) * root2[None, keep2]
    if core.size == 0:
        return 0.0
    return float(np.linalg.svd(core, compute_uv=False).sum())


def _psd_sqrt_eigh(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square roots of the eigenvalues of symmetric PSD `sigma`, and its eigenvectors.

    Eigenvalues below d * eps * max|eigenvalue| (numpy's `matrix_rank` tolerance) are rounding noise
    of eigh, whose absolute error is about eps * |sigma|; they are set to exactly 0, as for a
    rank-deficient covariance they should be. Left in, their square roots (~1e-8 |sigma|^{1/2}
    each) would bias the trace term.
    """
    vals, vecs = np.linalg.eigh((sigma + sigma.T) / 2)
    tol = len(vals) * np.finfo(np.float64).eps * max(np.abs(vals).max(initial=0.0), 0.0)
    return np.sqrt(np.where(vals > tol, vals, 0.0)), vecs


def _check_features(feats: np.ndarray, what: str) -> np.ndarray:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2:
        raise EvalError(f"{what} must be a 2-D array [num_samples, dim], got shape {feats.shape}")
    if len(feats) < 2:
        raise EvalError(
            f"{what} has {len(feats)} sample(s); a Fréchet distance needs at least 2 to estimate a covariance"
        )
    if not np.isfinite(feats).all():
        raise EvalError(f"{what} contains NaN or infinite values; check the images and the feature extractor")
    return feats


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalError(
            f"{which} statistics have mean shape {mu.shape} and covariance shape {sigma.shape}; "
            "expected [d] and [d, d]"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"{which} statistics contain NaN or infinite values")
