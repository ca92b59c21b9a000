"""The product workflow's launch side: the seed's resources and hyper-parameters in the paper
dry run (arrays over the nine categories, one GPU a phase, the login steps), the presets, bad
values refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.pipeline_helpers import cli, launch_json

STAGES = ["dataset", "get_pairs", "arcface_1", "arcface_2", "extract_features", "analyse_pairs", "download_images",
          "prepare_training_set", "xbm_1", "xbm_2", "xbm_3", "eval"]
#: the seed's five configs: (epochs, input size, batch, head lr, warm-up steps, grad accumulation)
SEED = {"arcface_1": (3, 224, 48, 3e-4, 4500, 1), "arcface_2": (5, 256, 32, 3e-4, 4500, 1),
        "xbm_1": (3, 256, 32, 1e-4, 1000, 1), "xbm_2": (3, 256, 32, 1e-4, 1000, 1),
        "xbm_3": (3, 256, 32, 6e-6, 1500, 4)}


def _scripts(out):
    return {s["name"]: Path(s["script"]).read_text() for s in out["stages"] if s["script"]}


def test_paper_dry_run_on_discovery_renders_the_seed_resources(tmp_path):
    out = launch_json(tmp_path, "product", "--cluster", "discovery", "--preset", "paper", "--dry-run",
                      "--account", "x")
    assert [s["name"] for s in out["stages"]] == STAGES
    scripts = _scripts(out)
    assert set(scripts) == set(STAGES) - {"dataset", "download_images"}  # the two login-node steps
    for stage in ("get_pairs", "extract_features", "analyse_pairs"):  # one task per seed category
        assert "#SBATCH --array=0-8" in scripts[stage], stage
    for stage in SEED:  # the seed trained every phase on one A100 (here Discovery's V100s)
        text = scripts[stage]
        for line in ("#SBATCH --gres=gpu:v100:1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8",
                     "#SBATCH --time=2-00:00:00", "#SBATCH --partition=gpu", f"#SBATCH --job-name=product.{stage}"):
            assert line in text, (stage, line)
    assert "#SBATCH --gres=gpu:v100:1" in scripts["extract_features"]  # the filter's embeddings on a GPU
    assert "gres" not in scripts["get_pairs"] and "gres" not in scripts["analyse_pairs"]
    assert "#SBATCH --partition=main" in scripts["prepare_training_set"]
    parents = {s["name"]: s["depends_on"] for s in out["stages"]}
    assert parents["extract_features"] == ["dataset", "get_pairs", "arcface_2"]  # the phase-2 model
    assert parents["download_images"] == ["dataset", "analyse_pairs"]  # the login step mid-pipeline
    assert parents["xbm_1"] == ["dataset", "arcface_2", "prepare_training_set"]
    assert parents["xbm_3"] == ["dataset", "xbm_2", "prepare_training_set"]
    assert "<xbm_2>" in scripts["xbm_3"] and "<arcface_1>" in scripts["arcface_2"]
    cfg = yaml.safe_load((Path(out["run_dir"]) / "config.yaml").read_text())
    assert cfg["train"]["arch"] == "convnext_xxlarge.clip_laion2b_soup" and cfg["train"]["pretrained"] is False
    assert (cfg["train"]["embedding_dim"], cfg["train"]["subcenters"], cfg["train"]["s"]) == (1024, 3, 30.0)
    assert (cfg["train"]["m_min"], cfg["train"]["m_max"], cfg["train"]["xbm_margin"]) == (0.05, 0.5, 0.5)
    for stage, (epochs, size, batch, lr, warmup, accum) in SEED.items():
        s = cfg[stage]
        assert (s["epochs"], s["input_size"], s["batch_size"], s["lr_head"], s["warmup_steps"],
                s["grad_accum"]) == (epochs, size, batch, lr, warmup, accum), stage
        assert (s["lr_backbone"], s["backbone_blocks"], s["wd_backbone"], s["wd_head"]) == (1e-5, 4, 1e-3, 0.1)
    assert cfg["xbm_1"]["memory_size"] == 32000
    assert (cfg["filter"]["strict"], cfg["filter"]["loose"], cfg["filter"]["snapshot_every"]) == (0.6, 0.5, 1000)
    assert len(cfg["data"]["categories"]) == 9


def test_presets_tiny_on_synthetic_paper_on_real_data(tmp_path):
    from launchers.product import Product, phase_epochs

    tiny = Product.make_config()
    assert tiny.train.arch == "resnet10t" and tiny.arcface_1.input_size < 64 and len(tiny.data.categories) == 3
    assert tiny.filter.snapshot_every < 100 and tiny.filter.gpus == 0
    assert (tiny.filter.strict, tiny.filter.loose) == (0.5, 0.4)  # a from-scratch network's cosines
    (tmp_path / "vpr").mkdir()
    paper = Product.make_config(overrides={"data.root": str(tmp_path / "vpr")})
    assert paper.arcface_2.input_size == 256 and paper.train.arch.startswith("convnext_xxlarge")
    assert (paper.filter.strict, paper.filter.loose) == (0.6, 0.5)
    skipped = Product.make_config(overrides={"train.epochs": 0})
    assert [phase_epochs(skipped, s) for s in SEED] == [0] * 5


@pytest.mark.parametrize("override, message", [
    ("filter.loose=0.7", "loose <= strict"),
    ("xbm_2.batch_size=31", "even number"),
    ("data.categories=[Toys_and_Games]", "first n of"),
    ("train.m_max=2.0", "m_max < pi/2"),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, override, message):
    proc = cli(tmp_path, "product", "--dry-run", "--set", override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)


def test_a_given_filter_checkpoint_frees_the_data_prep_from_the_arcface_phases(tmp_path):
    ckpt = tmp_path / "phase2.pt"
    ckpt.write_bytes(b"x")
    out = launch_json(tmp_path, "product", "--dry-run", "--set", f"filter.checkpoint={ckpt}")
    parents = {s["name"]: s["depends_on"] for s in out["stages"]}
    assert parents["extract_features"] == ["dataset", "get_pairs"]


def test_the_paper_dry_run_imports_no_heavy_library(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom hpc_jobs.cli import main\n"
            "rc = main(['product', '--cluster', 'discovery', '--preset', 'paper', '--account', 'a', '--dry-run', '--json'])\n"
            "assert rc == 0, rc\n"
            "print('HEAVY', [m for m in ('torch', 'numpy', 'cv2', 'timm', 'pyarrow') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True,
                          env=dict(os.environ, HPC_JOBS_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
