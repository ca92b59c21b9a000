"""vsc: VSC 2022 video similarity, matching track (3rd place), the seed's chain as one command.

    download (login node) -> train_v41 (224 px, memory 4096) -> train_v44 (init, 384 px, memory 8192)
      -> train_v46 (init, 416 px, memory 16384) -> train_v45 (init, 448 px, supervised pairs + 2
      negatives, warm-up + cosine) -> extract (frame descriptors) -> match (kNN + temporal
      localisation -> segments) -> eval (segment AP, pair micro AP)

Every training stage runs DeepSpeed ZeRO stage 2 through the shared engine (fp16 and SyncBN on
GPUs; fp32 and gloo on CPUs) and trains the seed's ViT (a ResNet-50 stem, :mod:`models.vsc`) on
DISC21 images with the contrastive loss in a cross-batch memory, as isc does. Each stage after
the first starts from its predecessor's weights (``Input(kind="init")``, the seed's ``--weight``)
at a larger input size: the ViT's position embedding is resized to the new patch grid on load, and
the job log says so. Config sections are named after the stages and use the seed's flag names
(``--set train_v44.input_size=384``, ``--set train_v45.num_negatives=2``); ``train`` holds what
the four share (``--set train.epochs=0`` skips training everywhere: each stage then hands its
starting weights on, so the chain still runs and measures the untrained network).

With no data configured, ``download`` writes the synthetic set (videos in the VSC layout, DISC21
images for training) and says so; the ``tiny`` preset (the default on synthetic data) is sized for
it and a laptop CPU, ``paper`` (the default when ``data.root`` is set) has the seed's
hyper-parameters, sizes and GPU counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.errors import UserError
from hpc_jobs.fsutil import build_lock

PAPER_ARCH = "vit_base_r50_s16_224.orig_in21k"  # the seed's vit_base_r50_s16_224_in21k
TRAIN_STAGES = ("train_v41", "train_v44", "train_v46", "train_v45")
#: the stage each training stage starts from (the seed's --weight: weights only)
HANDOFFS = {"train_v44": "train_v41", "train_v46": "train_v44", "train_v45": "train_v46"}
VSC_BUCKET_URL = "https://drivendata-competition-meta-vsc-data-sg.s3.amazonaws.com"


@dataclass
class DataOptions:
    root: Optional[str] = None         # the competition data ($COMPETITION_DATA: train/, test/); unset: synthetic
    disc21_root: Optional[str] = None  # DISC21 training images ($DISC_DATA); default: <root>/disc21
    synthetic: Literal["auto", "yes", "no"] = "auto"  # auto: only when root is not set
    synthetic_preset: Literal["micro", "tiny", "small"] = "tiny"
    base_url: Optional[str] = None     # a mirror of the VSC bucket
    disc21_base_url: Optional[str] = None  # a mirror of the ISC bucket
    no_network: bool = False           # never download: fail naming what is missing
    download_workers: int = 16


@dataclass
class TrainShared:
    """What the four training stages share (``train.``)."""

    arch: str = PAPER_ARCH          # -a
    depth: Optional[int] = None     # ViT blocks (None: the architecture's)
    patch_size: Optional[int] = None  # ViT patch size (None: the architecture's; plain ViTs only)
    feature_dim: int = 512          # --feature_dim
    epochs: Optional[int] = None    # set: every stage trains this many epochs; 0: none
    optimizer: Literal["sgd", "adamw"] = "sgd"  # --optimizer
    momentum: float = 0.9
    head_lr_scale: float = 5.0      # the projection head's lr x this ...
    head_wd_scale: float = 10.0     # ... and its weight decay x this
    ncrops: int = 2                 # views per training image (1 moderate + hard ones)
    views: Literal["hard", "copy_edit"] = "hard"  # self-supervised views: the seed's hard augmentations,
    #   or (small presets) the image as it is + copy edits of the synthetic queries' family (data/vsc/train_views.py)
    copy_edit_strength: Literal["moderate", "strong"] = "moderate"  # views=copy_edit: the edits' strength
    hard_crop_scale: float = 0.15   # smallest crop of the hard view
    hard_strength: float = 1.0      # x the probability of each hard-view pixel edit
    pretrained: bool = False        # timm's pretrained backbone (downloads it: needs the internet)
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"  # on GPUs; CPUs always train in fp32
    zero_stage: int = 2             # --ddp_strategy deepspeed_stage_2
    sync_bn: bool = True            # SyncBatchNorm across ranks (GPUs only: gloo on CPUs has none)
    num_workers: Optional[int] = None  # --workers (None: the job's CPUs - 1, at most 8)
    num_threads: Optional[int] = None  # torch threads per rank (None: the job's CPUs under Slurm)
    cpus_per_gpu: int = 8
    mem: str = "128G"
    log_every: int = 50
    checkpoint_every_steps: int = 0
    max_steps: Optional[int] = None  # cap each stage's optimizer steps (smoke tests)
    tensorboard: bool = True
    plot: bool = True


@dataclass
class StageTrain:
    """One training stage: the seed's flags for that run."""

    epochs: int = 10
    lr: float = 0.001
    wd: float = 1e-6
    batch_size: int = 32            # total per step over all ranks
    input_size: int = 224
    memory_size: int = 4096         # cross-batch memory (descriptors); 0: none
    memory_warmup_steps: int = 0    # batches before the bank joins the loss
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    seed: int = 0
    sample_size: int = 2000000      # training images used
    num_negatives: int = 0          # supervised stage: reference images per pair as negatives
    warmup_steps: int = 0           # linear warm-up, then cosine decay to 0
    num_frames: int = 32            # frames per video when this stage's weights are evaluated
    gpus: int = 0                   # GPUs (= DeepSpeed ranks) on one node; 0: --gpus
    grad_accum: int = 1
    time: str = "2-00:00:00"


