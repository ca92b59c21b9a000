"""The training engine: RunEnv detection, fit, exact resume after signals, DDP and DeepSpeed on
the CPU with gloo, init_from, outputs.

Runs that must survive a signal or span ranks run in new processes forked from the test process
(torch is already imported there, so each starts in milliseconds), one torch thread each.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_jobs.environment import RunEnv, expand_hostlist, expand_tasks_per_node

REPO = Path(__file__).resolve().parents[2]
EXIT_REQUEUED, EXIT_TERMINATED = 75, 143

# ----------------------------------------------------------------------------- RunEnv (no torch)


@pytest.mark.parametrize("spec, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("a1,b[3,5-6]", ["a1", "b3", "b5", "b6"]),
    ("gpu[08-10],login", ["gpu08", "gpu09", "gpu10", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("d05-[06,08]", ["d05-06", "d05-08"]),
])
def test_expand_hostlist(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[3-1]", "n[a-b]"])
def test_expand_hostlist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(bad)


def test_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


SLURM_ENV = {
    "SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "2", "SLURM_CPUS_PER_TASK": "4",
    "CUDA_VISIBLE_DEVICES": "0,1",
}


def test_runenv_from_slurm() -> None:
    env = RunEnv.detect(SLURM_ENV)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.master_addr) == (1, 2, "n1")
    assert env.master_port == 20000 + 12345 % 20000
    assert (env.job_id, env.restart_count, env.cpus_per_task, env.gpus) == ("12345", 2, 4, ("0", "1"))
    assert env.is_slurm and not env.is_main and env.array_task_id is None
    over = RunEnv.detect({**SLURM_ENV, "MASTER_PORT": "29999", "SLURM_PROCID": "0"})
    assert over.master_port == 29999 and over.is_main
    uneven = RunEnv.detect({**SLURM_ENV, "SLURM_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"})
    assert uneven.local_world_size == 1


def test_runenv_in_the_batch_script_is_one_process_with_job_facts() -> None:
    batch = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_ID"}  # no srun: the batch step
    batch.update(SLURM_PROCID="0", SLURM_NODEID="0", SLURM_LOCALID="0",
                 SLURM_ARRAY_JOB_ID="12340", SLURM_ARRAY_TASK_ID="5")
    env = RunEnv.detect(batch)
    assert (env.rank, env.world_size, env.local_world_size) == (0, 1, 1)  # SLURM_NTASKS=4 is not us
    assert env.is_slurm and env.job_id == "12345" and env.restart_count == 2 and env.cpus_per_task == 4
    assert env.requeue_target == "12340_5"


def test_runenv_from_torchrun_and_single() -> None:
    env = RunEnv.detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (1, 2, 1, "10.0.0.1", 29400)
    assert not env.is_slurm and env.num_nodes == 1 and env.job_id is None
    # torchrun inside a Slurm step: torchrun's ranks, Slurm's job facts
    inside = RunEnv.detect({**SLURM_ENV, "TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2",
                            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    assert (inside.rank, inside.world_size, inside.is_slurm, inside.job_id) == (0, 2, True, "12345")
    single = RunEnv.detect({})
    assert (single.rank, single.world_size, single.is_slurm, single.gpus) == (0, 1, False, ())
    assert single.requeue() is False


def test_requeue_targets_job_or_array_task() -> None:
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert RunEnv.detect(SLURM_ENV).requeue(run=fake_run) is True
    array = {**SLURM_ENV, "SLURM_JOB_ID": "200", "SLURM_ARRAY_JOB_ID": "199", "SLURM_ARRAY_TASK_ID": "3"}
    assert RunEnv.detect(array).requeue(run=fake_run) is True
    assert calls == [["scontrol", "requeue", "12345"], ["scontrol", "requeue", "199_3"]]
    refused = RunEnv.detect(SLURM_ENV).requeue(run=lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "no"))
    assert refused is False


def test_train_config_validates() -> None:
    from hpc_jobs.engine.config import TrainConfig, resolve_precision

    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"epochs": 1, "epocs": 2})
    assert TrainConfig(signal_name="SIGUSR1").signal_name == "USR1"
    assert resolve_precision("auto", "cpu", False) == "fp32"
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp16"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("fp16", "cpu", False)


# ----------------------------------------------------------------------------- the test task

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
import torch._dynamo  # noqa: E402,F401  (optimizers import it lazily: pay once here, not per fork)
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

import hpc_jobs.engine.trainer  # noqa: E402,F401


class NoisyRegression(Dataset):
    """y = x . w; each read adds fresh noise to x (exercises per-sample RNG seeding)."""

    def __init__(self, n: int, seed: int, noise: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8).unsqueeze(1)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + self.noise * torch.randn(8), self.y[i]


class RegressionTask:
    def __init__(self, n_train: int = 100, stop_at_call: int | None = None, stop_signal: str = "USR2",
                 stop_rank: int = 0) -> None:
        self.n_train, self.stop_at_call, self.stop_signal, self.stop_rank = n_train, stop_at_call, stop_signal, stop_rank
        self.calls = 0
        self.seen = 0  # task state that must survive a resume

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def build_optimizer(self, model: nn.Module):
        return torch.optim.AdamW(model.parameters(), lr=3e-2)

    def build_scheduler(self, optimizer, steps_per_epoch: int, epochs: int):
        total = steps_per_epoch * epochs
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.5 * s / total)

    def train_dataset(self) -> Dataset:
        return NoisyRegression(self.n_train, seed=0)

    def val_dataset(self) -> Dataset:
        return NoisyRegression(32, seed=1, noise=0.0)

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls == self.stop_at_call and int(os.environ.get("RANK", "0")) == self.stop_rank:
            os.kill(os.getpid(), getattr(signal, "SIG" + self.stop_signal))
        x, y = batch
        self.seen += len(x)
        pred = model(x)
        return {"loss": nn.functional.mse_loss(pred, y), "mae": (pred - y).abs().mean()}

    def validate(self, model, loader):
        total, n = 0.0, 0
        for x, y in loader:
            total += nn.functional.mse_loss(model(x), y, reduction="sum").item()
            n += len(x)
        return {"mse": total / n, "neg_mse": -total / n}

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


def _config(**overrides):
    from hpc_jobs.engine import TrainConfig

    base = dict(epochs=3, batch_size=8, grad_accum=2, num_workers=0, log_every=2, checkpoint_every_steps=4,
                keep_last=2, best_metric="neg_mse", seed=7, heartbeat_every_s=0.0, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _local_trainer(task, config, out_dir, **kwargs):
    """A Trainer in this test process: one rank, whatever SLURM_*/RANK variables the test runner has."""
    from hpc_jobs.engine import Trainer

    return Trainer(task, config, out_dir, env=RunEnv(), **kwargs)


def _segment(spec: dict) -> int:
    """One training process: fit, dump this rank's final weights, exit 0 / 75 / 143."""
    from hpc_jobs.engine import Requeued, Terminated, Trainer

    torch.set_num_threads(1)
    task = RegressionTask(**spec.get("task", {}))
    config = {"plot": False, "tensorboard": False, **spec.get("config", {})}  # outputs: tested in-process
    trainer = Trainer(task, _config(**config), spec["out"])
    try:
        result = trainer.fit()
    except (Requeued, Terminated) as exc:
        print(f"STOPPED {type(exc).__name__} step={exc.step} checkpoint={exc.checkpoint}", flush=True)
        return exc.exit_code
    rank = trainer.env.rank
    torch.save({"model": trainer.strategy.module.state_dict(), "seen": task.seen},
               Path(spec["out"]) / f"final-rank{rank}.pt")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(spec: dict, rank: int, ranks: int, port: int, log: Path, tmp: Path) -> None:
    """Body of a forked training process: a fresh Trainer in a new process, without paying the
    interpreter + torch start-up again (the parent already imported them)."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC")) or k in _LAUNCH_VARS]:
            del os.environ[key]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp / "torch_ext")
        if ranks > 1:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                              LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = _segment(spec)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def _launch(spec: dict, tmp: Path, ranks: int = 1) -> list:
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    tag = f"{Path(spec['out']).name}-{len(list(tmp.glob('log-*')))}"
    procs = []
    for rank in range(ranks):
        log = tmp / f"log-{tag}-rank{rank}.txt"
        proc = ctx.Process(target=_child, args=(spec, rank, ranks, port, log, tmp))
        proc.start()
        procs.append((proc, log))
    return procs


def _wait(procs: list, expect: int, timeout: float = 120) -> list[str]:
    outs = []
    for proc, log in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        out = log.read_text() if log.exists() else ""
        outs.append(out)
        assert proc.exitcode == expect, f"exit {proc.exitcode}, expected {expect}:\n{out[-4000:]}"
    return outs


def _run(spec: dict, tmp: Path, expect: int = 0, ranks: int = 1) -> list[str]:
    return _wait(_launch(spec, tmp, ranks), expect)


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def _final_state(out: Path) -> dict:
    from hpc_jobs.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoints" / "last.pt")


# ----------------------------------------------------------------------------- in-process runs


def test_single_process_fit_learns_and_writes_outputs(tmp_path: Path, capsys) -> None:
    from hpc_jobs.checkpoint import verify_checkpoint

    result = _local_trainer(RegressionTask(), _config(epochs=2), tmp_path).fit()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,split,") and "loss" in rows[0] and "neg_mse" in rows[0]
    train_losses = [float(r.split(",")[3]) for r in rows[1:] if r.split(",")[2] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0], train_losses
    assert result["step"] == 12 and result["epoch"] == 2
    assert result["best"]["metric"] == "neg_mse" and result["best_checkpoint"].endswith("best.pt")
    best = verify_checkpoint(result["best_checkpoint"])
    assert best.metrics["neg_mse"] == result["best"]["value"]
    beat = json.loads((tmp_path / "heartbeat.json").read_text())
    assert beat["phase"] == "done" and beat["step"] == 12 and beat["total_steps"] == 12
    assert set(beat) >= {"step", "epoch", "total_steps", "epochs", "loss", "rate", "samples_per_s", "eta_s",
                         "time", "host", "pid", "phase"}
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert ckpts == ["step-00000008.pt", "step-00000012.pt"]  # keep_last=2 pruned steps 4 and 6
    out = capsys.readouterr().out
    assert "epoch 2/2 step 12/12 loss" in out and "steps/s" in out and "eta" in out
    # a second fit() of a finished run resumes at its end and trains nothing
    again = _local_trainer(RegressionTask(), _config(epochs=2), tmp_path).fit()
    assert again["step"] == 12 and again["resumed_from"].endswith("step-00000012.pt")


def test_init_from_strips_module_prefix_and_refuses_other_architectures(tmp_path: Path) -> None:
    from hpc_jobs.engine import ArchitectureMismatch, load_init_weights

    source = RegressionTask().build_model()
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "foreign.pth")  # ISC-style, no manifest
    target = RegressionTask().build_model()
    report = load_init_weights(target, tmp_path / "foreign.pth")
    assert len(report.loaded) == 4 and not report.missing and not report.mismatched
    _assert_same_tensors(target.state_dict(), source.state_dict())
    # a dropped head (ArcFace -> XBM style) is reported, not fatal
    renamed = load_init_weights(RegressionTask().build_model(), tmp_path / "foreign.pth",
                                key_map=lambda k: None if k.startswith("3.") else k)
    assert renamed.missing == ["3.weight", "3.bias"]
    other = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    with pytest.raises(ArchitectureMismatch, match="does not fit this model.*another architecture"):
        load_init_weights(other, tmp_path / "foreign.pth")
    with pytest.raises(ArchitectureMismatch, match="0 of 2 model tensors"):
        load_init_weights(nn.Linear(3, 3), tmp_path / "foreign.pth")


def test_trainer_init_from_a_previous_run(tmp_path: Path) -> None:
    first = _local_trainer(RegressionTask(), _config(epochs=1, max_steps=2), tmp_path / "a").fit()
    src = first["last_checkpoint"]
    trainer = _local_trainer(RegressionTask(), _config(epochs=1, max_steps=1), tmp_path / "b", init_from=src)
    result = trainer.fit()
    assert result["resumed_from"] is None and result["step"] == 1  # weights only: a fresh run


def test_a_signal_during_start_up_is_acted_on_at_the_first_step(tmp_path: Path) -> None:
    from hpc_jobs.engine import Requeued
    from hpc_jobs.environment import catch_stop_signals

    saved = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    catch_stop_signals()  # what a job process does before importing torch
    try:
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives "during imports": recorded, not fatal
        with pytest.raises(Requeued) as stop:
            _local_trainer(RegressionTask(), _config(epochs=1, plot=False, tensorboard=False), tmp_path).fit()
        assert stop.value.step == 1 and stop.value.checkpoint.name == "step-00000001.pt"
    finally:
        signal.signal(signal.SIGUSR2, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


# ----------------------------------------------------------------------------- runs in new processes


def test_exact_resume_after_two_requeues_is_bit_identical(tmp_path: Path) -> None:
    """Uninterrupted vs requeued twice (USR2 mid-epoch; USR2 during an epoch's last step, acted on
    after validation and the epoch-end save), each part a new process: weights, optimizer,
    scheduler, task state, RNG and metrics.csv identical. The parts load data in a worker process,
    the reference in the main process: per-sample seeding makes the noise independent of that."""

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # 100 samples / batch 8 = 12 micro-batches = 6 steps per epoch (grad_accum 2), 18 steps
    workers = {"num_workers": 1}
    first = _launch({"out": str(cut), "task": {"stop_at_call": 5}, "config": workers}, tmp_path)
    reference_task = RegressionTask()
    _local_trainer(reference_task, _config(plot=False, tensorboard=False), ref).fit()  # beside the first part
    outs = _wait(first, EXIT_REQUEUED)
    assert "STOPPED Requeued step=3" in outs[0]  # mid-epoch: 6 of 12 micro-batches
    outs = _run({"out": str(cut), "task": {"stop_at_call": 5}, "config": workers}, tmp_path, EXIT_REQUEUED)
    assert "resumed from" in outs[0] and "STOPPED Requeued step=6" in outs[0]
    outs = _run({"out": str(cut), "config": workers}, tmp_path)
    a, b = _final_state(ref), _final_state(cut)
    for key in ("model", "optimizer", "scheduler", "task", "step", "epoch", "best", "metrics", "rng"):
        _assert_same_tensors(a[key], b[key], key)
    assert torch.load(cut / "final-rank0.pt")["seen"] == reference_task.seen
    assert (ref / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()


def test_sigterm_saves_once_then_resume_from_continues_in_a_new_directory(tmp_path: Path) -> None:
    from hpc_jobs.checkpoint import read_manifest
    from hpc_jobs.engine import Terminated

    first = tmp_path / "first"
    # SIGTERM during step 4 (micro-batches 7-8), which is also a periodic checkpoint step
    with pytest.raises(Terminated) as stop:
        _local_trainer(RegressionTask(stop_at_call=7, stop_signal="TERM"), _config(epochs=1, plot=False), first).fit()
    assert stop.value.step == 4 and stop.value.exit_code == EXIT_TERMINATED and not stop.value.requeued
    assert read_manifest(stop.value.checkpoint).meta["reason"] == "periodic"  # saved once, not twice
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after fit()
    done = _local_trainer(RegressionTask(), _config(epochs=1, plot=False), first).fit()
    assert done["step"] == 6 and done["resumed_from"].endswith("step-00000004.pt")
    # a later stage continues that run from 1 to 2 epochs in its own directory
    more = _local_trainer(RegressionTask(), _config(epochs=2, plot=False), tmp_path / "more", resume_from=first).fit()
    assert more["step"] == 12 and more["resumed_from"].endswith("step-00000006.pt")
    assert (tmp_path / "more" / "checkpoints" / "best.pt").exists()  # best is tracked per directory


def test_ddp_two_ranks_gloo_identical_weights_and_resume(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    cfg = {"epochs": 2, "grad_accum": 1}  # 50 samples per rank: 6 steps per epoch
    _run({"out": str(ref), "config": cfg}, tmp_path, ranks=2)
    outs = _run({"out": str(cut), "config": cfg, "task": {"stop_at_call": 5, "stop_rank": 1}}, tmp_path,
                EXIT_REQUEUED, ranks=2)
    assert all("STOPPED Requeued step=5" in o for o in outs)  # rank 1's signal stops both ranks
    _run({"out": str(cut), "config": cfg}, tmp_path, ranks=2)
    for out in (ref, cut):
        r0, r1 = torch.load(out / "final-rank0.pt"), torch.load(out / "final-rank1.pt")
        _assert_same_tensors(r0["model"], r1["model"], "rank weights")
    _assert_same_tensors(torch.load(ref / "final-rank0.pt"), torch.load(cut / "final-rank0.pt"), "resume")
    _assert_same_tensors(torch.load(ref / "final-rank1.pt")["seen"], torch.load(cut / "final-rank1.pt")["seen"])
    # every rank's running loss sums survive the stop at step 5 (between two log lines)
    assert (ref / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()


@pytest.fixture(scope="module")
def deepspeed_loaded():
    """Import DeepSpeed in the test process once. Its ZeRO optimizer check imports its Muon
    optimizer, whose torch.compile decorators pull in torch._inductor (seconds per process)."""
    pytest.importorskip("deepspeed")
    importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")


def test_deepspeed_zero2_single_process_checkpoint_and_resume(tmp_path: Path, deepspeed_loaded) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    cfg = {"strategy": "deepspeed", "epochs": 2}
    reference = _launch({"out": str(ref), "config": cfg}, tmp_path)
    outs = _run({"out": str(cut), "config": cfg, "task": {"stop_at_call": 5}}, tmp_path, EXIT_REQUEUED)
    assert "STOPPED Requeued step=3" in outs[0]
    from hpc_jobs.checkpoint import verify_checkpoint

    manifest = verify_checkpoint(cut / "checkpoints" / "step-00000003.pt")
    assert any("zero_pp_rank_0" in name for name in manifest.companions)
    _run({"out": str(cut), "config": cfg}, tmp_path)
    _wait(reference, 0)
    _assert_same_tensors(torch.load(ref / "final-rank0.pt"), torch.load(cut / "final-rank0.pt"), "deepspeed")
    assert not list((tmp_path / "torch_ext").glob("*")), "DeepSpeed compiled an op"


def test_deepspeed_zero2_two_processes_gloo(tmp_path: Path, deepspeed_loaded) -> None:
    out = tmp_path / "run"
    cfg = {"strategy": "deepspeed", "epochs": 2, "grad_accum": 1}
    outs = _run({"out": str(out), "config": cfg, "task": {"stop_at_call": 4, "stop_rank": 0}}, tmp_path,
                EXIT_REQUEUED, ranks=2)
    assert all("STOPPED Requeued step=4" in o for o in outs)
    outs = _run({"out": str(out), "config": cfg}, tmp_path, ranks=2)
    assert "resumed from" in outs[0]
    r0, r1 = torch.load(out / "final-rank0.pt"), torch.load(out / "final-rank1.pt")
    _assert_same_tensors(r0["model"], r1["model"], "rank weights")
    shards = sorted(p.name for p in (out / "checkpoints").glob("step-*.ds/ds/*optim_states.pt"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(shards)



def test_seeded_batches_draw_per_sample_and_leave_the_callers_rng_alone():
    """Each sample's random draws depend on its own seed only, whether fetched alone or in a batch
    through the DataLoader (``__getitems__``); the caller's RNG state is unchanged; an inner
    dataset with its own ``__getitems__`` (torch's Subset) is never handed (index, seed) keys."""
    import random as pyrandom

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset, Subset

    from hpc_jobs.engine.data import SeededDataset

    class Draws(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([float(i), pyrandom.random(), float(np.random.rand()), torch.rand(()).item()])

    ds = SeededDataset(Subset(Draws(), list(range(8))))
    keys = [(i, 1000 + i) for i in (3, 1, 6, 0)]
    torch.manual_seed(5)
    before = torch.get_rng_state(), pyrandom.getstate(), np.random.get_state()[1].copy()
    alone = torch.stack([ds[k] for k in keys])
    batched = torch.stack(ds.__getitems__(keys))
    assert torch.equal(torch.get_rng_state(), before[0]) and pyrandom.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    loader = DataLoader(ds, batch_size=4, sampler=keys)  # (its iterator draws a base seed itself)
    through_loader = next(iter(loader))
    assert torch.equal(alone, batched) and torch.equal(alone, through_loader)
    assert len({tuple(row[1:].tolist()) for row in alone}) == 4  # different seeds, different draws
    again = torch.stack(ds.__getitems__([(3, 1000 + 3)]))
    assert torch.equal(again[0], alone[0])  # the same key, the same draws
