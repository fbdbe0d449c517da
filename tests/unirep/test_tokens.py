"""TokenSet: construction, dense round trip, pooling and selection against direct tensor operations."""

import pytest
import torch

from unirep.tokens import TokenSet, segment_mean, segment_sum


def ragged(seed: int = 0) -> tuple[TokenSet, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = [torch.randn(n, 5, generator=g) for n in (3, 1, 4)]
    batch = torch.cat([torch.full((x.shape[0],), i) for i, x in enumerate(items)])
    return TokenSet(torch.cat(items), batch), items


def test_from_dense_layout_matches_image_convention():
    x = torch.randn(2, 4, 3)
    ts = TokenSet.from_dense(x)
    assert ts.num_items == 2 and len(ts) == 8
    assert torch.equal(ts.batch, torch.arange(2).repeat_interleave(4))
    assert torch.equal(ts.x[4:], x[1])
    dense, mask = ts.to_dense()
    assert torch.equal(dense, x) and bool(mask.all())


def test_ragged_dense_round_trip_and_pool():
    ts, items = ragged()
    dense, mask = ts.to_dense()
    assert dense.shape == (3, 4, 5)
    assert mask.sum(1).tolist() == [3, 1, 4]
    for i, x in enumerate(items):
        assert torch.equal(dense[i, : x.shape[0]], x)
        assert torch.allclose(ts.pool("mean")[i], x.mean(0))
        assert torch.allclose(ts.pool("sum")[i], x.sum(0))
    back = TokenSet.from_dense(dense, mask=mask)
    assert torch.equal(back.x, ts.x) and torch.equal(back.batch, ts.batch)


def test_shuffled_tokens_pool_and_dense_order():
    ts, items = ragged(1)
    perm = torch.randperm(len(ts), generator=torch.Generator().manual_seed(3))
    shuffled = TokenSet(ts.x[perm], ts.batch[perm])
    assert torch.allclose(shuffled.pool(), ts.pool())


def test_select_and_cat_items():
    ts, items = ragged(2)
    sel = ts.select([2, 0])
    assert sel.num_items == 2
    assert torch.equal(sel.x, torch.cat([items[2], items[0]]))
    assert sel.counts.tolist() == [4, 3]
    cat = TokenSet.cat_items([ts, sel])
    assert cat.num_items == 5 and torch.equal(cat.counts, torch.tensor([3, 1, 4, 4, 3]))


def test_empty_trailing_item_is_kept():
    ts = TokenSet(torch.randn(2, 3), torch.tensor([0, 0]), num_items=3)
    assert ts.pool().shape == (3, 3)
    assert torch.equal(ts.pool()[2], torch.zeros(3))


def test_segment_ops_match_loops():
    x = torch.randn(10, 2, dtype=torch.float64)
    idx = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0, 0])
    s = segment_sum(x, idx, 4)
    m = segment_mean(x, idx, 4)
    for k in range(3):
        assert torch.allclose(s[k], x[idx == k].sum(0))
        assert torch.allclose(m[k], x[idx == k].mean(0))
    assert torch.equal(s[3], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=torch.randn(3), batch=torch.zeros(3, dtype=torch.long)), "must be \\[T, D\\]"),
        (dict(x=torch.randn(3, 2), batch=torch.zeros(2, dtype=torch.long)), "must be \\[T\\]"),
        (dict(x=torch.randn(3, 2), batch=torch.zeros(3, dtype=torch.long), pos=torch.randn(2, 3)), "pos"),
    ],
)
def test_malformed_token_sets_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenSet(**kwargs)
