"""product: Visual Product Recognition 2023 (1st place), the seed's data preparation and five
training phases as one command.

    dataset (login: the synthetic set, or a check of the real layout)
    get_pairs[category] ──aftercorr──> extract_features[category] ──aftercorr──> analyse_pairs[category]
    arcface_1 (Product10K, 224 px) ──best──> arcface_2 (256 px) ──best──┘ (the filter's model)
    analyse_pairs[all] -> download_images (login node, mid-pipeline) -> prepare_training_set
    arcface_2 ──best──> xbm_1 (threshold-0.6 set) ──best──> xbm_2 (0.5 set) ──best──> xbm_3 (lower lr)
    xbm_3 ──best──> eval (mAP@1000 on the development set, queries cropped to their boxes)

The data preparation is an array over the Amazon-review categories (the seed ran one command per
category and script); task k of each array waits only for task k of the one before. The cosine
filter embeds the images with "the phase-2 model": this run's ``arcface_2`` (its best checkpoint),
or a given checkpoint (``--set filter.checkpoint=PATH``: then the data preparation does not wait
for the ArcFace phases). Every training phase starts from its predecessor's **best** checkpoint
(``BestCheckpoint``, by ``val_map``: the dev-set mAP@1000 each epoch, as the seed validated);
the XBM phases load it non-strictly and drop the ArcFace head (their log names what was dropped).

Config sections are the stage names (``--set xbm_3.lr_head=6e-6``); ``train`` holds what the
phases share (``--set train.arch=...``; ``--set train.epochs=0`` skips training everywhere: each
phase then hands its starting weights on, so the chain still runs and measures the untrained
network). With no ``data.root`` the ``dataset`` stage writes the synthetic set and says so; the
``tiny`` preset (the default then) fits it and a 2-core CPU, ``paper`` (the default once
``data.root`` is set) has the seed's hyper-parameters, image sizes and GPU counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from data.product import CATEGORIES
from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register
from hpc_jobs.errors import UserError
from hpc_jobs.fsutil import build_lock
from hpc_jobs.spec import BestCheckpoint

#: the seed's backbone: OpenCLIP ConvNeXt-XXLarge (laion2b_s34b_b82k_augreg_soup) as timm names it
PAPER_ARCH = "convnext_xxlarge.clip_laion2b_soup"
#: phase -> (loss, training data, the phase whose best checkpoint it starts from)
PHASES = {
    "arcface_1": ("arcface", "product10k", None),
    "arcface_2": ("arcface", "product10k", "arcface_1"),
    "xbm_1": ("xbm", "strict", "arcface_2"),
    "xbm_2": ("xbm", "loose", "xbm_1"),
    "xbm_3": ("xbm", "loose", "xbm_2"),
}
BEST = "val_map"  # the validation metric that picks every phase's best checkpoint


@dataclass
class DataOptions:
    root: Optional[str] = None  # holds the folders below; unset: the synthetic set
    synthetic: Literal["auto", "yes", "no"] = "auto"  # auto: only when root is not set
    synthetic_preset: Literal["micro", "tiny", "small"] = "tiny"
    product10k: str = "Product10K"              # train/, train.csv, test/, test_kaggletest.csv
    dev_set: str = "development_test_data"      # gallery/, gallery.csv, queries/, queries.csv
    reviews: str = "amazon/reviews"             # <Category>.json(.gz) + meta_<Category>.json(.gz)
    images: str = "amazon/images_mean"          # where download_images puts the kept images
    categories: List[str] = field(default_factory=lambda: list(CATEGORIES))
    download_workers: int = 16


@dataclass
class FilterOptions:
    checkpoint: Optional[str] = None  # a phase-2 checkpoint of a previous run; unset: this run's arcface_2
    strict: float = 0.6               # the seed's two thresholds on the mean cosine ...
    loose: float = 0.5                # ... (xbm_1 trains on the strict set, xbm_2/3 on the loose one)
    input_size: int = 256
    batch_size: int = 64
    snapshot_every: int = 1000        # the seed's snapshot interval (items)
    fetch_workers: int = 16
    gpus: int = 1
    cpus: int = 8
    mem: str = "32G"
    time: str = "12:00:00"


@dataclass
class TrainShared:
    """What the five phases share (``train.``)."""

    arch: str = PAPER_ARCH
    pretrained: bool = False         # timm's pretrained weights (downloads them: needs the internet)
    embedding_dim: int = 1024
    subcenters: int = 3              # sub-centre ArcFace: centres per class
    s: float = 30.0                  # ArcFace scale
    m_min: float = 0.05              # adaptive margin range: count^-1/4 scaled to [m_min, m_max]
    m_max: float = 0.5
    xbm_margin: float = 0.5          # contrastive: negatives pay while their cosine exceeds this
    epochs: Optional[int] = None     # set: every phase trains this many epochs; 0: none (the baseline)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the seed: bf16
    channels_last: bool = True       # the seed's memory format on GPUs
    num_workers: Optional[int] = None
    num_threads: Optional[int] = None
    cpus_per_gpu: int = 8
    mem: str = "64G"
    log_every: int = 50
    max_steps: Optional[int] = None  # cap each phase's optimizer steps (smoke tests)
    tensorboard: bool = True
    plot: bool = True


@dataclass
class Phase:
    """One training phase: the seed's config of that run."""

    epochs: int = 3
    input_size: int = 224
    batch_size: int = 48          # images per optimizer step over all ranks
    lr_head: float = 3e-4         # learning_rate_head (projection + ArcFace)
    wd_head: float = 0.1
    lr_backbone: float = 1e-5     # the last backbone block's; each earlier block has half the next's
    backbone_blocks: int = 4      # the seed's e1..e4: 1.25e-6, 2.5e-6, 5e-6, 1e-5
    wd_backbone: float = 1e-3
    warmup_steps: int = 4500
    grad_accum: int = 1
    memory_size: int = 32000      # XBM phases: past embeddings in the bank
    seed: int = 42
    gpus: int = 1                 # 0: --gpus
    time: str = "2-00:00:00"


