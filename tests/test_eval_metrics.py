"""Fréchet distance vs float64 / 40-digit references, precision/recall vs brute force, npz checks."""

import mpmath
import numpy as np
import pytest
import scipy.linalg

from dit_jax.eval import (
    EvalError,
    check_enough_samples,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_reference,
    load_samples,
    manifold_radii,
    precision_recall,
)

# ---------------------------------------------------------------- Fréchet distance


def sqrtm_fid(mu1, sigma1, mu2, sigma2):
    """The ADM / pytorch-fid formula (scipy.linalg.sqrtm of the product), for well-conditioned inputs."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def mpmath_fid(feats_a, feats_b, digits=40):
    """FD from features at 40 significant digits: sum of sqrt of the eigenvalues of S1 S2 (mpmath.eig)."""
    mpmath.mp.dps = digits

    def stats(x):
        n, d = x.shape
        m = mpmath.matrix(x.tolist())
        mu = [mpmath.fsum(m[i, j] for i in range(n)) / n for j in range(d)]
        centred = mpmath.matrix(n, d)
        for i in range(n):
            for j in range(d):
                centred[i, j] = m[i, j] - mu[j]
        return mu, centred.T * centred / (n - 1)

    (mu1, s1), (mu2, s2) = stats(feats_a), stats(feats_b)
    eigenvalues = mpmath.eig(s1 * s2, left=False, right=False)
    trace_sqrt = mpmath.fsum(mpmath.sqrt(max(mpmath.re(e), 0)) for e in eigenvalues)
    d = len(mu1)
    value = mpmath.fsum((mu1[j] - mu2[j]) ** 2 for j in range(d))
    value += mpmath.fsum(s1[j, j] + s2[j, j] for j in range(d)) - 2 * trace_sqrt
    return float(value)


def random_rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_diagonal_closed_form_including_zero_variances():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 3, 50), rng.uniform(0, 3, 50)
    a[:10] = 0.0  # rank deficient
    b[5:15] = 0.0
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(1)
    q = random_rotation(rng, 30)
    a, b = rng.uniform(0, 5, 30), rng.uniform(0, 5, 30)
    a[::3] = 0.0
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_well_conditioned_matches_sqrtm_formula(seed):
    rng = np.random.default_rng(seed)
    feats_a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    feats_b = rng.normal(size=(300, 32)) * rng.uniform(0.5, 2, 32) + 0.3
    stats = (*feature_statistics(feats_a), *feature_statistics(feats_b))
    assert frechet_distance(*stats) == pytest.approx(sqrtm_fid(*stats), rel=1e-9)
    assert fid_from_features(feats_a, feats_b) == pytest.approx(sqrtm_fid(*stats), rel=1e-9)


@pytest.mark.parametrize(("n", "m", "d", "scale"), [(5, 7, 12, 1.0), (8, 9, 14, 100.0), (6, 40, 10, 1.0)])
def test_rank_deficient_matches_high_precision_reference(n, m, d, scale):
    rng = np.random.default_rng(n * m)
    feats_a = rng.normal(size=(n, d)) * scale
    feats_b = rng.normal(size=(m, d)) * scale + 0.1 * scale
    expected = mpmath_fid(feats_a, feats_b)
    stats = (*feature_statistics(feats_a), *feature_statistics(feats_b))
    # Exact to ~1e-12 (scipy's sqrtm is off by ~1e-8 relative here, or fails outright).
    assert frechet_distance(*stats) == pytest.approx(expected, rel=1e-11)
    assert fid_from_features(feats_a, feats_b) == pytest.approx(expected, rel=1e-11)


def test_ill_conditioned_matches_high_precision_reference():
    rng = np.random.default_rng(3)
    d = 12
    scales, q = np.logspace(-5, 3, d), random_rotation(rng, d)
    feats_a = (rng.normal(size=(40, d)) * scales) @ q
    feats_b = (rng.normal(size=(30, d)) * scales[::-1]) @ q + 0.01
    expected = mpmath_fid(feats_a, feats_b)
    # Condition number ~1e16: rounding of the covariances themselves limits any method to ~1e-8.
    assert fid_from_features(feats_a, feats_b) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("n", [5, 300])  # fewer and more samples than dimensions
def test_identity_symmetry_and_rotation_invariance(n):
    rng = np.random.default_rng(n)
    d = 24
    feats_a = rng.normal(size=(n, d)) * 3
    feats_b = rng.normal(size=(n + 3, d)) + 1
    stats_a, stats_b = feature_statistics(feats_a), feature_statistics(feats_b)
    assert abs(frechet_distance(*stats_a, *stats_a)) < 1e-8
    assert abs(fid_from_features(feats_a, feats_a)) < 1e-8
    forward = frechet_distance(*stats_a, *stats_b)
    assert frechet_distance(*stats_b, *stats_a) == pytest.approx(forward, rel=1e-10)
    assert fid_from_features(feats_b, feats_a) == pytest.approx(forward, rel=1e-10)
    q = random_rotation(rng, d)
    assert fid_from_features(feats_a @ q, feats_b @ q) == pytest.approx(forward, rel=1e-9)


def test_fid_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(EvalError, match="feature dimensions differ"):
        fid_from_features(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(EvalError, match="at least 2"):
        fid_from_features(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
    with pytest.raises(EvalError, match="NaN"):
        fid_from_features(np.full((3, 4), np.nan), rng.normal(size=(10, 4)))
    with pytest.raises(EvalError, match="expected"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- precision / recall


def brute_force_precision_recall(ref, samples, k=3):
    """Kynkäänniemi et al.: balls of radius = distance to the k-th nearest other point (plain numpy)."""

    def radii(x):
        dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(dist, np.inf)
        return np.sort(dist, axis=1)[:, k - 1]

    cross = np.sqrt(((ref[:, None] - samples[None]) ** 2).sum(-1))  # [N_ref, N_samples]
    precision = (cross <= radii(ref)[:, None]).any(axis=0).mean()
    recall = (cross <= radii(samples)[None, :]).any(axis=1).mean()
    return precision, recall


@pytest.mark.parametrize(("seed", "blocks"), [(0, (7, 11)), (1, (1024, 8192)), (2, (16, 5))])
def test_precision_recall_matches_brute_force(seed, blocks):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(97, 6))
    samples = rng.normal(size=(61, 6)) * 1.4 + 0.4
    got = precision_recall(ref, samples, row_block=blocks[0], col_block=blocks[1])
    assert got == pytest.approx(brute_force_precision_recall(ref, samples), abs=1e-12)
    radii = manifold_radii(ref, row_block=blocks[0], col_block=blocks[1])
    dist = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_allclose(np.sqrt(radii), np.sort(dist, axis=1)[:, 2], rtol=1e-4)


def test_precision_recall_sanity_cases():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8))
    assert precision_recall(feats, feats) == (1.0, 1.0)
    assert precision_recall(feats, feats + 100.0) == (0.0, 0.0)
    precision, recall = precision_recall(feats, feats[:25])  # a subset: all inside, covers part
    assert precision == 1.0 and 0.4 < recall < 1.0
    with pytest.raises(EvalError, match="more than 3"):
        precision_recall(feats, feats[:3])
    with pytest.raises(EvalError, match="feature dimensions differ"):
        precision_recall(feats, feats[:, :4])


# ---------------------------------------------------------------- sample and reference files


def save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def one_line_error(func, *args, match):
    with pytest.raises(EvalError, match=match) as info:
        func(*args)
    assert "\n" not in str(info.value)


def test_load_samples_reads_adm_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    loaded, labels = load_samples(save(tmp_path / "a.npz", arr_0=images, arr_1=np.arange(6)))
    np.testing.assert_array_equal(loaded, images)
    assert labels.dtype == np.int32 and labels.tolist() == list(range(6))
    loaded, labels = load_samples(save(tmp_path / "b.npz", arr_0=images[..., :1]))
    assert loaded.shape == (6, 8, 8, 1) and labels is None


def test_load_samples_rejects_bad_files(tmp_path):
    good = np.zeros((4, 8, 8, 1), np.uint8)
    one_line_error(load_samples, str(tmp_path / "missing.npz"), match="does not exist")
    one_line_error(load_samples, str(tmp_path), match="is a folder")
    np.save(tmp_path / "plain.npy", good)
    one_line_error(load_samples, str(tmp_path / "plain.npy"), match="not an .npz")
    one_line_error(load_samples, save(tmp_path / "k.npz", images=good), match="no 'arr_0'")
    one_line_error(load_samples, save(tmp_path / "r.npz", arr_0=good[..., 0]), match=r"x\[\.\.\., None\]")
    chw = np.zeros((4, 3, 8, 8), np.uint8)
    one_line_error(load_samples, save(tmp_path / "c.npz", arr_0=chw), match="transpose")
    unit = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    one_line_error(load_samples, save(tmp_path / "f1.npz", arr_0=unit), match=r"\(x \* 255\)")
    one_line_error(
        load_samples, save(tmp_path / "f2.npz", arr_0=unit * 2 - 1), match=r"\(\(x \+ 1\) \* 127\.5\)"
    )
    one_line_error(load_samples, save(tmp_path / "i.npz", arr_0=good.astype(np.int64)), match="astype")
    one_line_error(load_samples, save(tmp_path / "e.npz", arr_0=good[:0]), match="no images")
    mismatch = save(tmp_path / "l.npz", arr_0=good, arr_1=np.arange(3))
    one_line_error(load_samples, mismatch, match="holds 4 images")
    one_line_error(load_samples, save(tmp_path / "lf.npz", arr_0=good, arr_1=np.ones(4)), match="integers")
    one_line_error(
        load_samples, save(tmp_path / "ln.npz", arr_0=good, arr_1=-np.ones(4, int)), match="negative"
    )


def test_load_reference(tmp_path):
    mu, sigma = np.zeros(5), np.eye(5)
    ref = load_reference(
        save(tmp_path / "s.npz", mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3]), ["fid"]
    )
    assert sorted(ref) == ["mu", "mu_s", "sigma", "sigma_s"]
    images = np.zeros((4, 8, 8, 3), np.uint8)
    assert sorted(load_reference(save(tmp_path / "i.npz", arr_0=images), ["fid", "sfid", "prec_recall"])) == [
        "arr_0"
    ]
    stats_only = save(tmp_path / "t.npz", mu=mu, sigma=sigma)
    with pytest.raises(EvalError, match="mu_s\\+sigma_s or arr_0"):
        load_reference(stats_only, ["sfid"])
    with pytest.raises(EvalError, match="prec_recall"):
        load_reference(stats_only, ["prec_recall"])
    with pytest.raises(EvalError, match="unknown metric"):
        load_reference(stats_only, ["fidd"])
    with pytest.raises(EvalError, match="expected \\[d\\] and \\[d, d\\]"):
        load_reference(save(tmp_path / "b.npz", mu=mu, sigma=np.eye(4)))
    with pytest.raises(EvalError, match="only one of"):
        load_reference(save(tmp_path / "h.npz", mu=mu))


def test_check_enough_samples():
    check_enough_samples(4, ["fid", "prec_recall"])
    with pytest.raises(EvalError, match="at least 2"):
        check_enough_samples(1, ["fid"])
    with pytest.raises(EvalError, match="at least 4"):
        check_enough_samples(3, ["prec_recall"])
