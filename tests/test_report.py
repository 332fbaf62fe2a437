"""`swengine report` (swengine/report): from a real tiny run (rolled back and resumed), one
self-contained HTML file that parses, embeds one PNG per plot and no network reference, shows the
breaker events, the context phases, the config; --png, --watch, and one-line errors."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from swengine import report
from swengine.errors import UserError
from swengine.report.run import load
from swengine.safety import Breaker
from swengine.telemetry import MetricsLogger
from swengine.train import rollback as rb
from swengine.train.lock import LOCK_NAME
from swengine.train.trainer import Trainer
from tests.test_rollback import _quiet_cpu, config, phased  # noqa: F401  (fixtures: _quiet_cpu is autouse)

ROOT = Path(__file__).parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP_PLOTS = ["loss", "lr", "grad_norm", "throughput", "memory"]


@pytest.fixture(scope="module")
def run(tiny_llama, tiny_train_data, tmp_path_factory):
    """A real 6-step run, rolled back to step 4 after a (logged) loss spike at step 5, resumed to
    the end; plus two context phases' phase_end events as the trainer writes them."""
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = config(tiny_llama, tiny_train_data, out, steps=6)
    Trainer(cfg, log=lambda m: None).run()
    trip = Breaker().observe(5, float("nan"))[0]  # as the trainer would log it at step 5
    metrics = MetricsLogger(out / "metrics.jsonl", run_id="spike")
    metrics.log("breaker", **trip.event())
    metrics.close()
    rb.rollback(out, "step-4", log=lambda m: None)
    Trainer(cfg, resume="auto", log=lambda m: None).run()
    with open(out / "metrics.jsonl", "a") as f:
        for i, (length, ppl, regression, flagged) in enumerate([(128, {"64": 30.5, "128": 28.0}, None, False),
                                                                 (256, {"64": 33.9, "128": 27.1, "256": 25.0},
                                                                  0.111, True)]):
            f.write(json.dumps({"schema_version": 1, "event": "phase_end", "time": 0, "rank": 0,
                                "phase": f"phase-{i + 1}", "run_id": "x", "step": 6, "seq_len": length, "ppl": ppl,
                                "regression": regression, "flagged": flagged}) + "\n")
    return out


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_report_is_one_self_contained_html_file_with_every_plot(run, tmp_path):
    out = tmp_path / "r.html"
    written = report.render(run, out, png=True)
    page = parse(out)
    text = " ".join(page.text)
    imgs = [a for t, a in page.tags if t == "img"]
    figures = [a["id"] for t, a in page.tags if t == "figure"]
    assert figures == [f"plot-{n}" for n in STEP_PLOTS + ["context"]] and len(imgs) == len(figures)
    for img, path in zip(imgs, written.pngs, strict=True):
        assert img["src"].startswith("data:image/png;base64,")
        raw = base64.b64decode(img["src"].split(",", 1)[1])
        assert raw.startswith(PNG_MAGIC) and raw == path.read_bytes()  # --png: the same images as files
    assert [p.name for p in written.pngs] == [f"r-{n}.png" for n in STEP_PLOTS + ["context"]]
    assert not any(t == "script" for t, _ in page.tags)
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href") and v]
    assert all(v.startswith("data:") for v in refs)  # nothing to fetch: it opens offline
    # the breaker event, the phases, the config, the summary
    assert "nonfinite" in text and "loss is nan at step 5" in text and "rollback" in text
    assert "phase-2" in text and "+11.1%" in text and "ppl @ 256" in text
    assert "lora:" in text and "max_steps: 6" in text
    assert "completed" in text and "6 of 6" in text and "2 (1)" in text  # two invocations, one resume
    assert "no: the step was redone after a resume or rollback (this name holds the new one)" in text  # step-6


