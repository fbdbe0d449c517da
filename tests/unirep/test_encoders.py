"""FrozenEncoder: frozen, eval-only, and its per-item feature cache returns exactly what the teacher computes."""

import pytest
import torch
from torch import nn

from unirep.encoders import Encoder, FrozenEncoder, module_fingerprint
from unirep.tokens import TokenSet


class ToyTeacher(nn.Module):
    """Items are [B, N, 4] tensors; tokens are a linear map with dropout (so eval mode matters)."""

    dim = 6

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.calls = 0

    def encode(self, x: torch.Tensor) -> TokenSet:
        self.calls += 1
        return TokenSet.from_dense(self.drop(self.lin(x)))


def test_protocol_frozen_and_eval():
    teacher = ToyTeacher()
    assert isinstance(teacher, Encoder)
    enc = FrozenEncoder(teacher)
    enc.train()
    assert not enc.encoder.training
    assert all(not p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 4)
    assert torch.equal(enc.encode(x).x, enc.encode(x).x)  # dropout off


def test_cache_equals_recomputed_and_skips_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = ToyTeacher()
    data = {f"img{i}": torch.randn(3, 4) for i in range(5)}
    enc = FrozenEncoder(teacher, cache_dir=tmp_path)
    ids = ["img0", "img3", "img4"]
    first = enc.encode(torch.stack([data[i] for i in ids]), ids=ids)
    assert teacher.calls == 1
    # a fresh wrapper reads the disk cache: same values, teacher not called, any order of items
    enc2 = FrozenEncoder(teacher, cache_dir=tmp_path)
    ids2 = ["img4", "img0"]
    calls = teacher.calls
    cached = enc2.encode(torch.stack([data[i] for i in ids2]), ids=ids2)
    assert teacher.calls == calls and enc2.hits == 1
    recomputed = FrozenEncoder(teacher).encode(torch.stack([data[i] for i in ids2]))
    assert torch.equal(cached.x, recomputed.x) and torch.equal(cached.batch, recomputed.batch)
    assert torch.equal(cached.select([1]).x, first.select([0]).x)
    pooled = enc2.encode_pooled(torch.stack([data[i] for i in ids2]), ids=ids2)
    assert torch.allclose(pooled, recomputed.pool())


def test_cache_key_changes_with_weights(tmp_path):
    a, b = ToyTeacher(), ToyTeacher()
    assert module_fingerprint(a) != module_fingerprint(b)
    ea, eb = FrozenEncoder(a, cache_dir=tmp_path), FrozenEncoder(b, cache_dir=tmp_path)
    x = torch.randn(1, 3, 4)
    ea.encode(x, ids=["same"])
    out_b = eb.encode(x, ids=["same"])  # must not read a's features
    assert torch.allclose(out_b.x, b.lin(x).reshape(3, 6))


def test_corrupt_cache_entry_names_the_file(tmp_path):
    enc = FrozenEncoder(ToyTeacher(), cache_dir=tmp_path)
    x = torch.randn(1, 3, 4)
    enc.encode(x, ids=["a/b weird id"])
    path = enc._path("tokens", "a/b weird id")
    assert path.exists() and path.parent.name == "tokens"
    path.write_bytes(b"not a safetensors file")
    fresh = FrozenEncoder(enc.encoder, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="unreadable"):
        fresh.encode(x, ids=["a/b weird id"])
