"""``report RUN``: the page of a real local run of ``folds`` (arrays, per-task handoff, a login step),
rendered by a real headless browser (Debian's chromium) and judged on its screenshot; the markdown
page written elsewhere keeps its links; ``-o`` into a missing folder; ``--json``; damaged files."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from hpc_jobs.engine.outputs import MetricsCSV
from hpc_jobs.ledger import Run
from hpc_jobs.report import collect, read_metrics_csv, write_report
from tests.pipeline_helpers import cli

STAGES = ["fetch", "fit", "refine", "gather", "publish", "summary"]
BARS = ["fetch", "fit[0]", "fit[1]", "refine[0]", "refine[1]", "gather", "publish", "summary"]
RUN_COLOUR = (0x2F, 0x6F, 0xB0)  # a completed stage's bar in the timeline
QUEUE_COLOUR = (0xF2, 0xCF, 0x8D)
HEADLINE_BG = (0xEE, 0xF5, 0xFF)


def _write_curves(task_dir: Path, steps: int, cut: bool = False) -> None:
    """What the training engine leaves: metrics.csv through its own writer (train loss each step,
    validation every 5 steps); ``cut``: the last line is half-written, as after a crash."""
    m = MetricsCSV(task_dir / "metrics.csv")
    for step in range(1, steps + 1):
        m.log(step, step / 10, "train", {"loss": 2.0 / step + 0.05, "lr": 0.3})
        if step % 5 == 0:
            m.log(step, step / 10, "val", {"loss": 1.5 / step + 0.1, "corr": 0.9 - abs(step - 25) / 100})
    if cut:
        with open(task_dir / "metrics.csv", "a") as fh:
            fh.write("41,4.1,val,0.13")


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPC_JOBS_LOCAL_PARALLEL", "1")  # fit[1] waits for fit[0]: the timeline shows a wait
        cli(home, "folds", "--cluster", "local", "--run-name", "k", "--set", "folds=2", "--set", "epochs=3",
            "--set", "refine_epochs=2", "--set", "points=60", timeout=400)
    run_dir = home / "runs" / "folds" / "k"
    _write_curves(run_dir / "stages" / "fit" / "tasks" / "0", 40)
    _write_curves(run_dir / "stages" / "fit" / "tasks" / "1", 40, cut=True)
    return home, run_dir


def _screenshot(page: Path, out: Path) -> Image.Image:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed: scripts/install.sh installs it (apt-get install chromium)"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                           f"--screenshot={out}", "--window-size=1280,2400", page.as_uri()],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return Image.open(out).convert("RGB")


def _bands(rows):
    """Contiguous runs of y values -> [(first, last)]."""
    out = []
    for y in rows:
        if out and y == out[-1][1] + 1:
            out[-1][1] = y
        else:
            out.append([y, y])
    return out


def test_html_page_is_self_contained_ordered_and_renders_in_a_browser(folds_run, tmp_path):
    home, run_dir = folds_run
    target = tmp_path / "share" / "k.html"  # "share" does not exist; its parent does
    path = Path(cli(home, "report", "k", "--format", "html", "-o", str(target)).stdout.strip())
    assert path == target and target.exists()
    page = target.read_text()

    # order: headline, identity, timeline, curves, stage table, config
    marks = [page.index(m) for m in ("id='headline'", "id='identity'", "id='timeline'", "id='curves'",
                                     "id='stages'", "id='config'")]
    assert marks == sorted(marks), marks
    headline = page[marks[0]:marks[1]]
    assert "abs_error = " in headline and "from stage summary" in headline
    record = json.loads((run_dir / "run.json").read_text())
    assert record["git"]["sha"] and record["git"]["sha"] in page[marks[1]:marks[2]]
    # self-contained: nothing fetched, every picture embedded and a real PNG
    assert not re.search(r"""(src|href)=['"]?(https?:|//|file:|[a-z./])""", page.replace("src='data:", "")), \
        "a link to something outside the page"
    assert "<script" not in page and "<link" not in page
    srcs = re.findall(r"<img src='([^']*)'", page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    charts = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in srcs]
    assert all(c.width >= 800 and c.height >= 200 for c in charts), [c.size for c in charts]
    curves = page[marks[3]:marks[4]]
    assert "fit[0]" in curves and "fit[1]" in curves and "best val corr = 0.9 at step 25" in curves
    # one row per stage, in order; a handoff is named, never "None"
    table = page[marks[4]:page.index("</table>", marks[4])]
    rows = re.findall(r"<tr class='stage'><td><b>([^<]+)</b>", table)
    assert rows == STAGES
    assert "None" not in table and "init fit[task]" in table
    # the timeline: a bar per stage and per array task, in run order
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count("class=\"run\"") == len(BARS)
    labels = re.findall(r'text-anchor="end" fill="#222">([^<]+)</text>', svg)
    assert labels == BARS

    shot = _screenshot(target, tmp_path / "shot.png")
    assert shot.size == (1280, 2400)
    px = shot.load()
    white = (255, 255, 255)
    inked = [y for y in range(shot.height) if any(px[x, y] != white for x in range(0, shot.width, 4))]
    assert inked and inked[-1] > 1500, "the page ends too early: sections missing"
    assert len(shot.getcolors(1 << 20) or []) > 200, "blank or flat page"
    head_rows = [y for y in range(0, 400) if px[640, y] == HEADLINE_BG]
    assert head_rows and head_rows[0] < 150, "the headline card is not at the top"
    bar_rows = [y for y in range(shot.height)
                if sum(px[x, y] == RUN_COLOUR for x in range(0, shot.width)) >= 2]
    bands = _bands(bar_rows)
    assert len(bands) >= len(BARS), bands  # each bar its own band (plus the legend's swatch)
    assert bands[0][0] > head_rows[-1], "the timeline is drawn above the headline"
    queue_rows = [y for y in range(bands[0][0], bands[len(BARS) - 1][1] + 1)
                  if sum(px[x, y] == QUEUE_COLOUR for x in range(0, shot.width)) >= 20]
    assert queue_rows, "no task waited: fit[1] runs after fit[0] (one task at a time), its wait is a bar"
    assert inked[-1] - bands[-1][1] > 600, "nothing drawn below the timeline (curves, table, config)"


def test_markdown_page_written_elsewhere_keeps_its_pictures(folds_run, tmp_path):
    home, run_dir = folds_run
    target = tmp_path / "notes" / "k.md"
    cli(home, "report", "k", "-o", str(target))
    text = target.read_text()
    assert text.index("**abs_error = ") < text.index("## Timeline") < text.index("## Curves") < text.index("## Stages")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 3  # the timeline and two charts
    for link in links:
        assert not Path(link).is_absolute() and (target.parent / link).is_file(), link
    table = text[text.index("## Stages"):text.index("## Final metrics")]
    assert [r.split("|")[1].strip() for r in table.splitlines() if r.startswith("| ") and "stage |" not in r] == STAGES
    assert "None" not in table and "| init fit[task] |" in table
    assert "**fit[1]**" in text  # each task's result


def test_output_into_a_missing_folder_whose_parent_is_missing_is_refused(folds_run, tmp_path):
    home, _ = folds_run
    proc = cli(home, "report", "k", "-o", str(tmp_path / "a" / "b" / "k.html"), "--format", "html", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and str(tmp_path / "a" / "b") in proc.stderr
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    proc = cli(home, "report", "k", "-o", str(tmp_path / "file" / "k.md"), check=False)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    into = Path(cli(home, "report", "k", "-o", str(tmp_path)).stdout.strip())  # a folder: report.md inside
    assert into == tmp_path / "report.md" and (tmp_path / "report_files" / "fit-0.png").is_file()


def test_json_has_headline_timeline_and_curves(folds_run):
    home, _ = folds_run
    data = json.loads(cli(home, "report", "k", "--json").stdout)
    assert data["headline"]["stage"] == "summary" and data["headline"]["metric"] == "abs_error"
    assert [b["label"] for b in data["timeline"]] == BARS
    assert all(b["run_s"] is not None and b["queue_s"] is not None and b["queue_s"] >= 0 for b in data["timeline"])
    fit1 = next(b for b in data["timeline"] if b["label"] == "fit[1]")
    assert fit1["queue_s"] >= fit1["run_s"] - 2  # it waited for fit[0] to run
    assert [c["label"] for c in data["curves"]] == ["fit[0]", "fit[1]"]
    assert data["curves"][1]["rows"] == 48 and "series" not in data["curves"][0]  # the cut line is dropped
    assert data["curves"][0]["best"] == {"split": "val", "metric": "corr", "mode": "max", "step": 25, "value": 0.9}
    assert data["config"].startswith("folds: 2")


def test_damaged_files_still_give_a_page(folds_run, tmp_path):
    _, run_dir = folds_run
    copy = tmp_path / "k"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt", "code"))
    stages = copy / "stages"
    (stages / "gather" / "metrics.json").write_text('{"abs_err')  # cut
    (stages / "summary" / "state.json").write_text('{"stage": "sum')  # cut marker
    (stages / "fit" / "tasks" / "0" / "metrics.csv").write_bytes(b"\x00\xff garbage\n")
    (stages / "fit" / "tasks" / "1" / "metrics.csv").write_text("step,epoch,split,loss\n")  # header only
    (stages / "refine" / "tasks" / "0" / "metrics.csv").write_text("step,epoch,split,loss\n1,0.1,train,0.5\n2,0.2,tr")
    (stages / "refine" / "tasks" / "1" / "broken.png").mkdir()  # a "picture" that cannot be read
    (copy / "config.yaml").unlink()
    run = Run(copy)
    html_page = write_report(run, "html").read_text()
    md_page = write_report(run, "md").read_text()
    data = collect(run)
    assert [c["label"] for c in data["curves"]] == ["refine[0]"] and data["curves"][0]["rows"] == 1
    assert "broken.png: unreadable" in html_page
    for page in (html_page, md_page):
        for stage in STAGES:
            assert stage in page
    assert data["headline"] and data["headline"]["stage"] != "summary"  # its marker is unreadable
    assert read_metrics_csv(copy / "missing.csv") is None
