"""`exnihilo report RUN_DIR`: the line chart's geometry on hand-made series, and the curves
page of a real tiny SFT run (values, escaping, errors). The browser check is in
test_report.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from exnihilo.errors import ExnihiloError
from exnihilo.report.html import line_chart_svg, line_segments
from exnihilo.report.run import curve, read_run, write_run_report

pytestmark = pytest.mark.usefixtures("one_thread")

# line_chart_svg's frame: 620 × 230, plot from x 64 to 606 (542 wide), y 28 to 196 (168 high).
LEFT, RIGHT, TOP, BOTTOM = 64.0, 606.0, 28.0, 196.0


def paths(svg: str) -> dict[str, str]:
    """series name → the path's d attribute."""
    return dict(re.findall(r'<path class="line" data-series="([^"]*)" d="([^"]*)"', svg))


def points_of(d: str) -> list[list[tuple[float, float]]]:
    """A path's d attribute → its subpaths' points."""
    return [[(float(x), float(y)) for x, y in re.findall(r"([-\d.]+) ([-\d.]+)", part)]
            for part in d.split("M ")[1:]]


def test_line_chart_places_points_on_shared_axes_and_breaks_at_gaps():
    svg = line_chart_svg("loss", [("a", [(0, 0.0), (10, 5.0), (20, None), (30, 10.0),
                                         (40, float("nan"))]),
                                  ("b", [(0, 10.0)])])
    lines = paths(svg)
    # x spans 0..30 (the last finite x), y spans 0..10: (10, 5) sits a third across, halfway up
    assert points_of(lines["a"]) == [[(LEFT, BOTTOM), (pytest.approx(LEFT + 542 / 3, abs=0.01),
                                                       (TOP + BOTTOM) / 2)],
                                     [(RIGHT, TOP)]]
    assert points_of(lines["b"]) == [[(LEFT, TOP)]]
    assert svg.count('<circle class="dot"') == 4  # the None and NaN points are not drawn
    assert ">5: 5<" not in svg and "step 10: 5</title>" in svg
    ticks = re.findall(r'text-anchor="end" dominant-baseline="middle">([^<]+)<', svg)
    assert ticks == ["0", "5", "10"]


def test_line_chart_single_value_and_empty_and_escaping():
    svg = line_chart_svg("<b>lr</b>", [('run "x" <i>', [(5, 2.0)])])
    [[(x, y)]] = points_of(paths(svg)['run &quot;x&quot; &lt;i&gt;'])
    assert (x, y) == ((LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2)  # one value: centred
    assert "<b>lr</b>" not in svg and "&lt;b&gt;lr&lt;/b&gt;" in svg
    empty = line_chart_svg("validation loss", [("a", [(1, None), (2, float("inf"))])])
    assert "validation loss: no values" in empty and "<path" not in empty
    assert line_segments([(1, 1.0), (2, None), (3, None), (4, 2.0)]) == [[(1.0, 1.0)],
                                                                         [(4.0, 2.0)]]


# --------------------------------------------------------------------------- a real run

def write_records(path: Path) -> str:
    pairs = [("What is 2+2?", "4."), ("Name a colour.", "Blue."), ("Say hi.", "Hi there!"),
             ("Capital of France?", "Paris."), ("Opposite of hot?", "Cold."),
             ("Plural of mouse?", "Mice."), ("First letter?", "A."), ("Days?", "Seven."),
             ("Two plus one?", "3."), ("Sky colour?", "Blue.")]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]})
                            + "\n" for q, a in pairs))
    return str(path)


def train_tiny_run(folder: Path, tokenizer) -> Path:
    """A real SFT run on a tiny random Llama: 2 epochs × 4 steps, validation every 3 steps
    (steps 3, 6 and the last, 8)."""
    from transformers import LlamaForCausalLM

    from exnihilo.train.sft import SFTConfig, run_sft

    torch.manual_seed(0)
    cfg = SFTConfig(data=write_records(folder.parent / f"{folder.name}-data.jsonl"),
                    out=str(folder), style="phi3", batch_size=2, val_fraction=0.2,
                    eval_every=3, save_every=0, max_length=64, seed=0, full=True, lr=3e-3,
                    epochs=2, warmup_ratio=0.25)
    run_sft(cfg, model_obj=LlamaForCausalLM(tiny_llama_config(len(tokenizer))),
            tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smol_tokenizer) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_run(tmp_path_factory.mktemp("runs") / "sft<i>&run", smol_tokenizer)
    finally:
        torch.set_num_threads(threads)


def chart(page: str, title: str) -> str:
    return page.split(f"<title>{title}</title>")[1].split("</svg>")[0]


