"""train_v83_cont resumes train_v83 exactly: two epochs in one run and one epoch + a resumed
second end with the same weights and the same memory bank (the engine's Trainer, IscTask, a
micro synthetic set, a 0.1M-parameter timm backbone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.isc import synthetic
from data.isc.layout import Disc21
from hpc_jobs.checkpoint import load_checkpoint, read_manifest
from hpc_jobs.engine import Trainer
from hpc_jobs.environment import RunEnv
from launchers.isc import Isc, IscTask, engine_config


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("isc-resume") / "micro"
    synthetic.generate(root, preset="micro")
    return Disc21(root)


def _config():
    same = {"batch_size": 16, "input_size": 32, "memory_size": 40, "memory_warmup_steps": 2, "seed": 5,
            "sample_size": 48}
    overrides = {"train.arch": "test_efficientnet", "train.num_workers": 0}
    for stage in ("train_v83", "train_v83_cont"):
        overrides.update({f"{stage}.{k}": v for k, v in same.items()})
    overrides["train_v83.epochs"], overrides["train_v83_cont.epochs"] = 1, 2
    return Isc.make_config(preset="tiny", overrides=overrides)


def _fit(cfg, stage, epochs, out: Path, layout, **kw):
    task = IscTask(cfg, stage, layout)
    result = Trainer(task, engine_config(cfg, stage, epochs, 1), out, env=RunEnv(), **kw).fit()
    return task, result


def test_resumed_run_matches_the_uninterrupted_one(tmp_path, layout):
    cfg = _config()
    whole_task, whole = _fit(cfg, "train_v83", 2, tmp_path / "whole", layout)
    _, first = _fit(cfg, "train_v83", 1, tmp_path / "first", layout)
    handed = Path(first["last_checkpoint"]).parent / "last.pt"
    assert read_manifest(handed).epoch == 1
    saved = load_checkpoint(handed)["task"]["memory"]
    assert saved["filled"] == 40 and saved["batches"] == 3  # the bank is part of the handoff
    cont_task, cont = _fit(cfg, "train_v83_cont", 2, tmp_path / "cont", layout, resume_from=handed)
    assert cont["resumed_from"] == str(handed)
    assert cont["step"] == whole["step"] == 6 and cont["epoch"] == 2
    a = load_checkpoint(whole["last_checkpoint"])
    b = load_checkpoint(cont["last_checkpoint"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(whole_task.memory.embeddings, cont_task.memory.embeddings)
    assert torch.equal(whole_task.memory.labels, cont_task.memory.labels)
    assert (whole_task.memory.ptr, whole_task.memory.batches) == (cont_task.memory.ptr, cont_task.memory.batches)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
