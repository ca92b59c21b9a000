"""Why did a stage fail, and what to do: (state, exit code, log tail) -> a one-line hint.

Pure: no file, no scheduler. :mod:`hpc_jobs.status` collects the inputs (the Slurm state and exit
code, the stage marker's error line, the last lines of the stage's error log, whether an upstream
stage failed) and shows the hint under the status table. Rules are tried in order; the first that
matches wins, so specific evidence in the log (a CUDA OOM) beats a generic state (FAILED).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .errors import command

FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Triage:
    cause: str  # short key: host_oom, cuda_oom, timeout, missing_module, dependency, ...
    hint: str  # one line: what to do
    evidence: str = ""  # the log line or state that told us

    def as_dict(self):
        return {"cause": self.cause, "hint": self.hint, "evidence": self.evidence}


@dataclass
class Facts:
    state: str  # hpc-jobs state (OUT_OF_MEMORY, TIMEOUT, ...)
    raw_state: str = ""  # Slurm's words ("CANCELLED by 1000")
    exit_code: str = ""  # "1:0" (code:signal), or "137"
    reason: str = ""  # Slurm's reason (DependencyNeverSatisfied, ...)
    error: str = ""  # the stage marker's error line
    log_tail: Sequence[str] = ()
    upstream_failed: Optional[str] = None  # the upstream stage that did not complete
    run: str = "RUN"
    stage: str = "STAGE"


CUDA_OOM = re.compile(r"CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
                      r"HIP out of memory|cudaErrorMemoryAllocation", re.IGNORECASE)
HOST_OOM = re.compile(r"oom[-_ ]kill|Out Of Memory|out-of-memory|MemoryError|Cannot allocate memory|"
                      r"exceeded (job )?memory limit|Killed process", re.IGNORECASE)
TIME_LIMIT = re.compile(r"DUE TO TIME LIMIT|TIME LIMIT|time limit exceeded", re.IGNORECASE)
NO_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'|ImportError: No module named ([\w.]+)")
IMPORT_ERR = re.compile(r"ImportError: (.+)")
CMD_NOT_FOUND = re.compile(r"(?:module|conda|singularity|apptainer|python3?): command not found|"
                           r"Lmod has detected the following error|EnvironmentNameNotFound|"
                           r"Could not find conda environment", re.IGNORECASE)
DISK = re.compile(r"No space left on device|Disk quota exceeded", re.IGNORECASE)
INPUT = re.compile(r"StageInputError|cannot start: (?:its|input)")
REQUEUE_LIMIT = re.compile(r"RequeueLimitError|was requeued \d+ times")
NCCL = re.compile(r"NCCL error|ncclInternalError|ProcessGroupNCCL.*(?:timeout|Timeout)|Watchdog caught collective "
                  r"operation timeout|DistNetworkError|EADDRINUSE|Address already in use", re.IGNORECASE)
NAN = re.compile(r"loss (?:is|became) (?:nan|inf)|non-finite loss|NaN loss", re.IGNORECASE)


def _find(pattern: re.Pattern, lines: Sequence[str]) -> Optional[re.Match]:
    for line in reversed(list(lines)):
        match = pattern.search(line)
        if match:
            return match
    return None


def _signal(exit_code: str) -> int:
    """``"0:9"`` -> 9; ``"137"`` (a shell's 128+9) -> 9; else 0."""
    text = (exit_code or "").strip()
    if ":" in text:
        try:
            return int(text.split(":")[1])
        except ValueError:
            return 0
    try:
        code = int(text)
    except ValueError:
        return 0
    return code - 128 if code > 128 else 0


def diagnose(facts: Facts) -> Optional[Triage]:
    """The most likely cause of a failed stage and what to do; None when nothing is known."""
    state = (facts.state or "").upper()
    raw = (facts.raw_state or state).upper()
    lines = [l for l in list(facts.log_tail) + ([facts.error] if facts.error else []) if l]
    resume = f"{command()} resume {facts.run}"
    if state not in FAILED_STATES and state != "UNKNOWN":
        return None

    rules: List[Callable[[], Optional[Triage]]] = []

    def cuda_oom():
        m = _find(CUDA_OOM, lines)
        if m:
            return Triage("cuda_oom", "GPU out of memory: lower batch_size (--set batch_size=...), use bf16 "
                          "(--set precision=bf16), or spread the model over more GPUs (--gpus N)", m.string.strip())

    def host_oom():
        if state == "OUT_OF_MEMORY" or raw.startswith("OUT_OF_MEMORY"):
            return Triage("host_oom", "out of host memory (Slurm OUT_OF_MEMORY): raise the stage's --mem, or lower "
                          "batch_size / num_workers", raw)
        m = _find(HOST_OOM, lines)
        if m:
            return Triage("host_oom", "out of host memory: raise the stage's --mem, or lower batch_size / num_workers",
                          m.string.strip())
        if state == "FAILED" and _signal(facts.exit_code) == 9 and not facts.error:
            return Triage("host_oom", "killed by SIGKILL with no Python error, most often the kernel's OOM killer: "
                          "raise --mem, or lower batch_size / num_workers", f"exit code {facts.exit_code}")

    def timeout():
        if state in ("TIMEOUT", "DEADLINE") or _find(TIME_LIMIT, lines):
            return Triage("timeout", f"hit the time limit: raise --time, or rely on checkpoint + resume ({resume} "
                          "continues from the last checkpoint)", raw if state == "TIMEOUT" else _find(TIME_LIMIT, lines).string.strip())

    def missing_module():
        m = _find(NO_MODULE, lines)
        if m:
            name = m.group(1) or m.group(2)
            return Triage("missing_module", f"module '{name}' is not importable in the job: activate the right env "
                          "(the cluster profile's setup lines: module load / conda activate) or pip install it there, "
                          f"then {resume}", m.string.strip())
        m = _find(CMD_NOT_FOUND, lines)
        if m:
            return Triage("environment", "the job's environment setup failed: fix the cluster profile's setup lines "
                          f"(module load / conda activate), then {resume}", m.string.strip())

    def dependency():
        if facts.upstream_failed:
            return Triage("dependency", f"never ran: upstream stage '{facts.upstream_failed}' did not complete; fix it "
                          f"({command()} logs {facts.run} {facts.upstream_failed}) and {resume}",
                          f"upstream {facts.upstream_failed}")
        if state == "CANCELLED" and "DEPENDENCY" in (facts.reason or "").upper():
            return Triage("dependency", f"cancelled because a job it depends on failed: fix that stage and {resume}",
                          facts.reason)

    def node_fail():
        if state == "NODE_FAIL":
            return Triage("node_fail", f"the node failed under the job (not your code): {resume} (training continues "
                          "from its last checkpoint)", raw)

    def inputs():
        m = _find(INPUT, lines)
        if m:
            return Triage("input", f"an upstream output is missing or incomplete: resume the run ({resume}) so the "
                          "upstream stage reruns first", m.string.strip())

    def requeue_limit():
        m = _find(REQUEUE_LIMIT, lines)
        if m:
            return Triage("requeue_limit", "requeued too often (preempted or timed out again and again): raise --time, "
                          "use the high partition, or checkpoint more often", m.string.strip())

    def disk():
        m = _find(DISK, lines)
        if m:
            return Triage("disk", "out of disk space or quota: free space, or point the profile's runs/data paths at "
                          "scratch", m.string.strip())

    def nccl():
        m = _find(NCCL, lines)
        if m:
            return Triage("distributed", "a distributed (NCCL/gloo) error or rendezvous failure: check that every rank "
                          f"started ({command()} logs {facts.run} {facts.stage} --rank N), then {resume}",
                          m.string.strip())

    def nan():
        m = _find(NAN, lines)
        if m:
            return Triage("nan", "the loss became NaN/inf: lower the learning rate, use bf16 instead of fp16, or clip "
                          "gradients", m.string.strip())

    def cancelled():
        if state == "CANCELLED":
            who = raw.split(" BY ", 1)[1] if " BY " in raw else ""
            return Triage("cancelled", f"cancelled{(' by uid ' + who) if who else ''} (scancel or "
                          f"{command()} cancel): {resume} to run it again", raw)

    def preempted():
        if state == "PREEMPTED":
            return Triage("preempted", f"preempted by a higher-priority job; it is normally requeued. If not: {resume}",
                          raw)

    rules = [cuda_oom, host_oom, missing_module, inputs, requeue_limit, disk, timeout, node_fail, dependency,
             nccl, nan, preempted, cancelled]
    for rule in rules:
        result = rule()
        if result:
            return result
    if state == "FAILED":
        line = facts.error or next((l.strip() for l in reversed(lines) if l.strip()), "")
        return Triage("error", f"the stage raised an error; read its log ({command()} logs {facts.run} "
                      f"{facts.stage}), fix it, then {resume}", line[:200])
    return None
