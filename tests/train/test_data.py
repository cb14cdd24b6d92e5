import pytest
import torch

from flowtok_fast.configs import TINY
from flowtok_fast.models.tokenizer import FlowTiTok
from flowtok_fast.train.data import ShardedBatches, SyntheticDataset, validate_batch
from flowtok_fast.train.frozen import ImageEncoder, latents_from_moments


def test_synthetic_items_are_deterministic_and_follow_the_contract():
    ds = SyntheticDataset(16, "moments", seed=3)
    a, b = ds.batch([1, 5]), SyntheticDataset(16, "moments", seed=3).batch([1, 5])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert validate_batch(a) == 2
    assert a["ids"][:, 0].tolist() == [49406, 49406] and (a["ids"] == 49407).sum() == 2
    px = SyntheticDataset(4, "pixels", resolution=64).batch([0, 1, 2])
    assert px["pixels"].shape == (3, 3, 64, 64) and validate_batch(px) == 3


@pytest.mark.parametrize(
    "batch, match",
    [
        ({"moments": torch.zeros(2, 32, 1, 77)}, "exactly one of 'ids'"),
        ({"ids": torch.zeros(2, 77, dtype=torch.long)}, "exactly one of 'pixels'"),
        ({"ids": torch.zeros(2, 77, dtype=torch.int32), "moments": torch.zeros(2, 32, 1, 77)}, "int64 tensor"),
        ({"ids": torch.zeros(2, 77, dtype=torch.long), "moments": torch.zeros(2, 16, 1, 77)}, "'moments' must be"),
        ({"text": ["a", "b"], "pixels": torch.zeros(2, 1, 8, 8)}, "'pixels' must be"),
        ({"text": "a cat", "pixels": torch.zeros(1, 3, 8, 8)}, "list of strings"),
    ],
)
def test_validate_batch_errors(batch, match):
    with pytest.raises(ValueError, match=match):
        validate_batch(batch)


def test_two_ranks_see_what_one_rank_with_accumulation_sees():
    ds = SyntheticDataset(40, seed=1)
    one = ShardedBatches(ds, global_batch=8, micro_batch=4, seed=1)
    ranks = [ShardedBatches(ds, global_batch=8, micro_batch=4, rank=r, world_size=2, seed=1) for r in range(2)]
    assert one.grad_accum == 2 and ranks[0].grad_accum == 1
    for _ in range(7):  # crosses an epoch boundary (40 // 8 = 5 steps per epoch)
        single = one.next_step()
        split = [mb for r in ranks for mb in r.next_step()]
        assert [i for i, _ in single] == [i for i, _ in split] == [0, 1]
        for (_, a), (_, b) in zip(single, split):
            assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["moments"], b["moments"])
    assert one.state_dict() == {"epoch": 1, "offset": 16}


def test_position_restores_exactly():
    ds = SyntheticDataset(24, seed=0)
    a = ShardedBatches(ds, 8, 8)
    for _ in range(4):
        a.next_step()
    b = ShardedBatches(ds, 8, 8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_step()[0][1]["ids"], b.next_step()[0][1]["ids"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatches(SyntheticDataset(4), 8, 8)


def test_moments_path_matches_the_tokenizer_encode():
    torch.manual_seed(0)
    tok = FlowTiTok(TINY.tokenizer, with_encoder=True).eval()
    enc = ImageEncoder(TINY.tokenizer).eval()
    enc.load_state_dict({k: v for k, v in tok.state_dict().items() if k == "latent_tokens" or k.startswith("encoder.")})
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = tok.encode(pixels, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(5)
        got = latents_from_moments(enc(pixels))
    assert got.shape == (2, 77, 16)
    torch.testing.assert_close(got, expected)
