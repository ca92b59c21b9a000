"""isc: ISC 2021 image copy detection, descriptor track (1st place), the seed's chain as one command.

    download (login node) -> train_v83 (5 ep) -> train_v83_cont (the same run resumed to 10 ep)
      -> train_v86 (init, larger input) -> train_v98 (init, + reference negatives)
      -> train_v107 (init, supervised on the query/reference ground truth)
      -> extract (descriptors -> h5) -> postprocess (DBA + NES + faiss kNN -> CSV) -> eval (uAP)

Each training stage is DDP on one node through the shared engine; ``train_v83_cont`` *resumes*
``train_v83`` (optimizer, epoch, memory bank and RNG restored: ``Input(kind="resume")``), the later
stages *init* from their predecessor's weights. Config sections are named after the stages and use
the seed's flag names (``--set train_v86.input_size=384``, ``--set train_v107.neg_margin=1.1``);
``train`` holds what the five share (``--set train.arch=...``; ``--set train.epochs=0`` skips
training everywhere: each stage then hands its starting weights on, so the chain still runs and
measures the untrained network).

With no data configured, ``download`` writes the synthetic DISC21-layout set and says so; the
``tiny`` preset (the default on synthetic data) is sized for it and a laptop CPU, ``paper`` (the
default when ``data.root`` is set) has the seed's hyper-parameters, sizes and GPU counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.errors import UserError
from hpc_jobs.fsutil import build_lock

PAPER_ARCH = "tf_efficientnetv2_m.in21k_ft_in1k"  # the seed's tf_efficientnetv2_m_in21ft1k
TRAIN_STAGES = ("train_v83", "train_v83_cont", "train_v86", "train_v98", "train_v107")
#: the stage each training stage starts from, and how: the seed's --resume / --weight
HANDOFFS = {"train_v83_cont": ("train_v83", "resume"), "train_v86": ("train_v83_cont", "init"),
            "train_v98": ("train_v86", "init"), "train_v107": ("train_v98", "init")}


@dataclass
class DataOptions:
    root: Optional[str] = None  # a DISC21 root (query_images/, reference_images/, ...); unset: synthetic
    synthetic: Literal["auto", "yes", "no"] = "auto"  # auto: only when root is not set
    synthetic_preset: Literal["micro", "tiny", "small"] = "tiny"
    train_queries: str = "query_images"               # v107's supervision: queries ...
    train_ground_truth: str = "public_ground_truth.csv"  # ... and their ground truth
    eval_queries: str = "query_images_phase2"         # extract/eval: held-out queries ...
    eval_ground_truth: str = "phase2_ground_truth.csv"   # ... and their ground truth
    base_url: Optional[str] = None  # a mirror of the competition bucket
    no_network: bool = False        # never download: fail naming what is missing
    download_workers: int = 16


@dataclass
class TrainShared:
    """What the five training stages share (``train.``)."""

    arch: str = PAPER_ARCH        # -a
    epochs: Optional[int] = None  # set: every stage trains this many epochs (v83_cont: this many more); 0: none
    ncrops: int = 2               # --ncrops: views per training image (1 moderate + hard ones)
    gem_p: float = 1.0            # --gem-p
    fc_dim: int = 256
    momentum: float = 0.9
    pretrained: bool = False      # timm's pretrained backbone (downloads it: needs the internet)
    hard_crop_scale: float = 0.15  # smallest crop of the hard view (the seed's hard_scale_lower)
    hard_strength: float = 1.0    # x the probability of each hard-view pixel edit (the seed's: 1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    sync_bn: bool = True          # SyncBatchNorm across ranks (GPUs only: gloo on CPUs has none)
    num_workers: Optional[int] = None
    num_threads: Optional[int] = None  # torch threads per rank (None: the job's CPUs under Slurm)
    cpus_per_gpu: int = 8
    mem: str = "64G"
    log_every: int = 50
    checkpoint_every_steps: int = 0
    max_steps: Optional[int] = None  # cap each stage's optimizer steps (smoke tests)
    tensorboard: bool = True
    plot: bool = True


@dataclass
class StageTrain:
    """One training stage: the seed's flags for that run."""

    epochs: int = 5
    lr: float = 0.1
    wd: float = 1e-6
    batch_size: int = 128          # total per step over all ranks (the seed's --batch-size per node)
    input_size: int = 256
    memory_size: int = 20000       # cross-batch memory (descriptors); 0: none
    memory_warmup_steps: int = 0   # batches before the bank joins the loss (0: at once, as the seed)
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    seed: int = 0
    sample_size: int = 1000000     # training images used
    extra_negatives: int = 0       # reference images per sample as negatives (v98: 2, v107: 30)
    overlay_p: float = 0.05        # hard view: chance of an overlay with another training image
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: lr x (1 - epoch/epochs)
    gpus: int = 0                  # GPUs (= DDP ranks); 0: --gpus
    grad_accum: int = 1
    time: str = "2-00:00:00"


