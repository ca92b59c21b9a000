"""Shell completion: sub-commands, workflow names, run ids, stage names, options and config keys.

``hpc-jobs completion bash`` prints a script for bash (zsh: after ``autoload bashcompinit &&
bashcompinit``); the shell then calls ``hpc-jobs __complete WORD...`` with the words typed so far
(the last one partial) and offers the lines it prints. Candidates come from the same places the
commands read (the workflow registry, the run index, a run's record, the profiles, a workflow's
config dataclass and its launch parser), so they never drift from what the commands accept; no
torch is imported, and a damaged or missing record only means fewer candidates.
"""

from __future__ import annotations

import sys
from typing import Iterable, List, Optional

RUN_COMMANDS = ("status", "logs", "cancel", "resume", "report")  # their first argument is a run
STAGE_COMMANDS = ("status", "logs", "cancel")  # and their second a stage of that run
KEY_OPTIONS = ("--set", "--sweep")  # take KEY=VALUE with a config key

BASH = """\
# hpc-jobs completion for bash (zsh: autoload bashcompinit && bashcompinit, then source this)
_hpc_jobs_complete() {
    local IFS=$'\\n'
    COMPREPLY=($(compgen -W "$(hpc-jobs __complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null)" \\
                 -- "${COMP_WORDS[COMP_CWORD]}"))
    # a KEY= candidate is not a whole word: no space after it
    [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *= ]] && compopt -o nospace 2>/dev/null
    return 0
}
complete -F _hpc_jobs_complete hpc-jobs
"""


def _match(items: Iterable[str], prefix: str) -> List[str]:
    return sorted({i for i in items if i.startswith(prefix)})


def _workflows():
    from . import workflow as wfmod

    return wfmod.discover()


def _run_ids() -> List[str]:
    from .ledger import recent_runs

    return [run.dir.name for run in recent_runs(limit=200)] + ["last"]


def _stages(ref: str) -> List[str]:
    from .errors import UserError
    from .ledger import find_run

    try:
        return list(find_run(ref).order)
    except (UserError, OSError, ValueError, KeyError):
        return []  # no such run (yet), or its record cannot be read: nothing to offer


def _launch_options(workflow: str) -> List[str]:
    from .cli import launch_parser

    parser = launch_parser(workflow)
    return [s for action in parser._actions for s in action.option_strings]


def _profiles() -> List[str]:
    from . import profiles

    return ["auto", *profiles.available()]


def candidates(words: List[str]) -> List[str]:
    """What may come next: ``words`` are the words after the program, the last one the partial
    word being completed (empty when the cursor follows a space)."""
    from .cli import COMMANDS

    *done, current = words or [""]
    if not done:
        if current.startswith("-"):
            return _match(("--help", "--version"), current)
        return _match([*COMMANDS, *_workflows()], current)
    command, args = done[0], done[1:]
    previous = done[-1]
    if command in ("list", "profiles", "new"):
        return []
    if command == "completion":
        return _match(("bash",), current) if not args else []
    positional = [a for a in args if not a.startswith("-")]
    if command in RUN_COMMANDS and not current.startswith("-"):
        if not positional:
            return _match(_run_ids(), current)
        if command in STAGE_COMMANDS:
            return _match(_stages(positional[0]), current)
        return []
    if command == "debug" and not positional and not current.startswith("-"):
        return _match(_workflows(), current)
    workflows = _workflows()
    name = positional[0] if command == "debug" and positional else command
    cls = workflows.get(name)
    if cls is None:
        return []
    if previous in KEY_OPTIONS and "=" not in current:
        return _match((key + "=" for key in cls.config_keys()), current)
    if previous == "--cluster":
        return _match(_profiles(), current)
    if previous == "--preset":
        return _match(cls.presets, current)
    if previous == "--resources-from":
        return _match(_run_ids(), current)
    if current.startswith("-") and command != "debug":
        return _match(_launch_options(name), current)
    return []


def main(argv: Optional[List[str]] = None) -> int:
    """``hpc-jobs __complete WORD...``: the candidates, one per line."""
    for line in candidates(list(sys.argv[1:] if argv is None else argv)):
        print(line)
    return 0
