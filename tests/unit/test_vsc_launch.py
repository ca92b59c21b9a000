"""The vsc workflow's launch side: the seed's resources stage by stage in a Discovery dry run, the
seed's flags per stage in the config, presets, bad input refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.pipeline_helpers import cli, launch_json

STAGES = ["download", "train_v41", "train_v44", "train_v46", "train_v45", "extract", "match", "eval"]
#: the seed's four commands: (seed, epochs, lr, batch, pos/neg margin, input size, memory, warm-up, negatives)
SEED = {
    "train_v41": (22999, 10, 0.001, 32, 0.0, 1.0, 224, 4096, 0, 0),
    "train_v44": (722999, 5, 0.0005, 16, 0.1, 1.1, 384, 8192, 0, 0),
    "train_v46": (34722999, 3, 0.0005, 16, 0.1, 1.1, 416, 16384, 0, 0),
    "train_v45": (5699999, 5, 0.0005, 16, 0.1, 1.1, 448, 0, 300, 2),
}


def _scripts(out):
    return {s["name"]: Path(s["script"]).read_text() for s in out["stages"] if s["script"]}


def test_paper_dry_run_on_discovery_renders_the_seed_resources(tmp_path):
    out = launch_json(tmp_path, "vsc", "--cluster", "discovery", "--preset", "paper", "--dry-run", "--account", "x")
    assert [s["name"] for s in out["stages"]] == STAGES
    scripts = _scripts(out)
    assert set(scripts) == set(STAGES) - {"download"}  # download runs on the login node
    for stage in SEED:  # the seed: CUDA_VISIBLE_DEVICES=0,1,2,3, one node, DeepSpeed ZeRO-2
        text = scripts[stage]
        for line in ("#SBATCH --gres=gpu:v100:4", "#SBATCH --ntasks-per-node=4", "#SBATCH --nodes=1",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --time=2-00:00:00", f"#SBATCH --job-name=vsc.{stage}",
                     "#SBATCH --account=x", "#SBATCH --partition=gpu", "conda activate"):
            assert line in text, (stage, line)
    for before, after in (("train_v41", "train_v44"), ("train_v44", "train_v46"), ("train_v46", "train_v45"),
                          ("train_v45", "extract"), ("extract", "match"), ("match", "eval")):
        assert f"#SBATCH --dependency=afterok:<{before}>" in scripts[after], (before, after)
    assert "#SBATCH --gres=gpu:v100:4" in scripts["extract"]
    assert "gres" not in scripts["match"] and "#SBATCH --partition=main" in scripts["eval"]
    cfg = yaml.safe_load((Path(out["run_dir"]) / "config.yaml").read_text())
    assert cfg["train"]["arch"] == "vit_base_r50_s16_224.orig_in21k" and cfg["train"]["feature_dim"] == 512
    assert cfg["train"]["zero_stage"] == 2 and cfg["train"]["precision"] == "fp16" and cfg["train"]["sync_bn"]
    assert (cfg["train"]["head_lr_scale"], cfg["train"]["head_wd_scale"]) == (5.0, 10.0)
    for stage, values in SEED.items():
        s = cfg[stage]
        assert (s["seed"], s["epochs"], s["lr"], s["batch_size"], s["pos_margin"], s["neg_margin"], s["input_size"],
                s["memory_size"], s["warmup_steps"], s["num_negatives"]) == values, stage
        assert s["wd"] == 1e-6 and s["num_frames"] == 32 and s["gpus"] == 4
    assert cfg["match"]["knn_k"] == 25


def test_presets_tiny_on_synthetic_paper_on_real_data(tmp_path):
    from launchers.vsc import Vsc, stage_epochs

    tiny = Vsc.make_config()
    sizes = [getattr(tiny, s).input_size for s in SEED]
    assert tiny.train.arch.startswith("vit_") and sizes == sorted(set(sizes))  # every handoff grows the input
    assert all(getattr(tiny, s).gpus == 0 for s in SEED)
    (tmp_path / "vsc").mkdir()
    paper = Vsc.make_config(overrides={"data.root": str(tmp_path / "vsc")})
    assert paper.train_v46.input_size == 416 and paper.train.arch == "vit_base_r50_s16_224.orig_in21k"
    none = Vsc.make_config(overrides={"train.epochs": 0})
    assert [stage_epochs(none, s) for s in SEED] == [0, 0, 0, 0]


def test_bad_values_are_refused_before_anything_runs(tmp_path):
    for args, words in ((["--set", "train_v45.num_negatives=0"], "num_negatives"),
                        (["--set", "train_v44.neg_margin=0.05"], "neg_margin"),
                        (["--set", "train_v41.batch_size=30", "--gpus", "4"], "batch_size=30"),
                        (["--set", "data.root=/no/such/dir"], "does not exist")):
        proc = cli(tmp_path, "vsc", "--cluster", "local", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "runs").exists()
