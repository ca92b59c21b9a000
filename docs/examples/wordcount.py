"""wordcount: the worked example of docs/writing-a-workflow.md (a workflow in one file)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from hpc_jobs import Input, Pipeline, Resources, Stage, Workflow, register


@dataclass
class WordcountConfig:
    text: str = "the quick brown fox jumps over the lazy dog the end"
    shards: int = 3          # the count stage is an array of this many tasks
    top: int = 3


def split(ctx):
    words = ctx.config.text.split()
    out = ctx.output("words")
    out.write_text(json.dumps(words))
    return {"words": len(words)}


def count(ctx):                      # one task of an array: ctx.task_index, ctx.num_tasks
    words = json.loads(ctx.inputs["words"].read_text())
    mine = words[ctx.task_index::ctx.num_tasks]
    out = ctx.output("counts")       # in this task's own directory: stages/count/tasks/<i>/counts.json
    out.write_text(json.dumps(Counter(mine)))
    return {"task": ctx.task_index, "words": len(mine)}


def merge(ctx):                      # an input from a whole array is a list of paths
    total = Counter()
    for path in ctx.inputs["counts"]:
        total.update(json.loads(path.read_text()))
    return {"top": total.most_common(ctx.config.top)}


@register
class Wordcount(Workflow):
    name = "wordcount"
    summary = "split a text, count words in an array of tasks, merge the counts"
    Config = WordcountConfig

    def build(self) -> Pipeline:
        small = Resources(cpus_per_task=1, mem="200M", time="00:05:00")
        return Pipeline(self.name, [
            Stage("split", split, where="login", outputs={"words": "words.json"}),
            Stage("count", count, resources=small, array=self.config.shards,
                  inputs={"words": Input("split", "words")}, outputs={"counts": "counts.json"}),
            Stage("merge", merge, resources=small, inputs={"counts": Input("count", "counts")}),
        ])
