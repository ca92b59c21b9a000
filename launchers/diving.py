"""diving: DeepSports / MTL-AQA dive scoring with TimeSformer, the CARC Discovery routine as one command.

    download (login node) -> prepare (CPU job: annotated frames) -> train (GPU job, DDP) -> eval

The config surface is the seed's argument table (``--set frame_num=16``, same names and
meanings), plus resources and engine knobs. With no data configured the ``download`` stage
generates the synthetic MTL-AQA set (same on-disk layout) and says so; a user who points
``root_dir`` at real data never trains on synthetic data. With no preset given, the ``tiny``
preset is used on synthetic data and ``paper`` (the seed's settings) on real data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.errors import UserError
from hpc_jobs.fsutil import build_lock

FRAME_METHODS = Literal["random", "spaced_fixed", "spaced_varied", "spaced_fixed_new", "spaced_varied_new"]


@dataclass
class DataOptions:
    synthetic: Literal["auto", "yes", "no"] = "auto"  # auto: only when root_dir is not set
    synthetic_preset: Literal["tiny", "ci", "full", "sparse"] = "full"
    allow_missing: bool = False  # skip corrupt/missing videos (named in the report) instead of failing
    workers: Optional[int] = None  # frame extraction processes (default: the job's CPUs)
    cache_mb: float = 256.0  # decoded-frame cache per loader process
    checkpoint: Optional[str] = None  # TimeSformer checkpoint to download, e.g. TimeSformer_divST_8x32_224_K400
    base_url: Optional[str] = None  # mirror of the MTL-AQA files
    no_network: bool = False  # never download: fail naming what is missing


@dataclass
class DivingConfig:
    # -- the seed's argument table ------------------------------------------------------------------
    loglevel: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    gpu: bool = True
    root_dir: Optional[str] = None  # the data root (DeepSports_dataset); default <profile data>/diving
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    batch_size: int = 4
    epochs: int = 5
    learning_rate: float = 1e-5
    weight_decay: float = 1e-5
    momentum: float = 0.9
    train_val_split_ratio: float = 0.8
    frame_num: int = 8
    frame_method: FRAME_METHODS = "spaced_fixed"
    spatial_size: int = 224
    freeze: bool = False
    dropout: List[float] = field(default_factory=lambda: [0.5, 0.5])
    activation: Optional[Literal["ReLU", "LeakyReLU", "ELU", "GELU", "Tanh", "Sigmoid"]] = None
    topology: List[int] = field(default_factory=lambda: [512, 256])
    output: str = "losses.png"
    annotation_path: Optional[str] = None
    attention_type: Literal["divided_space_time", "space_only", "joint_space_time"] = "divided_space_time"
    optimizer: Literal["Adam", "AdamW", "SGD", "RMSProp"] = "AdamW"
    patch_size: int = 16
    embed_dim: int = 768
    pretrained_model: str = "scratch"  # a .pyth path, or scratch
    evaluate: bool = True  # run the eval stage on the test split
    normalize: bool = False
    data_aug: bool = False
    amsgrad: bool = False
    videos: str = "all"  # or video numbers, e.g. "01 02"
    loss_mse_weight: float = 1.0
    loss_spcoef_weight: float = 0.0
    use_decoder: bool = False
    # -- model size beyond the seed (ViT-B/16 by default) ---------------------------------------------
    depth: int = 12
    num_heads: int = 12
    drop_path_rate: float = 0.1
    # -- engine --------------------------------------------------------------------------------------
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    num_workers: Optional[int] = None
    checkpoint_every_steps: int = 0
    max_steps: Optional[int] = None
    log_every: int = 10
    # -- resources (per stage) -------------------------------------------------------------------------
    prepare_cpus: int = 8
    prepare_mem: str = "32G"
    prepare_time: str = "12:00:00"
    train_cpus_per_gpu: int = 4
    train_mem: str = "32G"
    train_time: str = "02:00:00"
    eval_time: str = "00:30:00"
    data: DataOptions = field(default_factory=DataOptions)

    def validate(self) -> None:
        if not 0.0 < self.train_val_split_ratio < 1.0:
            raise UserError(f"train_val_split_ratio={self.train_val_split_ratio}: must lie strictly between 0 and 1")
        for name in ("batch_size", "epochs", "frame_num", "spatial_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.spatial_size % self.patch_size:
            raise UserError(f"spatial_size={self.spatial_size} must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim={self.embed_dim} must be a multiple of num_heads={self.num_heads}")
        if len(self.dropout) != len(self.topology):
            raise UserError(f"dropout has {len(self.dropout)} values but topology has {len(self.topology)} layers: give one per layer")
        if self.root_dir is not None and not Path(self.root_dir).expanduser().is_dir():
            raise UserError(f"root_dir '{self.root_dir}' does not exist: point it at the MTL-AQA data root "
                            f"(whole_videos/, final_annotations_dict.pkl), or leave it unset for the synthetic set")
        if self.pretrained_model not in ("scratch", "") and not Path(self.pretrained_model).expanduser().is_file():
            raise UserError(f"pretrained_model '{self.pretrained_model}' is not a file: give a TimeSformer .pyth "
                            f"(--set data.checkpoint=TimeSformer_divST_8x32_224_K400 downloads one) or 'scratch'")
        if self.data.synthetic == "yes" and self.root_dir is not None:
            raise UserError("data.synthetic=yes with root_dir set: the synthetic set would overwrite nothing, "
                            "but training on it would ignore your data; drop one of them")


PRESETS: Dict[str, Dict[str, Any]] = {
    # The seed's settings (ViT-B/16, 8 frames, 224 px, the CARC job resources).
    "paper": {},
    # A TimeSformer small enough to learn the synthetic set on a laptop CPU in minutes.
    "tiny": {
        "depth": 2, "embed_dim": 96, "num_heads": 4, "patch_size": 16, "spatial_size": 64, "frame_num": 8,
        "frame_method": "spaced_varied", "batch_size": 4, "epochs": 25, "learning_rate": 1e-3,
        "weight_decay": 1e-4, "dropout": [0.0], "topology": [128], "activation": "GELU", "drop_path_rate": 0.0,
        "normalize": True, "loss_mse_weight": 1.0, "loss_spcoef_weight": 0.0, "optimizer": "AdamW",
        "prepare_cpus": 2, "prepare_mem": "2G", "prepare_time": "00:30:00",
        "train_cpus_per_gpu": 1, "train_mem": "4G", "train_time": "00:30:00", "eval_time": "00:15:00",
        "log_every": 20,
    },
}


def preflight_real_data(cfg: DivingConfig) -> None:
    """At launch, before anything is submitted: the annotation and split pickles load safely and
    agree, and every video already on disk is a whole mp4 long enough for its clips (headers only,
    no decoding). Videos not on disk yet are the download stage's job, unless data.no_network."""
    from data.diving import annotations as ann
    from data.diving import mp4check
    from data.diving.errors import ExtractError

    root = Path(cfg.root_dir).expanduser()
    ann_path = Path(cfg.annotation_path).expanduser() if cfg.annotation_path else root / "final_annotations_dict.pkl"
    if not ann_path.exists():
        if cfg.data.no_network:
            raise UserError(f"annotation file {ann_path} does not exist and data.no_network=true forbids the download")
        return
    annotations = ann.load_annotations(ann_path)
    splits = [Path(p).expanduser() for p in (cfg.train_path or root / "train_split_0.pkl", cfg.test_path or root / "test_split_0.pkl")]
    loaded = [ann.load_split(p, annotations, str(ann_path)) for p in splits if p.exists()]
    if len(loaded) == 2:
        ann.check_disjoint(loaded[0], loaded[1], str(splits[0]), str(splits[1]))
    videos_dir = root / "whole_videos"
    problems = mp4check.check_videos(root, annotations, videos=cfg.videos)
    bad = {v: why for v, why in problems.items()
           if why and (cfg.data.no_network or (videos_dir / f"{v}.mp4").exists())}
    if bad and not cfg.data.allow_missing:
        raise ExtractError(
            f"{len(bad)} video(s) missing or damaged: " + "; ".join(f"{v}: {why}" for v, why in bad.items())
            + ". Delete them to download again, or leave them out with --set data.allow_missing=true")