@dataclass
class ExtractOptions:
    input_size: int = 512
    batch_size: int = 128          # total over all ranks
    gem_eval_p: float = 1.0        # --gem-eval-p
    train_sample: Optional[int] = None  # training images described for NES (default: all)
    gpus: int = 8                  # the seed extracts on every GPU of the node; 0: --gpus
    cpus_per_gpu: int = 8
    mem: str = "64G"
    time: str = "12:00:00"


@dataclass
class PostprocessOptions:
    k: int = 10                    # neighbours per query in the CSV
    dba_k: int = 10
    dba_alpha: float = 3.0
    nes_k: int = 10
    nes_beta: float = 0.35
    nes_iterations: int = 1
    gpus: int = 4                  # the seed post-processed on 4 GPUs (faiss-gpu); 0: CPU job
    cpus: int = 16
    mem: str = "128G"
    time: str = "06:00:00"


@dataclass
class EvalOptions:
    cpus: int = 2
    mem: str = "16G"
    time: str = "01:00:00"


def _stage(**values: Any):
    return field(default_factory=lambda: StageTrain(**values))


@dataclass
class IscConfig:
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainShared = field(default_factory=TrainShared)
    # the seed's five commands, flag for flag (the paper preset is these defaults)
    train_v83: StageTrain = _stage(epochs=5, lr=0.1, batch_size=128, input_size=256, memory_size=20000, seed=9,
                                   gpus=4, time="2-00:00:00")
    train_v83_cont: StageTrain = _stage(epochs=10, lr=0.1, batch_size=128, input_size=256, memory_size=20000,
                                        seed=90, gpus=4, time="2-00:00:00")
    train_v86: StageTrain = _stage(epochs=7, lr=0.1, batch_size=128, input_size=384, memory_size=20000, seed=99,
                                   gpus=8, time="2-00:00:00")
    train_v98: StageTrain = _stage(epochs=3, lr=0.1, batch_size=64, input_size=512, memory_size=20000, seed=999,
                                   extra_negatives=2, overlay_p=0.1, lr_schedule="linear", gpus=8, time="2-00:00:00")
    train_v107: StageTrain = _stage(epochs=10, lr=0.5, batch_size=512, input_size=512, memory_size=1000, seed=99999,
                                    neg_margin=1.1, extra_negatives=30, lr_schedule="linear", gpus=8,
                                    time="2-00:00:00")
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    #: fit the stages onto nodes with at most this many GPUs: a stage asking more spans
    #: ceil(asked / this) nodes with the same number of ranks (DDP world size) in all
    #: (``--nodes N`` spreads every stage's GPUs over N nodes the same way)
    max_gpus_per_node: Optional[int] = None

    def validate(self) -> None:
        for name in TRAIN_STAGES:
            s: StageTrain = getattr(self, name)
            for key in ("lr", "batch_size", "input_size", "sample_size", "grad_accum"):
                if getattr(s, key) <= 0:
                    raise UserError(f"{name}.{key}={getattr(s, key)}: must be positive")
            for key in ("epochs", "memory_size", "memory_warmup_steps", "extra_negatives", "gpus"):
                if getattr(s, key) < 0:
                    raise UserError(f"{name}.{key}={getattr(s, key)}: must be 0 or more")
            if not 0.0 <= s.overlay_p <= 1.0:
                raise UserError(f"{name}.overlay_p={s.overlay_p}: a probability in [0, 1]")
            if s.neg_margin <= s.pos_margin:
                raise UserError(f"{name}: neg_margin={s.neg_margin} must exceed pos_margin={s.pos_margin}")
        if self.train_v107.extra_negatives < 1:
            raise UserError("train_v107.extra_negatives must be at least 1: the supervised stage needs negatives")
        if self.train.epochs is not None and self.train.epochs < 0:
            raise UserError(f"train.epochs={self.train.epochs}: 0 (no training) or more")
        if self.train.ncrops < 2:
            raise UserError(f"train.ncrops={self.train.ncrops}: contrastive training needs 2 or more views")
        if not 0.0 < self.train.hard_crop_scale <= 1.0:
            raise UserError(f"train.hard_crop_scale={self.train.hard_crop_scale}: a fraction of the area in (0, 1]")
        if self.max_gpus_per_node is not None and self.max_gpus_per_node < 1:
            raise UserError(f"max_gpus_per_node={self.max_gpus_per_node}: at least 1")
        for key in ("k", "dba_k", "nes_k", "nes_iterations"):
            if getattr(self.postprocess, key) < 1:
                raise UserError(f"postprocess.{key}={getattr(self.postprocess, key)}: at least 1")
        if self.extract.input_size < 16 or self.extract.batch_size < 1:
            raise UserError("extract.input_size must be >= 16 and extract.batch_size >= 1")
        if self.data.root is not None and not Path(self.data.root).expanduser().is_dir():
            raise UserError(f"data.root '{self.data.root}' does not exist: point it at a DISC21 root "
                            "(query_images/, reference_images/, training_images/), or leave it unset for the synthetic set")
        if self.data.synthetic == "yes" and self.data.root is not None:
            raise UserError("data.synthetic=yes with data.root set: training would ignore your data; drop one of them")
        if self.data.synthetic == "no" and self.data.root is None:
            raise UserError("data.synthetic=no needs data.root (a DISC21 root to download into or read)")


