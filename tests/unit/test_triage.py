"""Failure triage: (Slurm state, exit code, log tail) -> a one-line hint, from synthetic logs."""

from __future__ import annotations

from hpc_jobs.triage import Facts, diagnose

CUDA_OOM_LOG = """\
[engine] step 120/2000 loss 0.4412
Traceback (most recent call last):
  File "/code/hpc_jobs/engine/trainer.py", line 380, in _train_step
    loss.backward()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB
srun: error: n1: task 0: Exited with exit code 1
""".splitlines()

HOST_OOM_LOG = """\
[engine] step 40/2000 loss 0.9
slurmstepd: error: Detected 1 oom-kill event(s) in StepId=1234.0. Some of your processes may have been killed by the cgroup out-of-memory handler.
srun: error: n1: task 0: Out Of Memory
""".splitlines()

TIMEOUT_LOG = """\
[engine] step 900/2000 loss 0.2
slurmstepd: error: *** JOB 1234 ON n1 CANCELLED AT 2026-01-01T10:00:00 DUE TO TIME LIMIT ***
""".splitlines()

MODULE_LOG = """\
Traceback (most recent call last):
  File "/code/launchers/diving.py", line 12, in train
    import timm
ModuleNotFoundError: No module named 'timm'
""".splitlines()


def test_cuda_oom():
    t = diagnose(Facts(state="FAILED", raw_state="FAILED", exit_code="1:0", log_tail=CUDA_OOM_LOG, run="r1"))
    assert t.cause == "cuda_oom"
    assert "batch_size" in t.hint and "bf16" in t.hint and "--gpus" in t.hint
    assert "CUDA out of memory" in t.evidence


def test_host_oom_from_the_slurm_state_and_from_the_log():
    t = diagnose(Facts(state="OUT_OF_MEMORY", raw_state="OUT_OF_MEMORY", exit_code="0:125"))
    assert t.cause == "host_oom" and "--mem" in t.hint and "batch_size" in t.hint
    t = diagnose(Facts(state="FAILED", exit_code="0:9", log_tail=HOST_OOM_LOG))
    assert t.cause == "host_oom" and any(w in t.evidence for w in ("oom-kill", "Out Of Memory"))


def test_sigkill_without_a_python_error_is_probably_the_oom_killer():
    t = diagnose(Facts(state="FAILED", exit_code="0:9", log_tail=["[engine] step 3/10"]))
    assert t.cause == "host_oom"


def test_cuda_oom_wins_over_a_generic_failure_and_host_oom_words():
    lines = HOST_OOM_LOG[:1] + CUDA_OOM_LOG
    assert diagnose(Facts(state="FAILED", log_tail=lines)).cause == "cuda_oom"


def test_timeout():
    t = diagnose(Facts(state="TIMEOUT", raw_state="TIMEOUT", exit_code="0:0", log_tail=TIMEOUT_LOG, run="myrun"))
    assert t.cause == "timeout"
    assert "--time" in t.hint and "python launch.py resume myrun" in t.hint
    # the time-limit line alone (state lost) tells it too
    assert diagnose(Facts(state="CANCELLED", raw_state="CANCELLED by 0", log_tail=TIMEOUT_LOG)).cause == "timeout"


def test_missing_module():
    t = diagnose(Facts(state="FAILED", exit_code="1:0", log_tail=MODULE_LOG, run="r"))
    assert t.cause == "missing_module" and "'timm'" in t.hint
    assert "activate" in t.hint and "setup lines" in t.hint


def test_environment_setup_failure():
    t = diagnose(Facts(state="FAILED", log_tail=["/var/spool/slurmd/job01/slurm_script: line 12: module: command not found"]))
    assert t.cause == "environment" and "setup lines" in t.hint


def test_failed_dependency_names_the_upstream_stage():
    t = diagnose(Facts(state="CANCELLED", raw_state="CANCELLED", reason="Dependency", upstream_failed="train_more",
                       run="flaky", stage="evaluate"))
    assert t.cause == "dependency"
    assert "train_more" in t.hint and "python launch.py resume flaky" in t.hint
    # without the ledger's knowledge, Slurm's reason still tells it
    t = diagnose(Facts(state="CANCELLED", raw_state="CANCELLED", reason="DependencyNeverSatisfied"))
    assert t.cause == "dependency"


def test_node_fail_and_cancel_and_preemption():
    assert diagnose(Facts(state="NODE_FAIL", raw_state="NODE_FAIL")).cause == "node_fail"
    t = diagnose(Facts(state="CANCELLED", raw_state="CANCELLED by 1000"))
    assert t.cause == "cancelled" and "uid 1000" in t.hint
    assert diagnose(Facts(state="PREEMPTED")).cause == "preempted"


def test_missing_input_and_requeue_limit():
    t = diagnose(Facts(state="FAILED", error="StageInputError: stage 'train' cannot start: input 'stats' (/x) "
                                           "from stage 'shard' does not exist."))
    assert t.cause == "input"
    t = diagnose(Facts(state="FAILED", error="RequeueLimitError: stage 'train' was requeued 21 times (limit 20)"))
    assert t.cause == "requeue_limit"


def test_generic_failure_points_at_the_log_and_quotes_the_error():
    t = diagnose(Facts(state="FAILED", error="RuntimeError: injected failure in stage train_more (fail_once)",
                       run="flaky", stage="train_more"))
    assert t.cause == "error"
    assert "python launch.py logs flaky train_more" in t.hint and "injected failure" in t.evidence


def test_nothing_to_say_about_healthy_states():
    for state in ("COMPLETED", "RUNNING", "PENDING"):
        assert diagnose(Facts(state=state, log_tail=CUDA_OOM_LOG)) is None
    assert diagnose(Facts(state="UNKNOWN")) is None
