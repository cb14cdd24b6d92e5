"""The Inception path offline: a stand-in TorchScript file in clean-fid's layout, loaded by
clean-fid's own wrapper; our preprocessing gives exactly clean-fid's features; bad files are UserErrors."""
import numpy as np
import pytest
import torch
from PIL import Image

from flowtok_fast.errors import UserError
from flowtok_fast.evaluation.inception import EXPECTED_NAME, InceptionFeatures
from tests.evaluation.tiny_inception import save_tiny_inception


def random_images(tmp_path, n, size=48):
    paths = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def test_features_equal_cleanfids_own_pipeline(tmp_path):
    from cleanfid.fid import get_files_features

    ours = InceptionFeatures(save_tiny_inception(tmp_path / "any-name.pt"), batch_size=3)
    files = random_images(tmp_path, 5)
    got = ours([Image.open(f) for f in files])
    expected = get_files_features(files, model=ours.model, num_workers=0, batch_size=2, device=torch.device("cpu"),
                                  mode="clean", verbose=False)
    assert got.shape == (5, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.std() > 0


def test_missing_and_corrupt_inception_files(tmp_path):
    with pytest.raises(UserError, match=EXPECTED_NAME) as err:
        InceptionFeatures(None)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="file not found"):
        InceptionFeatures(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="not a TorchScript Inception") as err:
        InceptionFeatures(str(bad))
    assert "\n" not in str(err.value)
    wrong = tmp_path / "wrong.pt"  # TorchScript, but not Inception: fails on the first batch, named
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 3))).save(str(wrong))
    with pytest.raises(UserError):
        InceptionFeatures(str(wrong))([Image.new("RGB", (8, 8))])


class _FlatLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1)[:, :2048]  # a view that an NHWC (channels_last) tensor refuses


class _FlatNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FlatLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_a_network_refusing_channels_last_falls_back_to_the_plain_layout(tmp_path):
    """On a CPU the batch goes in as channels_last (faster convolutions); a network that cannot
    take that layout still gets the right features, in NCHW order."""
    import warnings

    path = str(tmp_path / "flat.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_FlatNetwork()).save(path)
    ours = InceptionFeatures(path, batch_size=2)
    assert ours.memory_format == torch.channels_last
    images = [Image.open(p) for p in random_images(tmp_path, 3)]
    got = ours(images)
    assert ours.memory_format == torch.contiguous_format
    expected = np.stack([((ours.preprocess(im) - 128) / 128).reshape(-1)[:2048].double().numpy() for im in images])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
