"""Pictures of a ``Report``: a self-contained HTML page (inline SVG) and, with matplotlib, a PNG.

``render_report`` writes them; ``report_table`` gives the same per-layer facts as plain text
for the terminal. The HTML needs nothing beyond the standard library: no scripts, no external
resources. matplotlib is optional; without it only the HTML is written.
"""

from __future__ import annotations

import html
import math
import os
import warnings
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

from .errors import EvagraphWarning


class _Report(Protocol):
    """What the pictures read of a ``report.Report``. A protocol, not the class: the report
    imports this module (``Report.render``), so this one does not import it back."""

    settings: dict
    layers: list[Any]  # LayerReport
    skipped: dict[str, str]
    steps: int
    unconverged: list[str]
    capture: str
    rewrite: str
    run: dict

    @property
    def next_steps(self) -> list[str]: ...


BLUE, RED, GREY = "#4c72b0", "#c44e52", "#8c8c8c"
# viridis at 0, 1/4, 1/2, 3/4, 1: the heatmap's colour scale, interpolated in between
VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
ROW = 18  # px per layer in the SVG charts
CHAR = 6.7  # px per character of 11px monospace text (layer names)
NAME_CHARS = 44  # longer layer names are shortened from the left in the charts
# Inside each SVG, so a chart saved from the page on its own looks the same.
SVG_CSS = f"""
text {{ fill: #222; font-family: system-ui, sans-serif; font-size: 11px; }}
text.name {{ font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; }}
text.tick {{ fill: #666; font-size: 10px; }}
text.axis {{ fill: #444; }}
text.muted {{ fill: {GREY}; }}
text.bad {{ fill: {RED}; font-weight: bold; }}
line.grid {{ stroke: #e4e4e4; }}
line.mark {{ stroke: #333; stroke-dasharray: 4 3; }}
line.cut {{ stroke: #e31a1c; stroke-width: 3; }}
"""


@dataclass
class _Row:
    """One target layer as the pictures and the table show it."""

    name: str
    kind: str
    shape: str  # "in->out"
    depth: int
    group: str
    rank: int
    steps: int | None  # minibatch at which it converged
    unconverged: bool  # has an adapter whose needed components did not converge
    cumulative: list[float]  # cumulative explained-variance ratio by component count

    @property
    def at_rank(self) -> float | None:
        """Cumulative explained variance of the components the adapter got."""
        return self.cumulative[min(self.rank, len(self.cumulative)) - 1] if self.rank else None

    @property
    def status(self) -> str:
        if self.unconverged:
            return "NOT converged"
        return f"batch {self.steps}" if self.steps is not None else "-"


def _rows(report: _Report) -> list[_Row]:
    """The target layers in depth order (ties keep the report's order)."""
    unconverged = set(report.unconverged)
    return [
        _Row(
            name=layer.name,
            kind=layer.kind,
            shape=f"{layer.in_features}->{layer.out_features}",
            depth=layer.depth,
            group=layer.group,
            rank=layer.rank,
            steps=layer.steps_to_converge,
            unconverged=layer.name in unconverged,
            cumulative=list(accumulate(layer.explained_variance_ratio)),
        )
        for layer in sorted(report.layers, key=lambda layer: layer.depth)
    ]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _settings(report: _Report) -> dict:
    """The report's settings, flat: the adapter's, then the calibration's it does not repeat
    (reports before the split kept one flat dict)."""
    nested = [report.settings.get(k) for k in ("adapter", "calibration")]
    if not all(isinstance(d, dict) for d in nested):
        return dict(report.settings)
    adapter, calibration = nested
    return {**adapter, **{k: v for k, v in calibration.items() if k not in adapter}}


def _budget_and_cap(report: _Report) -> tuple[int, int]:
    """The average rank r and the per-layer cap round(r x rho) (0 where the settings lack them)."""
    settings = _settings(report)
    budget, rho = settings.get("budget"), settings.get("rho")
    if not isinstance(budget, int):
        return 0, 0
    return budget, round(budget * rho) if isinstance(rho, (int, float)) else budget


def _summary(report: _Report, rows: list[_Row]) -> str:
    """One line: layers, rank against the budget, minibatches, convergence."""
    budget, _ = _budget_and_cap(report)
    total = sum(r.rank for r in rows)
    adapted = sum(1 for r in rows if r.rank)
    bad = [r.name for r in rows if r.unconverged]
    line = f"{adapted} of {len(rows)} target layer(s) adapted, total rank {total}"
    if budget:
        line += f" (budget {budget} x {len(rows)} = {budget * len(rows)})"
    line += f"; {report.steps} minibatch(es); "
    line += f"{len(bad)} layer(s) NOT converged" if bad else "all converged"
    return line + f"; {len(report.skipped)} layer(s) skipped"


