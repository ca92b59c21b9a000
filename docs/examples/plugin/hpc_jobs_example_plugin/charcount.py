"""charcount: count characters of a text in an array of tasks, then merge (an entry-point workflow).

pyproject.toml declares ``charcount = "hpc_jobs_example_plugin.charcount:Charcount"`` under the
entry-point group ``hpc_jobs.workflows``; hpc-jobs imports this module only when ``charcount`` is
launched (or listed), so keep heavy imports inside the stage functions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow


@dataclass
class CharcountConfig:
    text: str = "hello hpc-jobs from a package of our own"
    shards: int = 2


def count(ctx):
    text = ctx.config.text
    mine = text[ctx.task_index::ctx.num_tasks]
    ctx.output("counts").write_text(json.dumps(Counter(mine)))
    return {"task": ctx.task_index, "chars": len(mine)}


def merge(ctx):
    total = Counter()
    for path in ctx.inputs["counts"]:
        total.update(json.loads(path.read_text()))
    return {"chars": sum(total.values()), "top": "".join(c for c, _ in total.most_common(3))}


class Charcount(Workflow):  # no @register needed: the entry point names the class
    name = "charcount"
    summary = "count characters in an array of tasks, merge (an example entry-point workflow)"
    Config = CharcountConfig

    def build(self) -> Pipeline:
        small = Resources(cpus_per_task=1, mem="200M", time="00:05:00")
        return Pipeline(self.name, [
            Stage("count", count, resources=small, array=self.config.shards, outputs={"counts": "counts.json"}),
            Stage("merge", merge, resources=small, inputs={"counts": Input("count", "counts")}),
        ])