# -- stage functions (run inside jobs; heavy imports stay inside) --------------------------------------
def _root(ctx) -> Path:
    """The configured data root; the synthetic set lives apart, one directory per size."""
    cfg = ctx.config
    if cfg.root_dir:
        return Path(cfg.root_dir).expanduser()
    if cfg.data.synthetic == "no":
        return ctx.data_root / "diving"
    return ctx.data_root / "diving-synthetic" / cfg.data.synthetic_preset


def _dataset_record(ctx) -> Dict[str, Any]:
    return json.loads(Path(ctx.inputs["dataset"]).read_text())


def download(ctx) -> Dict[str, Any]:
    """Login node: bring the data (or generate the synthetic set when none is configured)."""
    from data.diving import download as dl
    from data.diving import synthetic

    cfg = ctx.config
    root = _root(ctx)
    use_synthetic = cfg.data.synthetic == "yes" or (cfg.data.synthetic == "auto" and cfg.root_dir is None)
    if use_synthetic:
        print(f"diving: no MTL-AQA data configured: using the SYNTHETIC set in {root} "
              f"(set root_dir=... for the real data)", flush=True)
        with build_lock(root):  # another launch may be writing it now: wait, then reuse it
            summary = synthetic.generate(root, preset=cfg.data.synthetic_preset, seed=cfg.seed)
        kind = "synthetic"
    else:
        summary = dl.download_dataset(root, videos=cfg.videos, checkpoint=cfg.data.checkpoint,
                                      base_url=cfg.data.base_url, no_network=cfg.data.no_network)
        kind = "real"
    if cfg.data.checkpoint and use_synthetic:
        dl.download_dataset(root, videos=[], annotations=False, checkpoint=cfg.data.checkpoint,
                            base_url=cfg.data.base_url, no_network=cfg.data.no_network)
    record = {"root": str(root), "kind": kind}
    out = ctx.output("dataset")
    out.write_text(json.dumps(record))
    return {"root": str(root), "kind": kind, "clips": summary.get("clips") if isinstance(summary, dict) else None}


