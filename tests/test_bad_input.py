"""Ordinary mistakes get one clear line (CLI) or a specific exception (Python), never a deep
torch traceback, and nothing is written."""

import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import quiet
from safetensors.torch import save_file
from torch import nn

import evagraph
from evagraph.cli import main
from evagraph.errors import (
    CaptureError,
    ConfigError,
    ConvergenceWarning,
    DataError,
    ModelLoadError,
    OutputError,
)
from evagraph.io import atomic_directory, load_model


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def batches(n: int = 12, rows: int = 16, width: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, width, generator=g) for _ in range(n)]


def transform(model, data, **kw):
    return evagraph.transform(model, data, progress=False, **{"budget": 2, **kw})


# -- Python API: each mistake raises its own exception type, with a message that says what --


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: no graph capture can follow this
            return self.lin(x)
        return -self.lin(x)


@pytest.mark.parametrize(
    "case,error,words",
    [
        ("empty", DataError, "calibration data is empty"),
        ("wrong shape", DataError, "failed on calibration batch 0: RuntimeError"),
        ("wrong dtype", DataError, "failed on calibration batch 0: RuntimeError"),
        ("wrong keys", DataError, "unexpected keyword argument 'tokens'"),
        ("later batch", DataError, "failed on calibration batch 3"),
        ("too few rows", DataError, "saw only 3 activation row(s)"),
        ("nan", DataError, "NaN or Inf in the activations entering layer(s) 0 at calibration"),
        ("inf", DataError, "NaN or Inf in the activations entering layer(s) 2"),
        ("no layer", ConfigError, "no adaptable layer"),
        ("untraceable", CaptureError, "`if x.sum() > 0:"),
        ("budget", ConfigError, "budget must be a positive integer"),
        ("rho", ConfigError, "rho must be >= 1"),
        ("tau zero", ConfigError, "tau must be in (0, 1]"),
        ("tau big", ConfigError, "tau must be in (0, 1]"),
    ],
)
def test_api_raises_specific_errors(case, error, words):
    model, data, kw = mlp(), batches(), {}
    if case == "empty":
        data = []
    elif case == "wrong shape":
        data = batches(width=9)
    elif case == "wrong dtype":
        data = [b.long() for b in data]
    elif case == "wrong keys":
        data = [{"tokens": b} for b in data]
    elif case == "later batch":
        data = data[:3] + batches(width=9) + data
    elif case == "too few rows":
        data, kw = batches(n=1, rows=3), {"budget": 4}
    elif case == "nan":
        data[0][2, 3] = float("nan")
    elif case == "inf":
        with torch.no_grad():
            model[0].weight[5, 0] = float("inf")
    elif case == "no layer":
        model = nn.Sequential(nn.ReLU(), nn.Tanh())
    elif case == "untraceable":
        model = DataDependent()
    else:
        kw = {"budget": {"budget": 0}, "rho": {"rho": 0.5}, "tau zero": {"tau": 0.0}}.get(
            case, {"tau": 1.5}
        )
    with pytest.raises(error) as info:
        quiet(transform, model, data, **kw)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_not_converged_warns_naming_the_layers_and_can_fail():
    with pytest.warns(ConvergenceWarning, match=r"not converged at tau=1.0: 0, 2"):
        _, report = transform(mlp(), batches(n=2), tau=1.0)
    assert report.unconverged == ["0", "2"]
    # The opt-in to fail is the standard warnings filter.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning):
            transform(mlp(), batches(n=2), tau=1.0)


