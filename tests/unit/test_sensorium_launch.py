"""The sensorium workflow's launch side: the paper preset renders the seed's single-GPU fold runs
as throttled Slurm arrays, distill's teacher is a per-task (aftercorr) handoff of train's best
checkpoint, the predict array waits for every fold; presets and config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.pipeline_helpers import cli, launch_json

STAGES = ["download", "train", "distill", "predict", "ensemble"]


def _scripts(out):
    return {s["name"]: Path(s["script"]).read_text() for s in out["stages"] if s["script"]}


def _run_record(out):
    return json.loads((Path(out["run_dir"]) / "run.json").read_text())


def _config(out):
    return yaml.safe_load((Path(out["run_dir"]) / "config.yaml").read_text())


def test_paper_dry_run_renders_one_gpu_per_fold_task_in_throttled_arrays(tmp_path):
    out = launch_json(tmp_path, "sensorium", "--cluster", "discovery", "--preset", "paper", "--dry-run",
                      "--account", "x")
    assert [s["name"] for s in out["stages"]] == STAGES
    scripts = _scripts(out)
    assert set(scripts) == set(STAGES) - {"download"}  # the download runs on the login node
    for stage in ("train", "distill"):
        text = scripts[stage]
        for line in ("#SBATCH --array=0-6%4", "#SBATCH --gres=gpu:v100:1", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu",
                     "#SBATCH --time=1-00:00:00", f"#SBATCH --job-name=sensorium.{stage}", "#SBATCH --requeue",
                     "#SBATCH --signal=USR2@300"):
            assert line in text, (stage, line)
    assert "#SBATCH --array=0-9" in scripts["predict"] and "#SBATCH --gres=gpu:v100:1" in scripts["predict"]
    assert "--array" not in scripts["ensemble"] and "--gres" not in scripts["ensemble"]
    stages = {s["name"]: s for s in out["stages"]}
    assert stages["train"]["array"] == 7 and stages["distill"]["array"] == 7
    assert stages["distill"]["depends_on"] == ["download", "train"]
    assert stages["predict"]["depends_on"] == ["download", "train", "distill"]
    # distill task k takes train task k's best checkpoint (per task: aftercorr on submission)
    record = _run_record(out)["stages"]
    teacher = record["distill"]["inputs"]["teacher"]
    assert teacher["stage"] == "train" and teacher["output"] == "best" and teacher["per_task"] is True
    assert teacher["kind"] == "init"
    assert not record["predict"]["inputs"]["train_models"]["per_task"]  # waits for every fold
    assert record["train"]["outputs"]["best"] == "fold_{task}/checkpoints/best.pt"


def test_paper_preset_is_the_seeds_config(tmp_path):
    out = launch_json(tmp_path, "sensorium", "--cluster", "discovery", "--preset", "paper", "--dry-run",
                      "--account", "x")
    cfg = _config(out)
    m, t, d = cfg["model"], cfg["train"], cfg["distill"]
    assert m["image_size"] == [64, 64] and m["frame_stack_size"] == 16 and m["frame_stack_step"] == 2
    assert m["core_features"] == [64, 64, 64, 64, 128, 128, 128, 256, 256]
    assert m["spatial_strides"] == [2, 1, 1, 1, 2, 1, 1, 2, 1] and m["cortex_features"] == [1024, 2048, 4096]
    assert (m["expansion_ratio"], m["se_reduce_ratio"], m["temporal_kernel"], m["groups"]) == (6, 32, 5, 2)
    assert t["batch_size"] == 32 and t["base_lr"] == 3e-4 and t["num_epochs"] == [3, 18]
    assert t["train_epoch_size"] == 72000 and t["ema_decay"] == 0.999 and t["experiment"] == "true_batch_001"
    assert d == {"name": "distillation_001", "experiment": "true_batch_001", "ratio": 0.36, "epochs": None}
    assert cfg["data"]["num_folds"] == 7 and cfg["metric"] == {"skip_first": 50, "last_frame": 300}


def test_real_data_selects_paper_and_synthetic_tiny(tmp_path):
    real = tmp_path / "sensorium_all_2023"
    real.mkdir()
    paper = _config(launch_json(tmp_path, "sensorium", "--cluster", "discovery", "--dry-run", "--account", "x",
                                "--set", f"data.root={real}"))
    assert paper["train"]["batch_size"] == 32 and paper["model"]["image_size"] == [64, 64]
    tiny = _config(launch_json(tmp_path, "sensorium", "--cluster", "local", "--dry-run"))
    assert tiny["train"]["batch_size"] == 8 and tiny["data"]["num_folds"] == 7


@pytest.mark.parametrize("setting, message", [
    ("distill.experiment=other_001", "names the teacher experiment"),
    ("distill.ratio=1.0", "distill.ratio=1.0 must lie in"),
    ("data.num_folds=1", "need at least 2"),
    ("train.iter_size=3", "not a multiple of train.iter_size"),
    ("model.spatial_strides=[2]", "give one stride per block"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, setting, message):
    proc = cli(tmp_path, "sensorium", "--cluster", "local", "--dry-run", "--set", setting, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr


def test_iter_size_is_gradient_accumulation_and_lr_follows_the_seed():
    from launchers.sensorium import PRESETS, Sensorium, engine_config

    cfg = Sensorium.make_config("paper", overrides={"train.iter_size": 2})
    engine = engine_config(cfg, "train", fold=3)
    assert engine.batch_size == 16 and engine.grad_accum == 2 and engine.seed == 3
    assert engine.lr == pytest.approx(3e-4 * 32 / 4) and engine.best_metric == "val_corr"
    assert engine.epochs == 21
    assert "tiny" in PRESETS
