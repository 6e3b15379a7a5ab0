"""The pipeline registry is an extension point: a pipeline registered from outside the package
runs through transform and calibrate by name, and through the command line under the name
``choose`` picks."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SharedMLP, correlated, loras, quiet

import evagraph
from evagraph.errors import ConfigError
from evagraph.pipelines import PIPELINES, Pipeline, Whole, choose, register


class EveryOther(Pipeline):
    """A toy pipeline: the whole-graph loop on every other batch."""

    def run(self, traced, batches, settings, **how):
        return Whole().run(traced, itertools.islice(batches, 0, None, 2), settings, **how)


@pytest.fixture
def every_other(monkeypatch):
    monkeypatch.setitem(PIPELINES, "every_other", None)  # put back as it was after the test
    register("every_other")(EveryOther)
    return "every_other"


def test_a_registered_pipeline_runs_through_transform_and_calibrate(every_other):
    batches = list(correlated(96, 16).split(8))
    settings = dict(budget=2, tau=1.0, progress=False)  # tau 1: every batch is consumed
    model = SharedMLP().eval()
    adapted, report = quiet(evagraph.transform, model, batches, pipeline=every_other, **settings)
    expected, report_of_half = quiet(evagraph.transform, model, batches[::2], **settings)
    assert report.steps == report_of_half.steps == 6
    assert report.ranks == report_of_half.ranks
    for name, lora in loras(expected).items():
        torch.testing.assert_close(loras(adapted)[name].lora_A.weight, lora.lora_A.weight)
    state = quiet(evagraph.calibrate, model, batches, pipeline=EveryOther(), **settings)
    assert state.steps == 6
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'; the pipelines are"):
        evagraph.calibrate(model, batches, pipeline="nope")
    with pytest.raises(ConfigError, match="sequential: options of the chosen pipeline"):
        evagraph.calibrate(model, batches, pipeline=every_other, sequential=True)


def test_choose_takes_the_pipelines_from_the_registry(monkeypatch):
    class Mine(Whole):
        pass

    monkeypatch.setitem(PIPELINES, "whole", Mine)
    assert type(choose(SharedMLP())) is Mine


def test_the_command_line_runs_a_pipeline_registered_under_the_name_choose_picks(example, tmp_path):
    script = textwrap.dedent(
        """
        import itertools, sys
        from evagraph.pipelines import Whole, register

        @register("whole")
        class EveryOther(Whole):
            def run(self, traced, batches, settings, **how):
                print("every other batch", file=sys.stderr)
                return super().run(traced, itertools.islice(batches, 0, None, 2), settings, **how)

        from evagraph.cli import main
        main(sys.argv[1:])
        """
    )
    model, data = example / "tiny_cnn.pt2", example / "calib.safetensors"  # 32 batches of 8
    out = tmp_path / "out"
    args = ["compile", str(model), "--data", str(data), "--tau", "1", "-o", str(out), "-q"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "every other batch" in proc.stderr
    assert json.loads((out / "report.json").read_text())["steps"] == 16
