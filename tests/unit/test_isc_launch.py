"""The isc workflow's launch side: the seed's resources stage by stage in dry-run scripts, the
presets, nested --set overrides, bad input refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.pipeline_helpers import cli, launch_json

STAGES = ["download", "train_v83", "train_v83_cont", "train_v86", "train_v98", "train_v107", "extract",
          "postprocess", "eval"]
#: the seed's five commands: (epochs, lr, batch, input size, memory, neg margin, seed, GPUs)
SEED = {
    "train_v83": (5, 0.1, 128, 256, 20000, 1.0, 9, 4),
    "train_v83_cont": (10, 0.1, 128, 256, 20000, 1.0, 90, 4),
    "train_v86": (7, 0.1, 128, 384, 20000, 1.0, 99, 8),
    "train_v98": (3, 0.1, 64, 512, 20000, 1.0, 999, 8),
    "train_v107": (10, 0.5, 512, 512, 1000, 1.1, 99999, 8),
}


def _scripts(out):
    return {s["name"]: Path(s["script"]).read_text() for s in out["stages"] if s["script"]}


def _config(out):
    return yaml.safe_load((Path(out["run_dir"]) / "config.yaml").read_text())


@pytest.fixture
def a100x8(tmp_path, monkeypatch):
    """A user profile like CARC Discovery but with nodes of 8 A100s, as the seed's machine."""
    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "templates" / "profiles" / "discovery.yaml").read_text())
    data["description"] = "Discovery-like, 8 x A100 per node"
    data["partitions"]["gpu"] = {"max_time": "2-00:00:00", "gpus_per_node": 8, "gpu_types": ["a100"]}
    data["gpu_type"] = "a100"
    data.pop("detect", None)
    folder = tmp_path / "xdg" / "hpc_jobs" / "profiles"
    folder.mkdir(parents=True)
    (folder / "a100x8.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return "a100x8"


def test_paper_dry_run_renders_the_seed_resources_stage_by_stage(tmp_path, a100x8):
    out = launch_json(tmp_path, "isc", "--cluster", a100x8, "--preset", "paper", "--dry-run", "--account", "x")
    assert [s["name"] for s in out["stages"]] == STAGES
    scripts = _scripts(out)
    assert set(scripts) == set(STAGES) - {"download"}  # download runs on the login node
    for stage, (*_, gpus) in SEED.items():
        text = scripts[stage]
        for line in (f"#SBATCH --gres=gpu:a100:{gpus}", f"#SBATCH --ntasks-per-node={gpus}", "#SBATCH --nodes=1",
                     f"#SBATCH --cpus-per-task=8", "#SBATCH --time=2-00:00:00", f"#SBATCH --job-name=isc.{stage}",
                     "#SBATCH --account=x", "#SBATCH --partition=gpu", "conda activate"):
            assert line in text, (stage, line)
    # the chain: each training stage waits for the one it starts from
    assert "#SBATCH --dependency=afterok:<train_v83>" in scripts["train_v83_cont"]
    assert "#SBATCH --dependency=afterok:<train_v98>" in scripts["train_v107"]
    assert "#SBATCH --gres=gpu:a100:8" in scripts["extract"]  # extraction on every GPU of the node
    post = scripts["postprocess"]  # the seed post-processed with faiss on 4 GPUs, one process
    assert "#SBATCH --gres=gpu:a100:4" in post and "#SBATCH --ntasks-per-node=1" in post
    assert "gres" not in scripts["eval"] and "#SBATCH --partition=main" in scripts["eval"]
    cfg = _config(out)
    assert cfg["train"]["arch"] == "tf_efficientnetv2_m.in21k_ft_in1k" and cfg["train"]["gem_p"] == 1.0
    for stage, (epochs, lr, batch, size, memory, neg, seed, gpus) in SEED.items():
        s = cfg[stage]
        assert (s["epochs"], s["lr"], s["batch_size"], s["input_size"], s["memory_size"], s["neg_margin"],
                s["seed"], s["gpus"]) == (epochs, lr, batch, size, memory, neg, seed, gpus), stage
        assert s["pos_margin"] == 0.0 and s["wd"] == 1e-6
    assert cfg["train_v98"]["extra_negatives"] == 2 and cfg["train_v107"]["extra_negatives"] == 30
    assert cfg["extract"]["input_size"] == 512
    pp = cfg["postprocess"]
    assert (pp["k"], pp["dba_k"], pp["dba_alpha"], pp["nes_k"], pp["nes_beta"]) == (10, 10, 3.0, 10, 0.35)


def test_discovery_has_four_gpu_nodes_so_eight_gpu_stages_span_two(tmp_path):
    args = ["isc", "--cluster", "discovery", "--preset", "paper", "--dry-run", "--account", "x"]
    proc = cli(tmp_path, *args, check=False)
    assert proc.returncode == 2 and "train_v86" in proc.stderr and "8 GPUs" in proc.stderr, proc.stderr
    out = launch_json(tmp_path, *args, "--set", "max_gpus_per_node=4")
    scripts = _scripts(out)
    v83, v86 = scripts["train_v83"], scripts["train_v86"]
    assert "#SBATCH --nodes=1" in v83 and "#SBATCH --gres=gpu:v100:4" in v83
    # the seed's 8 ranks (DDP world size) as 2 nodes x 4 GPUs: the same per-GPU batch of 16
    assert "#SBATCH --nodes=2" in v86 and "#SBATCH --gres=gpu:v100:4" in v86 and "--ntasks-per-node=4" in v86
    assert "module load gcc/8.3.0 cuda/10.2.89" in v86
    # or, as the preflight error suggests, --nodes 2: every stage's seed GPU count over 2 nodes
    scripts = _scripts(launch_json(tmp_path, *args, "--nodes", "2"))
    assert "#SBATCH --nodes=2" in scripts["train_v83"] and "#SBATCH --gres=gpu:v100:2" in scripts["train_v83"]
    assert "#SBATCH --nodes=2" in scripts["train_v86"] and "#SBATCH --gres=gpu:v100:4" in scripts["train_v86"]
    # an explicit --gpus wins over the seed's per-stage counts: 2 per stage, on one node
    scripts = _scripts(launch_json(tmp_path, *args, "--gpus", "2"))
    for stage in ("train_v83", "train_v86", "train_v107", "extract"):
        assert "#SBATCH --nodes=1" in scripts[stage] and "#SBATCH --gres=gpu:v100:2" in scripts[stage], stage


def test_presets_tiny_on_synthetic_paper_on_real_data(tmp_path):
    from launchers.isc import Isc, stage_epochs

    tiny = Isc.make_config()
    assert tiny.train.arch == "mobilenetv3_small_050" and tiny.train_v83.input_size == 64
    assert [stage_epochs(tiny, s) for s in ("train_v83", "train_v83_cont")] == [5, 10]
    assert all(getattr(tiny, s).gpus == 0 for s in SEED)  # tiny: every stage on --gpus
    (tmp_path / "disc21").mkdir()
    paper = Isc.make_config(overrides={"data.root": str(tmp_path / "disc21")})
    assert paper.train_v86.input_size == 384 and paper.train.arch.startswith("tf_efficientnetv2_m")
    # the data root in a --config file, nested as YAML writes it, picks the paper preset too
    (tmp_path / "real.yaml").write_text(f"data:\n  root: {tmp_path / 'disc21'}\n")
    assert Isc.make_config(config_file=str(tmp_path / "real.yaml")).train_v86.input_size == 384
    both = Isc.make_config(preset="paper", overrides={"train_v86.input_size": 320, "train.epochs": 0})
    assert both.train_v86.input_size == 320 and both.train_v98.input_size == 512
    assert [stage_epochs(both, s) for s in SEED] == [0, 0, 0, 0, 0]
    three = Isc.make_config(overrides={"train.epochs": 3})
    assert [stage_epochs(three, s) for s in SEED] == [3, 6, 3, 3, 3]  # v83_cont: 3 more on top of v83's


def test_tiny_on_the_dev_cluster_sizes_from_gpus(tmp_path):
    out = launch_json(tmp_path, "isc", "--cluster", "local", "--gpus", "2", "--dry-run")
    scripts = _scripts(out)
    for stage in ("train_v83", "train_v107", "extract"):
        assert "#SBATCH --ntasks-per-node=2" in scripts[stage] and "#SBATCH --cpus-per-task=1" in scripts[stage]
    assert "--ntasks-per-node=1" in scripts["postprocess"] and "gres" not in scripts["postprocess"]


@pytest.mark.parametrize("sets,message", [
    (["train_v83.lr=fast"], "config 'train_v83.lr': 'fast' is not a number"),
    (["train.epochs=-1"], "train.epochs=-1"),
    (["train_v83.momentum=0.8"], "unknown config key 'train_v83.momentum'"),
    (["train_v86.lr_schedule=cosine"], "config 'train_v86.lr_schedule': 'cosine' is not one of"),
    (["data.root=/nonexistent/disc21"], "data.root '/nonexistent/disc21' does not exist"),
    (["train_v98.neg_margin=0.0"], "neg_margin=0.0 must exceed pos_margin"),
    (["train_v107.extra_negatives=0"], "train_v107.extra_negatives must be at least 1"),
    (["train_v83.batch_size=30", "--gpus", "4"], "train_v83: batch_size=30 does not split over 4 rank(s)"),
    (["max_gpus_per_node=3", "--preset", "paper"], "train_v86: its 8 GPUs do not split evenly over 3 nodes"),
])
def test_bad_isc_config_exits_2_before_anything_runs(tmp_path, sets, message):
    args = ["isc", "--cluster", "local"]
    for s in sets:
        args += ["--set", s] if not s.startswith("--") and "=" in s else [s]
    proc = cli(tmp_path, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_seed_flags(tmp_path):
    out = cli(tmp_path, "isc", "--help").stdout
    for key in ("train_v83.memory_size", "train_v107.neg_margin", "train.gem_p", "train.epochs",
                "postprocess.nes_beta", "data.root", "max_gpus_per_node"):
        assert key in out, key


@pytest.fixture
def real_layout(tmp_path):
    """A DISC21 root (the micro synthetic set, its marker removed: indistinguishable from data)."""
    from data.isc import synthetic

    root = tmp_path / "disc21"
    synthetic.generate(root, preset="micro")
    (root / synthetic.MARKER).unlink()
    return root


def test_real_layout_passes_preflight_and_missing_ground_truth_is_named(tmp_path, real_layout):
    ok = cli(tmp_path, "isc", "--cluster", "local", "--dry-run", "--set", f"data.root={real_layout}", check=False)
    assert ok.returncode == 0, ok.stderr
    (real_layout / "phase2_ground_truth.csv").unlink()
    proc = cli(tmp_path, "isc", "--cluster", "local", "--dry-run", "--set", f"data.root={real_layout}", check=False)
    assert proc.returncode == 2 and "phase2_ground_truth.csv" in proc.stderr and "data.eval_ground_truth" in proc.stderr
    # images are the download stage's job, unless the network is off
    import shutil

    shutil.rmtree(real_layout / "training_images")
    args = ["isc", "--cluster", "local", "--dry-run", "--set", f"data.root={real_layout}",
            "--set", "data.eval_ground_truth=public_ground_truth.csv", "--set", "data.eval_queries=query_images"]
    assert cli(tmp_path, *args, check=False).returncode == 0
    proc = cli(tmp_path, *args, "--set", "data.no_network=true", check=False)
    assert proc.returncode == 2 and "training_images" in proc.stderr, proc.stderr