def test_run_report_draws_the_runs_own_numbers(tiny_run, tmp_path):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "curves.html"
    [run] = write_run_report([tiny_run], out)
    page = out.read_text()
    assert run.info is not None and run.config["lr"] == 3e-3 and len(run.rows) == 8

    loss = points_of(paths(chart(page, "training loss"))["sft&lt;i&gt;&amp;run"])
    assert len(loss) == 1 and len(loss[0]) == 8  # one unbroken line, a point per step
    assert loss[0][0][0] == LEFT and loss[0][-1][0] == RIGHT
    # the highest loss is on the top edge, the lowest on the bottom, the rest in order
    values = [r["loss"] for r in rows]
    ys = [y for _, y in loss[0]]
    assert ys[values.index(max(values))] == TOP and ys[values.index(min(values))] == BOTTOM
    assert sorted(range(8), key=lambda i: ys[i]) == sorted(range(8), key=lambda i: -values[i])

    val = points_of(paths(chart(page, "validation loss"))["sft&lt;i&gt;&amp;run"])
    val_steps = [r["step"] for r in rows if "val_loss" in r]
    assert val_steps == [3, 6, 8] and len(val[0]) == 3
    # x of step s is LEFT + 542 (s - 1) / 7 on the shared step axis
    assert [x for x, _ in val[0]] == [pytest.approx(LEFT + 542 * (s - 1) / 7, abs=0.01)
                                      for s in val_steps]

    lr = points_of(paths(chart(page, "learning rate"))["sft&lt;i&gt;&amp;run"])[0]
    lrs = [r["lr"] for r in rows]  # warmup (2 steps) then cosine decay
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[-1]
    assert lr[lrs.index(max(lrs))][1] == TOP and lr[lrs.index(min(lrs))][1] == BOTTOM
    assert "<title>trained tokens/s</title>" in page and "<title>gradient norm</title>" in page

    # final metrics and config tables, escaped
    assert f"<td>{rows[-1]['val_loss']:.4g}</td>" in page
    best = min((r["val_loss"], r["step"]) for r in rows if "val_loss" in r)
    assert f"<td>{best[0]:.4g} (step {best[1]})</td>" in page
    assert "<tr><th>lr</th><td>0.003</td></tr>" in page
    assert "<tr><th>method</th><td>sft</td></tr>" in page
    assert "sft<i>" not in page and "<script" not in page
    assert "default-src &#x27;none&#x27;" in page


def test_two_runs_share_each_chart(tiny_run, tmp_path):
    import shutil

    other = tmp_path / "other" / tiny_run.name
    shutil.copytree(tiny_run, other)
    rows = (other / "metrics.jsonl").read_text().splitlines()[:5]  # a shorter run
    (other / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "both.html"
    write_run_report([tiny_run, other], out)
    lines = paths(chart(out.read_text(), "training loss"))
    assert list(lines) == [str(tiny_run).replace("<", "&lt;").replace(">", "&gt;")
                           .replace("&run", "&amp;run"), str(other).replace("<", "&lt;")
                           .replace(">", "&gt;").replace("&run", "&amp;run")]
    # one step axis for both: the shorter run ends at step 5 of 8
    short = points_of(lines[list(lines)[1]])[0]
    assert len(short) == 5 and short[-1][0] == pytest.approx(LEFT + 542 * 4 / 7, abs=0.01)
    with pytest.raises(ExnihiloError, match="given twice"):
        write_run_report([tiny_run, tiny_run], out)


def test_run_folder_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ExnihiloError, match="no metrics.jsonl"):
        read_run(empty)
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ExnihiloError, match="no metrics yet"):
        read_run(empty)
    # a live run's half-written last line is left out; a bad line before it is an error
    (empty / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert [r["step"] for r in read_run(empty).rows] == [1]
    (empty / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ExnihiloError, match=r"metrics.jsonl:2: not a metrics line"):
        read_run(empty)
    assert curve([{"step": 1, "val_loss": None}, {"step": 2}], "val_loss") == [(1.0, None)]


def test_report_cli_on_a_run_folder(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from exnihilo.cli import app

    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(tiny_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(8 steps)" in result.output and out.read_text().count('<path class="line"') >= 3
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    result = CliRunner().invoke(app, ["report", str(tiny_run), str(data), "-o", str(out)])
    assert isinstance(result.exception, ExnihiloError)
    assert "either run folders or dataset files" in str(result.exception)


def test_step_axis_ticks_are_whole_steps():
    svg = line_chart_svg("loss", [("a", [(1, 1.0), (12000, 2.0)])])
    ticks = re.findall(r'y="210" class="val" text-anchor="middle">([^<]+)<', svg)
    assert ticks == ["1", "3,001", "6,000", "9,000", "12,000"]
    # 1 + 11999 / 4 = 3000.75 rounds to 3,001; each label sits at its own step's x
    assert f'<text x="{LEFT + 542 * 3000 / 11999:.1f}" y="210"' in svg
