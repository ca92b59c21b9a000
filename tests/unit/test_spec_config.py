"""The DAG, resource parsing and typed config overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

import pytest

from hpc_jobs import config as cfgmod
from hpc_jobs.errors import ConfigError, UserError
from hpc_jobs.record import array_directive, task_chunks
from hpc_jobs.spec import Input, Pipeline, Resources, Stage, format_time, parse_mem_mb, parse_time
from launchers import demo


def S(name, **kw):
    return Stage(name, demo.train, **kw)


def test_toposort_follows_dependencies_and_declaration_order():
    p = Pipeline("t", [
        S("c", after=["b"]),
        S("a", outputs={"x": "x"}),
        S("b", inputs={"x": Input("a", "x")}),
        S("d"),
    ])
    assert p.order == ["a", "b", "c", "d"]
    assert p.descendants(["a"]) == ["b", "c"]
    assert p.children("b") == ["c"]


def test_cycle_is_reported_with_its_path():
    with pytest.raises(UserError, match="cycle: a -> b -> a"):
        Pipeline("t", [S("a", after=["b"]), S("b", after=["a"])])


def test_unknown_parent_and_output_are_reported():
    with pytest.raises(UserError, match="depends on 'nope'"):
        Pipeline("t", [S("a", after=["nope"])])
    with pytest.raises(UserError, match="declares only: x"):
        Pipeline("t", [S("a", outputs={"x": "x"}), S("b", inputs={"m": Input("a", "model")})])


def test_in_process_stage_cannot_follow_a_batch_stage_but_a_login_step_can():
    with pytest.raises(UserError, match="runs inside the launching process"):
        Pipeline("t", [S("a"), S("b", where="process", after=["a"])])
    pipeline = Pipeline("t", [S("a"), S("b", where="login", after=["a"]), S("c", after=["b"])])
    assert pipeline.order == ["a", "b", "c"] and pipeline.ancestors("c") == ["a", "b"]


def test_per_task_inputs_need_matching_arrays():
    with pytest.raises(UserError, match="must match"):
        Pipeline("t", [S("a", array=3, outputs={"o": "{task}"}), S("b", array=2, inputs={"o": Input("a", "o", per_task=True)})])


def test_stage_validation():
    with pytest.raises(UserError, match="stage name"):
        S("bad name").validate()
    with pytest.raises(UserError, match="where="):
        S("a", where="cloud").validate()
    with pytest.raises(UserError, match="module-level"):
        Stage("a", lambda ctx: None).validate()
    with pytest.raises(UserError, match="relative"):
        S("a", outputs={"o": "../../etc/passwd"}).validate()
    with pytest.raises(UserError, match="input kind"):
        Input("a", "b", kind="weights")


@pytest.mark.parametrize("text,seconds", [("02:00:00", 7200), ("1-00:00:00", 86400), ("90", 5400), ("01:30", 5400), ("7-12:00:00", 648000)])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


def test_bad_time_and_memory():
    with pytest.raises(UserError, match="not a Slurm time"):
        parse_time("two hours")
    with pytest.raises(UserError, match="not a size"):
        parse_mem_mb("lots")
    assert parse_mem_mb("32GB") == 32768 and parse_mem_mb("500M") == 500
    assert format_time(86400 + 3661) == "1-01:01:01"


def test_resources_defaults():
    r = Resources(gpus_per_node=4, nodes=2)
    assert r.ntasks_per_node == 4 and r.world_size == 8
    assert Resources().ntasks_per_node == 1
    with pytest.raises(UserError):
        Resources(gpus_per_node=-1).validate("x")


def test_array_chunks_respect_max_array_size():
    assert task_chunks(range(5), 1001) == [(0, [0, 1, 2, 3, 4])]
    parts = task_chunks(range(2500), 1001)
    assert [len(t) for _, t in parts] == [1000, 1000, 500]
    assert [o for o, _ in parts] == [0, 1000, 2000]
    # a resubmitted subset keeps its own indices (array=1,5), so aftercorr edges line up
    assert task_chunks([5, 1], 1001) == [(0, [1, 5])]
    assert array_directive([1, 5], 0, 2) == "1,5%2"
    assert task_chunks([3, 1500], 1001) == [(3, [3]), (1500, [1500])]


@dataclass
class Data:
    root: Optional[str] = None
    allow_missing: bool = False


@dataclass
class Cfg:
    epochs: int = 5
    lr: float = 1e-3
    topology: List[int] = field(default_factory=lambda: [512, 256])
    optimizer: Literal["Adam", "AdamW"] = "AdamW"
    data: Data = field(default_factory=Data)


def test_overrides_are_typed():
    cfg = cfgmod.apply(Cfg(), {"epochs": 7, "lr": 1, "topology": "64,32", "data.allow_missing": True, "optimizer": "Adam"})
    assert cfg.epochs == 7 and cfg.lr == 1.0 and cfg.topology == [64, 32] and cfg.data.allow_missing and cfg.optimizer == "Adam"
    assert Cfg().epochs == 5  # the defaults are not mutated


@pytest.mark.parametrize("key,value,match", [
    ("epochs", "ten", "not an int"),
    ("epochs", 2.5, "not an int"),
    ("lr", "fast", "not a number"),
    ("data.allow_missing", "maybe", "not a bool"),
    ("optimizer", "Lion", "one of 'Adam', 'AdamW'"),
    ("topology", "a,b", "not an int"),
    ("topology", "[1,2", "brackets do not balance"),
    ("topology", "{a: [", "brackets do not balance"),
    ("topology", ": :", "not an int"),
])
def test_ill_typed_values_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        cfgmod.apply(Cfg(), {key: value})


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        cfgmod.apply(Cfg(), {"epoch": 3})
    msg = str(err.value)
    assert "Did you mean epochs" in msg and "data.allow_missing" in msg


def test_parse_assignment():
    assert cfgmod.parse_assignment("epochs=20") == ("epochs", 20)
    assert cfgmod.parse_assignment("data.root=/scratch1/x") == ("data.root", "/scratch1/x")
    assert cfgmod.parse_assignment("flag=true") == ("flag", True)
    with pytest.raises(ConfigError):
        cfgmod.parse_assignment("epochs")


def test_malformed_set_values_are_one_line_and_exit_2(tmp_path):
    from tests.pipeline_helpers import cli

    for value in ("topology=[1,2", "topology={a: [", "topology=: :", "seed=[", "epochs='x"):
        proc = cli(tmp_path, "diving", "--cluster", "local", "--dry-run", "--set", value, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (value, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_config_round_trip():
    cfg = cfgmod.apply(Cfg(), {"epochs": 9, "data.root": "/d"})
    assert cfgmod.from_dict(Cfg, cfgmod.to_dict(cfg)) == cfg