def prepare(ctx) -> Dict[str, Any]:
    """CPU job: decode the annotated clip ranges into whole_videos_frames/NN/%06d.jpg (idempotent)."""
    from data.diving import extract_frames

    cfg = ctx.config
    root = Path(_dataset_record(ctx)["root"])

    def progress(done: int, total: int) -> None:
        ctx.heartbeat(step=done, total_steps=total, phase="extract")

    report = extract_frames(root, videos=cfg.videos, workers=cfg.data.workers, allow_missing=cfg.data.allow_missing,
                            progress=progress)
    ctx.output("frames").write_text(json.dumps({"root": str(root), "status": report["status"],
                                                "frames_written": report["frames_written"],
                                                "failed": report.get("failed", [])}))
    return {"status": report["status"], "frames_written": report["frames_written"],
            "frames_per_s": round(report.get("frames_per_s") or 0.0, 1)}


def _engine_config(cfg: DivingConfig):
    from hpc_jobs.engine import TrainConfig

    return TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate, strategy=cfg.strategy,
        precision=cfg.precision if cfg.gpu else "fp32", device="auto" if cfg.gpu else "cpu",
        num_workers=cfg.num_workers, seed=cfg.seed, checkpoint_every_steps=cfg.checkpoint_every_steps,
        best_metric="spearman", best_mode="max", log_every=cfg.log_every, max_steps=cfg.max_steps,
        find_unused_parameters=cfg.freeze,
    )