@dataclass
class ExtractOptions:
    input_size: Optional[int] = None  # None: train_v45's
    num_frames: Optional[int] = None  # frames per video (None: train_v45's num_frames)
    batch_size: int = 64            # frames per forward, per rank
    gpus: int = 4
    cpus_per_gpu: int = 8
    mem: str = "64G"
    time: str = "12:00:00"


@dataclass
class MatchOptions:
    knn_k: int = 25                 # nearest reference frames per query frame
    noise_k: int = 1                # noise frames averaged for the score normalisation
    max_candidates: int = 10        # references localised per query
    max_gap: int = 1                # unmatched frames a segment may span
    min_frames: int = 1             # matched frames a segment needs
    cpus: int = 8
    mem: str = "64G"
    time: str = "04:00:00"


@dataclass
class EvalOptions:
    cpus: int = 2
    mem: str = "8G"
    time: str = "01:00:00"


def _stage(**values: Any):
    return field(default_factory=lambda: StageTrain(**values))


@dataclass
class VscConfig:
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainShared = field(default_factory=TrainShared)
    # the seed's four commands, flag for flag (the paper preset is these defaults)
    train_v41: StageTrain = _stage(epochs=10, lr=0.001, batch_size=32, input_size=224, memory_size=4096,
                                   seed=22999, gpus=4)
    train_v44: StageTrain = _stage(epochs=5, lr=0.0005, batch_size=16, input_size=384, memory_size=8192,
                                   pos_margin=0.1, neg_margin=1.1, seed=722999, gpus=4)
    train_v46: StageTrain = _stage(epochs=3, lr=0.0005, batch_size=16, input_size=416, memory_size=16384,
                                   pos_margin=0.1, neg_margin=1.1, seed=34722999, gpus=4)
    train_v45: StageTrain = _stage(epochs=5, lr=0.0005, batch_size=16, input_size=448, memory_size=0,
                                   pos_margin=0.1, neg_margin=1.1, seed=5699999, num_negatives=2,
                                   warmup_steps=300, gpus=4)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    match: MatchOptions = field(default_factory=MatchOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def validate(self) -> None:
        for name in TRAIN_STAGES:
            s: StageTrain = getattr(self, name)
            for key in ("lr", "batch_size", "input_size", "sample_size", "grad_accum", "num_frames"):
                if getattr(s, key) <= 0:
                    raise UserError(f"{name}.{key}={getattr(s, key)}: must be positive")
            for key in ("epochs", "memory_size", "memory_warmup_steps", "num_negatives", "warmup_steps", "gpus"):
                if getattr(s, key) < 0:
                    raise UserError(f"{name}.{key}={getattr(s, key)}: must be 0 or more")
            if s.neg_margin <= s.pos_margin:
                raise UserError(f"{name}: neg_margin={s.neg_margin} must exceed pos_margin={s.pos_margin}")
        if self.train_v45.num_negatives < 1:
            raise UserError("train_v45.num_negatives must be at least 1: the supervised stage needs negatives")
        if self.train.epochs is not None and self.train.epochs < 0:
            raise UserError(f"train.epochs={self.train.epochs}: 0 (no training) or more")
        if self.train.ncrops < 2:
            raise UserError(f"train.ncrops={self.train.ncrops}: contrastive training needs 2 or more views")
        if self.train.zero_stage not in (1, 2):
            raise UserError(f"train.zero_stage={self.train.zero_stage}: the seed trains with ZeRO stage 2 "
                            "(1 also works; 3 is not supported by the engine)")
        for key in ("knn_k", "max_candidates", "min_frames"):
            if getattr(self.match, key) < 1:
                raise UserError(f"match.{key}={getattr(self.match, key)}: at least 1")
        if self.match.max_gap < 0 or self.match.noise_k < 0:
            raise UserError("match.max_gap and match.noise_k: 0 or more")
        if self.data.root is not None and not Path(self.data.root).expanduser().is_dir():
            raise UserError(f"data.root '{self.data.root}' does not exist: point it at the VSC competition data "
                            "(train/, test/), or leave it unset for the synthetic set")
        if self.data.synthetic == "yes" and self.data.root is not None:
            raise UserError("data.synthetic=yes with data.root set: training would ignore your data; drop one of them")
        if self.data.synthetic == "no" and self.data.root is None:
            raise UserError("data.synthetic=no needs data.root (the VSC data root to download into or read)")


def stage_epochs(cfg: VscConfig, stage: str) -> int:
    return getattr(cfg, stage).epochs if cfg.train.epochs is None else cfg.train.epochs


_TINY_STAGE = dict(wd=1e-6, gpus=0, time="00:30:00", sample_size=600, num_frames=16)
PRESETS: Dict[str, Dict[str, Any]] = {
    # The seed's commands (the dataclass defaults): ViT-B/16 with a ResNet-50 stem, 224 -> 384 ->
    # 416 -> 448 px, memory 4096 -> 8192 -> 16384 -> none, 4 GPUs, DeepSpeed ZeRO-2, fp16.
    "paper": {},
    # Learns the synthetic set on a CPU in a couple of minutes: timm's ViT-Ti with a ResNet stem
    # (vit_tiny_r_s16_p8_224, a small relative of the seed's R50 hybrid; 2-cell patches of the
    # stride-4 stem map, 4 blocks) from scratch, 32 -> 40 -> 48 -> 56 px (patch grids 4 -> 5 -> 6
    # -> 7, so every handoff resizes the position embedding), the same chain and losses. What a
    # network from scratch learns in ~250 steps (issue 13): views that are the image and one copy
    # edit of the synthetic queries' family (train.views=copy_edit), SGD at lr 0.02, small memory
    # banks joining late (stale descriptors of a fast-moving network are poor negatives), a gentle
    # supervised stage (at lr 0.05 it learns its 80 DISC21 pairs by heart). On the tiny set: segment
    # AP 0.44 and pair micro AP 0.49 after the chain, 0.32 and 0.42 untrained, where it was tuned
    # (other CPUs' float rounding: 0.38-0.43 and 0.33-0.40, docs/workflows/vsc.md). One torch thread per rank.
    "tiny": {
        "data": {"synthetic_preset": "tiny"},
        "train": {"arch": "vit_tiny_r_s16_p8_224", "depth": 4, "patch_size": 2, "feature_dim": 128,
                  "views": "copy_edit", "hard_crop_scale": 0.3, "hard_strength": 0.15, "cpus_per_gpu": 1,
                  "num_threads": 1, "mem": "3G", "log_every": 20, "tensorboard": False, "plot": False},
        "train_v41": {**_TINY_STAGE, "epochs": 4, "lr": 0.02, "batch_size": 32, "input_size": 32,
                      "memory_size": 128, "memory_warmup_steps": 48, "seed": 22999},
        "train_v44": {**_TINY_STAGE, "epochs": 4, "lr": 0.02, "batch_size": 32, "input_size": 40,
                      "memory_size": 256, "memory_warmup_steps": 24, "pos_margin": 0.1, "neg_margin": 1.1,
                      "seed": 722999},
        "train_v46": {**_TINY_STAGE, "epochs": 4, "lr": 0.02, "batch_size": 32, "input_size": 48,
                      "memory_size": 256, "memory_warmup_steps": 24, "pos_margin": 0.1, "neg_margin": 1.1,
                      "seed": 34722999},
        "train_v45": {**_TINY_STAGE, "epochs": 4, "lr": 0.002, "batch_size": 8, "input_size": 56,
                      "memory_size": 0, "pos_margin": 0.1, "neg_margin": 1.1, "seed": 5699999,
                      "num_negatives": 2, "warmup_steps": 5},
        "extract": {"batch_size": 64, "gpus": 0, "cpus_per_gpu": 1, "mem": "3G", "time": "00:15:00"},
        "match": {"knn_k": 25, "cpus": 1, "mem": "2G", "time": "00:10:00"},
        "eval": {"cpus": 1, "mem": "1G", "time": "00:10:00"},
    },
}


def preflight_real_data(cfg: VscConfig) -> None:
    """At launch: a VSC root that is already there has what the stages read (the videos and
    metadata may still be the download stage's job, unless data.no_network; the ground truth is
    in the bucket's train/ prefix too)."""
    from data.vsc.layout import VscLayout

    problems = VscLayout(Path(cfg.data.root).expanduser()).check()
    if problems and cfg.data.no_network:
        first = next(iter(problems))
        raise UserError(f"VSC root {cfg.data.root}: {problems[first]}, and data.no_network=true forbids the download")


# -- stage functions (run inside jobs; heavy imports stay inside) --------------------------------------
def _roots(ctx) -> tuple:
    """(VSC root, DISC21 root) this run reads."""
    d = ctx.config.data
    if d.root:
        root = Path(d.root).expanduser()
        return root, Path(d.disc21_root).expanduser() if d.disc21_root else root / "disc21"
    root = ctx.data_root / "vsc-synthetic" / d.synthetic_preset
    return root, root / "disc21"


def _dataset(ctx):
    """(VscLayout, Disc21) of the download stage's output."""
    from data.isc.layout import Disc21
    from data.vsc.layout import VscLayout

    info = json.loads(Path(ctx.inputs["dataset"]).read_text())
    return VscLayout(Path(info["root"])), Disc21(Path(info["disc21_root"]))


def download(ctx) -> Dict[str, Any]:
    """Login node: bring the VSC videos and DISC21 (or write the synthetic set when no data is configured)."""
    cfg = ctx.config
    root, disc21_root = _roots(ctx)
    use_synthetic = cfg.data.synthetic == "yes" or (cfg.data.synthetic == "auto" and cfg.data.root is None)
    if use_synthetic:
        from data.vsc import synthetic

        print(f"vsc: no VSC data configured: using the SYNTHETIC set in {root} "
              f"(set data.root=... for the real data)", flush=True)
        with build_lock(root):  # another launch may be writing it now: wait, then reuse it
            summary = synthetic.generate(root, preset=cfg.data.synthetic_preset, seed=0)
        kind = "synthetic"
    else:
        from data.isc import download as disc21_download
        from data.vsc import download as dl

        wanted = [(dl.PARTS, root, cfg.data.base_url or VSC_BUCKET_URL, "VSC"),
                  (dl.DISC21_PARTS, disc21_root, cfg.data.disc21_base_url or disc21_download.BUCKET_URL, "DISC21")]
        summary = {"fetched": 0}
        for parts, where, url, what in wanted:
            missing = disc21_download.missing_parts(where, parts)
            if missing and cfg.data.no_network:
                raise UserError(f"{where}: {', '.join(missing.values())} missing or partly downloaded, and "
                                "data.no_network=true forbids the download")
            if missing:
                print(f"vsc: downloading {', '.join(missing.values())} of {what} into {where}", flush=True)
                report = disc21_download.download_disc21(
                    where, parts=missing, base_url=url, workers=cfg.data.download_workers,
                    progress=lambda part, done, total: ctx.heartbeat(step=done, total_steps=total, phase=part))
                summary["fetched"] += sum(part["fetched"] for part in report.values())
        kind = "real"
    ctx.output("dataset").write_text(json.dumps({"root": str(root), "disc21_root": str(disc21_root), "kind": kind}))
    return {"root": str(root), "kind": kind, **{k: summary[k] for k in ("copied", "fetched") if k in summary}}


def train(ctx) -> Dict[str, Any]:
    """One training stage (which one: ``ctx.stage``), DeepSpeed ZeRO-2 through the shared engine."""
    from hpc_jobs.engine import Trainer

    cfg, stage = ctx.config, ctx.stage
    opts: StageTrain = getattr(cfg, stage)
    epochs = stage_epochs(cfg, stage)
    _, disc21 = _dataset(ctx)
    task = VscTask(cfg, stage, disc21, say=lambda message: _say(ctx, message))
    upstream = ctx.inputs.get("checkpoint")
    if epochs == 0:
        return _hand_on(ctx, task, upstream)
    result = Trainer(task, engine_config(cfg, stage, epochs, ctx.env.world_size), ctx.out_dir, env=ctx.env,
                     init_from=upstream).fit()
    return {"step": result["step"], "epoch": result["epoch"], "train_loss": result["train_loss"],
            "handoff": f"init {HANDOFFS[stage]}" if upstream else None, "input_size": opts.input_size}


def _say(ctx, message: str) -> None:
    if ctx.env is None or ctx.env.is_main:
        print(message, flush=True)


def _hand_on(ctx, task, upstream: Optional[Path]) -> Dict[str, Any]:
    """No training (epochs=0): save the starting weights (resized to this stage's input) as the
    stage's checkpoint, so the next stage starts from them and the chain still runs end to end."""
    import torch

    from hpc_jobs.checkpoint import link_checkpoint, save_checkpoint
    from hpc_jobs.engine import load_init_weights

    _say(ctx, f"{ctx.stage}: no training (epochs=0): handing on its starting weights")
    handoff = f"weights {HANDOFFS[ctx.stage]}" if upstream is not None else None
    if ctx.env is not None and not ctx.env.is_main:
        return {"trained": False, "handoff": handoff}
    torch.manual_seed(getattr(ctx.config, ctx.stage).seed)
    model = task.build_model()
    if upstream is not None:
        load_init_weights(model, upstream, filter_fn=task.filter_init_state)
    path = ctx.out_dir / "checkpoints" / "step-00000000.pt"
    save_checkpoint(path, {"format": 1, "model": model.state_dict(), "step": 0, "epoch": 0},
                    step=0, epoch=0, meta={"weights_only": True, "reason": "epochs=0"})
    link_checkpoint(path, ctx.out_dir / "checkpoints" / "last.pt")
    return {"trained": False, "why": "epochs=0", "handoff": handoff}


def engine_config(cfg: VscConfig, stage: str, epochs: int, world: int):
    import torch

    from hpc_jobs.engine import TrainConfig

    s: StageTrain = getattr(cfg, stage)
    t = cfg.train
    gpu = torch.cuda.is_available()
    return TrainConfig(
        epochs=epochs, batch_size=per_rank_batch(s.batch_size, world, s.grad_accum, stage), lr=s.lr,
        grad_accum=s.grad_accum, precision=t.precision if gpu else "fp32", strategy="deepspeed",
        zero_stage=t.zero_stage, num_workers=t.num_workers, seed=s.seed,
        checkpoint_every_steps=t.checkpoint_every_steps, log_every=t.log_every, max_steps=t.max_steps,
        num_threads=t.num_threads, sync_batchnorm=t.sync_bn and gpu, tensorboard=t.tensorboard, plot=t.plot,
    )


def per_rank_batch(total: int, world: int, grad_accum: int, where: str) -> int:
    """The seed's --batch-size is per step over all GPUs; the engine's is per rank and micro-batch."""
    per = total // (world * grad_accum)
    if per < 1 or per * world * grad_accum != total:
        raise UserError(f"{where}: batch_size={total} does not split over {world} rank(s) x grad_accum="
                        f"{grad_accum}: use a multiple of {world * grad_accum}")
    return per


class VscTask:
    """The engine's TrainTask for every training stage: VSCNet at the stage's input size, SGD with
    the head at lr x5 / wd x10, the contrastive loss in a cross-batch memory (none in v45), the
    position embedding resized when the weights come from another input size."""

    def __init__(self, cfg: VscConfig, stage: str, disc21, say=print) -> None:
        from models.memory_bank import CrossBatchMemory

        self.cfg, self.stage, self.disc21, self.say = cfg, stage, disc21, say
        self.opts: StageTrain = getattr(cfg, stage)
        self.memory = CrossBatchMemory(self.opts.memory_size, cfg.train.feature_dim, self.opts.pos_margin,
                                       self.opts.neg_margin, warmup_batches=self.opts.memory_warmup_steps)

    def build_model(self, input_size: Optional[int] = None):
        from models.vsc import VSCNet

        t = self.cfg.train
        return VSCNet(t.arch, input_size or self.opts.input_size, fc_dim=t.feature_dim, pretrained=t.pretrained,
                      depth=t.depth, patch_size=t.patch_size)

    def filter_init_state(self, state_dict, model):
        from models.vsc import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model, log=lambda line: self.say(f"{self.stage}: {line}"))

    def build_optimizer(self, model):
        import torch

        from models.param_groups import optimizer_groups
        from models.vsc import HEAD_PREFIXES

        t = self.cfg.train
        groups = optimizer_groups(model, self.opts.wd, lr=self.opts.lr, head_prefixes=HEAD_PREFIXES,
                                  head_lr_scale=t.head_lr_scale, head_wd_scale=t.head_wd_scale)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.opts.lr)
        return torch.optim.SGD(groups, lr=self.opts.lr, momentum=t.momentum)

    def build_scheduler(self, optimizer, steps_per_epoch: int, epochs: int):
        import torch

        from models.lr_schedules import WarmupCosine

        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(self.opts.warmup_steps,
                                                                         steps_per_epoch * epochs))

    def train_dataset(self):
        from data.isc import datasets
        from data.isc.layout import list_images
        from models.timm_backbone import backbone_norm

        mean, std = backbone_norm(self.cfg.train.arch)
        size = self.opts.input_size
        if self.stage == "train_v45":  # supervised: the DISC21 query/reference ground truth
            queries, refs, negatives = datasets.supervised_pairs(self.disc21)
            return datasets.GroundTruthPairs(queries, refs, negatives, size, mean, std,
                                             negatives=self.opts.num_negatives)
        _, paths = list_images(self.disc21.training, "training", limit=self.opts.sample_size)
        t = self.cfg.train
        if t.views == "copy_edit":
            from data.vsc.train_views import CopyEditViews

            return CopyEditViews(paths, size, mean, std, ncrops=t.ncrops, strength=t.copy_edit_strength)
        return datasets.TrainViews(paths, size, mean, std, ncrops=t.ncrops, hard_strength=t.hard_strength,
                                   hard_crop_scale=t.hard_crop_scale)

    def training_step(self, model, batch):
        from models.gather import gather_with_grad

        images, labels = batch
        embeddings = model(images.flatten(0, 1))
        # the loss sees every rank's descriptors and the bank; each rank's gradient flows through
        # its own (ZeRO-2 averages the ranks' gradients as DDP does)
        all_embeddings, _ = gather_with_grad(embeddings)
        all_labels, _ = gather_with_grad(labels.flatten())
        out = self.memory.loss(all_embeddings, all_labels)
        return {"loss": out["loss"], "pos_loss": out["pos_loss"], "neg_loss": out["neg_loss"]}

    def state_dict(self) -> Dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state and "memory" in state:
            self.memory.load_state_dict(state["memory"])


