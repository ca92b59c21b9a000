"""models/vsc: the ViT descriptor's shapes, the position-embedding filter on an input-size change
(plain and hybrid ViTs, through the engine's init loading, logged), the head's parameter groups,
the warm-up + cosine schedule, and the all-gather with gradient under DeepSpeed ZeRO-2 on 2 ranks
matching one process's step over the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from models.lr_schedules import WarmupCosine
from models.param_groups import optimizer_groups
from models.vsc import HEAD_PREFIXES, POS_EMBED_KEY, VSCNet, checkpoint_filter_fn

TINY = dict(arch="vit_tiny_patch16_224", fc_dim=32, depth=2, patch_size=8)


def _net(size: int, **kw) -> VSCNet:
    return VSCNet(input_size=size, **{**TINY, **kw})


def test_descriptors_are_unit_vectors_of_feature_dim():
    torch.manual_seed(0)
    model = _net(32).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 32) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.grid_size == (4, 4) and model.backbone.pos_embed.shape == (1, 17, 192)
    assert not model.fc.bias if hasattr(model.fc, "bias") else True
    with pytest.raises(ValueError, match="no model named"):
        VSCNet("vit_no_such_model", 32)


def test_filter_resizes_the_position_embedding_bilinearly_and_logs_it():
    torch.manual_seed(0)
    small, large = _net(32), _net(48)  # 4x4 -> 6x6 patch grid
    lines = []
    state = checkpoint_filter_fn(small.state_dict(), large, log=lines.append)
    old, new = small.state_dict()[POS_EMBED_KEY], state[POS_EMBED_KEY]
    assert new.shape == (1, 37, 192)
    assert torch.equal(new[:, 0], old[:, 0])  # the class token's entry is kept as it is
    grid = old[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(new[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 36, 192), atol=1e-6)
    assert lines == ["pos_embed resized: 4x4 -> 6x6 patch grid (bilinear; 1 class token kept), "
                     "(1, 17, 192) -> (1, 37, 192)"]
    large.load_state_dict(state)  # every other tensor fits as it is
    lines.clear()
    assert checkpoint_filter_fn(large.state_dict(), large, log=lines.append) is not None and lines == []


def test_hybrid_vit_through_the_engines_init_loading(tmp_path):
    """The paper's kind of model (a ResNet stem under the ViT): a 2x2 -> 3x3 grid on init."""
    from hpc_jobs.checkpoint import save_checkpoint
    from hpc_jobs.engine import load_init_weights

    kw = dict(arch="vit_tiny_r_s16_p8_224", depth=1, patch_size=4)
    torch.manual_seed(0)
    src, dst = _net(32, **kw), _net(48, **kw)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": src.state_dict(), "step": 1, "epoch": 1}, step=1, epoch=1)
    lines = []
    report = load_init_weights(dst, path, filter_fn=lambda s, m: checkpoint_filter_fn(s, m, log=lines.append))
    assert not report.mismatched and not report.missing
    assert lines and "2x2 -> 3x3 patch grid" in lines[0]
    assert torch.equal(dst.backbone.patch_embed.proj.weight, src.backbone.patch_embed.proj.weight)
    # without the filter the engine refuses nothing but skips the embedding: say it is mismatched
    plain = load_init_weights(_net(48, **kw), path)
    assert [m[0] for m in plain.mismatched] == [POS_EMBED_KEY]


def test_head_groups_take_the_seeds_lr_x5_and_wd_x10():
    model = _net(32)
    groups = optimizer_groups(model, 1e-6, lr=0.01, head_prefixes=HEAD_PREFIXES, head_lr_scale=5, head_wd_scale=10)
    head = {id(p) for n, p in model.named_parameters() if n.startswith(HEAD_PREFIXES)}
    by_kind = {(all(id(p) in head for p in g["params"]), g["weight_decay"] > 0): g for g in groups}
    assert by_kind[(True, True)]["lr"] == pytest.approx(0.05) and by_kind[(True, True)]["weight_decay"] == pytest.approx(1e-5)
    assert [id(p) for p in by_kind[(True, True)]["params"]] == [id(model.fc.weight)]
    assert by_kind[(True, False)]["weight_decay"] == 0.0 and by_kind[(True, False)]["lr"] == pytest.approx(0.05)
    assert by_kind[(False, True)]["lr"] == pytest.approx(0.01) and by_kind[(False, True)]["weight_decay"] == 1e-6
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_warmup_then_cosine():
    f = WarmupCosine(warmup_steps=3, total_steps=13)
    assert [round(f(s), 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(13) == pytest.approx(0.0) and f(100) == 0.0
    assert WarmupCosine(0, 10)(0) == 1.0


# -- the all-gather with gradient under DeepSpeed ZeRO-2 ------------------------------------------
def _step(rank: int, world: int, port: int, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from hpc_jobs.engine.strategy import _skip_cpu_shm_op_build
    from models.contrastive_loss import batch_contrastive_loss
    from models.gather import gather_with_grad

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _skip_cpu_shm_op_build()
    model, x, labels = _problem()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        config={"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4 * world, "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "steps_per_print": 10**9}, dist_init_required=False)
    mine = slice(rank * 4, rank * 4 + 4)
    emb, _ = gather_with_grad(F.normalize(engine(x[mine]), dim=1))
    lab, _ = gather_with_grad(labels[mine])
    engine.backward(batch_contrastive_loss(emb, lab, 0.0, 1.0)["loss"])
    engine.step()
    if rank == 0:
        torch.save(engine.module.weight.detach().clone(), out)
    dist.barrier()
    dist.destroy_process_group()


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4, bias=False)
    x = torch.randn(8, 6)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # each positive pair split over the two ranks
    return model, x, labels


def test_gather_with_grad_under_zero2_matches_one_process(tmp_path):
    from models.contrastive_loss import batch_contrastive_loss

    model, x, labels = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch_contrastive_loss(F.normalize(model(x), dim=1), labels, 0.0, 1.0)["loss"].backward()
    opt.step()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "w.pt"
    torch.multiprocessing.spawn(_step, args=(2, port, str(out)), nprocs=2, join=True)
    zero2 = torch.load(out)
    assert not torch.allclose(zero2, _problem()[0].weight)  # the step moved the weights ...
    assert torch.allclose(zero2, model.weight.detach(), atol=1e-6)  # ... exactly as one process would