def test_a_real_phased_run_gets_its_context_plot_and_phase_table(phased, tmp_path):  # noqa: F811 (a fixture)
    page = parse(report.render(phased, tmp_path / "r.html").html)
    text = " ".join(page.text)
    assert [a["id"] for t, a in page.tags if t == "figure"] == [f"plot-{n}" for n in STEP_PLOTS + ["context"]]
    assert "ppl @ 32" in text and "ppl @ 64" in text and "phase-1" in text and "phase-2" in text


def test_steps_redone_after_the_rollback_are_marked(run):
    data = load(run)
    redone = sorted(e["step"] for e in data.train if e["superseded"])
    assert redone == [5, 6]  # the first trajectory's steps after step-4
    assert sorted(e["step"] for e in data.current(data.train)) == [1, 2, 3, 4, 5, 6]
    assert data.finished and data.status == "completed"


def test_a_report_on_something_else_is_a_one_line_error(tmp_path):
    cases = [(tmp_path / "missing", "is not a directory"),
             (tmp_path, "is not a swengine run directory (no metrics.jsonl); pass the output_dir")]
    for where, message in cases:
        with pytest.raises(UserError) as info:
            report.render(where)
        assert message in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="has no events yet"):
        report.render(tmp_path)


def test_missing_matplotlib_names_the_extra(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r"^swengine report needs matplotlib, an optional extra: "
                                        r"pip install 'swengine\[report\]'$"):
        report.render(run, tmp_path / "r.html")


def test_bad_out_is_one_line(run, tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        report.render(run, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        report.render(run, tmp_path / "nope" / "r.html")


def test_watch_rerenders_until_run_end(run, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    last_start = max(i for i, x in enumerate(lines) if '"run_start"' in x)
    (live / "metrics.jsonl").write_text("".join(lines[:last_start + 3]))  # a run under way
    (live / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    seen, notes = [], []

    def sleep(_seconds):
        html = (live / "report.html").read_text()
        seen.append("http-equiv='refresh' content='2'" in html)
        if len(seen) == 2:  # the run ends while we watch
            with open(live / "metrics.jsonl", "a") as f:
                f.writelines(lines[last_start + 3:])

    written = report.watch(live, None, False, 2.0, log=notes.append, sleep=sleep)
    assert seen == [True, True] and written.finished
    assert "http-equiv" not in (live / "report.html").read_text()  # final: no more reloading
    assert notes[0].startswith(f"watching {live}") and notes[-1] == "the run has ended; the report is final"
    (live / "metrics.jsonl").write_text("".join(lines[:last_start + 3]))
    (live / LOCK_NAME).write_text("")  # nobody holds it and no run_end: killed
    notes.clear()
    written = report.watch(live, None, False, 2.0, log=notes.append, sleep=lambda s: pytest.fail("slept"))
    assert not written.finished and "no live run holds the directory" in notes[-1]
    with pytest.raises(UserError, match="--interval 0.0: must be > 0"):
        report.watch(live, interval=0.0)


def test_cli_writes_the_report_and_the_pngs(run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from swengine.report.cli import report_command

    app = typer.Typer()
    app.command()(report_command)
    result = CliRunner().invoke(app, [str(run), "--out", str(tmp_path / "r.html"), "--png"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"report: {tmp_path / 'r.html'}"] + [
        f"plot: {tmp_path / f'r-{n}.png'}" for n in STEP_PLOTS + ["context"]]
    default = CliRunner().invoke(app, [str(run)])
    assert default.exit_code == 0 and (run / "report.html").is_file()
    bad = CliRunner().invoke(app, [str(tmp_path)])
    assert isinstance(bad.exception, UserError)


def test_the_cli_module_imports_neither_torch_nor_matplotlib():
    code = ("import sys, swengine.report.cli; "
            "sys.exit(bool({'torch', 'matplotlib'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_report_renders_in_headless_chromium(run, tmp_path):
    out = report.render(run, tmp_path / "r.html").html
    shot = tmp_path / "shot.png"
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels[..., :3].std() > 0.05  # drawn: not a blank page
