"""models/isc and the shared metric-learning pieces it is built from: GeM, the descriptor head's
shapes, the contrastive loss by hand, the memory bank's state round trip, the linear schedule."""

from __future__ import annotations

import math

import pytest
import torch

from models.contrastive_loss import contrastive_loss
from models.gather import gather_with_grad
from models.isc import ISCNet
from models.lr_schedules import EpochLinearDecay
from models.memory_bank import CrossBatchMemory
from models.param_groups import optimizer_groups
from models.pooling import GeM, gem


def test_gem_p1_is_average_pooling_and_p_large_tends_to_max():
    x = torch.rand(2, 3, 4, 5) + 0.1
    assert torch.allclose(gem(x, 1.0), x.mean(dim=(-2, -1)))
    assert torch.allclose(gem(x, 3.0), x.pow(3).mean(dim=(-2, -1)).pow(1 / 3))
    assert torch.allclose(gem(x, 60.0), x.amax(dim=(-2, -1)), rtol=0.05)
    pool = GeM(p=1.0, eval_p=3.0)
    pool.train()
    assert torch.allclose(pool(x), gem(x, 1.0))
    pool.eval()
    assert torch.allclose(pool(x), gem(x, 3.0))


def test_descriptor_head_shapes_and_names_match_the_seed():
    torch.manual_seed(0)
    model = ISCNet("mobilenetv3_small_050", fc_dim=256, p=1.0, eval_p=1.0)
    channels = model.backbone.feature_info.channels()[-1]
    assert model.fc.weight.shape == (256, channels) and model.fc.bias is None
    assert isinstance(model.bn, torch.nn.BatchNorm1d) and model.bn.num_features == 256
    out = model(torch.randn(4, 3, 64, 64))
    assert out.shape == (4, 256)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)  # L2-normalised
    model.eval()
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 256)  # any input size
    keys = set(model.state_dict())
    assert {"fc.weight", "bn.weight", "bn.running_mean"} <= keys
    assert any(k.startswith("backbone.") for k in keys)  # the seed's module names: its checkpoints load
    groups = optimizer_groups(model, 1e-6)
    assert groups[0]["weight_decay"] == 0.0 and any(p is model.bn.weight for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 1e-6 and any(p is model.fc.weight for p in groups[1]["params"])


def test_contrastive_loss_by_hand():
    # three unit vectors: a and b share a label; c is another image
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8]), torch.tensor([0.0, 1.0])
    emb = torch.stack([a, b, c])
    labels = torch.tensor([0, 0, 1])
    mask = torch.eye(3, dtype=torch.bool)
    out = contrastive_loss(emb, labels, emb, labels, pos_margin=0.0, neg_margin=1.0, self_mask=mask)
    d_ab = math.dist(a.tolist(), b.tolist())   # 0.894
    d_bc = math.dist(b.tolist(), c.tolist())   # 0.632
    d_ac = math.dist(a.tolist(), c.tolist())   # 1.414: beyond the margin, no loss
    # positives (a,b), (b,a): mean d_ab; negatives with loss: (b,c), (c,b): 1 - d_bc each
    assert d_ac > 1.0
    assert out["pos_loss"].item() == pytest.approx(d_ab, abs=1e-5)
    assert out["neg_loss"].item() == pytest.approx(1.0 - d_bc, abs=1e-5)
    assert out["loss"].item() == pytest.approx(d_ab + 1.0 - d_bc, abs=1e-5)
    # a positive margin above the distance costs nothing
    out = contrastive_loss(emb, labels, emb, labels, pos_margin=0.95, neg_margin=1.0, self_mask=mask)
    assert out["pos_loss"].item() == 0.0


def test_memory_bank_fills_wraps_and_joins_the_loss():
    torch.manual_seed(0)
    bank = CrossBatchMemory(size=5, dim=4, warmup_batches=1)
    batches = [(torch.nn.functional.normalize(torch.randn(2, 4), dim=1), torch.tensor([2 * i, 2 * i + 1]))
               for i in range(4)]
    first = bank.loss(*batches[0])  # warm-up: batch only
    alone = contrastive_loss(*batches[0], *batches[0], self_mask=torch.eye(2, dtype=torch.bool))
    assert first["loss"].item() == pytest.approx(alone["loss"].item())
    assert bank.filled == 2 and bank.ptr == 2
    for emb, lab in batches[1:]:
        bank.loss(emb, lab)
    assert bank.filled == 5 and bank.ptr == (2 * 4) % 5
    # the 5 newest entries: labels 3..7 (label 2 was overwritten)
    assert sorted(bank.contents()[1].tolist()) == [3, 4, 5, 6, 7]


def test_memory_bank_state_round_trip_is_exact():
    torch.manual_seed(1)
    a = CrossBatchMemory(size=7, dim=8, pos_margin=0.1, neg_margin=1.1, warmup_batches=2)
    for i in range(5):
        a.loss(torch.nn.functional.normalize(torch.randn(3, 8), dim=1), torch.arange(3 * i, 3 * i + 3))
    state = a.state_dict()
    b = CrossBatchMemory(size=7, dim=8, pos_margin=0.1, neg_margin=1.1, warmup_batches=2)
    b.load_state_dict(state)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.labels, b.labels)
    assert (a.ptr, a.filled, a.batches) == (b.ptr, b.filled, b.batches)
    nxt = torch.nn.functional.normalize(torch.randn(3, 8), dim=1), torch.tensor([100, 101, 3])
    assert a.loss(*nxt)["loss"].item() == b.loss(*nxt)["loss"].item()
    assert torch.equal(a.embeddings, b.embeddings)
    # tensors and ints only: loads with torch.load(weights_only=True)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["filled"] == state["filled"]


def test_memory_bank_loads_into_another_size_keeping_the_newest():
    bank = CrossBatchMemory(size=4, dim=2)
    for i in range(6):  # labels 0..5 one at a time: the bank holds 2, 3, 4, 5 (wrapped)
        bank.enqueue(torch.tensor([[float(i), 0.0]]), torch.tensor([i]))
    small = CrossBatchMemory(size=2, dim=2)
    small.load_state_dict(bank.state_dict())
    assert sorted(small.contents()[1].tolist()) == [4, 5]
    big = CrossBatchMemory(size=10, dim=2)
    big.load_state_dict(bank.state_dict())
    assert big.contents()[1].tolist() == [2, 3, 4, 5] and big.filled == 4
    with pytest.raises(ValueError, match="8-d"):
        CrossBatchMemory(size=4, dim=3).load_state_dict(CrossBatchMemory(size=4, dim=8).state_dict())


def test_gather_without_a_process_group_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    out, world = gather_with_grad(x)
    assert out is x and world == 1


def test_epoch_linear_decay_steps_per_epoch():
    f = EpochLinearDecay(steps_per_epoch=10, epochs=4)
    assert [f(s) for s in (0, 9, 10, 25, 39)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert f(1000) == 0.0