def stage_epochs(cfg: IscConfig, stage: str) -> int:
    """The epochs a stage trains to: its own, or ``train.epochs`` (v83_cont: twice that, i.e.
    train.epochs more on top of v83's)."""
    if cfg.train.epochs is None:
        return getattr(cfg, stage).epochs
    return cfg.train.epochs * (2 if stage == "train_v83_cont" else 1)


_TINY_STAGE = dict(wd=1e-6, memory_warmup_steps=0, gpus=0, time="00:30:00", sample_size=384)
PRESETS: Dict[str, Dict[str, Any]] = {
    # The seed's commands (the dataclass defaults): EfficientNetV2-M, 256 -> 384 -> 512 px,
    # memory 20000 (v107: 1000), 4 then 8 GPUs.
    "paper": {},
    # Learns the synthetic set on a CPU in minutes: a 0.57M-parameter MobileNetV3 from scratch,
    # 64 -> 80 -> 96 px, the same chain and losses; gentler hard views (a network trained from
    # scratch for minutes does not learn the seed's full-strength ones) and a memory bank that
    # joins after a warm-up (from scratch, descriptors drift too fast for a bank at first). One
    # torch thread per rank: convolutions this small gain nothing from more, and on a shared
    # machine a stalled OpenMP thread holds the others (measured: 2.6 min vs 4+ min locally).
    "tiny": {
        "data": {"synthetic_preset": "tiny"},
        "train": {"arch": "mobilenetv3_small_050", "hard_crop_scale": 0.3, "hard_strength": 0.15,
                  "cpus_per_gpu": 1, "num_threads": 1, "mem": "3G", "log_every": 20, "tensorboard": False,
                  "plot": False},
        "train_v83": {**_TINY_STAGE, "epochs": 5, "lr": 0.1, "batch_size": 32, "input_size": 64,
                      "memory_size": 128, "memory_warmup_steps": 48, "seed": 9},
        "train_v83_cont": {**_TINY_STAGE, "epochs": 10, "lr": 0.1, "batch_size": 32, "input_size": 64,
                           "memory_size": 128, "memory_warmup_steps": 48, "seed": 90},
        "train_v86": {**_TINY_STAGE, "epochs": 5, "lr": 0.1, "batch_size": 32, "input_size": 80,
                      "memory_size": 256, "seed": 99},
        "train_v98": {**_TINY_STAGE, "epochs": 3, "lr": 0.1, "batch_size": 16, "input_size": 96,
                      "memory_size": 256, "seed": 999, "extra_negatives": 2, "overlay_p": 0.1,
                      "lr_schedule": "linear"},
        "train_v107": {**_TINY_STAGE, "epochs": 6, "lr": 0.1, "batch_size": 8, "input_size": 96,
                       "memory_size": 64, "seed": 99999, "neg_margin": 1.1, "extra_negatives": 6,
                       "lr_schedule": "linear"},
        "extract": {"input_size": 96, "batch_size": 64, "gpus": 0, "cpus_per_gpu": 1, "mem": "3G",
                    "time": "00:15:00"},
        "postprocess": {"gpus": 0, "cpus": 1, "mem": "2G", "time": "00:10:00"},
        "eval": {"cpus": 1, "mem": "1G", "time": "00:10:00"},
    },
}


def preflight_real_data(cfg: IscConfig) -> None:
    """At launch: a DISC21 root that is already there has what the stages read (the parts not
    there yet are the download stage's job, unless data.no_network)."""
    from data.isc.layout import Disc21

    d = cfg.data
    layout = Disc21(Path(d.root).expanduser(), d.train_queries, d.train_ground_truth, d.eval_queries,
                    d.eval_ground_truth)
    problems = layout.check()
    images = {"references", "training", "train_queries", "eval_queries"}
    if not d.no_network:  # the download stage brings the images; ground truth never comes from it
        problems = {k: v for k, v in problems.items() if k not in images}
    if problems:
        keys = {"train_ground_truth": "data.train_ground_truth", "eval_ground_truth": "data.eval_ground_truth"}
        first = next(iter(problems))
        raise UserError(f"DISC21 root {layout.root}: {problems[first]}"
                        + (f" (set {keys[first]}=..., or download it from the competition's data page)"
                           if first in keys else " and data.no_network=true forbids the download"))