def _device_and_dist(ctx):
    from hpc_jobs.engine.distributed import Distributed, select_device

    device = select_device(ctx.env)
    return device, Distributed(ctx.env, device)


def extract(ctx) -> Dict[str, Any]:
    """Descriptors of uniformly spaced frames of every query, reference and noise video ->
    descriptors.h5 (per set: ``{set}`` frames x dim, ``{set}_ids``, ``{set}_offsets`` (each
    video's first row), ``{set}_times`` (s), ``{set}_steps``). Each rank describes a contiguous
    shard of every set; rank 0 joins them."""
    import numpy as np
    import torch

    from data.isc.augment import resize
    from data.isc.datasets import to_tensor
    from data.vsc.frames import sample_frames
    from hpc_jobs.engine import load_init_weights
    from hpc_jobs.engine.strategy import autocast
    from models.timm_backbone import backbone_norm

    cfg, env = ctx.config, ctx.env
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    layout, disc21 = _dataset(ctx)
    size = cfg.extract.input_size or cfg.train_v45.input_size
    num_frames = cfg.extract.num_frames or cfg.train_v45.num_frames
    device, dist = _device_and_dist(ctx)
    try:
        task = VscTask(cfg, "train_v45", disc21, say=lambda message: _say(ctx, f"extract: {message}"))
        model = task.build_model(input_size=size)
        report = load_init_weights(model, ctx.inputs["checkpoint"], filter_fn=task.filter_init_state)
        _say(ctx, f"extract: {report.summary()}")
        model.to(device).eval()
        precision = cfg.train.precision if device.type == "cuda" else "fp32"
        mean, std = backbone_norm(cfg.train.arch)
        sets = {kind: layout.videos(kind) for kind in ("query", "reference", "noise")}
        parts = ctx.out_dir / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        total, done = sum(len(ids) for ids, _ in sets.values()), 0
        for name, (ids, paths) in sets.items():
            lo, hi = len(paths) * env.rank // env.world_size, len(paths) * (env.rank + 1) // env.world_size
            rows, counts, times, steps = [], [], [], []
            for path in paths[lo:hi]:
                frames = sample_frames(path, num_frames)
                batch = torch.stack([to_tensor(resize(f, size), mean, std) for f in frames.images])
                with torch.no_grad(), autocast(device, precision):
                    out = [model(chunk.to(device)).float().cpu() for chunk in batch.split(cfg.extract.batch_size)]
                rows.append(torch.cat(out).numpy())
                counts.append(len(frames.times))
                times.append(frames.times)
                steps.append(frames.step)
                done += env.world_size
                ctx.heartbeat(step=min(done, total), total_steps=total, phase=f"extract {name}")
            dim = cfg.train.feature_dim
            np.savez(parts / f"{name}.{env.rank}.npz", rows=np.concatenate(rows) if rows else np.zeros((0, dim)),
                     counts=np.asarray(counts, np.int64), times=np.concatenate(times) if times else np.zeros(0),
                     steps=np.asarray(steps, np.float64))
        dist.barrier()
        if env.is_main:
            _join_parts(ctx.output("descriptors"), parts, sets, env.world_size)
        dist.barrier()
    finally:
        dist.close()
    return {"queries": len(sets["query"][0]), "references": len(sets["reference"][0]),
            "noise": len(sets["noise"][0]), "frames_per_video": num_frames, "input_size": size}


