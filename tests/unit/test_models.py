"""Unit tests for the diving model code (TimeSformer, heads, losses). Tiny configs, CPU, no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops")
pytest.importorskip("torchsort")

import torch.nn.functional as F  # noqa: E402

from models.diving import DivingModelConfig, DivingScoreModel, build_diving_model  # noqa: E402
from models.heads import DecoderHead, MLPHead, decode_score, encode_target  # noqa: E402
from models.losses import diving_loss, diving_loss_terms, soft_spearman  # noqa: E402
from models.timesformer import (  # noqa: E402
    ATTENTION_TYPES,
    CheckpointMismatchError,
    TimeSformer,
    checkpoint_filter_fn,
    load_pretrained,
)

TINY: dict[str, Any] = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_frames=8)
TINY_CFG: dict[str, Any] = dict(
    spatial_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, frame_num=8,
    topology=[32, 16], dropout=[0.1, 0.1], activation="ReLU", decoder_layers=4, decoder_heads=4,
    batch_size=4, learning_rate=1e-5,  # unrelated run keys must be ignored
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def clips(batch: int = 2, frames: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size)


def save_official(model: TimeSformer, path: Path) -> Path:
    """Write ``model`` the way the official trainer does: ``model_state`` with ``model.``-prefixed keys."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 15, "model_state": state, "cfg": "TRAIN:\n  DATASET: kinetics\n"}, path)
    return path


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_forward_shapes(attention_type: str) -> None:
    model = TimeSformer(attention_type=attention_type, **TINY).eval()
    x = clips(batch=3)
    assert model(x).shape == (3, 64)  # num_classes=0: the cls feature
    n_tokens = 1 + 16 if attention_type == "space_only" else 1 + 16 * 8
    assert model.forward_tokens(x).shape == (3, n_tokens, 64)
    with_head = TimeSformer(attention_type=attention_type, num_classes=5, **TINY).eval()
    assert with_head(x).shape == (3, 5)