def _run_line(report: _Report) -> str:
    """Model, data, what calibration consumed, how long, and with which versions."""
    run = report.run
    parts = [f"{k} {run[k]}" for k in ("model", "data") if run.get(k)]
    if run.get("model_format"):
        parts[0:1] = [f"{parts[0]} ({run['model_format']})"] if parts else []
    if run.get("samples") is not None:
        tokens = f", {run['tokens']} tokens" if run.get("tokens") is not None else ""
        parts.append(f"{run['samples']} samples{tokens} consumed")
    if run.get("elapsed_s") is not None:
        parts.append(f"{run['elapsed_s']:.1f} s")
    versions = [f"{k} {run[k]}" for k in ("evagraph", "torch", "transformers") if run.get(k)]
    return "; ".join(parts + ([", ".join(versions)] if versions else []))


def report_table(report: _Report) -> str:
    """The report as terminal text: a summary line, one row per layer, the skipped layers."""
    rows = _rows(report)
    head = ("layer", "kind", "in->out", "rank", "converged at", "cum. var @ rank")
    body = [(r.name, r.kind, r.shape, str(r.rank), r.status, _percent(r.at_rank)) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    right = {2, 3, 5}  # numbers align right

    def fmt(cells: tuple[str, ...]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    lines = [_summary(report, rows)]
    lines += [f"run: {line}" for line in [_run_line(report)] if line]
    lines += ["", fmt(head), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(cells) for cells in body]
    if report.skipped:
        lines += ["", f"skipped ({len(report.skipped)}):"]
        lines += [f"  {name}: {why}" for name, why in report.skipped.items()]
    lines += ["", "next:"] + [f"  {step}" for step in report.next_steps]
    return "\n".join(lines)


# --- HTML / SVG ---------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _short(name: str) -> str:
    # The tail of a qualified name tells layers apart ("...layers.31.self_attn.q_proj").
    return name if len(name) <= NAME_CHARS else "\u2026" + name[-(NAME_CHARS - 1) :]


def _ticks(top: float, count: int = 5) -> list[int]:
    """Round integer tick positions from 0 to at most ``top``."""
    raw = max(top / count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return list(range(0, int(top) + 1, int(step)))


def _viridis(value: float) -> str:
    x = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    lo, hi = VIRIDIS[i], VIRIDIS[i + 1]
    rgb = [
        round(int(lo[j : j + 2], 16) * (i + 1 - x) + int(hi[j : j + 2], 16) * (x - i))
        for j in (1, 3, 5)
    ]
    return "#" + "".join(f"{c:02x}" for c in rgb)


class _Chart:
    """An SVG with one row per layer: names on the left, a plot area right of them."""

    def __init__(self, rows: list[_Row], title: str, plot_width: int, right: int = 150) -> None:
        self.rows = rows
        self.title = title
        self.left = int(max([len(_short(r.name)) for r in rows] + [5]) * CHAR) + 14
        self.top = 34
        self.plot_width = plot_width
        self.width = self.left + plot_width + right
        self.height = self.top + ROW * max(len(rows), 1) + 10
        self.parts: list[str] = []
        for i, row in enumerate(rows):
            self.add(
                f'<text class="name" x="{self.left - 8}" y="{self.mid(i) + 4}" '
                f'text-anchor="end"><title>{_esc(row.name)}</title>{_esc(_short(row.name))}</text>'
            )

    def y(self, i: int) -> float:
        return self.top + ROW * i + 2

    def mid(self, i: int) -> float:
        return self.top + ROW * i + ROW / 2

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> None:
        attrs = f'x="{x:.1f}" y="{y:.1f}" class="{cls}" text-anchor="{anchor}"'
        self.add(f"<text {attrs}>{_esc(text)}</text>")

    def axis(self, top: float, label: str) -> float:
        """Vertical grid lines with integer ticks above the rows; returns px per unit."""
        scale = self.plot_width / max(top, 1)
        bottom = self.top + ROW * len(self.rows)
        for t in _ticks(top):
            x = self.left + t * scale
            self.add(
                f'<line x1="{x:.1f}" y1="{self.top - 4}" x2="{x:.1f}" y2="{bottom}" class="grid"/>'
            )
            self.text(x, self.top - 8, str(t), "tick", "middle")
        self.text(self.left, 12, label, "axis")
        return scale

    def marker(self, x: float, label: str, cls: str) -> None:
        """A dashed vertical line across all rows, labelled at its foot."""
        bottom = self.top + ROW * len(self.rows)
        self.add(f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{bottom}" class="{cls}"/>')
        self.text(x + 3, bottom + 9, label, "tick")

    def svg(self) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height + 8}" viewBox="0 0 {self.width} {self.height + 8}" '
            f'role="img" aria-label="{_esc(self.title)}">\n<style>{SVG_CSS}</style>\n'
            + "\n".join(self.parts)
            + "\n</svg>"
        )


def _rank_chart(report: _Report, rows: list[_Row]) -> str:
    budget, cap = _budget_and_cap(report)
    chart = _Chart(rows, "rank per layer", 420)
    scale = chart.axis(max([cap, 1] + [r.rank for r in rows]), "rank (adapter size)")
    for i, row in enumerate(rows):
        w = row.rank * scale
        chart.add(
            f'<rect x="{chart.left}" y="{chart.y(i)}" width="{w:.1f}" height="{ROW - 4}" '
            f'fill="{BLUE}"><title>{_esc(row.name)}: rank {row.rank}</title></rect>'
        )
        label = str(row.rank) if row.rank else "0 (no adapter)"
        chart.text(chart.left + w + 4, chart.mid(i) + 4, label, "" if row.rank else "muted")
    if budget:
        chart.marker(chart.left + budget * scale, f"r = {budget}", "mark")
        if cap > budget:
            chart.marker(chart.left + cap * scale, f"cap {cap}", "mark")
    return chart.svg()


def _variance_chart(rows: list[_Row]) -> str:
    k = max([len(r.cumulative) for r in rows] + [1])
    cell = max(4, min(22, 440 // k))
    chart = _Chart(rows, "cumulative explained variance", cell * k, right=190)
    chart.text(
        chart.left, 12, "components (1 = the leading one); red bar = the layer's rank", "axis"
    )
    step = max(1, math.ceil(k / 20))
    for j in range(0, k, step):
        chart.text(chart.left + (j + 0.5) * cell, chart.top - 8, str(j + 1), "tick", "middle")
    for i, row in enumerate(rows):
        for j, value in enumerate(row.cumulative):
            chart.add(
                f'<rect x="{chart.left + j * cell}" y="{chart.y(i)}" width="{cell}" '
                f'height="{ROW - 4}" fill="{_viridis(value)}"><title>{_esc(row.name)}: '
                f"{j + 1} component(s) explain {_percent(value)}</title></rect>"
            )
        if row.rank:
            x = chart.left + min(row.rank, len(row.cumulative)) * cell
            chart.add(
                f'<line x1="{x}" y1="{chart.y(i) - 1}" x2="{x}" y2="{chart.y(i) + ROW - 3}" '
                f'class="cut"/>'
            )
        label = f"{_percent(row.at_rank)} at rank {row.rank}" if row.rank else "no adapter"
        chart.text(chart.left + k * cell + 6, chart.mid(i) + 4, label, "" if row.rank else "muted")
    # colour legend under the rows
    y = chart.top + ROW * len(rows) + 4
    for j in range(10):
        chart.add(
            f'<rect x="{chart.left + j * 12}" y="{y}" width="12" height="8" '
            f'fill="{_viridis((j + 0.5) / 10)}"/>'
        )
    chart.text(chart.left + 126, y + 8, "0% \u2192 100% of the input's variance", "tick")
    return chart.svg()


def _steps_chart(report: _Report, rows: list[_Row]) -> str:
    chart = _Chart(rows, "minibatches to converge", 420, right=120)
    top = max([report.steps, 1] + [r.steps or 0 for r in rows])
    scale = chart.axis(top, "minibatches until the layer's components converged")
    for i, row in enumerate(rows):
        if row.unconverged:
            # the whole run, hatched red: the layer never settled
            w, fill, label, cls = report.steps * scale, "url(#hatch)", "NOT converged", "bad"
        elif row.steps is not None:
            w, fill, label, cls = row.steps * scale, BLUE, str(row.steps), ""
        else:
            w, fill, label, cls = 0, BLUE, "-", "muted"
        chart.add(
            f'<rect x="{chart.left}" y="{chart.y(i)}" width="{w:.1f}" height="{ROW - 4}" '
            f'fill="{fill}"><title>{_esc(row.name)}: {_esc(row.status)}</title></rect>'
        )
        chart.text(chart.left + w + 4, chart.mid(i) + 4, label, cls)
    chart.marker(chart.left + report.steps * scale, f"run: {report.steps}", "mark")
    chart.parts.insert(
        0,
        f'<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f4d4d5"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{RED}" stroke-width="3"/></pattern></defs>',
    )
    return chart.svg()


CSS = f"""
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
  max-width: 1100px; margin: 1.5em auto; padding: 0 1em; }}
h1 {{ font-size: 1.5em; margin-bottom: .2em; }}
h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
p.note {{ color: #555; margin: .2em 0 .6em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ padding: 2px 10px 2px 0; text-align: left; border-bottom: 1px solid #eee; }}
td.num {{ text-align: right; }}
tr.bad td, .bad {{ color: {RED}; font-weight: bold; }}
.ok {{ color: #2a7d2a; font-weight: bold; }}
svg {{ max-width: 100%; height: auto; }}
"""


def _table(head: list[str], rows: list[list[str]], numeric: set[int], bad: list[bool]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for cells, is_bad in zip(rows, bad):
        tds = "".join(
            f'<td class="num">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
            for i, c in enumerate(cells)
        )
        out.append(f'<tr class="bad">{tds}</tr>' if is_bad else f"<tr>{tds}</tr>")
    return "\n".join([*out, "</table>"])


def _html(report: _Report) -> str:
    rows = _rows(report)
    bad = [r.name for r in rows if r.unconverged]
    status = (
        f'<span class="bad">NOT converged: {_esc(", ".join(bad))}</span>'
        if bad
        else '<span class="ok">all layers converged</span>'
    )
    settings = dict(_settings(report), capture=report.capture, rewrite=report.rewrite)
    settings_rows = [[k, "-" if v is None else str(v)] for k, v in settings.items()]
    layer_rows = [
        [
            r.name, str(r.depth), r.kind, r.shape, r.group, str(r.rank), r.status,
            _percent(r.at_rank),
        ]
        for r in rows
    ]  # fmt: skip
    skipped_rows = [[name, why] for name, why in report.skipped.items()]
    cumulative_note = (
        "Each row is a layer; cell <i>j</i> is the share of the layer's input variance that "
        "its first <i>j</i> principal components explain (layers sharing an input share a "
        "decomposition). The red bar marks the rank the layer got."
    )
    body = [
        "<h1>evagraph report</h1>",
        f"<p>{_esc(_summary(report, rows))}</p>",
        f"<p>{status}</p>",
        f"<p>{_esc(_run_line(report))}</p>" if report.run else "",
        "<h2>Next</h2>",
        "<ul>" + "".join(f"<li>{_esc(step)}</li>" for step in report.next_steps) + "</ul>",
        "<h2>Settings</h2>",
        _table(["setting", "value"], settings_rows, set(), [False] * len(settings_rows)),
        "<h2>Rank per layer</h2>",
        '<p class="note">Layers in depth order, input first. Dashed: the average rank r '
        "and the per-layer cap round(r x rho).</p>",
        _rank_chart(report, rows),
        "<h2>Cumulative explained variance</h2>",
        f'<p class="note">{cumulative_note}</p>',
        _variance_chart(rows),
        "<h2>Minibatches to converge</h2>",
        '<p class="note">The minibatch at which each layer\'s needed components stopped '
        "moving (cosine similarity &ge; tau). Hatched red: not converged when calibration "
        "ended.</p>",
        _steps_chart(report, rows),
        "<h2>Layers</h2>",
        _table(
            ["layer", "depth", "kind", "in->out", "group", "rank", "converged at", "cum. var"],
            layer_rows,
            {1, 3, 5, 7},
            [r.unconverged for r in rows],
        ),
        f"<h2>Skipped layers ({len(skipped_rows)})</h2>",
        _table(["layer", "reason"], skipped_rows, set(), [False] * len(skipped_rows))
        if skipped_rows
        else "<p>None.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>evagraph report</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# --- PNG (matplotlib) -----------------------------------------------------------------------


def _png(report: _Report, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import MaxNLocator

    rows = _rows(report)
    n = len(rows)
    budget, cap = _budget_and_cap(report)
    k = max(len(r.cumulative) for r in rows)
    fontsize = max(4.0, min(9.0, 700 / max(n, 1)))
    fig = Figure(figsize=(15, min(3.0 + 0.26 * n, 48)), dpi=100, layout="constrained")
    ax_rank, ax_var, ax_steps = fig.subplots(
        1, 3, sharey=True, gridspec_kw={"width_ratios": [1, 1.3, 1]}
    )
    ys = list(range(n))

    ax_rank.barh(ys, [r.rank for r in rows], color=BLUE)
    for i, r in enumerate(rows):
        ax_rank.text(r.rank, i, f" {r.rank}", va="center", fontsize=fontsize)
    if budget:
        ax_rank.axvline(budget, color="#333", ls="--", lw=1, label=f"r = {budget}")
        if cap > budget:
            ax_rank.axvline(cap, color="#333", ls=":", lw=1, label=f"cap {cap}")
        ax_rank.legend(loc="lower right", fontsize=8)
    ax_rank.set_yticks(ys, labels=[_short(r.name) for r in rows], fontsize=fontsize)
    ax_rank.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_rank.set_xlim(0, max([cap, 1] + [r.rank for r in rows]) * 1.15)
    ax_rank.invert_yaxis()  # shared: input layers on top in all three panels
    ax_rank.set_title("rank per layer (depth order)")
    ax_rank.set_xlabel("rank")

    nan = float("nan")
    grid = [r.cumulative + [nan] * (k - len(r.cumulative)) for r in rows]
    edges_x = [j + 0.5 for j in range(k + 1)]
    edges_y = [i - 0.5 for i in range(n + 1)]
    mesh = ax_var.pcolormesh(edges_x, edges_y, grid, cmap="viridis", vmin=0, vmax=1)
    for i, r in enumerate(rows):
        if r.rank:
            x = min(r.rank, len(r.cumulative)) + 0.5
            ax_var.plot([x, x], [i - 0.5, i + 0.5], color="#e31a1c", lw=2.5)
    fig.colorbar(mesh, ax=ax_var, label="cumulative explained variance", pad=0.01, aspect=40)
    ax_var.set_title("cumulative explained variance (red: the layer's rank)")
    ax_var.set_xlabel("components")

    done = [(i, r.steps) for i, r in enumerate(rows) if not r.unconverged and r.steps is not None]
    if done:
        ax_steps.barh([i for i, _ in done], [s for _, s in done], color=BLUE)
    for i, r in enumerate(rows):
        if r.unconverged:
            ax_steps.barh(i, report.steps, color="#f4d4d5", edgecolor=RED, hatch="//")
            ax_steps.text(report.steps, i, " NOT converged", va="center", color=RED,
                          fontsize=fontsize, fontweight="bold")  # fmt: skip
        else:
            ax_steps.text(r.steps or 0, i, f" {r.status.removeprefix('batch ')}", va="center",
                          fontsize=fontsize)  # fmt: skip
    ax_steps.axvline(report.steps, color="#333", ls="--", lw=1)
    ax_steps.set_xlim(0, max(report.steps, 1) * 1.25)
    ax_steps.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_steps.set_title(f"minibatches to converge (run: {report.steps})")
    ax_steps.set_xlabel("minibatch")

    header = _summary(report, rows)
    settings = ", ".join(
        f"{key}={v}" for key, v in _settings(report).items() if v not in (None, [])
    )
    fig.suptitle(f"evagraph report: {header}\n{settings}", fontsize=10)
    skipped = [f"{name} ({why})" for name, why in report.skipped.items()]
    if skipped:
        shown = "; ".join(skipped[:8]) + (
            f"; ... and {len(skipped) - 8} more" if len(skipped) > 8 else ""
        )
        fig.supxlabel(f"skipped: {shown}", fontsize=8, wrap=True)
    fig.savefig(path, format="png")


# --- entry point ----------------------------------------------------------------------------


def _replace(path: Path, write) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_report(report: _Report, outdir: str | Path) -> list[Path]:
    """Write ``report.html`` to ``outdir``, and ``report.png`` if matplotlib is installed.

    The HTML is self-contained (inline SVG, no scripts): rank per layer in depth order,
    cumulative explained variance per layer, minibatches each layer took to converge
    (unconverged layers in red), the settings and totals, and the skipped layers with
    their reasons. Returns the paths written.
    """
    outdir = Path(outdir)
    page = _html(report)
    written = [outdir / "report.html"]
    _replace(written[0], lambda p: p.write_text(page, encoding="utf-8"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    if report.layers:
        png = outdir / "report.png"
        try:
            _replace(png, lambda p: _png(report, p))
        except OSError:  # a full disk or a file size limit: all outputs or none
            raise
        except Exception as err:  # matplotlib failing on a picture: the PNG is an extra
            warnings.warn(f"report.png not written: {err!r}", EvagraphWarning, stacklevel=2)
        else:
            written.append(png)
    return written