@dataclass
class EvalOptions:
    input_size: int = 256
    batch_size: int = 128
    fp16: bool = True             # the seed's inference: pure fp16 on GPUs (fp32 on a CPU)
    crop_queries: bool = True     # crop the queries to their boxes
    gpus: int = 1
    cpus: int = 8
    mem: str = "32G"
    time: str = "02:00:00"


@dataclass
class PrepOptions:
    cpus: int = 2
    mem: str = "16G"
    time: str = "04:00:00"


def _phase(**values: Any):
    return field(default_factory=lambda: Phase(**values))


@dataclass
class ProductConfig:
    data: DataOptions = field(default_factory=DataOptions)
    filter: FilterOptions = field(default_factory=FilterOptions)
    prep: PrepOptions = field(default_factory=PrepOptions)
    train: TrainShared = field(default_factory=TrainShared)
    # the seed's five configs (config/arcface_1st.yml ... xbm_3rd.yml): the paper preset
    arcface_1: Phase = _phase(epochs=3, input_size=224, batch_size=48, lr_head=3e-4, warmup_steps=4500)
    arcface_2: Phase = _phase(epochs=5, input_size=256, batch_size=32, lr_head=3e-4, warmup_steps=4500)
    xbm_1: Phase = _phase(epochs=3, input_size=256, batch_size=32, lr_head=1e-4, warmup_steps=1000)
    xbm_2: Phase = _phase(epochs=3, input_size=256, batch_size=32, lr_head=1e-4, warmup_steps=1000)
    xbm_3: Phase = _phase(epochs=3, input_size=256, batch_size=32, lr_head=6e-6, warmup_steps=1500, grad_accum=4)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def validate(self) -> None:
        d = self.data
        if not d.categories:
            raise UserError("data.categories is empty: name at least one Amazon-review category")
        if len(set(d.categories)) != len(d.categories):
            raise UserError(f"data.categories={d.categories}: a category is named twice")
        synthetic = d.synthetic == "yes" or (d.synthetic == "auto" and d.root is None)
        if synthetic and list(d.categories) != list(CATEGORIES[:len(d.categories)]):
            raise UserError(f"data.categories={d.categories}: the synthetic set has the seed's categories in its "
                            f"order; use the first n of {', '.join(CATEGORIES)}")
        if d.root is not None and not Path(d.root).expanduser().is_dir():
            raise UserError(f"data.root '{d.root}' does not exist: point it at the folder holding "
                            f"{d.product10k}/, {d.dev_set}/ and {d.reviews}/, or leave it unset for the synthetic set")
        if d.synthetic == "yes" and d.root is not None:
            raise UserError("data.synthetic=yes with data.root set: training would ignore your data; drop one of them")
        if d.synthetic == "no" and d.root is None:
            raise UserError("data.synthetic=no needs data.root")
        f = self.filter
        if not -1.0 <= f.loose <= f.strict <= 1.0:
            raise UserError(f"filter.loose={f.loose} and filter.strict={f.strict}: cosines with loose <= strict")
        if f.snapshot_every < 1 or f.batch_size < 1:
            raise UserError("filter.snapshot_every and filter.batch_size must be at least 1")
        if f.checkpoint is not None and not Path(f.checkpoint).expanduser().is_file():
            raise UserError(f"filter.checkpoint '{f.checkpoint}' is not a file: give a phase-2 checkpoint "
                            "(a previous run's stages/arcface_2/checkpoints/best.pt), or unset it to use this run's")
        t = self.train
        if not 0.0 <= t.m_min <= t.m_max < math.pi / 2:
            raise UserError(f"train.m_min={t.m_min}, train.m_max={t.m_max}: margins with 0 <= m_min <= m_max < pi/2")
        if t.epochs is not None and t.epochs < 0:
            raise UserError(f"train.epochs={t.epochs}: 0 (no training) or more")
        if t.subcenters < 1 or t.embedding_dim < 2:
            raise UserError("train.subcenters must be >= 1 and train.embedding_dim >= 2")
        for name, (loss, _, _) in PHASES.items():
            p: Phase = getattr(self, name)
            for key in ("input_size", "batch_size", "lr_head", "grad_accum", "backbone_blocks"):
                if getattr(p, key) <= 0:
                    raise UserError(f"{name}.{key}={getattr(p, key)}: must be positive")
            for key in ("epochs", "warmup_steps", "memory_size", "gpus", "lr_backbone"):
                if getattr(p, key) < 0:
                    raise UserError(f"{name}.{key}={getattr(p, key)}: must be 0 or more")
            if loss == "xbm" and p.batch_size % 2:
                raise UserError(f"{name}.batch_size={p.batch_size}: an XBM batch is pairs of one product's "
                                "images: use an even number")


def phase_epochs(cfg: ProductConfig, name: str) -> int:
    return getattr(cfg, name).epochs if cfg.train.epochs is None else cfg.train.epochs


_TINY_PHASE = dict(gpus=0, time="00:20:00", lr_backbone=2e-3, backbone_blocks=1, wd_backbone=1e-4,
                   wd_head=1e-4, grad_accum=1)