def test_other_input_sizes_resize_embeddings_on_the_fly() -> None:
    model = TimeSformer(**TINY).eval()
    assert model(clips(batch=1, frames=4, size=96)).shape == (1, 64)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_sdpa_matches_explicit_attention(attention_type: str) -> None:
    model = TimeSformer(attention_type=attention_type, attn_impl="sdpa", **TINY).eval()
    with torch.no_grad():  # make the zero-initialised temporal_fc matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = clips()
    with torch.no_grad():
        sdpa = model.forward_tokens(x)
        model.set_attn_impl("explicit")
        explicit = model.forward_tokens(x)
    torch.testing.assert_close(sdpa, explicit, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attn_impl"):
        model.set_attn_impl("flash")  # type: ignore[arg-type]


def _official_base_layout(num_classes: int = 400) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``model_state`` in TimeSformer_divST_8x32_224_K400.pyth, ``model.`` prefix removed.

    Written out from facebookresearch/TimeSformer timesformer/models/vit.py (VisionTransformer with
    embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True, 8 frames, 224 px, patch 16).
    """
    d, mlp = 768, 3072
    per_block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "temporal_norm1.weight": (d,), "temporal_norm1.bias": (d,),
        "temporal_attn.qkv.weight": (3 * d, d), "temporal_attn.qkv.bias": (3 * d,),
        "temporal_attn.proj.weight": (d, d), "temporal_attn.proj.bias": (d,),
        "temporal_fc.weight": (d, d), "temporal_fc.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (mlp, d), "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (d, mlp), "mlp.fc2.bias": (d,),
    }
    layout: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 14 * 14 + 1, d),
        "time_embed": (1, 8, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (num_classes, d),
        "head.bias": (num_classes,),
    }
    for i in range(12):
        layout.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    return layout


def test_state_dict_matches_official_base_layout() -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = TimeSformer(num_classes=400)  # defaults: ViT-B/16, 224 px, 8 frames, divided
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_base_layout()
    assert len(official) == 12 * 20 + 9 == 249
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != official[k]} == {}
    with torch.device("meta"):
        features_only = TimeSformer()  # num_classes=0: no head parameters at all
    assert not any(k.startswith("head.") for k in features_only.state_dict())


# --------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------


def test_official_style_pyth_loads_with_interpolated_embeddings(tmp_path: Path) -> None:
    src = TimeSformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_frames=4, num_classes=400)
    with torch.no_grad():  # pos_embed that varies by grid row only: a 2D resize must keep rows constant
        rows = torch.arange(2.0).repeat_interleave(2)  # 2x2 grid, row-major
        src.pos_embed[0, 1:] = rows[:, None].expand(4, 64)
        src.pos_embed[0, 0] = 7.0
    path = save_official(src, tmp_path / "TimeSformer_divST_4x32_32_K400.pyth")

    dst = TimeSformer(**TINY)  # 64 px (4x4 grid), 8 frames, no head
    report = load_pretrained(dst, path)
    assert report.loaded == len(dst.state_dict()) and not report.head_loaded

    assert dst.pos_embed.shape == (1, 17, 64) and dst.time_embed.shape == (1, 8, 64)
    assert torch.equal(dst.pos_embed[0, 0], torch.full((64,), 7.0))  # the cls slot is not interpolated
    grid = dst.pos_embed[0, 1:, 0].detach().reshape(4, 4)
    assert torch.allclose(grid, grid[:, :1].expand(4, 4))  # constant along each row
    assert grid[0, 0] < grid[-1, 0]  # and still increasing down the rows
    expected_time = F.interpolate(src.time_embed.detach().transpose(1, 2), size=8, mode="linear").transpose(1, 2)
    torch.testing.assert_close(dst.time_embed.detach(), expected_time)
    for key in ("blocks.1.temporal_fc.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "norm.bias"):
        assert torch.equal(dst.state_dict()[key], src.state_dict()[key])
    dst(clips(batch=1))  # and it runs


def test_filter_keeps_matching_head_and_drops_temporal_for_space_only(tmp_path: Path) -> None:
    src = TimeSformer(num_classes=5, **TINY)
    official = {"model_state": {f"model.{k}": v for k, v in src.state_dict().items()}}
    with_head = TimeSformer(num_classes=5, **TINY)
    assert "head.weight" in checkpoint_filter_fn(official, with_head)

    space_only = TimeSformer(attention_type="space_only", **TINY)
    filtered = checkpoint_filter_fn(official, space_only)
    assert not any("temporal" in k for k in filtered) and "time_embed" not in filtered
    assert load_pretrained(space_only, save_official(src, tmp_path / "divst.pyth")).loaded == len(filtered)


def test_checkpoint_from_another_architecture_is_refused(tmp_path: Path) -> None:
    wider = TimeSformer(**{**TINY, "embed_dim": 96})
    with pytest.raises(CheckpointMismatchError, match=r"'cls_token'.*\(1, 1, 96\).*\(1, 1, 64\)|shape"):
        load_pretrained(TimeSformer(**TINY), save_official(wider, tmp_path / "wide.pyth"))

    deeper = TimeSformer(**{**TINY, "depth": 3})
    with pytest.raises(CheckpointMismatchError, match=r"missing 0 keys \[\], unexpected 20 keys \['blocks\.2\."):
        load_pretrained(TimeSformer(**TINY), save_official(deeper, tmp_path / "deep.pyth"))

    resnet_like = {"model_state": {"model.conv1.weight": torch.zeros(8, 3, 7, 7), "model.fc.weight": torch.zeros(4, 8)}}
    torch.save(resnet_like, tmp_path / "resnet.pyth")
    with pytest.raises(CheckpointMismatchError, match="missing .* keys .*unexpected 2 keys"):
        load_pretrained(TimeSformer(**TINY), tmp_path / "resnet.pyth")

    with pytest.raises(FileNotFoundError, match="pretrained_model"):
        load_pretrained(TimeSformer(**TINY), tmp_path / "absent.pyth")


def test_refused_error_names_key_and_shapes(tmp_path: Path) -> None:
    other_patch = TimeSformer(**{**TINY, "patch_size": 32})
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(TimeSformer(**TINY), save_official(other_patch, tmp_path / "p32.pyth"))
    msg = str(err.value)
    assert "'patch_embed.proj.weight'" in msg and "(64, 3, 32, 32)" in msg and "(64, 3, 16, 16)" in msg


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def _true_spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().float()
    ry = y.argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_soft_spearman_approaches_true_spearman() -> None:
    x = torch.randn(64)
    y = 0.5 * x + torch.randn(64)
    truth = _true_spearman(x, y)
    errors = [abs(float(soft_spearman(x, y, r)) - truth) for r in (1.0, 1e-2, 1e-4)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[-1] < 1e-5
    assert float(soft_spearman(x, x, 1e-3)) == pytest.approx(1.0, abs=1e-5)
    assert float(soft_spearman(x, -x, 1e-3)) == pytest.approx(-1.0, abs=1e-5)
    assert float(soft_spearman(x[:1], y[:1])) == 0.0  # one sample: no ranking signal, no NaN


def test_gradients_flow_through_the_spearman_term() -> None:
    out = torch.rand(8, 2, requires_grad=True)
    target = encode_target(torch.rand(8) * 100, 1.5 + 2.5 * torch.rand(8))
    loss = diving_loss(out, target, mse_weight=0.0, spcoef_weight=1.0, regularization_strength=0.1)
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


def test_loss_decreases_and_ranking_improves_on_a_toy_problem() -> None:
    features = torch.randn(32, 6)
    difficulty = 1.5 + 2.5 * torch.rand(32)
    execution = torch.sigmoid(features[:, 0] - features[:, 1])  # 0..1, as final/difficulty/30
    target = encode_target(execution * difficulty * 30, difficulty)
    head = torch.nn.Linear(6, 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    with torch.no_grad():
        first = diving_loss_terms(head(features), target, mse_weight=1.0, spcoef_weight=0.5)
    for _ in range(80):
        opt.zero_grad()
        diving_loss(head(features), target, mse_weight=1.0, spcoef_weight=0.5).backward()
        opt.step()
    with torch.no_grad():
        last = diving_loss_terms(head(features), target, mse_weight=1.0, spcoef_weight=0.5)
    assert float(last.total) < float(first.total) - 0.5
    assert float(last.spearman) > 0.8 > float(first.spearman)


def test_decode_score_inverts_encode_target() -> None:
    target = encode_target(torch.tensor([87.5, 40.0]), torch.tensor([3.5, 2.0]))
    torch.testing.assert_close(decode_score(target), torch.tensor([87.5, 40.0]))


# --------------------------------------------------------------------------------------------------
# Heads and the assembled model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "None", "ReLU", "LeakyReLU", "leaky_relu", "ELU", "GELU", "tanh"])
def test_mlp_head_output_shape(activation: str | None) -> None:
    head = MLPHead(64, topology=[32, 16], dropout=[0.5, 0.2], activation=activation)
    assert head(torch.randn(5, 64)).shape == (5, 2)


def test_mlp_head_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="activation='swish'"):
        MLPHead(64, activation="swish")
    with pytest.raises(ValueError, match="dropout=.*3 values.*2 layers"):
        MLPHead(64, topology=[32, 16], dropout=[0.1, 0.2, 0.3])
    assert MLPHead(64, topology=[], dropout=0.0)(torch.randn(2, 64)).shape == (2, 2)


def test_decoder_head_output_shape() -> None:
    head = DecoderHead(64, num_layers=4, num_heads=4, num_queries=2)
    assert len(head.decoder.layers) == 4
    assert head(torch.randn(3, 129, 64)).shape == (3, 2)


@pytest.mark.parametrize("use_decoder", [False, True])
def test_build_diving_model_forward(use_decoder: bool) -> None:
    model = build_diving_model({**TINY_CFG, "use_decoder": use_decoder, "pretrained_model": "scratch"})
    assert isinstance(model, DivingScoreModel) and model.backbone.num_classes == 0
    assert model.eval()(clips()).shape == (2, 2)
    assert model.predict_score(clips()).shape == (2,)


def test_build_diving_model_loads_pretrained_backbone(tmp_path: Path) -> None:
    src = TimeSformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_frames=4, num_classes=400)
    path = save_official(src, tmp_path / "k400.pyth")
    model = build_diving_model({**TINY_CFG, "pretrained_model": str(path)})
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_freeze_leaves_backbone_without_grad() -> None:
    model = build_diving_model({**TINY_CFG, "freeze": True}).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.training  # frozen features stay deterministic
    target = encode_target(torch.tensor([60.0, 80.0]), torch.tensor([2.0, 3.0]))
    diving_loss(model(clips()), target, spcoef_weight=1.0).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="attention_type='divided'"):
        DivingModelConfig.from_dict({"attention_type": "divided"})
    with pytest.raises(ValueError, match="activation"):
        DivingModelConfig.from_dict({"activation": "Swish"})
    assert DivingModelConfig.from_dict({"pretrained_model": "scratch", "activation": "None"}).pretrained_model is None
    with pytest.raises(ValueError, match="num_heads=5"):
        build_diving_model({**TINY_CFG, "num_heads": 5})