# -- stage functions (run inside jobs; heavy imports stay inside) --------------------------------------
def _root(ctx) -> Path:
    cfg = ctx.config
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    return ctx.data_root / "isc-synthetic" / cfg.data.synthetic_preset


def _layout(ctx):
    from data.isc.layout import Disc21

    d = ctx.config.data
    root = Path(json.loads(Path(ctx.inputs["dataset"]).read_text())["root"])
    return Disc21(root, d.train_queries, d.train_ground_truth, d.eval_queries, d.eval_ground_truth)


def download(ctx) -> Dict[str, Any]:
    """Login node: bring DISC21 (or write the synthetic set when no data is configured)."""
    from data.isc import synthetic

    cfg = ctx.config
    root = _root(ctx)
    use_synthetic = cfg.data.synthetic == "yes" or (cfg.data.synthetic == "auto" and cfg.data.root is None)
    if use_synthetic:
        print(f"isc: no DISC21 data configured: using the SYNTHETIC set in {root} "
              f"(set data.root=... for the real data)", flush=True)
        with build_lock(root):  # another launch may be writing it now: wait, then reuse it
            summary = synthetic.generate(root, preset=cfg.data.synthetic_preset, seed=0)
        kind = "synthetic"
    else:
        from data.isc import download as dl

        used = {"reference_images", "training_images", cfg.data.train_queries, cfg.data.eval_queries}
        missing = dl.missing_parts(root, {p: f for p, f in dl.PARTS.items() if f in used})
        if missing and cfg.data.no_network:
            raise UserError(f"{root}: {', '.join(missing.values())} missing or partly downloaded, and "
                            "data.no_network=true forbids the download")
        summary = {}
        if missing:
            print(f"isc: downloading {', '.join(missing.values())} of DISC21 into {root}", flush=True)
            summary = dl.download_disc21(root, parts=missing, base_url=cfg.data.base_url or dl.BUCKET_URL,
                                         workers=cfg.data.download_workers,
                                         progress=lambda part, done, total: ctx.heartbeat(step=done, total_steps=total,
                                                                                          phase=part))
        summary = {"fetched": sum(part["fetched"] for part in summary.values())}
        kind = "real"
    ctx.output("dataset").write_text(json.dumps({"root": str(root), "kind": kind}))
    return {"root": str(root), "kind": kind, **{k: summary[k] for k in ("references", "fetched") if k in summary}}


def _device_and_dist(ctx):
    from hpc_jobs.engine.distributed import Distributed, select_device

    device = select_device(ctx.env)
    return device, Distributed(ctx.env, device)


def train(ctx) -> Dict[str, Any]:
    """One training stage (which one: ``ctx.stage``), DDP through the shared engine."""
    from hpc_jobs.checkpoint import latest_complete, read_manifest
    from hpc_jobs.engine import Trainer

    cfg, stage = ctx.config, ctx.stage
    opts: StageTrain = getattr(cfg, stage)
    epochs = stage_epochs(cfg, stage)
    task = IscTask(cfg, stage, _layout(ctx), world_size=ctx.env.world_size)
    upstream = ctx.inputs.get("checkpoint")
    kind = ctx.input_kinds.get("checkpoint")
    source = HANDOFFS.get(stage, (None, None))[0]
    init_from = resume_from = None
    if upstream is not None:
        manifest = read_manifest(upstream)
        if kind == "resume" and not manifest.meta.get("weights_only"):
            if epochs <= manifest.epoch:
                return _hand_on(ctx, task, upstream, f"{source} already trained {manifest.epoch} of the "
                                f"{epochs} epochs asked", epoch=manifest.epoch)
            resume_from = upstream
            own = latest_complete(ctx.out_dir / "checkpoints")
            if own is None:
                _say(ctx, f"{stage}: resumed {source} at epoch {manifest.epoch} (step {manifest.step}; optimizer, "
                     f"scheduler, memory bank and RNG restored); training on to epoch {epochs}")
            else:
                _say(ctx, f"{stage}: continuing from its own checkpoint {own.name} (a requeued attempt)")
        else:
            init_from = upstream
            if kind == "resume":
                _say(ctx, f"{stage}: {source} handed on untrained weights only (it trained no epoch): "
                     "starting from them with a fresh optimizer")
    if epochs == 0:
        return _hand_on(ctx, task, upstream, "epochs=0", epoch=0)
    world = ctx.env.world_size
    result = Trainer(task, engine_config(cfg, stage, epochs, world), ctx.out_dir, env=ctx.env,
                     init_from=init_from, resume_from=resume_from).fit()
    return {"step": result["step"], "epoch": result["epoch"], "train_loss": result["train_loss"],
            "handoff": _handoff(stage, kind if resume_from else ("init" if init_from else None)),
            "input_size": opts.input_size}