PRESETS: Dict[str, Dict[str, Any]] = {
    # The seed's configs (the dataclass defaults): CLIP ConvNeXt-XXLarge, 224 then 256 px, batch
    # 48/32, AdamW with the head at 3e-4 (XBM: 1e-4, then 6e-6) and the backbone at 1.25e-6..1e-5,
    # warm-up + cosine, bf16, one A100 per phase, XBM memory 32000.
    "paper": {},
    # Learns the synthetic set on a 2-core CPU in about a minute: ResNet-10-T from scratch (the
    # MobileNetV3 and LCNet tried first barely moved under ArcFace from scratch in this budget),
    # 48 -> 56 px, three categories, one learning rate for the whole network (a network from
    # scratch has nothing to protect in its early layers), snapshots every 24 images so the
    # filter's resume is exercised. The filter's thresholds are 0.1 lower than the seed's: a
    # network trained for a minute from scratch puts a product's customer photos at a mean cosine
    # of about 0.6 to its seller photos (the seed's CLIP model: higher); measured on the synthetic
    # set, 0.5 / 0.4 remove about 90% / 80% of the injected wrong images and keep 60% / 75% of
    # the right ones. One torch thread a job: a network this small gains nothing
    # from more on a shared machine.
    "tiny": {
        "data": {"synthetic_preset": "tiny", "categories": list(CATEGORIES[:3]), "download_workers": 4},
        "filter": {"strict": 0.5, "loose": 0.4, "input_size": 56, "batch_size": 32, "snapshot_every": 24,
                   "fetch_workers": 1, "gpus": 0, "cpus": 1, "mem": "2G", "time": "00:10:00"},
        "prep": {"cpus": 1, "mem": "1G", "time": "00:10:00"},
        "train": {"arch": "resnet10t", "embedding_dim": 128, "cpus_per_gpu": 1, "num_threads": 1,
                  "mem": "3G", "log_every": 10, "tensorboard": False, "plot": False, "channels_last": False},
        "arcface_1": {**_TINY_PHASE, "epochs": 6, "input_size": 48, "batch_size": 32, "lr_head": 2e-3,
                      "warmup_steps": 6},
        "arcface_2": {**_TINY_PHASE, "epochs": 2, "input_size": 56, "batch_size": 32, "lr_head": 1e-3,
                      "lr_backbone": 1e-3, "warmup_steps": 3},
        "xbm_1": {**_TINY_PHASE, "epochs": 2, "input_size": 56, "batch_size": 32, "lr_head": 3e-4,
                  "lr_backbone": 3e-4, "warmup_steps": 2, "memory_size": 256},
        "xbm_2": {**_TINY_PHASE, "epochs": 2, "input_size": 56, "batch_size": 32, "lr_head": 3e-4,
                  "lr_backbone": 3e-4, "warmup_steps": 2, "memory_size": 256},
        "xbm_3": {**_TINY_PHASE, "epochs": 1, "input_size": 56, "batch_size": 32, "lr_head": 1e-4,
                  "lr_backbone": 1e-4, "warmup_steps": 1, "memory_size": 256},
        "eval": {"input_size": 56, "batch_size": 64, "gpus": 0, "cpus": 1, "mem": "2G", "time": "00:10:00"},
    },
}


# -- stage functions (run inside jobs; heavy imports stay inside) --------------------------------------
def _say(ctx, message: str) -> None:
    if ctx.env is None or ctx.env.is_main:
        print(message, flush=True)


def _uses_synthetic(cfg: ProductConfig) -> bool:
    return cfg.data.synthetic == "yes" or (cfg.data.synthetic == "auto" and cfg.data.root is None)


def _paths(ctx) -> Dict[str, Any]:
    """The dataset stage's record: where Product10K, the dev set, the reviews and the images are."""
    return json.loads(Path(ctx.inputs["dataset"]).read_text())


def prepare_dataset(ctx) -> Dict[str, Any]:
    """Login node: write the synthetic set (no data configured), or check the real layout."""
    cfg = ctx.config
    d = cfg.data
    if _uses_synthetic(cfg):
        from data.product import synthetic

        root = ctx.data_root / "product-synthetic" / d.synthetic_preset
        print(f"product: no data configured: using the SYNTHETIC set in {root} (set data.root=... for "
              "Product10K, the development set and the Amazon reviews)", flush=True)
        with build_lock(root):  # another launch may be writing it now: wait, then reuse it
            summary = synthetic.generate(root, preset=d.synthetic_preset, seed=0, categories=len(d.categories))
        paths = {"kind": "synthetic", "product10k": root / "Product10K", "dev_set": root / "development_test_data",
                 "reviews": root / "amazon" / "reviews", "images": root / "amazon" / "images_mean",
                 "truth": root / "amazon" / "filter_truth.json"}
    else:
        root = Path(d.root).expanduser()
        paths = {"kind": "real", "product10k": root / d.product10k, "dev_set": root / d.dev_set,
                 "reviews": root / d.reviews, "images": root / d.images, "truth": None}
        summary = {}
    problems = check_layout(paths, d.categories)
    if problems:
        raise UserError(f"product data in {root}: " + "; ".join(problems))
    record = {k: (str(v) if v is not None else None) for k, v in paths.items()}
    ctx.output("dataset").write_text(json.dumps(record, indent=1))
    return {"kind": record["kind"], "root": str(root), **{k: summary[k] for k in ("p10k_train", "gallery", "queries")
                                                          if k in summary}}


def review_files(reviews: Path, category: str) -> tuple:
    """A category's review and metadata files (``.json`` or ``.json.gz``, as UCSD serves them)."""
    def first(stem: str) -> Path:
        for suffix in (".json", ".json.gz"):
            if (reviews / f"{stem}{suffix}").exists():
                return reviews / f"{stem}{suffix}"
        return reviews / f"{stem}.json"

    return first(category), first(f"meta_{category}")


def check_layout(paths: Dict[str, Any], categories: List[str]) -> List[str]:
    """What is missing from the layouts the stages read (empty: all there)."""
    p10k, dev, reviews = Path(paths["product10k"]), Path(paths["dev_set"]), Path(paths["reviews"])
    need = [p10k / "train.csv", p10k / "train", dev / "gallery.csv", dev / "queries.csv"]
    for category in categories:
        need += list(review_files(reviews, category))
    return [f"{p} is missing" for p in need if not p.exists()]


