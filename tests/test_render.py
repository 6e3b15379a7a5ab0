"""The report's pictures: report.html (always), report.png (with matplotlib), `evagraph report`."""

import json
import struct
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SmallCNN, quiet

import evagraph
from evagraph.cli import main
from evagraph.render import render_report, report_table


class Page(HTMLParser):
    """Collects what the tests look at: tags, attributes, text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.open_svg = 0
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        self.open_svg += tag == "svg"

    def handle_endtag(self, tag):
        self.open_svg -= tag == "svg"

    def handle_data(self, data):
        self.text.append(data)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (checking its signature and CRC)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(data[12 : 16 + length]) == crc
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report() -> evagraph.Report:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    return quiet(
        evagraph.transform, SmallCNN(), batches, budget=2, rho=2, progress=False, conv_stride=1
    )[1]  # every row: some layers converge, others not, as the tests below need


def test_html_is_self_contained_with_three_charts(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without matplotlib installed
    assert report.render(tmp_path) == [tmp_path / "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    html = (tmp_path / "report.html").read_text()
    page = Page(html)
    assert page.tags.count("svg") == 3 and page.open_svg == 0
    assert "script" not in page.tags and "img" not in page.tags and "link" not in page.tags
    assert not [v for k, v in page.attrs if k in ("src", "href")]
    text = " ".join(page.text)
    for layer in report.layers:
        assert layer.name in text
    for name, why in report.skipped.items():  # fc, the head
        assert name in text and why in text
    assert "Rank per layer" in text and "Cumulative explained variance" in text


def test_png_opens_with_a_sane_size(report, tmp_path):
    pytest.importorskip("matplotlib")
    written = render_report(report, tmp_path)
    assert written == [tmp_path / "report.html", tmp_path / "report.png"]
    width, height = png_size(tmp_path / "report.png")
    assert 300 <= width <= 5000 and 300 <= height <= 5000
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_unconverged_layers_are_marked(report, tmp_path):
    # four minibatches of noise: some layers' components are still moving
    assert report.unconverged and len(report.unconverged) < len(report.layers)
    report.render(tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert html.count(">NOT converged<") == 2 * len(report.unconverged)  # chart and table
    assert html.count('<tr class="bad">') == len(report.unconverged)
    table = report_table(report)
    for layer in report.layers:
        line = next(x for x in table.splitlines() if x.startswith(layer.name + " "))
        assert ("NOT converged" in line) == (layer.name in report.unconverged)


def test_load_round_trips_and_rejects_malformed_files(report, tmp_path):
    path = tmp_path / "report.json"
    report.save(path)
    assert evagraph.Report.load(path).to_dict() == report.to_dict()
    data = json.loads(path.read_text())
    bad = {
        "not json": "{",
        "no layers": "[]",
        "missing key": json.dumps({**data, "layers": [{"name": "x"}]}),
        "wrong type": json.dumps(
            {**data, "layers": [{**data["layers"][0], "explained_variance_ratio": "high"}]}
        ),
    }
    for text in bad.values():
        path.write_text(text)
        with pytest.raises(ValueError):
            evagraph.Report.load(path)


def test_cli_compile_then_report(example, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    compiled = runner.invoke(
        main,
        [
            "compile",
            str(example / "tiny_cnn.pt2"),
            *("--data", str(example / "calib.safetensors"), "--budget", "4", "--rho", "2"),
            *("--format", "safetensors", "-o", str(out), "-q"),
        ],
    )
    assert compiled.exit_code == 0, compiled.output
    assert "report.html" in compiled.output and (out / "report.html").is_file()

    (out / "report.html").unlink()
    shown = runner.invoke(main, ["report", str(out)])
    assert shown.exit_code == 0, shown.output
    assert not (out / "report.html").exists()  # reading a report writes nothing
    redrawn = runner.invoke(main, ["report", str(out), "--redraw"])
    assert redrawn.exit_code == 0 and (out / "report.html").is_file(), redrawn.output
    lines = shown.output.splitlines()
    assert lines[0].startswith("5 of 5 target layer(s) adapted, total rank 20 (budget 4 x 5 = 20)")
    assert lines[1].startswith("run: ") and " samples consumed; " in lines[1]  # no tokens: images
    assert "; evagraph " in lines[1] and "torch " in lines[1]
    assert lines[3] == "layer  kind    in->out  rank  converged at  cum. var @ rank"
    assert lines[-2] == "next:" and "apply_adapter" in lines[-1]
    report = json.loads((out / "report.json").read_text())
    for layer in report["layers"]:
        row = next(x.split() for x in lines if x.startswith(layer["name"] + " "))
        assert row[:4] == [
            layer["name"],
            layer["kind"],
            f"{layer['in_features']}->{layer['out_features']}",
            str(layer["rank"]),
        ]
        assert row[-1].endswith("%")
    assert "head: output layer (model head)" in shown.output


def test_cli_report_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0
    assert (
        result.output.strip()
        == f"Error: no report.json in {tmp_path} (evagraph compile writes one)"
    )
    (tmp_path / "report.json").write_text('{"layers": 3}')
    result = runner.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "not an evagraph report" in result.output
    help_text = runner.invoke(main, ["report", "--help"]).output
    assert "report.json" in help_text and "report.html" in help_text