def _handoff(stage: str, kind: Optional[str]) -> Optional[str]:
    """``"resume train_v83"`` / ``"init train_v98"``: how this stage started, for ``status``."""
    return f"{kind} {HANDOFFS[stage][0]}" if kind and stage in HANDOFFS else None


def _say(ctx, message: str) -> None:
    if ctx.env is None or ctx.env.is_main:
        print(message, flush=True)


def _hand_on(ctx, task, upstream: Optional[Path], why: str, epoch: int) -> Dict[str, Any]:
    """No training in this stage: save the starting weights as its checkpoint (weights only), so
    the next stage starts from them and the chain still runs end to end."""
    import torch

    from hpc_jobs.checkpoint import link_checkpoint, save_checkpoint
    from hpc_jobs.engine import load_init_weights

    _say(ctx, f"{ctx.stage}: no training ({why}): handing on its starting weights")
    handoff = _handoff(ctx.stage, "weights" if upstream is not None else None)
    if ctx.env is not None and not ctx.env.is_main:
        return {"trained": False, "handoff": handoff}
    torch.manual_seed(getattr(ctx.config, ctx.stage).seed)
    model = task.build_model()
    if upstream is not None:
        load_init_weights(model, upstream)
    path = ctx.out_dir / "checkpoints" / "step-00000000.pt"
    save_checkpoint(path, {"format": 1, "model": model.state_dict(), "step": 0, "epoch": epoch},
                    step=0, epoch=epoch, meta={"weights_only": True, "reason": why})
    link_checkpoint(path, ctx.out_dir / "checkpoints" / "last.pt")
    return {"trained": False, "why": why, "handoff": handoff}


def engine_config(cfg: IscConfig, stage: str, epochs: int, world: int):
    import torch

    from hpc_jobs.engine import TrainConfig

    s: StageTrain = getattr(cfg, stage)
    t = cfg.train
    return TrainConfig(
        epochs=epochs, batch_size=per_rank_batch(s.batch_size, world, s.grad_accum, stage), lr=s.lr,
        grad_accum=s.grad_accum, precision=t.precision, strategy="ddp", num_workers=t.num_workers, seed=s.seed,
        checkpoint_every_steps=t.checkpoint_every_steps, log_every=t.log_every, max_steps=t.max_steps,
        num_threads=t.num_threads,
        sync_batchnorm=t.sync_bn and torch.cuda.is_available(), tensorboard=t.tensorboard, plot=t.plot,
    )


def per_rank_batch(total: int, world: int, grad_accum: int, where: str) -> int:
    """The seed's --batch-size is per step over all GPUs of the node; the engine's is per rank and
    micro-batch."""
    per = total // (world * grad_accum)
    if per < 1 or per * world * grad_accum != total:
        raise UserError(f"{where}: batch_size={total} does not split over {world} rank(s) x grad_accum="
                        f"{grad_accum}: use a multiple of {world * grad_accum}")
    return per