def get_pairs(ctx) -> Dict[str, Any]:
    """Array task k: category k's reviews + metadata -> pairs (parquet, or CSV without pyarrow)."""
    from data.product import amazon

    category = ctx.config.data.categories[ctx.task_index]
    reviews, meta = review_files(Path(_paths(ctx)["reviews"]), category)
    rows, counts = amazon.get_pairs(reviews, meta)
    path = amazon.write_table(ctx.output("pairs"), "pairs", rows, amazon.PAIR_COLUMNS)
    print(f"get_pairs {category}: {counts['products']} products with customer images, {counts['user_images']} "
          f"customer and {counts['product_images']} product images -> {path.name}"
          + ("" if path.suffix == ".parquet" else " (pyarrow is not installed: CSV instead of parquet)"), flush=True)
    return {"category": category, **counts, "format": path.suffix[1:]}


def _device(ctx):
    from hpc_jobs.engine.distributed import select_device

    return select_device(ctx.env)


def _load_embedder(ctx, checkpoint: Path, input_size: int):
    """The embedding network (no ArcFace head) with a checkpoint's weights, in eval mode on the
    job's device: fp16 and channels_last on a GPU (the seed's fast inference)."""
    import torch

    from hpc_jobs.engine import load_init_weights
    from models.product_embedding import ProductNet, drop_arcface_head

    cfg = ctx.config
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model = ProductNet(cfg.train.arch, dim=cfg.train.embedding_dim, img_size=input_size)
    dropped: List[str] = []

    def keep_body(state, net):
        state, names = drop_arcface_head(state, net)
        dropped.extend(names)
        return state

    report = load_init_weights(model, checkpoint, filter_fn=keep_body)
    _say(ctx, f"{ctx.stage}: {report.summary()}" + (f"; dropped {', '.join(dropped)} (ArcFace head)" if dropped else ""))
    device = _device(ctx)
    model.to(device).eval()
    half = device.type == "cuda" and cfg.eval.fp16
    if device.type == "cuda":
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if half:
            model.half()
    return model, device, half


def _embed_batches(model, device, half: bool, channels_last: bool):
    """A function: a float tensor batch -> unit embeddings as a float32 numpy array."""
    import torch

    def run(x: "torch.Tensor"):
        x = x.to(device, non_blocking=True)
        if half:
            x = x.half()
        if channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return model(x).float().cpu().numpy()

    return run


def extract_features(ctx) -> Dict[str, Any]:
    """Array task k: an embedding per image of category k's pairs, in snapshots of
    ``filter.snapshot_every`` items; a requeued or resumed task continues after its last snapshot."""
    import numpy as np
    import torch

    from data.product import amazon
    from data.product.datasets import to_tensor
    from models.timm_backbone import backbone_norm

    cfg = ctx.config
    f = cfg.filter
    rows = amazon.read_table(Path(ctx.inputs["pairs"]), "pairs")
    urls = list(dict.fromkeys(r["url"] for r in rows))
    checkpoint = Path(f.checkpoint).expanduser() if f.checkpoint else Path(ctx.inputs["model"])
    model, device, half = _load_embedder(ctx, checkpoint, f.input_size)
    mean, std = backbone_norm(cfg.train.arch)
    forward = _embed_batches(model, device, half, cfg.train.channels_last)

    def embed(images):
        out = np.full((len(images), cfg.train.embedding_dim), np.nan, np.float32)
        ok = [i for i, im in enumerate(images) if im is not None]
        if ok:
            out[ok] = forward(torch.stack([to_tensor(images[i], f.input_size, mean, std) for i in ok]))
        return out

    folder = ctx.out_dir / "snapshots"
    done = amazon.completed_snapshots(folder, urls, f.snapshot_every)
    if done:
        print(f"extract_features: {done} of {len(urls)} images already embedded (complete snapshots of an "
              f"earlier attempt): continuing at item {done}", flush=True)
    result = amazon.extract_embeddings(urls, embed, folder, every=f.snapshot_every, batch_size=f.batch_size,
                                       fetch_workers=f.fetch_workers,
                                       progress=lambda n, total: ctx.heartbeat(step=n, total_steps=total,
                                                                               phase="embed"))
    amazon.save_features(ctx.output("features"), urls, result["embeddings"])
    print(f"extract_features: {len(urls)} images ({result['computed']} embedded in this attempt, resumed at "
          f"{result['resumed_at']}), {result['failed']} could not be fetched; model {checkpoint}", flush=True)
    return {"images": len(urls), "resumed_at": result["resumed_at"], "computed": result["computed"],
            "failed": result["failed"], "snapshot_every": f.snapshot_every}


def analyse_pairs(ctx) -> Dict[str, Any]:
    """Array task k: keep category k's customer images whose mean cosine to their product's images
    is above ``filter.strict`` (one list) and ``filter.loose`` (the other)."""
    from data.product import amazon

    f = ctx.config.filter
    category = ctx.config.data.categories[ctx.task_index]
    rows = amazon.read_table(Path(ctx.inputs["pairs"]), "pairs")
    urls, embeddings = amazon.load_features(Path(ctx.inputs["features"]))
    scores = amazon.mean_cosines(rows, urls, embeddings)
    kept = amazon.analyse_pairs(rows, scores, (f.strict, f.loose))
    columns = (*amazon.PAIR_COLUMNS, "mean_cos")
    amazon.write_table(ctx.output("kept_strict"), "kept", kept[f.strict], columns)
    amazon.write_table(ctx.output("kept_loose"), "kept", kept[f.loose], columns)
    truth_path = _paths(ctx).get("truth")
    truth = json.loads(Path(truth_path).read_text()) if truth_path and Path(truth_path).exists() else None
    report = {"category": category, **amazon.filter_report(scores, kept, truth)}
    ctx.output("report").write_text(json.dumps(report, indent=1))
    line = ", ".join(f"> {th:g}: kept {report[f'{th:g}']['kept']} of {report['user_images']}"
                     + (f" (removed {report[f'{th:g}']['wrong_removed']} of {report[f'{th:g}']['wrong']} wrong, kept "
                        f"{report[f'{th:g}']['right_kept']} of {report[f'{th:g}']['right']} right)" if truth else "")
                     for th in (f.strict, f.loose))
    print(f"analyse_pairs {category}: customer images with mean cosine {line}", flush=True)
    return {k: v for k, v in report.items() if k != "by_kind"}


