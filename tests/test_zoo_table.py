"""The README's zoo bullet and the pass-rate lines of benchmarks/results.md agree with the
per-model tables of the zoo section (issue 17): numbers edited by hand in either fail here.

The sweep's JSON files are not kept, so the records are read back from those tables, which
``benchmarks/zoo.py --write-results`` wrote; ``--readme-from-results`` rewrites the bullet."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import zoo
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

RESULTS = (ROOT / "benchmarks" / "results.md").read_text()
README = (ROOT / "README.md").read_text()
FIX = "python benchmarks/zoo.py --readme-from-results"


def readme_zoo_block(text: str) -> list[str]:
    lines = text.splitlines()
    begin = [i for i, line in enumerate(lines) if line == zoo.README_BEGIN]
    end = [i for i, line in enumerate(lines) if line == zoo.README_END]
    assert len(begin) == len(end) == 1 and begin[0] < end[0], "README.md: zoo markers"
    return lines[begin[0] : end[0] + 1]


def test_readme_zoo_bullet_is_rendered_from_the_results_table():
    records, partial = zoo.records_from_results(RESULTS)
    assert readme_zoo_block(README) == zoo.readme_block(records, partial), (
        f"README.md's zoo bullet differs from the table in benchmarks/results.md; run `{FIX}`"
    )


def test_results_pass_rate_lines_match_its_own_table():
    records, _ = zoo.records_from_results(RESULTS)
    counts = zoo.tally(records)
    assert set(counts) == {"timm", "hf"}
    lines = zoo.results_section(RESULTS).splitlines()
    for source, c in counts.items():
        assert zoo.summary_line(source, c) in lines, source
    shown = [line for line in lines if line.startswith("- **")]
    assert len(shown) == len(counts), shown


def test_table_round_trip_and_hand_edits_are_caught():
    """Records written by ``section`` read back with the statuses the README needs; a
    changed number in the README bullet no longer matches."""
    checks = {c: {"status": "pass", "message": "x"} for c in zoo.CHECKS}
    failing = {**checks, "merge": {"status": "fail", "message": "max |diff| 1"}}
    run = {
        "command": "c",
        "machine": "m",
        "selection": "timm (3 models); time budget of 1 min: the first 2 ran",
        "results": [
            {"source": "timm", "name": "a", "family": "a", "status": "ran", "checks": checks},
            {"source": "timm", "name": "b", "family": "b", "status": "ran", "checks": failing},
            {"source": "hf", "name": "c", "family": "c", "status": "ran", "checks": checks,
             "note": "3-D weights"},
            {"source": "hf", "name": "d", "family": "d", "status": "not attempted",
             "reason": "no | class"},
        ],
    }  # fmt: skip
    text = "# Benchmark results\n\n" + "\n".join(zoo.section([run])) + "\n"
    records, partial = zoo.records_from_results(text)
    assert partial
    assert zoo.tally(records) == zoo.tally(run["results"])
    block = zoo.readme_block(records, partial)
    assert block == zoo.readme_block(run["results"], partial=True)
    words = " ".join(" ".join(block).split())
    assert "1 of 2 timm families and 1 of 1 transformers model types" in words
    assert "(a time-boxed subset)" in words and "another 1 were not attempted" in words

    # a number of the real README bullet changed by hand
    shown = readme_zoo_block(README)
    body = "\n".join(shown[1:-1])
    edited = re.sub(r"\d+", lambda m: str(int(m[0]) + 1), body, count=1)
    assert edited != body
    edited_readme = README.replace(body, edited)
    assert readme_zoo_block(edited_readme) != zoo.readme_block(*zoo.records_from_results(RESULTS))


def test_write_readme_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"intro\n{zoo.README_BEGIN}\nold\n{zoo.README_END}\n- next\n")
    records = [{"source": "timm", "name": "a", "status": "ran", "checks": {}}]
    zoo.write_readme(records, False, path)
    text = path.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{zoo.README_END}\n- next\n")
    assert "old" not in text and "0 of 1 timm families" in text
    path.write_text("no markers\n")
    with pytest.raises(SystemExit):
        zoo.write_readme(records, False, path)
    assert path.read_text() == "no markers\n"
