"""DwiseNeuro's shapes and parts, the Poisson loss, the distillation rule (teacher fills the other
mice's targets at distill.ratio of the loss), CutMix's target mixing and the EMA."""

from __future__ import annotations

import pytest
import torch

from data.sensorium.dataset import cutmix, mix_targets
from models.ema import ModelEma
from models.sensorium import (DwiseNeuro, InvertedResidual3d, build_model, distillation_weights,
                              fill_with_teacher, mice_poisson_loss, poisson_terms)
from models.squeeze_excite import SqueezeExcite
from models.timesformer import DropPath

TINY = dict(core_features=(8, 16), spatial_strides=(2, 2), temporal_kernel=3, expansion_ratio=2,
            se_reduce_ratio=4, cortex_features=(32, 32), cortex_pool=(2, 4))


def test_output_is_every_mouse_neuron_at_every_frame_and_positive():
    model = build_model([7, 5], **TINY).eval()
    out = model(torch.randn(3, 5, 6, 16, 32))
    assert out.shape == (3, 12, 6)
    assert (out > 0).all()  # Softplus readouts
    assert [(s.start, s.stop) for s in model.mouse_slices] == [(0, 7), (7, 12)]


def test_paper_sized_model_builds_with_the_seed_arguments():
    model = build_model([100, 80])  # the dataclass defaults are the seed's
    assert isinstance(model, DwiseNeuro) and len(model.core) == 9
    assert model.cfg.cortex_features == (1024, 2048, 4096) and model.cfg.groups == 2
    assert model.readouts[0][1].out_channels == 100 and model.gate.beta == pytest.approx(0.07)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 5, 4, 64, 64))
    assert out.shape == (1, 180, 4)


def test_block_is_factorized_depthwise_with_se_and_drop_path():
    block = InvertedResidual3d(8, 16, spatial_stride=2, spatial_kernel=3, temporal_kernel=5, expansion_ratio=3,
                               se_reduce_ratio=4, drop_path=0.2)
    assert block.spatial[0].conv.groups == 24 and block.spatial[0].conv.kernel_size == (3, 3)
    assert block.temporal[0].conv.groups == 24 and block.temporal[0].conv.kernel_size == (5,)
    assert isinstance(block.se, SqueezeExcite) and isinstance(block.drop_path, DropPath)
    assert block(torch.randn(2, 8, 4, 9, 10)).shape == (2, 16, 4, 5, 5)  # odd sizes: shortcut agrees


def test_depthwise_spatial_and_temporal_equal_conv3d():
    block = InvertedResidual3d(4, 4, temporal_kernel=3, expansion_ratio=1, se_reduce_ratio=2)
    x = torch.randn(2, 4, 5, 6, 7)
    sp, tp = block.spatial[0].conv, block.temporal[0].conv
    ref_s = torch.nn.functional.conv3d(x, sp.weight[:, :, None], padding=(0, 1, 1), groups=4)
    ref_t = torch.nn.functional.conv3d(x, tp.weight[:, :, :, None, None], padding=(1, 0, 0), groups=4)
    torch.testing.assert_close(block.spatial[0](x), ref_s)
    torch.testing.assert_close(block.temporal[0](x), ref_t)


def test_poisson_terms_match_torch():
    pred, target = torch.rand(4, 6) + 0.1, torch.poisson(torch.rand(4, 6) * 3)
    want = torch.nn.functional.poisson_nll_loss(pred, target, log_input=False, full=False, eps=1e-8, reduction="none")
    torch.testing.assert_close(poisson_terms(pred, target), want)


def test_mice_loss_weights_each_sample_and_mouse_by_its_mean_over_neurons():
    slices = [slice(0, 2), slice(2, 5)]
    pred, target = torch.rand(2, 5, 3) + 0.1, torch.poisson(torch.rand(2, 5, 3) * 2)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    per = poisson_terms(pred, target)
    want = (per[0, 0:2].mean() + per[1, 2:5].mean()) / 2
    torch.testing.assert_close(mice_poisson_loss(pred, target, weights, slices), want)


def test_teacher_targets_make_up_the_distill_ratio_of_the_loss():
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    w = distillation_weights(weights, 0.36)
    teacher = weights == 0
    assert float(w[teacher].sum() / w.sum()) == pytest.approx(0.36)
    assert torch.equal(w[~teacher], weights[~teacher])  # own mice keep their weight
    assert torch.equal(distillation_weights(weights, 0.0), weights)
    with pytest.raises(ValueError, match="distill.ratio"):
        distillation_weights(weights, 1.0)


def test_teacher_fills_only_the_mice_a_sample_does_not_come_from():
    slices = [slice(0, 2), slice(2, 5)]
    target = torch.zeros(2, 5, 3)
    target[0, 0:2] = 7.0
    target[1, 2:5] = 9.0
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.full((2, 5, 3), 0.5)
    filled, w = fill_with_teacher(target, weights, teacher, slices, 0.36)
    assert (filled[0, 0:2] == 7).all() and (filled[0, 2:5] == 0.5).all()
    assert (filled[1, 2:5] == 9).all() and (filled[1, 0:2] == 0.5).all()
    # with every per-mouse loss equal, the teacher entries carry exactly 36% of the loss
    pred = torch.ones(2, 5, 3)
    same = torch.full((2, 5, 3), 2.0)
    per_entry = poisson_terms(pred, same).mean()
    teacher_part = (w * (weights == 0)).sum() * per_entry / w.sum()
    assert float(teacher_part / mice_poisson_loss(pred, same, w, slices)) == pytest.approx(0.36)


def test_cutmix_mixes_a_mouse_target_only_among_samples_that_have_it():
    slices = [slice(0, 1), slice(1, 2)]
    targets = torch.tensor([[[4.0], [0.0]], [[0.0], [6.0]], [[2.0], [0.0]]])
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    partner = torch.roll(torch.arange(3), 1)  # 0<-2, 1<-0, 2<-1
    out, w = mix_targets(targets, weights, partner, 0.75, slices)
    # sample 0 (mouse 0) mixed with sample 2 (mouse 0): 0.75 * 4 + 0.25 * 2
    assert out[0, 0, 0] == pytest.approx(3.5) and w[0].tolist() == [1.0, 0.0]
    # sample 1 (mouse 1) mixed with sample 0 (mouse 0): each mouse keeps its own target
    assert out[1, 1, 0] == pytest.approx(6.0) and out[1, 0, 0] == pytest.approx(4.0)
    assert w[1].tolist() == pytest.approx([0.25, 0.75])


def test_cutmix_boxes_the_partner_into_the_frame():
    torch.manual_seed(3)
    x = torch.stack([torch.zeros(5, 2, 8, 8), torch.ones(5, 2, 8, 8)])
    t, w = torch.zeros(2, 2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    mixed, _, _ = cutmix(x, t, w, [slice(0, 1), slice(1, 2)], alpha=1.0, prob=1.0)
    assert 0 < float(mixed[0].mean()) < 1  # some of sample 1 pasted into sample 0
    same = cutmix(x, t, w, [slice(0, 1), slice(1, 2)], alpha=1.0, prob=0.0)
    assert same[0] is x


def test_ema_follows_the_weights_with_warmup_and_round_trips_its_state():
    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.9)
    initial = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.9, 1/10) = 0.1: mostly the new weights
    torch.testing.assert_close(ema.module.weight, 0.1 * initial + 0.9)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module.weight, torch.ones(1, 2), atol=1e-6)
    other = ModelEma(torch.nn.Linear(2, 1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 201 and torch.equal(other.module.weight, ema.module.weight)
