"""The diving workflow's launch side: presets, the seed's config surface, CARC scripts, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline_helpers import cli, launch_json


def _scripts(out):
    return {s["name"]: Path(s["script"]).read_text() for s in out["stages"] if s["script"]}


def test_carc_dry_run_reads_like_the_seed_job_files(tmp_path):
    out = launch_json(tmp_path, "diving", "--gpus", "2", "--cluster", "discovery", "--account", "ttrojan_123",
                      "--dry-run", "--preset", "paper")
    names = [s["name"] for s in out["stages"]]
    assert names == ["download", "prepare", "train", "eval"]
    scripts = _scripts(out)
    assert set(scripts) == {"prepare", "train", "eval"}  # download runs on the login node
    train = scripts["train"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gres=gpu:v100:2", "#SBATCH --account=ttrojan_123",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --time=02:00:00", "#SBATCH --job-name=diving.train",
                 "module load gcc/8.3.0 cuda/10.2.89", "conda activate", "#SBATCH --signal=USR2@300"):
        assert line in train, line
    prepare = scripts["prepare"]
    for line in ("#SBATCH --partition=main", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32768M",
                 "#SBATCH --time=12:00:00", "module load gcc/8.3.0 ffmpeg/4.1.1 python/3.9.2"):
        assert line in prepare, line
    assert "gres" not in prepare


def test_gpu_type_nodes_and_partition_options(tmp_path):
    out = launch_json(tmp_path, "diving", "--gpus", "4", "--nodes", "2", "--gpu-type", "a100", "--cluster",
                      "discovery", "--account", "a", "--time", "1-00:00:00", "--dry-run")
    train = _scripts(out)["train"]
    assert "#SBATCH --gres=gpu:a100:4" in train and "#SBATCH --nodes=2" in train
    assert "#SBATCH --time=1-00:00:00" in train
    assert "#SBATCH --time=12:00:00" not in train


def test_presets_tiny_on_synthetic_paper_on_real_data(tmp_path):
    from launchers.diving import Diving

    tiny = Diving.make_config()
    assert tiny.depth == 2 and tiny.spatial_size == 64
    (tmp_path / "mtl").mkdir()
    paper = Diving.make_config(overrides={"root_dir": str(tmp_path / "mtl")})
    assert paper.depth == 12 and paper.embed_dim == 768 and paper.spatial_size == 224 and paper.learning_rate == 1e-5
    assert Diving.make_config(preset="paper", overrides={"frame_num": 16}).frame_num == 16


@pytest.mark.parametrize("sets,message", [
    (["root_dir=/nonexistent/mtl"], "root_dir '/nonexistent/mtl' does not exist"),
    (["frame_method=every_other"], "config 'frame_method': 'every_other' is not one of"),
    (["optimizer=Lion"], "config 'optimizer': 'Lion' is not one of"),
    (["topology=512,256", "dropout=0.5"], "dropout has 1 values but topology has 2 layers"),
    (["pretrained_model=/nope.pyth"], "pretrained_model '/nope.pyth' is not a file"),
    (["spatial_size=70"], "must be a multiple of patch_size"),
    (["batch_size=0"], "batch_size=0: must be at least 1"),
    (["data.allow_missing=perhaps"], "config 'data.allow_missing': 'perhaps' is not a bool"),
    (["train_val_split_ratio=1.5"], "train_val_split_ratio=1.5"),
])
def test_bad_diving_config_exits_2_before_anything_runs(tmp_path, sets, message):
    args = ["diving", "--cluster", "local"]
    for s in sets:
        args += ["--set", s]
    proc = cli(tmp_path, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_seed_keys(tmp_path):
    proc = cli(tmp_path, "diving", "--help")
    for key in ("frame_method", "loss_spcoef_weight", "use_decoder", "data.allow_missing", "attention_type"):
        assert key in proc.stdout


@pytest.fixture
def real_layout(tmp_path):
    """A data root in the real MTL-AQA layout (the tiny synthetic set, used as if it were real)."""
    from data.diving import synthetic

    root = tmp_path / "mtl"
    synthetic.generate(root, preset="tiny")
    (root / "SYNTHETIC.json").unlink()  # now indistinguishable from user data
    return root


def _launch_on(tmp_path, root, *extra):
    return cli(tmp_path, "diving", "--cluster", "local", "--dry-run", "--set", f"root_dir={root}", *extra, check=False)


def test_real_layout_passes_preflight(tmp_path, real_layout):
    proc = _launch_on(tmp_path, real_layout)
    assert proc.returncode == 0, proc.stderr


def test_annotation_pickle_that_imports_code_is_refused(tmp_path, real_layout):
    import pickle

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch /tmp/hpc-jobs-pwned",))

    (real_layout / "final_annotations_dict.pkl").write_bytes(pickle.dumps({(1, 1): Evil()}))
    proc = _launch_on(tmp_path, real_layout)
    assert proc.returncode == 2 and "os" in proc.stderr and "system" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not Path("/tmp/hpc-jobs-pwned").exists()


def test_malformed_annotations_and_bad_split_are_refused(tmp_path, real_layout):
    import pickle

    good = (real_layout / "train_split_0.pkl").read_bytes()
    (real_layout / "train_split_0.pkl").write_bytes(pickle.dumps([(99, 1)]))
    proc = _launch_on(tmp_path, real_layout)
    assert proc.returncode == 2 and "(99, 1)" in proc.stderr, proc.stderr
    (real_layout / "train_split_0.pkl").write_bytes(good)
    (real_layout / "final_annotations_dict.pkl").write_bytes(b"not a pickle at all")
    proc = _launch_on(tmp_path, real_layout)
    assert proc.returncode == 2 and "final_annotations_dict.pkl" in proc.stderr, proc.stderr


def test_truncated_video_is_named_before_submission(tmp_path, real_layout):
    video = sorted((real_layout / "whole_videos").glob("*.mp4"))[0]
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 3])
    proc = _launch_on(tmp_path, real_layout)
    assert proc.returncode == 2 and video.name[:2] in proc.stderr and "allow_missing" in proc.stderr, proc.stderr
    assert _launch_on(tmp_path, real_layout, "--set", "data.allow_missing=true").returncode == 0