class IscTask:
    """The engine's TrainTask for every training stage: ISCNet, SGD, the contrastive loss in a
    cross-batch memory bank (saved in checkpoints, restored on resume)."""

    def __init__(self, cfg: IscConfig, stage: str, layout, world_size: int = 1) -> None:
        from models.memory_bank import CrossBatchMemory

        self.cfg, self.stage, self.layout = cfg, stage, layout
        self.opts: StageTrain = getattr(cfg, stage)
        self.memory = CrossBatchMemory(self.opts.memory_size, cfg.train.fc_dim, self.opts.pos_margin,
                                       self.opts.neg_margin, warmup_batches=self.opts.memory_warmup_steps)
        self.world_size = world_size

    def build_model(self):
        from models.isc import ISCNet

        t = self.cfg.train
        return ISCNet(t.arch, fc_dim=t.fc_dim, p=t.gem_p, eval_p=self.cfg.extract.gem_eval_p, pretrained=t.pretrained)

    def build_optimizer(self, model):
        import torch

        from models.param_groups import optimizer_groups

        return torch.optim.SGD(optimizer_groups(model, self.opts.wd), lr=self.opts.lr, momentum=self.cfg.train.momentum)

    def build_scheduler(self, optimizer, steps_per_epoch: int, epochs: int):
        import torch

        from models.lr_schedules import EpochLinearDecay

        if self.opts.lr_schedule == "constant":
            return None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, EpochLinearDecay(steps_per_epoch, epochs))

    def train_dataset(self):
        from data.isc import datasets
        from data.isc.layout import list_images
        from models.timm_backbone import backbone_norm

        mean, std = backbone_norm(self.cfg.train.arch)
        size = self.opts.input_size
        if self.stage == "train_v107":
            queries, refs, negatives = datasets.supervised_pairs(self.layout)
            return datasets.GroundTruthPairs(queries, refs, negatives, size, mean, std,
                                             negatives=self.opts.extra_negatives)
        _, paths = list_images(self.layout.training, "training", limit=self.opts.sample_size)
        negatives = list_images(self.layout.references, "reference")[1] if self.opts.extra_negatives else ()
        t = self.cfg.train
        return datasets.TrainViews(paths, size, mean, std, ncrops=t.ncrops, overlay_p=self.opts.overlay_p,
                                   hard_strength=t.hard_strength, hard_crop_scale=t.hard_crop_scale,
                                   negative_paths=negatives, extra_negatives=self.opts.extra_negatives)

    def training_step(self, model, batch):
        from models.gather import gather_with_grad

        images, labels = batch
        embeddings = model(images.flatten(0, 1))
        # the loss sees the whole step's batch (every rank's descriptors) and the bank, as the
        # seed's DistributedLossWrapper; each rank's gradient flows through its own descriptors
        all_embeddings, _ = gather_with_grad(embeddings)
        all_labels, _ = gather_with_grad(labels.flatten())
        out = self.memory.loss(all_embeddings, all_labels)
        return {"loss": out["loss"], "pos_loss": out["pos_loss"], "neg_loss": out["neg_loss"]}

    def state_dict(self) -> Dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state and "memory" in state:
            self.memory.load_state_dict(state["memory"])


