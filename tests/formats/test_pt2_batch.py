""".pt2 archives exported with static shapes: the CLI runs batches of the exported size."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from evagraph import ConvergenceWarning
from evagraph.cli import main
from evagraph.formats.pt2 import input_shapes, static_batch_size


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(F.relu(self.proj(F.relu(self.conv(x)).mean(dim=(2, 3)))))


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt2batch")
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(16, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), out / "static.pt2")
    dynamic = {0: torch.export.Dim("batch", min=1, max=1024)}
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=(dynamic,)), out / "dyn.pt2")
    save_file({"x": torch.randn(40, 3, 8, 8)}, str(out / "calib.safetensors"))  # 2 x 16 + 8
    save_file({"x": torch.randn(40, 3, 6, 6)}, str(out / "small.safetensors"))
    save_file({"x": torch.randn(10, 3, 8, 8)}, str(out / "few.safetensors"))
    return out


def compile_(*args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return CliRunner().invoke(main, ["compile", *args, "--budget", "2", "-q"])


def test_input_shapes_tell_static_from_dynamic(archives):
    assert input_shapes(archives / "static.pt2") == {"x": (16, 3, 8, 8)}
    assert input_shapes(archives / "dyn.pt2") == {"x": (None, 3, 8, 8)}
    assert static_batch_size(input_shapes(archives / "static.pt2")) == 16
    assert static_batch_size(input_shapes(archives / "dyn.pt2")) is None
    assert input_shapes(archives / "calib.safetensors") == {}  # not an archive


def test_static_archive_compiles_with_its_batch_size(archives, tmp_path):
    result = compile_(
        str(archives / "static.pt2"), "--data", str(archives / "calib.safetensors"),
        "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "static.pt2 was exported for batches of 16: using --batch-size 16" in result.stderr
    assert "dropping the last 8 sample(s): static.pt2 takes batches of exactly 16" in result.stderr
    assert (tmp_path / "out" / "model.pt2").is_file()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"] == 2


def test_dynamic_archive_keeps_the_batch_size(archives, tmp_path):
    result = compile_(
        str(archives / "dyn.pt2"), "--data", str(archives / "calib.safetensors"),
        "--batch-size", "8", "--format", "safetensors", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "exported for batches" not in result.stderr and "dropping" not in result.stderr


@pytest.mark.parametrize(
    "model,data,words",
    [
        (
            "static.pt2",
            "small.safetensors",
            "static.pt2 expects input x of shape (16, 3, 8, 8); calibration batch 0 has "
            "(16, 3, 6, 6)",
        ),
        (
            "dyn.pt2",
            "small.safetensors",
            "dyn.pt2 expects input x of shape (*, 3, 8, 8); calibration batch 0 has (8, 3, 6, 6)",
        ),
        ("static.pt2", "few.safetensors", "holds 10 sample(s), fewer than one batch of 16"),
    ],
)
def test_shape_mismatch_is_one_line(archives, tmp_path, model, data, words):
    out = tmp_path / "o"
    result = compile_(str(archives / model), "--data", str(archives / data), "-o", str(out))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