def test_unknown_model_file_kinds(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(tmp_path / "notes.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(tmp_path / "sd.pt")
    (tmp_path / "hf").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(tmp_path / "hf")


def test_output_location_that_cannot_be_written(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="f is a file"), atomic_directory(tmp_path / "f/o"):
        pass
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(FileExistsError, match="--force"), atomic_directory(tmp_path / "full"):
        pass


# -- CLI: the same mistakes, one line on stderr, non-zero exit, no output directory --------


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def cli(*args: str):
    return CliRunner().invoke(main, ["compile", *args, "-q"])


def one_line(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "case,words",
    [
        ("empty data", "holds no samples"),
        ("mismatched tensors", "same first dimension (samples), got {'mask': 7, 'x': 8}"),
        ("wrong shape", "failed on calibration batch 0"),
        ("wrong dtype", "failed on calibration batch 0"),
        ("wrong keys", "failed on calibration batch 0"),
        ("too few rows", "layer(s) proj, gate saw only 3 activation row(s)"),
        ("nan", "NaN or Inf in the activations entering layer(s) stem"),
        ("not a data file", "cannot read calibration data"),
        ("no layer", "no adaptable layer"),
        ("not writable", "is a file"),
        ("not empty", "exists and is not an empty directory (use --force)"),
        ("not converged", "not converged at tau=0.99: stem"),
    ],
)
def test_cli_bad_input_one_line(example, tmp_path, case, words):
    model, data = str(example / "tiny_cnn.pt2"), tmp_path / "data.safetensors"
    out, extra = tmp_path / "out", []
    tensors = {"x": images(32)}
    if case == "empty data":
        tensors = {"x": images(0)}
    elif case == "mismatched tensors":
        tensors = {"x": images(8), "mask": torch.ones(7, 32)}
    elif case == "wrong shape":
        tensors = {"x": images(8, size=20)}
    elif case == "wrong dtype":
        tensors = {"x": images(8).to(torch.int32)}
    elif case == "wrong keys":
        tensors = {"x": images(8), "mask": torch.ones(8)}
    elif case == "too few rows":
        tensors, extra = {"x": images(3)}, ["--budget", "4"]
    elif case == "nan":
        tensors["x"][0, 0, 0, 0] = float("nan")
    elif case == "not a data file":
        data = tmp_path / "data.pt"
        data.write_text("hello")
    elif case == "no layer":
        torch.save(nn.Sequential(nn.ReLU()), tmp_path / "relu.pt")
        model, extra = str(tmp_path / "relu.pt"), ["--allow-pickle"]
    elif case == "not writable":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    elif case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "not converged":
        extra = ["--max-steps", "1", "--batch-size", "32", "--fail-unconverged"]
    if data.suffix == ".safetensors":
        save_file(tensors, str(data))
    result = cli(model, "--data", str(data), "-o", str(out), *extra)
    assert words in one_line(result)
    if case == "not empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    if out.parent.is_dir():  # no temporary directory left behind
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_cli_not_converged_is_a_warning_by_default(example, tmp_path):
    save_file({"x": images(32)}, str(tmp_path / "d.safetensors"))
    args = (str(example / "tiny_cnn.pt2"), "--data", str(tmp_path / "d.safetensors"))
    with pytest.warns(ConvergenceWarning, match="stem"):
        result = cli(*args, "-o", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    assert "NOT all converged" in result.stdout
    assert (tmp_path / "o" / "adapter.safetensors").exists()


CONFIG_CODE = """
import os
from transformers import PretrainedConfig

if os.environ.get("EVAGRAPH_TEST_MARKER"):  # the "payload": proves whether this code ran
    open(os.environ["EVAGRAPH_TEST_MARKER"], "w").write("ran")


class RemoteConfig(PretrainedConfig):
    model_type = "evagraph-test-remote"

    def __init__(self, width=16, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""

MODEL_CODE = """
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_remote import RemoteConfig


class RemoteModel(PreTrainedModel):
    config_class = RemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.up = nn.Linear(config.width, 32)
        self.down = nn.Linear(32, config.width)
        self.post_init()

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))
"""


def test_hf_model_with_its_own_code_needs_trust_remote_code(tmp_path, monkeypatch):
    import importlib

    package = tmp_path / "src" / "remote_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "configuration_remote.py").write_text(CONFIG_CODE)
    (package / "modeling_remote.py").write_text(MODEL_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    config_mod = importlib.import_module("remote_pkg.configuration_remote")
    model_mod = importlib.import_module("remote_pkg.modeling_remote")
    config_mod.RemoteConfig.register_for_auto_class()
    model_mod.RemoteModel.register_for_auto_class("AutoModel")
    model_mod.RemoteModel(config_mod.RemoteConfig()).save_pretrained(tmp_path / "hf")
    save_file({"x": torch.randn(64, 16)}, str(tmp_path / "d.safetensors"))

    marker = tmp_path / "ran"
    monkeypatch.setenv("EVAGRAPH_TEST_MARKER", str(marker))
    args = (str(tmp_path / "hf"), "--data", str(tmp_path / "d.safetensors"), "--budget", "2")
    line = one_line(cli(*args, "-o", str(tmp_path / "o")))
    assert "its own code (configuration_remote.py, modeling_remote.py" in line
    assert "--trust-remote-code" in line
    assert not marker.exists() and not (tmp_path / "o").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = cli(*args, "-o", str(tmp_path / "o"), "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert marker.exists() and (tmp_path / "o" / "adapter.safetensors").exists()


def test_batch_that_does_not_fit_an_exported_model_is_a_data_error():
    # fx cannot trace GPT-2, so capture goes through torch.export with the batch: its failure
    # must still be reported as the data's (a misspelt key), not as an untraceable model.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = GPT2LMHeadModel(config).eval()
    data = [{"input_idz": torch.randint(0, 50, (2, 8))}]
    with pytest.raises(
        DataError, match="batch 0: ValueError: You have to specify either input_ids"
    ):
        transform(model, data)