def _join_parts(out: Path, parts: Path, sets, world: int) -> None:
    import shutil

    import h5py
    import numpy as np

    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, (ids, _) in sets.items():
            shards = [np.load(parts / f"{name}.{r}.npz") for r in range(world)]
            counts = np.concatenate([s["counts"] for s in shards])
            if len(counts) != len(ids):
                raise RuntimeError(f"extract: {len(counts)} {name} videos described for {len(ids)} listed")
            f.create_dataset(name, data=np.concatenate([s["rows"] for s in shards]).astype(np.float32))
            f.create_dataset(f"{name}_ids", data=np.array(ids, dtype="S"))
            f.create_dataset(f"{name}_offsets", data=np.concatenate([[0], np.cumsum(counts)]))
            f.create_dataset(f"{name}_times", data=np.concatenate([s["times"] for s in shards]))
            f.create_dataset(f"{name}_steps", data=np.concatenate([s["steps"] for s in shards]))
    tmp.replace(out)
    shutil.rmtree(parts, ignore_errors=True)


def load_videos(path: Path, name: str) -> list:
    """One set of descriptors.h5 as :class:`data.vsc.matching.VideoDescriptors`, one per video."""
    import h5py

    from data.vsc.matching import VideoDescriptors

    with h5py.File(path, "r") as f:
        rows, offsets, times = f[name][:], f[f"{name}_offsets"][:], f[f"{name}_times"][:]
        ids, steps = [x.decode() for x in f[f"{name}_ids"][:]], f[f"{name}_steps"][:]
    return [VideoDescriptors(vid, rows[a:b], times[a:b], float(step))
            for vid, a, b, step in zip(ids, offsets[:-1], offsets[1:], steps)]