def download_images(ctx) -> Dict[str, Any]:
    """Login node (mid-pipeline): fetch the kept images of every category, resumable and verified
    (the synthetic set's file:// URLs: a copy)."""
    from data.product import amazon

    cfg = ctx.config
    urls: List[str] = []
    for path in list(ctx.inputs["kept_loose"]) + list(ctx.inputs["kept_strict"]):  # loose is a superset
        urls += [r["url"] for r in amazon.read_table(Path(path), "kept")]
    dest = Path(_paths(ctx)["images"])
    result = amazon.download_images(urls, dest, workers=cfg.data.download_workers,
                                    progress=lambda n, total: ctx.heartbeat(step=n, total_steps=total, phase="download"))
    index = {url: result["index"][url] for url in dict.fromkeys(urls) if url in result["index"]}
    ctx.output("index").write_text(json.dumps({"images": str(dest), "files": index}))
    print(f"download_images: {result['wanted']} kept images into {dest}: {result['fetched']} fetched, "
          f"{result['reused']} already there (verified size), {len(result['failed'])} failed", flush=True)
    if result["failed"]:
        first = next(iter(result["failed"].items()))
        print(f"download_images: e.g. {first[0]}: {first[1]}", flush=True)
    return {k: result[k] if k != "failed" else len(result[k]) for k in ("wanted", "fetched", "reused", "failed")}


def prepare_training_set(ctx) -> Dict[str, Any]:
    """Every category's kept images in one CSV ``image_path, label`` per threshold."""
    from data.product import amazon

    record = json.loads(Path(ctx.inputs["index"]).read_text())
    images, index = Path(record["images"]), record["files"]
    out = {}
    for name in ("strict", "loose"):
        out[name] = amazon.prepare_training_set([Path(p) / f"kept{_table_suffix(Path(p))}"
                                                 for p in ctx.inputs[f"kept_{name}"]], index, images,
                                                ctx.output(f"train_{name}"))
    th = {"strict": ctx.config.filter.strict, "loose": ctx.config.filter.loose}
    print("prepare_training_set: " + "; ".join(f"> {th[n]:g}: {o['images']} images of {o['classes']} products"
                                               for n, o in out.items()), flush=True)
    return {f"{n}_{k}": v for n, o in out.items() for k, v in o.items()}


def _table_suffix(folder: Path) -> str:
    return ".parquet" if (folder / "kept.parquet").exists() else ".csv"


# -- training ------------------------------------------------------------------------------------------
class ProductTask:
    """The engine's TrainTask for the five phases: ArcFace phases train ProductNet + sub-centre
    ArcFace on Product10K; XBM phases train ProductNet alone with the contrastive loss over the
    batch and a memory bank of past embeddings, on class-balanced pairs of the filtered reviews."""

    def __init__(self, cfg: ProductConfig, stage: str, paths: Dict[str, Any], train_csv: Optional[Path] = None,
                 log=print) -> None:
        self.cfg, self.stage, self.paths, self.log = cfg, stage, paths, log
        self.loss_kind, self.data_kind, self.source = PHASES[stage]
        self.opts: Phase = getattr(cfg, stage)
        self.train_csv = train_csv
        self.memory = None
        self._classes: Optional[List[int]] = None
        if self.loss_kind == "xbm":
            from models.memory_bank import CrossBatchMemory

            # the seed's cosine margin m is the distance margin sqrt(2 - 2m) between unit vectors
            neg_margin = math.sqrt(2.0 - 2.0 * cfg.train.xbm_margin)
            self.memory = CrossBatchMemory(self.opts.memory_size, cfg.train.embedding_dim, 0.0, neg_margin)

    # data
    def _product10k(self):
        from data.product.datasets import read_product10k

        return read_product10k(Path(self.paths["product10k"]), "train")

    def class_counts(self) -> List[int]:
        _, labels = self._product10k()
        counts = [0] * (max(labels) + 1)
        for label in labels:
            counts[label] += 1
        return counts

    def build_model(self):
        import torch

        from models.product_embedding import ProductNet

        t = self.cfg.train
        classes = len(self.class_counts()) if self.loss_kind == "arcface" else 0
        model = ProductNet(t.arch, dim=t.embedding_dim, num_classes=classes, subcenters=t.subcenters,
                           pretrained=t.pretrained, img_size=self.opts.input_size)
        if t.channels_last and torch.cuda.is_available():
            model.to(memory_format=torch.channels_last)
        return model

    def build_optimizer(self, model):
        import torch

        from models.product_embedding import stage_param_groups

        o = self.opts
        lrs = [o.lr_backbone / 2 ** (o.backbone_blocks - 1 - i) for i in range(o.backbone_blocks)]
        return torch.optim.AdamW(stage_param_groups(model, lrs, o.wd_backbone, o.lr_head, o.wd_head))

    def build_scheduler(self, optimizer, steps_per_epoch: int, epochs: int):
        import torch

        from models.lr_schedules import WarmupCosine

        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(self.opts.warmup_steps,
                                                                         steps_per_epoch * epochs))

    def _norm(self):
        from models.timm_backbone import backbone_norm

        return backbone_norm(self.cfg.train.arch)

    def train_dataset(self):
        from data.product.datasets import ClassBalancedPairs, LabelledImages, read_training_csv

        mean, std = self._norm()
        if self.loss_kind == "arcface":
            paths, labels = self._product10k()
            return LabelledImages(paths, labels, self.opts.input_size, mean, std, train=True)
        paths, labels = read_training_csv(self.train_csv)
        return ClassBalancedPairs(paths, labels, self.opts.input_size, mean, std)

    def val_dataset(self):
        from data.product.datasets import RetrievalImages, dev_set_items

        mean, std = self._norm()
        return RetrievalImages(dev_set_items(Path(self.paths["dev_set"]), self.cfg.eval.crop_queries),
                               self.opts.input_size, mean, std)

    # steps
    def training_step(self, model, batch):
        import torch

        images, labels = batch
        if images.ndim == 5:  # class-balanced pairs: [B, 2, 3, S, S]
            images, labels = images.flatten(0, 1), labels.flatten()
        if images.is_cuda and self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.loss_kind == "arcface":
            from models.subcenter_arcface import adaptive_margins, arcface_loss

            if not hasattr(self, "_margins"):
                self._margins = adaptive_margins(self.class_counts(), self.cfg.train.m_min, self.cfg.train.m_max)
            _, cosine = model(images, with_head=True)
            return arcface_loss(cosine, labels, self._margins.to(images.device), self.cfg.train.s)
        from models.gather import gather_with_grad

        embeddings = model(images)
        # the bank and the loss see every rank's embeddings (each rank's gradient flows through its own)
        all_embeddings, _ = gather_with_grad(embeddings)
        all_labels, _ = gather_with_grad(labels)
        out = self.memory.loss(all_embeddings, all_labels)
        return {"loss": out["loss"], "pos_loss": out["pos_loss"], "neg_loss": out["neg_loss"]}

    def validate(self, model, loader) -> Dict[str, float]:
        return dev_set_map(model, loader)

    def filter_init_state(self, state, model):
        """An XBM phase starting from an ArcFace phase: drop the head (and say so in the log)."""
        from models.product_embedding import drop_arcface_head

        shapes = {k: list(v.shape) for k, v in state.items()}
        state, dropped = drop_arcface_head(state, model)
        if dropped:
            self.log(f"{self.stage}: starting from {self.source}'s best checkpoint without its ArcFace head: "
                     f"dropped {', '.join(f'{k} {shapes[k]}' for k in dropped)}")
        return state

    def state_dict(self) -> Dict[str, Any]:
        return {"memory": self.memory.state_dict()} if self.memory is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.memory is not None and state and "memory" in state:
            self.memory.load_state_dict(state["memory"])


