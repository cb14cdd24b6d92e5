"""Our Fréchet distance against the closed form and against clean-fid's own implementation."""
import numpy as np
import pytest
from cleanfid.fid import frechet_distance as cleanfid_frechet

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation.frechet import (frechet_distance, frechet_distance_to_features, gaussian_stats,
                                             load_stats, save_stats)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_closed_form_for_two_known_gaussians():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr (S1 S2)^(1/2) = sum sqrt(a b), so
    # d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert rel(got, expected) < 1e-6


def test_matches_cleanfid_on_the_same_features_both_routes():
    rng = np.random.default_rng(2)
    d = 48
    mix = rng.normal(size=(d, d))
    gen = rng.normal(size=(30, d)) @ mix + 0.5  # fewer vectors than dimensions: the N x N route
    ref = rng.normal(size=(400, d)) @ (mix + 0.3 * rng.normal(size=(d, d)))
    mu_r, s_r = gaussian_stats(ref)
    theirs = cleanfid_frechet(*gaussian_stats(gen), mu_r, s_r)
    assert rel(frechet_distance(*gaussian_stats(gen), mu_r, s_r), theirs) < 1e-6
    assert rel(frechet_distance_to_features(gen, mu_r, s_r), theirs) < 1e-6
    many = rng.normal(size=(300, d)) @ mix  # more vectors than dimensions: the D x D route
    assert rel(frechet_distance_to_features(many, mu_r, s_r), cleanfid_frechet(*gaussian_stats(many), mu_r, s_r)) < 1e-6


def test_a_set_against_itself_is_zero_at_inception_size():
    feats = np.random.default_rng(3).normal(size=(24, 2048))  # rank 23 covariance in 2048 dimensions
    assert abs(frechet_distance_to_features(feats, *gaussian_stats(feats))) < 1e-3


def test_stats_files_are_checked(tmp_path):
    good = tmp_path / "s.npz"
    save_stats(str(good), np.zeros(8), np.eye(8), key="k")
    mu, sigma, meta = load_stats(str(good), 8)
    assert mu.shape == (8,) and meta == {"key": "k"}
    with pytest.raises(UserError, match="dimension 8.*2048"):
        load_stats(str(good), 2048)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(8), sigma=np.eye(7))
    with pytest.raises(UserError, match=r"mu \[D\] and sigma \[D, D\]"):
        load_stats(str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read as .npz"):
        load_stats(str(tmp_path / "junk.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "junk.npz", "s.npz"]  # no temporaries left
