"""The dev cluster's OCI support, without the cluster: oci.conf, the bundle built from host files,
and the RunTimeRun wrapper that gives each task of a Slurm 22.05 container step its own environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hpc_jobs.devcluster import config as C
from hpc_jobs.devcluster.cluster import DevCluster


def test_oci_conf_runs_each_task_through_the_wrapper_with_exec(tmp_path):
    layout = C.Layout(tmp_path / "state", conf_dir=tmp_path / "etc")
    text = C.render_oci_conf(layout, "/usr/bin/python3")
    assert text.startswith(C.MARKER + "\n")
    run = next(line for line in text.splitlines() if line.startswith("RunTimeRun="))
    assert run == (f'RunTimeRun="exec /usr/bin/python3 {layout.oci_task_wrapper} %b %n %t '
                   f'runc --root={layout.runc_root} run %n.%u.%j.%s.%t"')
    for key in ("RunTimeQuery", "RunTimeKill", "RunTimeDelete"):
        assert f'{key}="runc --root={layout.runc_root} ' in text
    assert layout.oci_conf in layout.conf_files  # recognised as ours, removed by down --purge


def test_bundle_from_host_files_is_idempotent(tmp_path):
    """Built from the host's own directories (binds and links, no copies); a second build finds
    nothing to do. (How long it takes is no test's business: no timed assertions here.)"""
    cluster = DevCluster(state_dir=tmp_path / "state", echo=lambda msg: None)
    assert cluster._build_oci_bundle() == [f"built the OCI bundle {cluster.layout.oci_bundle}"]
    assert cluster._build_oci_bundle() == []  # nothing changed the second time
    bundle = cluster.layout.oci_bundle
    config = json.loads((bundle / "config.json").read_text())
    binds = {m["destination"]: m.get("options") for m in config["mounts"]}
    assert binds["/usr"] == ["rbind", "ro"] and binds["/tmp"] == ["rbind"] and "/run/munge" in binds
    prefix = os.path.realpath(sys.prefix)  # the Python environment that ran `up`: bound, or under a bind
    assert any(prefix == d or prefix.startswith(d.rstrip("/") + "/") for d in binds if d != "/proc"), binds
    assert config["linux"]["namespaces"] == [{"type": "mount"}]  # host network (DDP) and pids (signals)
    for name in ("bin", "lib"):
        if Path("/" + name).is_symlink():
            assert os.readlink(bundle / "rootfs" / name) == os.readlink("/" + name)
    assert all((bundle / "rootfs" / d.lstrip("/")).is_dir() for d in binds if d != "/proc")


def _run_wrapper(tmp_path, node, local, tasks_per_node, nodelist="n[1-2]"):
    wrapper = tmp_path / "oci-task-env.py"
    wrapper.write_text(C.OCI_TASK_WRAPPER)
    bundle = tmp_path / f"spool-{node}"
    bundle.mkdir(exist_ok=True)
    env = ["SLURM_PROCID=0", "SLURM_LOCALID=0", "SLURM_NODEID=0", "SLURMD_NODENAME=n1",
           f"SLURM_STEP_NODELIST={nodelist}", f"SLURM_STEP_TASKS_PER_NODE={tasks_per_node}", "KEEP=1"]
    (bundle / "config.json").write_text(json.dumps({"process": {"env": env}, "root": {"path": "/img/rootfs"}}))
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "scontrol").write_text("#!/bin/sh\n# show hostnames n[1-3]\necho n1; echo n2; echo n3\n")
    (bindir / "scontrol").chmod(0o755)
    proc = subprocess.run([sys.executable, str(wrapper), str(bundle), node, str(local), "echo", "runc", "run", "id"],
                          capture_output=True, text=True, env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stderr
    task_bundle = bundle / f"task-{local}"
    assert proc.stdout.split() == ["runc", "run", "id", "-b", str(task_bundle)]
    config = json.loads((task_bundle / "config.json").read_text())
    return dict(e.split("=", 1) for e in config["process"]["env"]), config


def test_wrapper_gives_each_task_its_own_rank_and_node(tmp_path):
    env, config = _run_wrapper(tmp_path, "n2", 0, "1(x2)")
    assert (env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NODEID"], env["SLURMD_NODENAME"]) == ("1", "0", "1", "n2")
    assert env["KEEP"] == "1" and config["root"]["path"] == "/img/rootfs"
    env, _ = _run_wrapper(tmp_path, "n3", 1, "2(x2),3", nodelist="n[1-3]")
    assert (env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NODEID"]) == ("5", "1", "2")
