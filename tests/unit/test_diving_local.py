"""The README's main command, `python launch.py diving --gpus 2`, on the local backend: the whole
pipeline on the synthetic set, two gloo ranks on the CPU, and a clearly positive test Spearman."""

from __future__ import annotations

import json
from pathlib import Path

from tests.pipeline_helpers import cli, status_json, workflow_lines


def test_readme_main_command_learns_the_synthetic_set(tmp_path):
    # (this machine runs the dev cluster, so name the backend a fresh machine falls back to)
    proc = cli(tmp_path, "diving", "--gpus", "2", "--cluster", "local", "--run-name", "readme", timeout=900)
    lines = workflow_lines(proc.stdout)  # (each stage's log opens with the framework's attempt banner)
    assert proc.stdout.startswith("[download] [hpc_jobs] attempt 1 of stage download"), proc.stdout[:300]
    assert lines[0].startswith("[download] diving: no MTL-AQA data configured: using the SYNTHETIC set"), lines[:3]
    assert "no GPU on this machine: 2 ranks run with gloo on the CPU" in proc.stdout
    assert "ddp on 2 rank(s)" in proc.stdout
    states = status_json(tmp_path, "readme")
    assert {k: v["state"] for k, v in states.items()} == {s: "COMPLETED" for s in ("download", "prepare", "train", "eval")}
    rho = states["eval"]["result"]["spearman"]
    assert rho > 0.5, f"test Spearman {rho}: the model did not learn the synthetic set"
    assert f"test Spearman rho = {rho:.4f}" in proc.stdout
    train_dir = Path(json.loads(cli(tmp_path, "status", "readme", "--json").stdout)["run_dir"]) / "stages" / "train"
    for name in ("losses.png", "metrics.csv", "heartbeat.json", "checkpoints/best.pt", "checkpoints/best.pt.manifest.json"):
        assert (train_dir / name).exists(), name
    assert list((train_dir / "tb").iterdir()), "no TensorBoard events"


def test_a_2x2_sweep_runs_locally_and_ranks_four_points_by_spearman(tmp_path):
    """The same grid as the dev-cluster sweep test, on the local backend: shared stages once, the
    four points of train and eval as tasks, ranked by their test Spearman."""
    proc = cli(tmp_path, "diving", "--gpus", "1", "--cluster", "local", "--run-name", "grid", "--set", "epochs=2",
               "--set", "data.synthetic_preset=tiny", "--sweep", "learning_rate=3e-4,1e-3", "--sweep", "batch_size=4,8",
               timeout=600)
    assert "sweep: 4 points over learning_rate, batch_size (stages train, eval), best spearman first" in proc.stdout
    doc = json.loads(cli(tmp_path, "status", "grid", "--json").stdout)
    states = {s["name"]: s for s in doc["stages"]}
    assert states["train"]["tasks"] == {str(i): "COMPLETED" for i in range(4)}, states["train"]
    assert states["prepare"]["state"] == "COMPLETED" and states["prepare"]["array"] is None
    points = doc["sweep"]["points"]
    assert {(p["values"]["learning_rate"], p["values"]["batch_size"]) for p in points} == {
        (3e-4, 4), (3e-4, 8), (1e-3, 4), (1e-3, 8)}
    values = [p["value"] for p in points]
    assert all(isinstance(v, float) for v in values) and values == sorted(values, reverse=True), points