def extract(ctx) -> Dict[str, Any]:
    """Descriptors of the eval queries, the references and the training images -> descriptors.h5
    (``query``, ``reference``, ``train``, ``query_ids``, ``reference_ids``). Every rank describes a
    contiguous shard; rank 0 joins them."""
    import numpy as np
    import torch

    from data.isc.datasets import EvalImages
    from data.isc.layout import list_images
    from hpc_jobs.engine import load_init_weights
    from hpc_jobs.engine.config import resolve_precision
    from hpc_jobs.engine.strategy import autocast
    from models.timm_backbone import backbone_norm

    cfg, env = ctx.config, ctx.env
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    layout = _layout(ctx)
    device, dist = _device_and_dist(ctx)
    try:
        task = IscTask(cfg, "train_v107", layout)
        model = task.build_model()
        report = load_init_weights(model, ctx.inputs["checkpoint"])
        _say(ctx, f"extract: {report.summary()}")
        model.to(device).eval()
        precision = resolve_precision(cfg.train.precision, device.type,
                                      device.type == "cuda" and torch.cuda.is_bf16_supported())
        mean, std = backbone_norm(cfg.train.arch)
        sets = {"query": list_images(layout.path(layout.eval_queries), "query"),
                "reference": list_images(layout.references, "reference"),
                "train": list_images(layout.training, "training", limit=cfg.extract.train_sample)}
        per_rank = max(1, cfg.extract.batch_size // env.world_size)
        workers = cfg.train.num_workers if cfg.train.num_workers is not None else min(8, max(0, env.cpus_per_task - 1))
        parts = ctx.out_dir / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        total = sum(len(ids) for ids, _ in sets.values())
        done = 0
        for name, (ids, paths) in sets.items():
            lo, hi = len(paths) * env.rank // env.world_size, len(paths) * (env.rank + 1) // env.world_size
            loader = torch.utils.data.DataLoader(EvalImages(paths[lo:hi], cfg.extract.input_size, mean, std),
                                                 batch_size=per_rank, num_workers=workers, shuffle=False)
            out = []
            with torch.no_grad(), autocast(device, precision):
                for images in loader:
                    out.append(model(images.to(device, non_blocking=True)).float().cpu().numpy())
                    done += len(images) * env.world_size
                    ctx.heartbeat(step=min(done, total), total_steps=total, phase=f"extract {name}")
            array = np.concatenate(out) if out else np.zeros((0, cfg.train.fc_dim), np.float32)
            np.save(parts / f"{name}.{env.rank}.npy", array.astype(np.float32))
        dist.barrier()
        if env.is_main:
            _join_parts(ctx.output("descriptors"), parts, sets, env.world_size)
        dist.barrier()
    finally:
        dist.close()
    return {"queries": len(sets["query"][0]), "references": len(sets["reference"][0]),
            "train": len(sets["train"][0]), "input_size": cfg.extract.input_size}


def _join_parts(out: Path, parts: Path, sets, world: int) -> None:
    import shutil

    import h5py
    import numpy as np

    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, (ids, _) in sets.items():
            data = np.concatenate([np.load(parts / f"{name}.{r}.npy") for r in range(world)])
            if len(data) != len(ids):
                raise RuntimeError(f"extract: {len(data)} {name} descriptors for {len(ids)} images")
            f.create_dataset(name, data=data)
        f.create_dataset("query_ids", data=np.array(sets["query"][0], dtype="S"))
        f.create_dataset("reference_ids", data=np.array(sets["reference"][0], dtype="S"))
        f.create_dataset("train_ids", data=np.array(sets["train"][0], dtype="S"))
    tmp.replace(out)
    shutil.rmtree(parts, ignore_errors=True)


def load_descriptors(path: Path):
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        return ({k: f[k][:].astype(np.float32) for k in ("query", "reference", "train")},
                [x.decode() for x in f["query_ids"][:]], [x.decode() for x in f["reference_ids"][:]])


def postprocess(ctx) -> Dict[str, Any]:
    """DBA on the training descriptors, NES of queries and references against them, exact kNN:
    predictions.csv (post-processed) and predictions_raw.csv (plain kNN, for comparison)."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "AVX2 not found" lines are noise
    import faiss
    import h5py
    import numpy as np

    from data.isc import postprocess as pp

    if ctx.env is not None and not ctx.env.is_main:
        return {}
    p = ctx.config.postprocess
    desc, query_ids, reference_ids = load_descriptors(ctx.inputs["descriptors"])
    out = pp.postprocess(desc["query"], desc["reference"], desc["train"], k=p.k, dba_k=p.dba_k,
                         dba_alpha=p.dba_alpha, nes_k=p.nes_k, nes_beta=p.nes_beta, nes_iterations=p.nes_iterations)
    _write_csv(ctx.output("predictions"), pp.to_rows(query_ids, reference_ids, out["scores"], out["indices"]))
    _write_csv(ctx.output("predictions_raw"), pp.to_rows(query_ids, reference_ids, out["raw_scores"],
                                                         out["raw_indices"]))
    iso = ctx.output("descriptors")
    tmp = iso.with_name(iso.name + ".tmp")
    with h5py.File(tmp, "w") as f:  # the descriptor-track submission: post-processed descriptors
        f.create_dataset("query", data=out["query"])
        f.create_dataset("reference", data=out["reference"])
        f.create_dataset("query_ids", data=np.array(query_ids, dtype="S"))
        f.create_dataset("reference_ids", data=np.array(reference_ids, dtype="S"))
    tmp.replace(iso)
    gpus = faiss.get_num_gpus()
    print(f"postprocess: DBA (k={p.dba_k}, sim^{p.dba_alpha:g}) on {len(desc['train'])} training descriptors, "
          f"NES (k={p.nes_k}, beta={p.nes_beta}), kNN k={p.k}; faiss on {f'{gpus} GPU(s)' if gpus else 'the CPU'}",
          flush=True)
    return {"queries": len(query_ids), "references": len(reference_ids), "faiss_gpus": gpus}


def _write_csv(path: Path, rows) -> None:
    import csv

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query_id", "reference_id", "score"])
        writer.writerows((q, r, f"{s:.6f}") for q, r, s in rows)
    tmp.replace(path)


def evaluate(ctx) -> Dict[str, Any]:
    """uAP and recall at precision 0.9 of the post-processed and the plain predictions."""
    from data.isc import metrics
    from data.isc.layout import read_ground_truth

    if ctx.env is not None and not ctx.env.is_main:
        return {}
    layout = _layout(ctx)
    gt = read_ground_truth(layout.path(layout.eval_ground_truth))
    final = metrics.evaluate(metrics.read_predictions(ctx.inputs["predictions"]), gt)
    raw = metrics.evaluate(metrics.read_predictions(ctx.inputs["predictions_raw"]), gt)
    result = {**final, "raw": raw, "ground_truth": str(layout.path(layout.eval_ground_truth))}
    ctx.output("metrics").write_text(json.dumps(result, indent=2))

    def fmt(value) -> str:
        return "not reached" if value is None else f"{value:.4f}"

    print(f"isc eval: uAP {final['uap']:.4f}, recall@P90 {fmt(final['recall_p90'])} (post-processed); "
          f"plain kNN uAP {raw['uap']:.4f}, recall@P90 {fmt(raw['recall_p90'])}; "
          f"{final['positives']} true pairs, {final['queries']} queries", flush=True)
    return {"uap": final["uap"], "recall_p90": final["recall_p90"], "uap_raw": raw["uap"],
            "recall_p90_raw": raw["recall_p90"], "recall_rank1": final["recall_rank1"]}


# -- the launcher object ---------------------------------------------------------------------------
@register
class Isc(Workflow):
    name = "isc"
    summary = ("ISC 2021 descriptor track (1st place): v83 -> v83 resumed -> v86 -> v98 -> v107 (DDP) -> "
               "extract -> DBA/NES/faiss post-process -> uAP")
    Config = IscConfig
    presets = PRESETS
    requires = ("torch", "timm", "faiss", "cv2", "h5py")
    default_preset = "tiny"  # the generated data set
    data_key, real_data_preset = "data.root", "paper"  # real data: the seed's settings

    def _layout(self, stage: str, asked: int) -> tuple:
        """(nodes, GPUs per node) for a stage asking ``asked`` GPUs (0: --gpus on each of --nodes).
        A stage with its own GPU count (the paper preset: the seed's) keeps that many ranks in all
        and spreads them over --nodes nodes, or over as many as ``max_gpus_per_node`` needs; an
        explicit ``--gpus N`` gives every GPU stage N per node on each of --nodes instead."""
        opts, cap = self.options, self.config.max_gpus_per_node
        if asked == 0 or opts.gpus_given:  # --gpus on the command line wins over the preset's counts
            return opts.nodes, opts.gpus
        nodes = max(opts.nodes, math.ceil(asked / cap) if cap else 1)
        if asked % nodes:
            raise UserError(f"{stage}: its {asked} GPUs do not split evenly over {nodes} nodes (--nodes, "
                            f"max_gpus_per_node): choose a node count that divides {asked}, or set {stage}.gpus")
        return nodes, asked // nodes

    def build(self) -> Pipeline:
        cfg = self.config
        if cfg.data.root:
            preflight_real_data(cfg)
        stages: List[Stage] = [
            Stage("download", download, where="login", outputs={"dataset": "dataset.json"},
                  description="DISC21 (or the synthetic set); login node: needs the internet"),
        ]
        dataset = Input("download", "dataset")
        for name in TRAIN_STAGES:
            s: StageTrain = getattr(cfg, name)
            nodes, gpus = self._layout(name, s.gpus)
            per_rank_batch(s.batch_size, nodes * max(1, gpus), s.grad_accum, name)  # fail at launch, not in the job
            inputs = {"dataset": dataset}
            if name in HANDOFFS:
                source, kind = HANDOFFS[name]
                inputs["checkpoint"] = Input(source, "checkpoint", kind=kind)
            res = Resources(nodes=nodes, gpus_per_node=gpus, tasks_per_node=max(1, gpus),
                            cpus_per_task=cfg.train.cpus_per_gpu, mem=cfg.train.mem, time=s.time)
            stages.append(Stage(name, train, resources=res, inputs=inputs,
                                outputs={"checkpoint": "checkpoints/last.pt"},
                                description=f"{stage_epochs(cfg, name)} epochs at {s.input_size} px, memory "
                                            f"{s.memory_size}" + (f", {HANDOFFS[name][1]} from {HANDOFFS[name][0]}"
                                                                  if name in HANDOFFS else "")))
        nodes, gpus = self._layout("extract", cfg.extract.gpus)
        ex = cfg.extract
        stages += [
            Stage("extract", extract,
                  resources=Resources(nodes=nodes, gpus_per_node=gpus, tasks_per_node=max(1, gpus),
                                      cpus_per_task=ex.cpus_per_gpu, mem=ex.mem, time=ex.time),
                  inputs={"dataset": dataset, "checkpoint": Input("train_v107", "checkpoint", kind="init")},
                  outputs={"descriptors": "descriptors.h5"},
                  description=f"query/reference/training descriptors at {ex.input_size} px"),
            Stage("postprocess", postprocess,
                  resources=Resources(gpus_per_node=cfg.postprocess.gpus, tasks_per_node=1,
                                      cpus_per_task=cfg.postprocess.cpus, mem=cfg.postprocess.mem,
                                      time=cfg.postprocess.time),
                  inputs={"descriptors": Input("extract", "descriptors")},
                  outputs={"predictions": "predictions.csv", "predictions_raw": "predictions_raw.csv",
                           "descriptors": "descriptors_iso.h5"},
                  description="DBA + NES on training descriptors, exact kNN (faiss)"),
            Stage("eval", evaluate,
                  resources=Resources(cpus_per_task=cfg.eval.cpus, mem=cfg.eval.mem, time=cfg.eval.time),
                  inputs={"dataset": dataset, "predictions": Input("postprocess", "predictions"),
                          "predictions_raw": Input("postprocess", "predictions_raw")},
                  outputs={"metrics": "metrics.json"}, description="uAP, recall@P90 (competition rules)"),
        ]
        return Pipeline(self.name, stages)