def dev_set_map(model, loader) -> Dict[str, float]:
    """mAP@min(1000, gallery) and accuracy@1 of the dev set (queries first in the loader's data)."""
    import numpy as np

    from data.product.metrics import retrieval_map

    embeddings, labels, is_query = [], [], []
    for images, label, query in loader:
        embeddings.append(model(images).float().cpu().numpy())
        labels.append(label.cpu().numpy())
        is_query.append(query.cpu().numpy())
    e, lab, q = np.concatenate(embeddings), np.concatenate(labels), np.concatenate(is_query).astype(bool)
    out = retrieval_map(e[q], e[~q], lab[q], lab[~q])
    return {BEST: out["map"], "val_acc1": out["acc1"]}


def per_rank_batch(total: int, world: int, grad_accum: int, where: str, per_item: int = 1) -> int:
    """The seed's batch size is images per optimizer step; the engine's is items per rank and
    micro-batch (an XBM item is ``per_item`` = 2 images of one product)."""
    per = total // (world * grad_accum * per_item)
    if per < 1 or per * world * grad_accum * per_item != total:
        raise UserError(f"{where}: batch_size={total} does not split over {world} rank(s) x grad_accum={grad_accum}"
                        + (f" x {per_item} images an item" if per_item > 1 else "")
                        + f": use a multiple of {world * grad_accum * per_item}")
    return per


def engine_config(cfg: ProductConfig, stage: str, epochs: int, world: int):
    from hpc_jobs.engine import TrainConfig

    p: Phase = getattr(cfg, stage)
    t = cfg.train
    per_item = 2 if PHASES[stage][0] == "xbm" else 1
    return TrainConfig(
        epochs=epochs, batch_size=per_rank_batch(p.batch_size, world, p.grad_accum, stage, per_item),
        lr=p.lr_head, grad_accum=p.grad_accum, precision=t.precision, strategy="ddp", num_workers=t.num_workers,
        seed=p.seed, log_every=t.log_every, max_steps=t.max_steps, num_threads=t.num_threads,
        best_metric=BEST, best_mode="max", tensorboard=t.tensorboard, plot=t.plot,
        # an XBM phase from an ArcFace checkpoint: the head is dropped, the rest must all be found
        init_min_matched=0.9,
    )


def train_phase(ctx) -> Dict[str, Any]:
    """One training phase (which one: ``ctx.stage``) through the shared engine."""
    from hpc_jobs.engine import Trainer

    cfg, stage = ctx.config, ctx.stage
    loss, data, source = PHASES[stage]
    epochs = phase_epochs(cfg, stage)
    train_csv = Path(ctx.inputs["train_set"]) if "train_set" in ctx.inputs else None
    task = ProductTask(cfg, stage, _paths(ctx), train_csv, log=lambda m: _say(ctx, m))
    init = Path(ctx.inputs["init"]) if "init" in ctx.inputs else None
    handoff = f"init {source} (best {BEST})" if init is not None else None
    if init is not None:
        _say(ctx, f"{stage}: starting from {source}'s best checkpoint {init}")
    if epochs == 0:
        return _hand_on(ctx, task, init, handoff)
    if train_csv is not None:
        from data.product.datasets import read_training_csv

        classes = len(set(read_training_csv(train_csv)[1]))
        if classes < 2:
            threshold = getattr(cfg.filter, data)
            raise UserError(f"{stage}: its training set {train_csv.name} has {classes} product(s) with two images or "
                            f"more after the filter (mean cosine > {threshold:g}): XBM needs several. Lower "
                            f"filter.{data}, or check the model extract_features used")
    result = Trainer(task, engine_config(cfg, stage, epochs, ctx.env.world_size), ctx.out_dir, env=ctx.env,
                     init_from=init).fit()
    best = result.get("best") or {}
    return {"step": result["step"], "epoch": result["epoch"], "train_loss": result["train_loss"],
            "best_val_map": best.get("value"), "val_map": result["metrics"].get(BEST), "handoff": handoff,
            "input_size": getattr(cfg, stage).input_size, "loss": loss, "data": data}