def train(ctx) -> Dict[str, Any]:
    """GPU job: DDP (or DeepSpeed) training through the shared engine; keeps the best by val Spearman."""
    import logging

    from hpc_jobs.engine import Trainer

    cfg = ctx.config
    logging.basicConfig(level=getattr(logging, cfg.loglevel), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(json.loads(Path(ctx.inputs["frames"]).read_text())["root"])
    task = DivingTask(cfg, root)
    result = Trainer(task, _engine_config(cfg), ctx.out_dir, env=ctx.env).fit()
    _copy_plot(ctx, cfg)
    best = result.get("best") or {}
    return {"step": result["step"], "epoch": result["epoch"], "val_spearman": best.get("value"),
            "best_step": best.get("step")}


def _copy_plot(ctx, cfg: DivingConfig) -> None:
    """The seed wrote its curves to ``output``; the engine writes out_dir/losses.png: copy it there too."""
    import shutil

    produced, wanted = ctx.out_dir / "losses.png", Path(cfg.output).expanduser()
    target = wanted if wanted.is_absolute() else ctx.out_dir / wanted
    if (ctx.env is None or ctx.env.is_main) and produced.exists() and target != produced:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, target)


def evaluate(ctx) -> Dict[str, Any]:
    """Spearman rho between predicted and true final score on the test split, best checkpoint."""
    import torch

    from hpc_jobs.engine import load_init_weights

    cfg = ctx.config
    if ctx.env is not None and not ctx.env.is_main:
        return {}
    root = Path(json.loads(Path(ctx.inputs["frames"]).read_text())["root"])
    task = DivingTask(cfg, root)
    model = task.build_model()
    load_init_weights(model, ctx.inputs["model"])
    device = torch.device("cuda" if cfg.gpu and torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(task.splits().test, batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=0)
    metrics = task.evaluate_loader(model, loader, device)
    metrics["checkpoint"] = str(ctx.inputs["model"])
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"diving eval: test Spearman rho = {metrics['spearman']:.4f} over {metrics['clips']} clips", flush=True)
    return {"spearman": metrics["spearman"], "clips": metrics["clips"], "mse": metrics["mse"]}


class DivingTask:
    """The engine's TrainTask for diving: TimeSformer + head, the seed's loss and optimizers."""

    def __init__(self, cfg: DivingConfig, root: Path):
        self.cfg, self.root = cfg, root
        self._splits = None

    def splits(self):
        if self._splits is None:
            from data.diving import build_datasets

            c = self.cfg
            self._splits = build_datasets(
                self.root, annotation_path=c.annotation_path, train_path=c.train_path, test_path=c.test_path,
                videos=c.videos, train_val_split_ratio=c.train_val_split_ratio, split_seed=c.seed,
                frame_num=c.frame_num, frame_method=c.frame_method, spatial_size=c.spatial_size,
                normalize=c.normalize, data_aug=c.data_aug, seed=c.seed, cache_mb=c.data.cache_mb,
                allow_missing=c.data.allow_missing)
        return self._splits

    def build_model(self):
        from models.diving import build_diving_model

        conf = asdict(self.cfg)
        conf["pretrained_model"] = None if self.cfg.pretrained_model in ("scratch", "") else self.cfg.pretrained_model
        return build_diving_model(conf)

    def build_optimizer(self, model):
        import torch

        c = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        if c.optimizer == "Adam":
            return torch.optim.Adam(params, lr=c.learning_rate, weight_decay=c.weight_decay, amsgrad=c.amsgrad)
        if c.optimizer == "AdamW":
            return torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay, amsgrad=c.amsgrad)
        if c.optimizer == "SGD":
            return torch.optim.SGD(params, lr=c.learning_rate, weight_decay=c.weight_decay, momentum=c.momentum)
        return torch.optim.RMSprop(params, lr=c.learning_rate, weight_decay=c.weight_decay, momentum=c.momentum)

    def train_dataset(self):
        return _FreshDrawEachEpoch(self.splits().train)

    def val_dataset(self):
        return self.splits().val

    def training_step(self, model, batch):
        from models.losses import diving_loss_terms

        clips, target = batch[0], batch[1]
        out = model(clips)
        terms = diving_loss_terms(out.float(), target.float(), self.cfg.loss_mse_weight, self.cfg.loss_spcoef_weight)
        return {"loss": terms.total, "mse": terms.mse.detach(), "soft_spearman": terms.spearman.detach()}

    def validate(self, model, loader):
        device = next(model.parameters()).device
        metrics = self.evaluate_loader(model, loader, device)
        return {"spearman": metrics["spearman"], "val_mse": metrics["mse"]}

    @staticmethod
    def evaluate_loader(model, loader, device) -> Dict[str, Any]:
        import numpy as np
        import torch
        from scipy.stats import spearmanr

        from models.heads import decode_score

        preds, trues = [], []
        with torch.no_grad():
            for batch in loader:
                clips, score = batch[0].to(device), batch[2]
                out = model(clips).float()
                preds.append(decode_score(out).cpu().numpy())
                trues.append(np.asarray(score, dtype=np.float64))
        pred, true = np.concatenate(preds), np.concatenate(trues)
        rho = float(spearmanr(pred, true).statistic) if len(pred) > 1 and np.std(pred) > 0 else 0.0
        return {"spearman": rho, "mse": float(np.mean((pred - true) ** 2)), "clips": int(len(pred))}


