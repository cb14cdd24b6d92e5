"""`flowtok-fast fid-stats`: statistics of a folder or tar equal those of its features; cached;
bad input one line."""
import os
import tarfile

import numpy as np
from PIL import Image

from flowtok_fast.evaluation import fid_stats
from flowtok_fast.evaluation.frechet import gaussian_stats, load_stats
from flowtok_fast.evaluation.inception import InceptionFeatures
from tests.evaluation.tiny_inception import save_tiny_inception


def test_folder_and_tar_give_the_same_cached_stats(tmp_path, capsys):
    inc = save_tiny_inception(tmp_path / "inc.pt")
    (tmp_path / "real" / "sub").mkdir(parents=True)
    paths = []
    for i in range(4):
        paths.append(tmp_path / "real" / ("sub" if i % 2 else "") / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "stats.npz"
    assert fid_stats.main([str(tmp_path / "real"), "--inception", inc, "--out", str(out)]) == 0
    mu, sigma, _ = load_stats(str(out), 2048)
    files = sorted(str(p) for p in paths)
    exp_mu, exp_sigma = gaussian_stats(InceptionFeatures(inc)([Image.open(f) for f in files]))
    np.testing.assert_allclose(mu, exp_mu, rtol=1e-10)
    np.testing.assert_allclose(sigma, exp_sigma, rtol=1e-8, atol=1e-12)
    stamp = os.stat(out).st_mtime_ns
    assert fid_stats.main([str(tmp_path / "real"), "--inception", inc, "--out", str(out)]) == 0
    assert os.stat(out).st_mtime_ns == stamp  # reused, not recomputed

    with tarfile.open(tmp_path / "real.tar", "w") as tar:
        tar.add(tmp_path / "real", arcname="real")
    assert fid_stats.main([str(tmp_path / "real.tar"), "--inception", inc, "--out", str(tmp_path / "t.npz")]) == 0
    np.testing.assert_allclose(load_stats(str(tmp_path / "t.npz"))[0], mu, rtol=1e-10)

    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert fid_stats.main([str(tmp_path / "empty"), "--inception", inc, "--out", str(tmp_path / "e.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowtok-fast fid-stats: error:") and "need at least 2" in err and "\n" not in err
    assert not (tmp_path / "e.npz").exists()
