"""`videoindex report`: a real small index rendered to HTML and opened in real headless Chromium.

The browser tests need the Debian packages chromium and chromium-driver (``.ci/run`` installs them) and
selenium (the `test` extra). Where they are missing the tests are skipped with the reason, except in CI
(``CI`` set), where a missing browser fails them: CI must never pass by skipping.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import s3server
from tests.helpers import small_job_config
from tests.synthetic_index import write_synthetic_index
from videoindex.cli import main as cli_main
from videoindex.query import open_index
from videoindex.report import register_report_cli, render_report, run_report_cli

s3_server, s3 = s3server.s3_server, s3server.s3  # the moto fixtures

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
)  # fmt: skip
SUMMARY_FIELDS = ("videos", "videos_ok", "videos_error", "clips", "hours", "labels_seen",
                  "shards_committed", "shards_total")  # fmt: skip


def _chromium_missing() -> str | None:
    """None when chromium and chromedriver are on PATH, else what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    return (
        f"{' and '.join(missing)} not on PATH (Debian: apt-get install chromium chromium-driver)"
        if missing
        else None
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, _ray_owner):
    """Headless Chromium driven by selenium, with a fresh profile and console logs collected.

    Chromium lives only while this module runs, and never beside the tests' Ray: once in about ten runs
    (kernel 6.18, 2 cores) Chromium's zygotes hung in the kernel reaping their children (wait4 ->
    release_task -> shrink_dcache_parent, SIGKILL ignored, a core each for good) while a raylet read /proc
    every 100 ms. So the shared Ray is stopped first (the next Ray test starts it again, about 3 s), and
    the quit is waited for a bounded time: a hung Chromium fails the teardown instead of the whole run.
    """
    from selenium import webdriver

    _ray_owner.stop()
    reason = _chromium_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI runs the browser tests: {reason}")
    if reason:
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    _quit_within(driver, QUIT_TIMEOUT_S)


QUIT_TIMEOUT_S = 60.0


def _quit_within(driver: Any, seconds: float) -> None:
    """driver.quit(), failing after ``seconds`` if Chromium has not ended (the quit goes on in a daemon
    thread; the run is not held by it)."""
    quitter = threading.Thread(target=driver.quit, name="chromium-quit", daemon=True)
    quitter.start()
    quitter.join(seconds)
    if quitter.is_alive():
        pytest.fail(
            f"Chromium did not quit within {seconds:g} s (stuck processes: see the fixture's docstring)"
        )


def _run_index(tmp_path: Path, videos: Path, model_dir: Path, *, thumbnails: bool) -> Path:
    from videoindex.job.run import run_job

    (videos / "empty.mp4").write_bytes(b"")  # one failed video for the error section
    output = tmp_path / "index"
    config = small_job_config(videos, output, model_dir, **{"output.thumbnails": thumbnails})
    run_job(config)
    return output


def _cli_summary(output: Path, tmp_path: Path) -> dict[str, Any]:
    """The row `videoindex query OUTPUT summary` prints."""
    path = tmp_path / "summary.json"
    assert cli_main(["query", str(output), "summary", "--format", "json", "--output", str(path)]) == 0
    return json.loads(path.read_text())[0]


def _report_cli(argv: list[str]) -> int:
    """`videoindex report ...` through the subcommand's own parser and handler."""
    parser = argparse.ArgumentParser(prog="videoindex")
    register_report_cli(parser.add_subparsers(dest="command", required=True))
    return run_report_cli(parser.parse_args(argv))