class _FreshDrawEachEpoch:
    """The engine seeds every sample by (seed, epoch, index); turn that seed into the clip's own
    draw, so random frame sampling and crops differ from epoch to epoch, reproducibly."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        import numpy as np

        return self.dataset[(int(index), int(np.random.randint(0, 2**31 - 1)))]


@register
class Diving(Workflow):
    name = "diving"
    summary = "DeepSports/MTL-AQA dive scoring, TimeSformer: download -> prepare frames -> train (DDP) -> Spearman eval"
    Config = DivingConfig
    presets = PRESETS
    requires = ("torch", "timm", "einops", "cv2", "scipy", "torchsort")
    default_preset = "tiny"  # the generated data set
    data_key, real_data_preset = "root_dir", "paper"  # real data: the seed's settings
    # --sweep learning_rate=1e-3,3e-4: download and prepare run once, train -> eval once per point
    sweep_from, sweep_metric, sweep_mode = "train", "spearman", "max"

    def build(self) -> Pipeline:
        cfg, opts = self.config, self.options
        if cfg.root_dir:
            preflight_real_data(cfg)
        gpus = opts.gpus if cfg.gpu else 0
        train_res = Resources(nodes=opts.nodes, gpus_per_node=gpus, tasks_per_node=max(1, opts.gpus),
                              cpus_per_task=cfg.train_cpus_per_gpu, mem=cfg.train_mem, time=cfg.train_time)
        eval_res = Resources(gpus_per_node=1 if cfg.gpu else 0, cpus_per_task=cfg.train_cpus_per_gpu,
                             mem=cfg.train_mem, time=cfg.eval_time)
        prep_res = Resources(cpus_per_task=cfg.prepare_cpus, mem=cfg.prepare_mem, time=cfg.prepare_time)
        stages = [
            Stage("download", download, where="login", outputs={"dataset": "dataset.json"},
                  description="videos + annotations (or the synthetic set); login node: needs the internet"),
            Stage("prepare", prepare, resources=prep_res, inputs={"dataset": Input("download", "dataset")},
                  outputs={"frames": "frames.json"}, description="annotated frames -> whole_videos_frames/"),
            Stage("train", train, resources=train_res, inputs={"frames": Input("prepare", "frames")},
                  outputs={"best": "checkpoints/best.pt", "last": "checkpoints/last.pt"},
                  description="TimeSformer + head, DDP, best by validation Spearman"),
        ]
        if cfg.evaluate:
            stages.append(Stage("eval", evaluate, resources=eval_res,
                                inputs={"model": Input("train", "best", kind="init"),
                                        "frames": Input("prepare", "frames")},
                                outputs={"metrics": "metrics.json"}, description="test Spearman rho"))
        return Pipeline(self.name, stages)