def match(ctx) -> Dict[str, Any]:
    """Frame-level kNN of the queries against the references (noise-normalised scores), then
    temporal localisation of each candidate pair -> matches.csv (the matching track's format)."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "AVX2 not found" lines are noise
    import numpy as np

    from data.vsc.matches import write_matches
    from data.vsc.matching import find_matches

    if ctx.env is not None and not ctx.env.is_main:
        return {}
    m = ctx.config.match
    path = ctx.inputs["descriptors"]
    queries, references, noise = (load_videos(path, name) for name in ("query", "reference", "noise"))
    noise_rows = np.concatenate([v.descriptors for v in noise]) if noise else np.zeros((0, 1), np.float32)
    matches = find_matches(queries, references, noise_rows, knn_k=m.knn_k, noise_k=m.noise_k,
                           max_candidates=m.max_candidates, max_gap=m.max_gap, min_frames=m.min_frames)
    write_matches(ctx.output("matches"), matches)
    pairs = {x.pair() for x in matches}
    print(f"match: {len(matches)} segments in {len(pairs)} (query, reference) pairs from {len(queries)} queries x "
          f"{len(references)} references (kNN k={m.knn_k}, scores normalised by {len(noise)} noise videos)", flush=True)
    return {"segments": len(matches), "pairs": len(pairs)}


def evaluate(ctx) -> Dict[str, Any]:
    """The matching track's segment AP and the video-pair micro AP of the matches."""
    from data.vsc import metrics
    from data.vsc.matches import read_matches

    if ctx.env is not None and not ctx.env.is_main:
        return {}
    layout, _ = _dataset(ctx)
    gt = read_matches(layout.path("ground_truth"), ground_truth=True)
    result = metrics.evaluate(gt, read_matches(ctx.inputs["matches"]))
    ctx.output("metrics").write_text(json.dumps({**result, "ground_truth": str(layout.path("ground_truth"))},
                                                indent=2))
    print(f"vsc eval: segment AP {result['segment_ap']:.4f}, pair micro AP {result['pair_micro_ap']:.4f}; "
          f"{result['pairs_found']} of {result['ground_truth_pairs']} copied pairs found, "
          f"{result['predictions']} predicted segments", flush=True)
    return {k: result[k] for k in ("segment_ap", "pair_micro_ap", "pairs_found", "ground_truth_pairs")}


