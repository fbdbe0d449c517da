"""FrozenEncoder: frozen, eval-only; its cache is keyed by content, bounded, and returns what the teacher computes."""

import logging

import pytest
import torch
from torch import nn

from unirep.encoders import Encoder, FrozenEncoder, module_fingerprint, tensor_item_digests
from unirep.tokens import TokenSet


class ToyTeacher(nn.Module):
    """Items are [B, N, 4] tensors; tokens are a linear map with dropout (so eval mode matters)."""

    dim = 6

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.lin2 = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.calls = 0

    def encode(self, x: torch.Tensor) -> TokenSet:
        self.calls += 1
        return TokenSet.from_dense(self.lin2(self.drop(self.lin(x))))

    def forward_intermediates(self, x: torch.Tensor, indices):
        self.calls += 1
        hs = [x.new_zeros(*x.shape[:-1], 6), self.lin(x), self.lin2(self.lin(x))]  # 0 = embedded, 1..2 = blocks
        return hs[-1], [TokenSet.from_dense(hs[i]) for i in indices]


class Molecules:
    """A non-tensor batch: items of different sizes; the encoder keys them with item_digests."""

    def __init__(self, items: list[torch.Tensor]):
        self.items = items

    def select(self, idx):
        return Molecules([self.items[i] for i in idx])


class MolTeacher(nn.Module):
    dim = 3

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls = 0

    def encode(self, mols: Molecules) -> TokenSet:
        self.calls += 1
        x = torch.cat([self.lin(m) for m in mols.items])
        batch = torch.cat([torch.full((len(m),), j) for j, m in enumerate(mols.items)])
        pos = torch.cat([m[:, :3] for m in mols.items])
        return TokenSet(x, batch, pos, len(mols.items))

    def item_digests(self, mols: Molecules) -> list[str]:
        return [tensor_item_digests(m[None])[0] for m in mols.items]


def test_protocol_frozen_and_eval():
    teacher = ToyTeacher()
    assert isinstance(teacher, Encoder)
    enc = FrozenEncoder(teacher, cache=False)
    enc.train()
    assert not enc.encoder.training
    assert all(not p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 4)
    assert torch.equal(enc.encode(x).x, enc.encode(x).x)  # dropout off
    assert teacher.calls == 2 and enc.pooled_dim is None


def test_content_keyed_same_id_new_content_is_recomputed():
    torch.manual_seed(0)
    teacher = ToyTeacher()
    enc = FrozenEncoder(teacher)
    x = torch.randn(3, 5, 4)
    first = enc.encode(x, ids=["a", "b", "c"])
    assert teacher.calls == 1
    again = enc.encode(x.clone(), ids=["z", "y", "x"])  # other ids, same content: a hit
    assert teacher.calls == 1 and enc.hits == 1 and torch.equal(again.x, first.x)
    regenerated = x.clone()
    regenerated[1] += 1.0  # same ids, item 1 regenerated: only it is recomputed
    out = enc.encode(regenerated, ids=["a", "b", "c"])
    assert teacher.calls == 2 and enc.item_misses == 4
    assert not torch.equal(out.select([1]).x, first.select([1]).x)
    assert torch.equal(out.select([0, 2]).x, first.select([0, 2]).x)
    assert tensor_item_digests(x.double()) != tensor_item_digests(x)  # the dtype is part of the content
    torch.testing.assert_close(out.x, FrozenEncoder(teacher, cache=False).encode(regenerated).x)


def test_cached_equals_recomputed_pooled_and_layers():
    torch.manual_seed(1)
    teacher = ToyTeacher()
    enc, ref = FrozenEncoder(teacher), FrozenEncoder(teacher, cache=False)
    x = torch.randn(4, 2, 4)
    for _ in range(2):  # second pass: from memory
        torch.testing.assert_close(enc.encode(x).x, ref.encode(x).x)
        torch.testing.assert_close(enc.encode_pooled(x), ref.encode(x).pool())
        torch.testing.assert_close(enc.encode(x, layer=1).x, teacher.lin(x).reshape(-1, 6))
        torch.testing.assert_close(enc.encode(x, layer=0).x, torch.zeros(8, 6))
    assert enc.teacher_calls == 4  # tokens, pooled, layer 1, layer 0: once each
    teacher.num_layers = 2
    torch.testing.assert_close(enc.encode(x, layer=-2).x, teacher.lin(x).reshape(-1, 6))  # -2 is layer 1: stored
    assert enc.teacher_calls == 4


def test_non_tensor_samples_use_item_digests_and_keep_positions():
    torch.manual_seed(2)
    teacher = MolTeacher()
    enc = FrozenEncoder(teacher)
    mols = Molecules([torch.randn(n, 4) for n in (2, 5, 3)])
    first = enc.encode(mols)
    cached = enc.encode(mols.select([2, 0]))
    assert teacher.calls == 1
    torch.testing.assert_close(cached.x, first.select([2, 0]).x)
    torch.testing.assert_close(cached.pos, first.select([2, 0]).pos)


def test_no_digests_means_no_cache():
    class Opaque(nn.Module):
        dim = 2

        def encode(self, sample):
            return TokenSet.from_dense(torch.ones(len(sample), 3, 2))

    enc = FrozenEncoder(Opaque())
    enc.encode([1, 2])
    enc.encode([1, 2])
    assert enc.teacher_calls == 2 and enc.memory_bytes == 0


def test_memory_lru_is_bounded_by_bytes():
    teacher = ToyTeacher()
    item_bytes = 5 * 6 * 4  # 5 tokens x 6 float32
    enc = FrozenEncoder(teacher, max_memory_mb=10 * item_bytes / 2**20)  # room for 10 items
    xs = torch.randn(30, 5, 4)
    for i in range(0, 30, 3):
        enc.encode(xs[i : i + 3])
    assert enc.memory_bytes <= 10 * item_bytes and len(enc._memory) == 10
    calls = teacher.calls
    enc.encode(xs[-3:])  # most recent: still there
    assert teacher.calls == calls
    enc.encode(xs[:3])  # least recent: evicted, recomputed
    assert teacher.calls == calls + 1


def test_cache_key_changes_with_weights_and_settings():
    a, b = ToyTeacher(), ToyTeacher()
    assert module_fingerprint(a) != module_fingerprint(b)
    assert FrozenEncoder(a).cache_key != FrozenEncoder(b).cache_key
    c = ToyTeacher()
    c.load_state_dict(a.state_dict())
    assert FrozenEncoder(c).cache_key == FrozenEncoder(a).cache_key
    c.calls = 12  # a counter is not a setting
    assert FrozenEncoder(c).cache_key == FrozenEncoder(a).cache_key
    c.cache_settings = lambda: {"grid_size": 7}  # a setting that changes the output
    assert FrozenEncoder(c).cache_key != FrozenEncoder(a).cache_key


def test_cache_dir_without_shards_warns_once(tmp_path, caplog):
    enc = FrozenEncoder(ToyTeacher(), cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="unirep.encoders"):
        enc.encode(torch.randn(2, 3, 4))
        enc.encode(torch.randn(2, 3, 4))
    warnings = [r for r in caplog.records if "unirep-features" in r.getMessage()]
    assert len(warnings) == 1
    assert not any(tmp_path.rglob("*.safetensors"))  # a training step never writes files


def test_layer_without_forward_intermediates_says_so():
    enc = FrozenEncoder(MolTeacher(), cache=False)
    with pytest.raises(TypeError, match="forward_intermediates"):
        enc.encode(Molecules([torch.randn(2, 4)]), layer=1)