def _hand_on(ctx, task: ProductTask, init: Optional[Path], handoff: Optional[str]) -> Dict[str, Any]:
    """No training (``train.epochs=0``): save the starting weights as this phase's checkpoint, with
    their dev-set mAP (the best-checkpoint handoff needs the metric), so the chain still runs."""
    import torch

    from hpc_jobs.checkpoint import link_checkpoint, save_checkpoint
    from hpc_jobs.engine import load_init_weights

    _say(ctx, f"{ctx.stage}: no training (epochs=0): handing on its starting weights")
    if ctx.env is not None and not ctx.env.is_main:
        return {"trained": False, "handoff": handoff}
    torch.manual_seed(getattr(ctx.config, ctx.stage).seed)
    model = task.build_model()
    if init is not None:
        _say(ctx, load_init_weights(model, init, filter_fn=task.filter_init_state).summary())
    model.to(_device(ctx)).eval()
    loader = torch.utils.data.DataLoader(task.val_dataset(), batch_size=64, shuffle=False)
    with torch.no_grad():
        metrics = task.validate(model, ((x.to(_device(ctx)), y, q) for x, y, q in loader))
    model.cpu()
    path = ctx.out_dir / "checkpoints" / "step-00000000.pt"
    save_checkpoint(path, {"format": 1, "model": model.state_dict(), "step": 0, "epoch": 0},
                    step=0, epoch=0, metrics=metrics, meta={"weights_only": True, "reason": "epochs=0"})
    link_checkpoint(path, ctx.out_dir / "checkpoints" / "last.pt")
    link_checkpoint(path, ctx.out_dir / "checkpoints" / "best.pt")
    _say(ctx, f"{ctx.stage}: starting weights: {BEST} {metrics[BEST]:.4f}")
    return {"trained": False, "why": "epochs=0", "handoff": handoff, "val_map": metrics[BEST]}


def evaluate(ctx) -> Dict[str, Any]:
    """mAP@min(1000, gallery size) of the final model on the development set (queries cropped to
    their boxes; fp16 + channels_last on a GPU, a partial sort for the top k); the filter's
    precision and recall over all categories. Writes metrics.json."""
    import numpy as np
    import torch

    from data.product.datasets import RetrievalImages, dev_set_items
    from data.product.metrics import retrieval_map
    from models.timm_backbone import backbone_norm

    if ctx.env is not None and not ctx.env.is_main:
        return {}
    cfg = ctx.config
    e = cfg.eval
    model, device, half = _load_embedder(ctx, Path(ctx.inputs["model"]), e.input_size)
    mean, std = backbone_norm(cfg.train.arch)
    items = dev_set_items(Path(_paths(ctx)["dev_set"]), e.crop_queries)
    loader = torch.utils.data.DataLoader(RetrievalImages(items, e.input_size, mean, std), batch_size=e.batch_size,
                                         shuffle=False, num_workers=0)
    forward = _embed_batches(model, device, half, cfg.train.channels_last)
    embeddings, labels, is_query = [], [], []
    for images, label, query in loader:
        embeddings.append(forward(images))
        labels.append(label.numpy())
        is_query.append(query.numpy())
    emb, lab, q = np.concatenate(embeddings), np.concatenate(labels), np.concatenate(is_query).astype(bool)
    result = retrieval_map(emb[q], emb[~q], lab[q], lab[~q])
    reports = [json.loads(Path(p).read_text()) for p in ctx.inputs["filter_reports"]]
    filt = merge_filter_reports(reports, (cfg.filter.strict, cfg.filter.loose))
    metrics = {"map_at_1000": result["map"], "k": result["k"], "acc1": result["acc1"], "queries": int(q.sum()),
               "gallery": int((~q).sum()), "queries_cropped": e.crop_queries, "fp16": half, "filter": filt,
               "filter_per_category": reports}
    ctx.output("metrics").write_text(json.dumps(metrics, indent=2))
    line = "; ".join(f"> {th}: removed {v['wrong_removed']}/{v['wrong']} wrong (precision {v['precision']:.2f}, "
                     f"recall {v['recall']:.2f}), kept {v['right_kept']}/{v['right']} right"
                     for th, v in filt.items() if "wrong" in v)
    print(f"product eval: mAP@{result['k']} {result['map']:.4f}, acc@1 {result['acc1']:.4f} ({int(q.sum())} queries, "
          f"{int((~q).sum())} gallery images)" + (f"; filter {line}" if line else ""), flush=True)
    out = {"map_at_1000": result["map"], "acc1": result["acc1"], "k": result["k"]}
    for th, v in filt.items():
        if "precision" in v:
            out[f"filter_{th}_precision"], out[f"filter_{th}_recall"] = v["precision"], v["recall"]
    return out


def merge_filter_reports(reports: List[Dict[str, Any]], thresholds) -> Dict[str, Dict[str, Any]]:
    """The categories' filter reports summed, precision and recall recomputed over all of them."""
    merged: Dict[str, Dict[str, Any]] = {}
    for th in thresholds:
        key = f"{th:g}"
        total: Dict[str, Any] = {}
        for r in reports:
            for name, value in r.get(key, {}).items():
                if isinstance(value, int):
                    total[name] = total.get(name, 0) + value
        if "wrong" in total:
            removed = total["removed"]
            total["precision"] = total["wrong_removed"] / removed if removed else 1.0
            total["recall"] = total["wrong_removed"] / total["wrong"] if total["wrong"] else 1.0
            total["right_kept_fraction"] = total["right_kept"] / total["right"] if total["right"] else 1.0
        merged[key] = total
    return merged


