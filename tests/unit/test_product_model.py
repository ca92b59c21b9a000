"""The product workflow's model: adaptive margins, sub-centre ArcFace, the XBM phases dropping the
ArcFace head, the seed's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from models.subcenter_arcface import SubCenterArcFace, adaptive_margins, arcface_logits, arcface_loss


def test_adaptive_margins_by_hand():
    # count^-1/4 = 1, 1/2, 1/3, 1/10 -> scaled to [0.05, 0.5]: (t - 0.1) / 0.9 * 0.45 + 0.05
    m = adaptive_margins([1, 16, 81, 10000], 0.05, 0.5)
    assert m.tolist() == pytest.approx([0.5, 0.05 + 0.45 * 0.4 / 0.9, 0.05 + 0.45 * (1 / 3 - 0.1) / 0.9, 0.05], abs=1e-6)
    assert torch.all(m[:-1] >= m[1:])  # rarer classes, larger margins
    assert adaptive_margins([5, 5, 5]).tolist() == pytest.approx([0.5] * 3)
    assert adaptive_margins([0, 1]).tolist() == pytest.approx([0.5, 0.5])  # an empty class counts as one image
    with pytest.raises(ValueError, match="m_min"):
        adaptive_margins([1, 2], 0.6, 0.5)


def test_arcface_logits_add_the_class_margin_to_the_target_angle_only():
    cosine = torch.tensor([[0.8, 0.3, -0.2], [0.1, 0.9, 0.5]])
    labels = torch.tensor([0, 2])
    margins = torch.tensor([0.5, 0.2, 0.1])
    logits = arcface_logits(cosine, labels, margins, s=30.0)
    assert logits[0, 0].item() == pytest.approx(30 * math.cos(math.acos(0.8) + 0.5), abs=1e-4)
    assert logits[1, 2].item() == pytest.approx(30 * math.cos(math.acos(0.5) + 0.1), abs=1e-4)
    assert logits[0, 1:].tolist() == pytest.approx([9.0, -6.0], abs=1e-4)  # others: s * cos
    assert logits[1, :2].tolist() == pytest.approx([3.0, 27.0], abs=1e-4)
    # past pi - m the logit keeps falling (cos(theta) - m sin(m)) instead of rising again
    far = arcface_logits(torch.tensor([[-0.99]]), torch.tensor([0]), torch.tensor([0.5]), s=1.0)
    assert far.item() == pytest.approx(-0.99 - math.sin(math.pi - 0.5) * 0.5, abs=1e-5)
    out = arcface_loss(cosine, labels, margins)
    assert out["loss"].item() > 0 and out["accuracy"].item() == pytest.approx(0.5)


def test_subcenter_arcface_takes_the_closest_of_k_centres():
    head = SubCenterArcFace(dim=2, num_classes=2, k=3)
    with torch.no_grad():
        # class 0's centres point at 0, 90 and 180 degrees; class 1's all at 45 degrees
        head.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [1, 1], [1, 1], [1, 1]]))
    cos = head(torch.tensor([[0.0, 3.0], [-2.0, 0.0]]))
    assert cos.shape == (2, 2)
    assert cos[0].tolist() == pytest.approx([1.0, math.sqrt(0.5)], abs=1e-6)   # its 90-degree centre
    assert cos[1].tolist() == pytest.approx([1.0, -math.sqrt(0.5)], abs=1e-6)  # its 180-degree centre


def test_xbm_phase_loads_an_arcface_checkpoint_without_its_head(tmp_path):
    from hpc_jobs.checkpoint import save_checkpoint
    from hpc_jobs.engine import load_init_weights
    from models.product_embedding import ProductNet, drop_arcface_head

    torch.manual_seed(0)
    arc = ProductNet("resnet10t", dim=16, num_classes=5, subcenters=3)
    assert arc.arcface.weight.shape == (15, 16)
    path = tmp_path / "arcface.pt"
    save_checkpoint(path, {"model": arc.state_dict()}, step=1, epoch=1, metrics={"val_map": 0.1})
    xbm = ProductNet("resnet10t", dim=16, num_classes=0)
    dropped = []

    def keep_body(state, model):
        state, names = drop_arcface_head(state, model)
        dropped.extend(names)
        return state

    report = load_init_weights(xbm, path, filter_fn=keep_body)
    assert dropped == ["arcface.weight"] and not report.unexpected and not report.missing
    assert torch.equal(xbm.fc.weight, arc.fc.weight)
    arc.eval(), xbm.eval()
    x = torch.randn(2, 3, 32, 32)
    emb, cos = arc(x, with_head=True)
    assert torch.allclose(xbm(x), emb, atol=1e-6) and cos.shape == (2, 5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(RuntimeError, match="no ArcFace head"):
        xbm(x, with_head=True)


def test_seed_param_groups_double_the_lr_block_by_block():
    from models.product_embedding import ProductNet, stage_param_groups

    model = ProductNet("resnet10t", dim=16, num_classes=4)
    groups = stage_param_groups(model, [1.25e-6, 2.5e-6, 5e-6, 1e-5], 1e-3, 3e-4, 0.1)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [1.25e-6, 2.5e-6, 5e-6, 1e-5, 3e-4]
    head = [g for g in groups if g["lr"] == 3e-4]
    assert any(p is model.arcface.weight for g in head for p in g["params"])
    assert {g["weight_decay"] for g in head} == {0.1, 0.0}  # the BN and biases carry none
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # every parameter in exactly one group
