"""A stand-in for your own train.py, written the way `python launch.py run` expects: it resumes
from the newest checkpoint in $HPC_JOBS_CHECKPOINT_DIR, and on the signal named in $HPC_JOBS_SIGNAL
(sent before the time limit) it writes a checkpoint and exits; hpc-jobs then requeues the job and
the script starts again where it stopped. Plain Python: no hpc-jobs import needed."""

import argparse
import json
import os
import signal
import time

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--step-seconds", type=float, default=0.05)
parser.add_argument("--lr", type=float, default=1e-3)
args = parser.parse_args()

ckpt_dir = os.environ.get("HPC_JOBS_CHECKPOINT_DIR", "checkpoints")
os.makedirs(ckpt_dir, exist_ok=True)
path = os.path.join(ckpt_dir, "state.json")
state = {"step": 0, "loss": 1.0}
if os.path.exists(path):
    with open(path) as fh:
        state = json.load(fh)
print(f"starting at step {state['step']} (restart {os.environ.get('HPC_JOBS_RESTART_COUNT', '0')}, lr {args.lr})",
      flush=True)

stop = []
signal.signal(getattr(signal, "SIG" + os.environ.get("HPC_JOBS_SIGNAL", "USR2")), lambda *_: stop.append(True))


def save() -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(state, fh)
    os.replace(path + ".tmp", path)  # atomic: a kill mid-write leaves the previous checkpoint


while state["step"] < args.steps:
    time.sleep(args.step_seconds)
    state["step"] += 1
    state["loss"] *= 1 - args.lr * 100
    if stop:
        save()
        print(f"time-limit signal: checkpoint at step {state['step']}, exiting", flush=True)
        raise SystemExit(0)
    if state["step"] % 10 == 0:
        save()
save()
print(f"done: step {state['step']} loss {state['loss']:.4f}", flush=True)