# -- the launcher object ---------------------------------------------------------------------------
@register
class Product(Workflow):
    name = "product"
    summary = ("Visual Product Recognition 2023 (1st place): per-category pairs -> embeddings -> cosine filter "
               "(arrays), login-node download, ArcFace x2 -> XBM x3 by best checkpoint, mAP@1000")
    Config = ProductConfig
    presets = PRESETS
    requires = ("torch", "timm", "faiss", "cv2")
    default_preset = "tiny"  # the generated data set
    data_key, real_data_preset = "data.root", "paper"  # real data: the seed's settings

    def _gpus(self, asked: int) -> int:
        """GPUs of a training phase: its own count (the paper preset: the seed's one A100), or
        --gpus when it asks 0 or --gpus is given."""
        opts = self.options
        return opts.gpus if asked == 0 or opts.gpus_given else asked

    def build(self) -> Pipeline:
        cfg = self.config
        n = len(cfg.data.categories)
        t, f, prep = cfg.train, cfg.filter, cfg.prep
        small = Resources(cpus_per_task=prep.cpus, mem=prep.mem, time=prep.time)
        dataset = Input("dataset", "dataset")
        best = {"best": BestCheckpoint("checkpoints", metric=BEST, mode="max"), "last": "checkpoints/last.pt"}

        def phase(name: str) -> Stage:
            p: Phase = getattr(cfg, name)
            loss, data, source = PHASES[name]
            gpus = self._gpus(p.gpus)
            per_rank_batch(p.batch_size, max(1, gpus), p.grad_accum, name, 2 if loss == "xbm" else 1)
            inputs = {"dataset": dataset}
            if source:
                inputs["init"] = Input(source, "best", kind="init")
            if data != "product10k":
                inputs["train_set"] = Input("prepare_training_set", f"train_{data}")
            what = {"product10k": "Product10K", "strict": f"reviews, mean cosine > {f.strict:g}",
                    "loose": f"reviews, mean cosine > {f.loose:g}"}[data]
            return Stage(name, train_phase, inputs=inputs, outputs=dict(best),
                         resources=Resources(gpus_per_node=gpus, tasks_per_node=max(1, gpus),
                                             cpus_per_task=t.cpus_per_gpu, mem=t.mem, time=p.time),
                         description=f"{'sub-centre ArcFace' if loss == 'arcface' else 'XBM contrastive'}, {what}, "
                                     f"{phase_epochs(cfg, name)} epochs at {p.input_size} px"
                                     + (f", init from {source}'s best" if source else ""))

        extract_inputs = {"dataset": dataset, "pairs": Input("get_pairs", "pairs", per_task=True)}
        if not f.checkpoint:
            extract_inputs["model"] = Input("arcface_2", "best", kind="init")
        per_task = {"dataset": dataset, "pairs": Input("get_pairs", "pairs", per_task=True)}
        stages: List[Stage] = [
            Stage("dataset", prepare_dataset, where="login", outputs={"dataset": "dataset.json"},
                  description="the synthetic set, or a check of the real layout"),
            Stage("get_pairs", get_pairs, array=n, resources=small, inputs={"dataset": dataset},
                  outputs={"pairs": "pairs"}, description="reviews + metadata -> products with customer images"),
            phase("arcface_1"),
            phase("arcface_2"),
            Stage("extract_features", extract_features, array=n, inputs=extract_inputs,
                  resources=Resources(gpus_per_node=f.gpus, tasks_per_node=1, cpus_per_task=f.cpus, mem=f.mem,
                                      time=f.time),
                  outputs={"features": "features.npz"},
                  description=f"embeddings ({'filter.checkpoint' if f.checkpoint else 'arcface_2 best'}), "
                              f"a snapshot every {f.snapshot_every} images"),
            Stage("analyse_pairs", analyse_pairs, array=n, resources=small,
                  inputs={**per_task, "features": Input("extract_features", "features", per_task=True)},
                  outputs={"kept_strict": "kept_strict", "kept_loose": "kept_loose", "report": "filter_report.json"},
                  description=f"keep customer images with mean cosine > {f.strict:g} / > {f.loose:g}"),
            Stage("download_images", download_images, where="login",
                  inputs={"dataset": dataset, "kept_strict": Input("analyse_pairs", "kept_strict"),
                          "kept_loose": Input("analyse_pairs", "kept_loose")},
                  outputs={"index": "downloaded.json"}, description="the kept images (login node: the internet)"),
            Stage("prepare_training_set", prepare_training_set, resources=small,
                  inputs={"index": Input("download_images", "index"),
                          "kept_strict": Input("analyse_pairs", "kept_strict"),
                          "kept_loose": Input("analyse_pairs", "kept_loose")},
                  outputs={"train_strict": "amazon_review_mean_strict_full_images.csv",
                           "train_loose": "amazon_review_mean_loose_full_images.csv"},
                  description="all categories in one CSV image_path,label per threshold"),
            phase("xbm_1"),
            phase("xbm_2"),
            phase("xbm_3"),
            Stage("eval", evaluate,
                  resources=Resources(gpus_per_node=cfg.eval.gpus, tasks_per_node=1, cpus_per_task=cfg.eval.cpus,
                                      mem=cfg.eval.mem, time=cfg.eval.time),
                  inputs={"dataset": dataset, "model": Input("xbm_3", "best", kind="init"),
                          "filter_reports": Input("analyse_pairs", "report")},
                  outputs={"metrics": "metrics.json"}, description="mAP@1000 on the development set"),
        ]
        return Pipeline(self.name, stages)