# -- the launcher object ---------------------------------------------------------------------------
@register
class Vsc(Workflow):
    name = "vsc"
    summary = ("VSC 2022 matching track (3rd place): v41 -> v44 -> v46 -> v45 (DeepSpeed ZeRO-2, pos-embed "
               "resized at each handoff) -> frame descriptors -> kNN + localisation -> segment AP")
    Config = VscConfig
    presets = PRESETS
    requires = ("torch", "timm", "deepspeed", "cv2", "h5py")
    default_preset = "tiny"  # the generated data set
    data_key, real_data_preset = "data.root", "paper"  # real data: the seed's settings

    def _gpus(self, asked: int) -> int:
        """GPUs on the stage's one node: its own count (the paper preset: the seed's 4), unless
        ``--gpus`` is given on the command line, or 0 (tiny): ``--gpus``."""
        opts = self.options
        return opts.gpus if asked == 0 or opts.gpus_given else asked

    def build(self) -> Pipeline:
        cfg = self.config
        if cfg.data.root:
            preflight_real_data(cfg)
        if self.options.nodes > 1:
            raise UserError("vsc runs every stage on one node, as the seed (DeepSpeed on 4 GPUs): drop --nodes")
        stages: List[Stage] = [
            Stage("download", download, where="login", outputs={"dataset": "dataset.json"},
                  description="VSC videos + DISC21 images (or the synthetic set); login node: needs the internet"),
        ]
        dataset = Input("download", "dataset")
        for name in TRAIN_STAGES:
            s: StageTrain = getattr(cfg, name)
            gpus = self._gpus(s.gpus)
            per_rank_batch(s.batch_size, max(1, gpus), s.grad_accum, name)  # fail at launch, not in the job
            inputs = {"dataset": dataset}
            if name in HANDOFFS:
                inputs["checkpoint"] = Input(HANDOFFS[name], "checkpoint", kind="init")
            res = Resources(nodes=1, gpus_per_node=gpus, tasks_per_node=max(1, gpus),
                            cpus_per_task=cfg.train.cpus_per_gpu, mem=cfg.train.mem, time=s.time)
            what = f"memory {s.memory_size}" if s.memory_size else f"supervised pairs + {s.num_negatives} negatives"
            stages.append(Stage(name, train, resources=res, inputs=inputs,
                                outputs={"checkpoint": "checkpoints/last.pt"},
                                description=f"{stage_epochs(cfg, name)} epochs at {s.input_size} px, {what}, ZeRO-"
                                            f"{cfg.train.zero_stage}" + (f", init from {HANDOFFS[name]}"
                                                                         if name in HANDOFFS else "")))
        ex, gpus = cfg.extract, self._gpus(cfg.extract.gpus)
        stages += [
            Stage("extract", extract,
                  resources=Resources(gpus_per_node=gpus, tasks_per_node=max(1, gpus), cpus_per_task=ex.cpus_per_gpu,
                                      mem=ex.mem, time=ex.time),
                  inputs={"dataset": dataset, "checkpoint": Input("train_v45", "checkpoint", kind="init")},
                  outputs={"descriptors": "descriptors.h5"},
                  description=f"{ex.num_frames or cfg.train_v45.num_frames} frames per query/reference/noise video"),
            Stage("match", match,
                  resources=Resources(cpus_per_task=cfg.match.cpus, mem=cfg.match.mem, time=cfg.match.time),
                  inputs={"descriptors": Input("extract", "descriptors")}, outputs={"matches": "matches.csv"},
                  description="frame kNN (faiss), noise normalisation, temporal localisation"),
            Stage("eval", evaluate,
                  resources=Resources(cpus_per_task=cfg.eval.cpus, mem=cfg.eval.mem, time=cfg.eval.time),
                  inputs={"dataset": dataset, "matches": Input("match", "matches")},
                  outputs={"metrics": "metrics.json"}, description="segment AP, pair micro AP (challenge rules)"),
        ]
        return Pipeline(self.name, stages)