def _open(driver: Any, page: Path, screenshot: Path) -> list[dict[str, Any]]:
    """Load the page, take a full-page screenshot, return the console's error entries."""
    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(page.as_uri())
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 100, 12000))
    driver.save_screenshot(str(screenshot))
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _check_page(driver: Any, output: Path, summary: dict[str, Any]) -> dict[str, Any]:
    from selenium.webdriver.common.by import By as by

    shown = {}
    for cell in driver.find_elements(by.CSS_SELECTOR, "#summary [data-field]"):
        shown[cell.get_attribute("data-field")] = (cell.get_attribute("data-value"), cell.text)
    for field in SUMMARY_FIELDS:
        value, text = shown[field]
        assert float(value) == pytest.approx(summary[field], rel=1e-9), field
        assert float(text.replace(",", "")) == pytest.approx(summary[field], abs=0.006), field
    assert shown["model"][1] == summary["model"]
    assert shown["random_weights"][0] == str(summary["random_weights"]).lower()

    index = open_index(str(output))
    ok = index.sql("SELECT video_id, num_clips FROM videos WHERE status = 'ok'").to_pylist()
    timelines = driver.find_elements(by.CSS_SELECTOR, "section.timeline")
    assert {t.get_attribute("data-video-id") for t in timelines} == {v["video_id"] for v in ok}
    for timeline in timelines:
        clips = int(timeline.get_attribute("data-clips"))
        assert clips > 0
        thumbs = timeline.find_elements(by.CSS_SELECTOR, "figure.clip img.thumb")
        assert len(thumbs) == clips  # one real image per shown clip, no placeholder
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('img.thumb')].map(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded and all(loaded)  # every thumbnail is a JPEG the browser decoded
    assert len(driver.find_elements(by.CSS_SELECTOR, "figure.chart svg")) >= 4
    neighbours = driver.find_elements(by.CSS_SELECTOR, "section.neighbours")
    assert neighbours
    first = neighbours[0]
    expected = index.similar(
        first.get_attribute("data-video-id"), 5, int(first.get_attribute("data-clip-index"))
    )
    cards = first.find_elements(by.CSS_SELECTOR, "figure.clip")[1:]
    assert [
        (c.get_attribute("data-video-id"), int(c.get_attribute("data-clip-index"))) for c in cards
    ] == list(zip(expected["video_id"].to_pylist(), expected["clip_index"].to_pylist(), strict=True))
    error_rows = driver.find_elements(by.CSS_SELECTOR, "#errors tr.error-type")
    assert [(r.get_attribute("data-error-type"), int(r.get_attribute("data-count"))) for r in error_rows] == [
        ("empty_file", 1)
    ]
    return driver.execute_script(
        "const n = document.getElementById('thumbs-note').dataset; return {stored: +n.stored, decoded: +n.decoded}"
    )


def _self_contained(html: str) -> None:
    """No external resource: every src/href is a data: URI or an in-page anchor."""
    external = re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)([^"']*)""", html)
    assert external == []
    assert "<script" not in html


@pytest.mark.browser
def test_report_in_browser_with_stored_thumbnails(tiny_model_dir, sample_videos, tmp_path, browser):
    output = _run_index(tmp_path, sample_videos, tiny_model_dir, thumbnails=True)
    page = render_report(str(output), tmp_path / "report.html")
    _self_contained(page.read_text())
    errors = _open(browser, page, tmp_path / "report.png")
    assert errors == []
    thumbs = _check_page(browser, output, _cli_summary(output, tmp_path))
    assert thumbs["stored"] > 0 and thumbs["decoded"] == 0
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.browser
def test_report_in_browser_decodes_sample_thumbnails(tiny_model_dir, sample_videos, tmp_path, browser):
    output = _run_index(tmp_path, sample_videos, tiny_model_dir, thumbnails=False)
    page = tmp_path / "sub" / "report.html"
    assert _report_cli(["report", str(output), "--out", str(page), "--sample-videos", "4"]) == 0
    errors = _open(browser, page, tmp_path / "report.png")
    assert errors == []
    thumbs = _check_page(browser, output, _cli_summary(output, tmp_path))
    assert thumbs["stored"] == 0 and thumbs["decoded"] > 0


def test_report_without_thumbnails_or_sources_shows_placeholders(tmp_path):
    """Synthetic index: no stored thumbnails, sources that do not exist, no timings in the markers."""
    info = write_synthetic_index(
        str(tmp_path / "idx"), videos=12, clips_per_video=30, shards=3, error_videos=2
    )
    job_path = tmp_path / "idx" / "_job.json"
    job = json.loads(job_path.read_text())
    job["config"]["input"]["uri"] = "file:///data/<script>alert(1)</script>"
    job["config"]["input"]["storage_options"] = {"secret": "hunter2"}
    job_path.write_text(json.dumps(job))
    page = render_report(str(tmp_path / "idx"), tmp_path / "r.html", sample_videos=3, neighbours=2)
    html = page.read_text()
    _self_contained(html)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "hunter2" not in html
    assert html.count('class="timeline"') == 3
    assert len(re.findall(r'class="thumb placeholder"', html)) > 0 and 'class="thumb"' not in html
    assert 'id="thumbs-missing"' in html and 'id="no-timing"' in html
    assert html.count('class="neighbours"') == 2
    for field in ("videos", "videos_ok", "videos_error", "clips"):
        assert f'data-field="{field}" data-value="{info[field]}"' in html
    assert (
        sum(
            int(n) for n in re.findall(r'class="error-type" data-error-type="[^"]*" data-count="(\d+)"', html)
        )
        == 2
    )


def test_report_of_an_index_in_object_storage(s3, tmp_path):
    """The same report from s3:// (moto), with the storage options given on the command line."""
    s3.fs().mkdir("reports")
    info = write_synthetic_index("reports/idx", videos=6, clips_per_video=8, shards=2, fs=s3.fs())
    options = [f"--storage-option={k}={json.dumps(v)}" for k, v in s3.options().items()]
    page = tmp_path / "s3.html"
    assert _report_cli(["report", "s3://reports/idx", "--out", str(page), *options]) == 0
    html = page.read_text()
    assert f'data-field="clips" data-value="{info["clips"]}"' in html
    assert html.count('class="timeline"') == 6 and s3.options()["secret"] not in html


def test_report_cli_refuses_a_non_index(tmp_path, capsys):
    assert _report_cli(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videoindex report: ") and "_job.json" in err and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_report_on_a_million_clips(tmp_path):
    """1,000,000 clips (10,000 videos x 100 clips, 100 shards): seconds, and no video is decoded."""
    write_synthetic_index(
        str(tmp_path / "big"), videos=10_000, clips_per_video=100, shards=100, error_videos=50
    )
    started = time.perf_counter()
    page = render_report(str(tmp_path / "big"), tmp_path / "big.html")
    elapsed = time.perf_counter() - started
    print(f"report of 1,000,000 clips: {elapsed:.1f} s, {page.stat().st_size / 1e3:.0f} kB")
    html = page.read_text()
    assert 'data-field="clips" data-value="995000"' in html
    assert 'id="thumbs-missing"' in html and 'data-decoded="0"' in html
    assert elapsed < 60
