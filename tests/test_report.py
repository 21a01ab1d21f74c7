"""The HTML report: escaping of generated text, and a real headless Chromium rendering it."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from exnihilo.errors import ExnihiloError
from exnihilo.records import make_record
from exnihilo.report.html import SEARCH_JS, write_report

CHROMIUM = "/usr/bin/chromium"
SCRIPT_ATTACK = "<script>document.title='pwned';document.body.setAttribute('data-pwned','1')" \
                "</script>"
IMG_ATTACK = "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"


def rec(instruction, response, **tags):
    return make_record([{"role": "user", "content": instruction},
                        {"role": "assistant", "content": response}], {"tags": tags})


def datasets(tmp_path: Path) -> tuple[Path, Path]:
    air = [rec(SCRIPT_ATTACK, "fine", quality="good", difficulty="easy", category="coding",
               min_neighbor_distance=0.2, score=70),
           rec("Explain rainbows.", IMG_ATTACK, quality="poor", difficulty="medium",
               category="information seeking", min_neighbor_distance=0.4),
           rec("Plan a picnic", "Bring food.", quality=None, difficulty="hard",
               category="<b>bold</b>"),  # an unreadable tag and an odd stored value
           rec("Untagged instruction", "ok")]
    pro = [rec(f"Pro instruction number {i}", "answer " * (i + 1), quality="excellent",
               difficulty="very hard", category="math", min_neighbor_distance=0.1 + i / 100)
           for i in range(6)]
    a, b = tmp_path / "air.jsonl", tmp_path / "pro.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in air))
    b.write_text("".join(json.dumps(r) + "\n" for r in pro))
    return a, b


def test_generated_text_is_escaped_and_csp_allows_only_our_script(tmp_path):
    a, b = datasets(tmp_path)
    out = tmp_path / "report.html"
    stats = write_report([a, b], out)
    page = out.read_text()
    assert [s.records for s in stats] == [4, 6]
    assert "<script>document.title" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;" in page
    assert "&lt;img src=x onerror=&quot;" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("<script>") == 1  # ours, and only ours
    digest = base64.b64encode(hashlib.sha256(SEARCH_JS.encode()).digest()).decode()
    assert f"script-src &#x27;sha256-{digest}&#x27;" in page
    assert "default-src &#x27;none&#x27;" in page
    assert not re.search(r"(src|href)=\"?https?:", page)  # nothing loaded from the network
    # 3 tag bar charts + 4 histograms; the quality chart has every level plus the unreadable
    # and untagged rows
    assert page.count('<svg class="chart"') == 7
    quality_chart = page.split("<title>input quality</title>")[1].split("</svg>")[0]
    labels = re.findall(r'text-anchor="end" dominant-baseline="middle">([^<]+)<', quality_chart)
    assert labels == ["very poor", "poor", "average", "good", "excellent", "unreadable",
                      "untagged"]


def test_report_rejects_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ExnihiloError, match="no records"):
        write_report([empty], tmp_path / "r.html")


def chromium(*args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="exnihilo-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_report_in_headless_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not installed: run scripts/test-deps/chromium.sh (make test does)")
    a, b = datasets(tmp_path)
    out = tmp_path / "report.html"
    write_report([a, b], out)

    # #q= runs the page's own search: it must filter the sample table in the real browser.
    dom = chromium("--dump-dom", out.as_uri() + "#q=pro%20instruction").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body        # our script ran under the CSP ...
    assert "data-pwned" not in body        # ... the injected script and onerror did not
    assert re.search(r"<title>exnihilo report: air vs pro</title>", dom)
    assert "<img" not in dom
    assert dom.count("<svg") == 7 and dom.count('class="bar"') > 40
    assert "6 of 10 shown" in dom
    shown = re.findall(r'<tr class="sample"( style="display: none;")?>', dom)
    assert len(shown) == 10 and sum(1 for s in shown if not s) == 6
    # the attack strings are on the page as text
    assert "&lt;script&gt;document.title='pwned'" in dom

    screenshot = tmp_path / "shot.png"
    chromium("--window-size=1280,1600", f"--screenshot={screenshot}", out.as_uri())
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from exnihilo.cli import app

    a, b = datasets(tmp_path)
    out = tmp_path / "cmp.html"
    result = CliRunner().invoke(app, ["report", str(a), str(b), "-o", str(out),
                                      "--samples", "3"])
    assert result.exit_code == 0, result.output
    assert "air (4)" in result.output and "pro (6)" in result.output
    assert out.read_text().count('<tr class="sample"') == 6


def test_histogram_bins_share_edges_and_fold_the_tail():
    from exnihilo.report.html import _bin_edges, _histogram

    edges = _bin_edges(list(range(34)), bins=20, integer=True)
    assert edges[:3] == [0.0, 2.0, 4.0] and len(edges) == 21  # whole-number steps
    # 33 lands in its own bin; 100 is past the last edge and folds into the last bin
    assert _histogram([0, 1, 2, 33, 100], edges) == [2, 1] + [0] * 14 + [1, 0, 0, 1]
    edges = _bin_edges([0.1, 0.5], bins=20, integer=False)
    assert edges[0] == 0.0 and abs(edges[-1] - 0.5) < 1e-12


@pytest.mark.browser
def test_run_report_curves_in_headless_chromium(tmp_path, smol_tokenizer, one_thread):
    """A real tiny SFT run's report: Chromium renders the training loss, validation loss and
    learning rate curves as paths with a point per logged step."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not installed: run scripts/test-deps/chromium.sh (make test does)")
    from exnihilo.report.run import write_run_report
    from test_run_report import train_tiny_run

    run = train_tiny_run(tmp_path / "tiny-sft", smol_tokenizer)
    out = tmp_path / "curves.html"
    write_run_report([run], out)

    dom = chromium("--dump-dom", out.as_uri()).stdout
    assert re.search(r"<title>exnihilo training report: tiny-sft</title>", dom)
    charts = {title: svg for title, svg in re.findall(
        r'<svg class="chart line-chart"[^>]*><title>([^<]+)</title>(.*?)</svg>', dom, re.S)}
    points = {}
    for title in ("training loss", "validation loss", "learning rate"):
        [d] = re.findall(r'<path class="line" data-series="tiny-sft" d="([^"]+)"', charts[title])
        points[title] = len(re.findall(r"[ML] [\d.]+ [\d.]+", d))
        assert charts[title].count('<circle class="dot"') == points[title]
    # 8 steps, validation at steps 3, 6 and 8
    assert points == {"training loss": 8, "validation loss": 3, "learning rate": 8}
    assert "<script" not in dom

    screenshot = tmp_path / "curves.png"
    chromium("--window-size=1280,1600", f"--screenshot={screenshot}", out.as_uri())
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
