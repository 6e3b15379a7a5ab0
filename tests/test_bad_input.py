"""Ordinary mistakes get one clear line (CLI) or a specific exception (Python), never a deep
torch traceback, and nothing is written."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import evagraph_cmd, quiet
from safetensors.torch import save_file
from test_text_data import make_tokenizer
from torch import nn

import evagraph
from evagraph.cli import main
from evagraph.config import patterns
from evagraph.errors import (
    CaptureError,
    ConfigError,
    ConvergenceWarning,
    DataError,
    ModelLoadError,
    OutputError,
    ReportLoadError,
)
from evagraph.formats.outdir import atomic_directory
from evagraph.loading import load_model
from evagraph.runtime import resolve_device


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


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        return h * float(h.detach().numpy().std())  # leaves torch: no graph capture follows


@pytest.mark.parametrize(
    "case,error,words",
    [
        ("empty", DataError, "calibration data is empty"),
        ("wrong shape", DataError, "failed on calibration batch 0: "),
        ("wrong dtype", DataError, "failed on calibration batch 0: "),
        ("wrong keys", DataError, "unexpected keyword argument 'tokens'"),
        ("later batch", DataError, "failed on calibration batch 3"),
        ("too few rows", DataError, "saw only 3 activation row(s)"),
        ("nan", DataError, "NaN or Inf in the activations entering layer(s) 0 at calibration"),
        ("inf", DataError, "NaN or Inf in the activations entering layer(s) 2"),
        ("no layer", ConfigError, "no adaptable layer"),
        ("untraceable", CaptureError, "numpy() is not supported"),
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
        model = Untraceable()
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
        ("wrong shape", "expects input x of shape (*, 3, 32, 32); calibration batch 0 has (8,"),
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
    with pytest.raises(DataError, match="failed on calibration batch 0"):  # not CaptureError
        transform(model, data)


# -- A table of bad inputs: each one line `Error: ...`, a non-zero exit, nothing written ------


class WiderCNN(nn.Module):
    """The example's layer names (stem ... head) with other widths: its statistics fit no
    layer of tiny_cnn.pt2 although every name matches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.conv1 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.proj, self.gate = nn.Linear(32, 48), nn.Linear(32, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.stem(x))))
        h = (h + torch.relu(self.conv2(h))).mean(dim=(2, 3))
        return self.head(self.proj(h) * torch.sigmoid(self.gate(h)))


@pytest.fixture(scope="module")
def bad(example, tmp_path_factory) -> dict[str, str]:
    """Input files for the table, written once: name -> path (the placeholders in ``BAD``)."""
    d = tmp_path_factory.mktemp("bad")
    files = {"model": str(example / "tiny_cnn.pt2"), "in": str(d)}

    def tensors(name: str, **ts: torch.Tensor) -> None:
        save_file(ts, str(d / name))

    tensors("data.safetensors", x=images(64))
    tensors("empty.safetensors", x=images(0))
    tensors("mismatched.safetensors", x=images(8), mask=torch.ones(7, 32))
    tensors("nan.safetensors", x=images(64).index_fill_(0, torch.tensor([0]), float("nan")))
    tensors("channels.safetensors", x=torch.randn(16, 4, 32, 32))
    tensors("int.safetensors", x=images(16).to(torch.int32))
    torch.save(torch.tensor(1.0), d / "scalar.pt")
    torch.save({"x": images(8).numpy()}, d / "numpy.pt")  # pickled numpy arrays, not tensors
    (d / "data.txt").write_text("0.1 0.2 0.3\n")
    (d / "garbage.pt2").write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    (d / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage}")
    for name in ("zero.pt", "zero.pt2", "zero-data.pt", "zero-data.safetensors"):
        (d / name).write_bytes(b"")
    torch.save(mlp(), d / "module.pt")  # a whole-module pickle
    torch.save(mlp().state_dict(), d / "state_dict.pt")
    make_tokenizer().save_pretrained(d / "tok")
    (d / "bad.jsonl").write_text('{"text": "a cat"}\n{"text": oops\n')
    (d / "numbers.json").write_text("[1, 2, 3]")
    (d / "noconfig").mkdir()
    (d / "badconfig").mkdir()
    (d / "badconfig" / "config.json").write_text("{not json")
    quiet(evagraph.calibrate, mlp(), batches(), budget=2, progress=False).save(d / "mlp.state")
    wider = quiet(
        evagraph.calibrate, WiderCNN(), list(images(64).split(8)), budget=2, progress=False
    )
    wider.save(d / "wider.state")
    return files


# Each row: its id, the arguments before "-o OUTDIR -q" ({model}, {in}: ``bad``'s files),
# words of evagraph's own message, and what is in the way of OUTDIR before the run.
S = "{model} --data {in}/data.safetensors"
T = "{model} --format safetensors --budget 2 --state"  # a .pt2 defaults to --format pt2
BEING_FIXED: dict[str, int] = {}  # name -> issue 12 item, while a row is known to fail
BAD = [
    # settings
    ("budget 0", f"{S} --budget 0", "budget must be a positive integer", None),
    ("budget -1", f"{S} --budget -1", "budget must be a positive integer", None),
    ("budget 1.5", f"{S} --budget 1.5", "--budget", None),
    ("rho 0.5", f"{S} --rho 0.5", "rho must be", None),
    ("rho inf", f"{S} --rho inf", "rho", None),
    ("rho nan", f"{S} --rho nan", "rho must be", None),
    ("tau 0", f"{S} --tau 0", "tau must be in (0, 1]", None),
    ("tau 1.5", f"{S} --tau 1.5", "tau must be in (0, 1]", None),
    ("tau nan", f"{S} --tau nan", "tau must be a finite number", None),
    ("alpha 0", f"{S} --alpha 0", "alpha must be", None),
    ("alpha inf", f"{S} --alpha inf", "alpha", None),
    ("alpha nan", f"{S} --alpha nan", "alpha must be", None),
    ("dropout 1", f"{S} --dropout 1", "dropout must be in [0, 1)", None),
    ("dropout -0.1", f"{S} --dropout -0.1", "dropout must be in [0, 1)", None),
    ("max-steps 0", f"{S} --max-steps 0", "max_steps must be positive", None),
    ("min-batches 0", f"{S} --min-batches 0", "min_batches must be >= 1", None),
    ("batch-size 0", f"{S} --batch-size 0", "--batch-size", None),
    ("budget 1e9", f"{S} --budget 1000000000", "more than any target layer's rank can be", None),
    ("unknown flag", f"{S} --no-such-flag", "No such option '--no-such-flag'", None),
    ("unknown format", f"{S} --format onnx", "--format", None),
    # devices
    ("device bogus", f"{S} --device bogus", "device 'bogus' is not a torch device", None),
    ("device cuda:99", f"{S} --device cuda:99", "device 'cuda:99'", None),
    ("device cuda", f"{S} --device cuda", "device 'cuda' is not available", None),
    # model
    ("missing model", "{in}/nope.pt2 --data {in}/data.safetensors", "model not found", None),
    ("no config.json", "{in}/noconfig --data {in}/data.safetensors", "without config.json", None),
    ("bad config.json", "{in}/badconfig --data {in}/data.safetensors", "config.json", None),
    ("garbage pt2", "{in}/garbage.pt2 --data {in}/data.safetensors", "garbage.pt2", None),
    ("zero-byte pt2", "{in}/zero.pt2 --data {in}/data.safetensors", "zero.pt2", None),
    ("zero-byte pt", "{in}/zero.pt --data {in}/data.safetensors", "zero.pt", None),
    ("pickle", "{in}/module.pt --data {in}/data.safetensors", "--allow-pickle", None),
    ("state dict", "{in}/state_dict.pt --data {in}/data.safetensors", "not a model", None),
    ("checkpoint", f"{S} --checkpoint {{in}}/state_dict.pt", "a checkpoint is for a timm", None),
    # data
    ("missing data", "{model} --data {in}/nope.pt", "calibration data file not found", None),
    ("zero-byte pt data", "{model} --data {in}/zero-data.pt", "empty file (0 bytes)", None),
    ("zero-byte st data", "{model} --data {in}/zero-data.safetensors", "(0 bytes)", None),
    ("garbage st data", "{model} --data {in}/garbage.safetensors", "cannot read calibration", None),
    ("scalar data", "{model} --data {in}/scalar.pt", "scalar (0-dim): it has no sample", None),
    ("no samples", "{model} --data {in}/empty.safetensors", "holds no samples", None),
    ("mismatched", "{model} --data {in}/mismatched.safetensors", "same first dimension", None),
    ("text data, no tokenizer", "{model} --data {in}/data.txt", "give the tokenizer", None),
    (
        "text options, tensor data",
        f"{S} --max-length 8",
        "--max-length: not an option for a file of tensors",
        None,
    ),
    ("no tokenizer", "{model} --data {in}/data.txt --tokenizer {in}/noconfig", "noconfig", None),
    ("numpy data", "{model} --data {in}/numpy.pt", "numpy.pt", None),
    ("malformed jsonl", "{model} --data {in}/bad.jsonl --tokenizer {in}/tok", "JSON parse", None),
    ("numbers as text", "{model} --data {in}/numbers.json --tokenizer {in}/tok", "not text", None),
    ("nan data", "{model} --data {in}/nan.safetensors", "NaN or Inf", None),
    ("wrong width", "{model} --data {in}/channels.safetensors", "calibration batch 0", None),
    ("wrong dtype", "{model} --data {in}/int.safetensors", "calibration batch 0", None),
    ("no data", "{model}", "--data", None),
    # targets / exclude
    ("targets nothing", f"{S} --targets 'nope*'", "targets pattern 'nope*' matches no", None),
    ("exclude nothing", f"{S} --exclude 'nope*'", "exclude pattern 'nope*' matches no", None),
    ("exclude all", f"{S} --exclude '*'", "no adaptable layer selected", None),
    # output
    ("output is a file", S, "is a file", "file"),
    ("output not empty", S, "is not an empty directory (use --force)", "not empty"),
    ("parent is a file", S, "is a file", "parent file"),
    ("output is a symlink loop", S, "symlink loop", "loop"),
    (
        "output holds the model",
        "{out}/m.pt2 --data {in}/data.safetensors --force",
        "contains",
        "in",
    ),
    # saved statistics
    ("garbage state", f"{T} {{in}}/garbage.safetensors", "garbage.safetensors", None),
    ("state of another model", f"{T} {{in}}/mlp.state", "EVA state", None),
    ("state of other widths", f"{T} {{in}}/wider.state", "EVA state", None),
    ("state pt2 without data", "{model} --state {in}/mlp.state --format pt2", "--data", None),
]


def _tree(root: Path) -> list[tuple[str, bytes | None]]:
    """Everything under ``root``: a "nothing written" check compares this before and after."""
    return sorted(
        (str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*")
    )


def _case(name: str, args: str, words: str, where: str | None) -> pytest.param:
    marks = []
    if name in BEING_FIXED:  # remove from BEING_FIXED when the fix lands (strict: XPASS fails)
        reason = f"issue 12 item {BEING_FIXED[name]}: being fixed"
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    if name == "device cuda":
        marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"))
    return pytest.param(args, words, where, id=name, marks=marks)


@pytest.mark.parametrize("args,words,where", [_case(*row) for row in BAD])
def test_cli_bad_inputs_table(bad, tmp_path, args, words, where):
    work = tmp_path / "w"
    work.mkdir()
    out = work / "out"
    if where == "file":
        out.write_text("mine")
    elif where == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif where == "parent file":
        (work / "f").write_text("mine")
        out = work / "f" / "out"
    elif where == "loop":
        out.symlink_to(out)
    elif where == "in":  # the model inside OUTDIR, which --force would replace
        out.mkdir()
        (out / "m.pt2").write_bytes(Path(bad["model"]).read_bytes())
        bad = {**bad, "out": str(out)}
    before = _tree(work)
    argv = shlex.split(args.format(**bad)) + ["-o", str(out)]
    result = cli(*argv)
    assert words in error_line(result.exit_code, result.output, result.exception)
    assert _tree(work) == before  # nothing written, no .out.* temporary left


def error_line(code: int, output: str, exception: BaseException | None = None) -> str:
    """The run's one ``Error:`` line, after checking it failed cleanly (no traceback)."""
    assert code != 0, output
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A model whose weights (1 MB, in its output layer) dwarf its adapter and statistics, as
    model.pt2 and as a pickle, with data: a small disk fills while writing the model."""
    d = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8192)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.randn(8, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, d / "wide.pt2")
    torch.save(model, d / "wide.pt")
    save_file({"x": torch.randn(64, 64)}, str(d / "data.safetensors"))
    return d


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a fresh tmpfs of that size (skips where mounting is not allowed)."""
    mounted = []

    def mount(size: str) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a small tmpfs needs root")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:  # lazily: a failed test's traceback may still hold a file open there
        subprocess.run(["umount", "--lazy", str(disk)], check=False, capture_output=True)


def _limit_file_size(limit: int):
    """For a child process: writes past ``limit`` bytes fail with EFBIG (as a full disk)."""

    import resource  # POSIX only

    def limit_child() -> None:
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the writer

    return limit_child


@pytest.mark.parametrize(
    "fmt,model,size,process",
    [
        # torch's zip writer aborted the process here (exit 134): only a real process shows it
        pytest.param("pt2", "wide.pt2", "512k", True, id="pt2 on a full disk"),
        pytest.param("pt2", "wide.pt2", None, True, id="pt2 past the file size limit"),
        pytest.param("safetensors", "wide.pt2", "4k", False, id="safetensors on a full disk"),
        pytest.param("pickle", "wide.pt", "512k", False, id="pickle on a full disk"),
    ],
)
def test_cli_disk_full_is_an_output_error(wide, small_disk, tmp_path, fmt, model, size, process):
    disk = small_disk(size) if size else tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    args = [str(wide / model), "--data", str(wide / "data.safetensors"), "--budget", "2"]
    args += ["--format", fmt, "--allow-pickle", "-o", str(disk / "out"), "-q"]
    if process:
        proc = subprocess.run(
            [*evagraph_cmd(), "compile", *args],
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=None if size else _limit_file_size(256 * 1024),
        )
        line = error_line(proc.returncode, proc.stdout + proc.stderr)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = CliRunner().invoke(main, ["compile", *args])
        line = error_line(result.exit_code, result.output, result.exception)
    assert line.startswith(f"Error: cannot write output {disk / 'out'}")
    assert ("File too large" if size is None else "No space left on device") in line
    assert list(disk.iterdir()) == []  # nothing left behind, not even the temporary directory


# -- Python API: the same mistakes as EvagraphError, with a reason ---------------------------


def test_device_is_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="device 'bogus' is not a torch device"):
        resolve_device("bogus")
    with pytest.raises(ConfigError, match="device 'cuda:99'"):
        resolve_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda' is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_string_is_one_pattern():
    assert patterns("stem") == ("stem",)
    assert patterns(["a.*", "b"]) == patterns(("a.*", "b")) == ("a.*", "b")
    assert patterns(None) is None
    for wrong in (3, b"stem", {"stem": 1}, ["stem", 2]):
        with pytest.raises(ConfigError, match="exclude"):
            patterns(wrong, "exclude")


def named_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = {"stem": nn.Linear(16, 32), "act": nn.ReLU(), "body": nn.Linear(32, 32)}
    return nn.Sequential(OrderedDict({**layers, "head": nn.Linear(32, 4)}))


def test_targets_given_as_a_string():
    _, report = quiet(transform, named_mlp(), batches(), targets="stem", exclude="body")
    assert [layer.name for layer in report.layers] == ["stem"]
    calibration = report.settings["calibration"]
    assert calibration["targets"] == ["stem"] and calibration["exclude"] == ["body"]


USER_MODEL = """
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * float(x.numpy().std())  # the user's line
"""


def test_capture_error_points_into_a_user_folder_named_evagraph(tmp_path):
    # git clones this repository into "evagraph/": the user's code may live under such a
    # folder, and must still be what the error points at.
    source = tmp_path / "evagraph" / "user_model.py"
    source.parent.mkdir()
    source.write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("user_model", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(CaptureError) as info:
        quiet(transform, module.Branchy(), batches())
    line = "return self.lin(x) * float(x.numpy().std())  # the user's line"
    assert f"at user_model.py:11 in forward: `{line}`" in str(info.value)


def test_report_load_errors_are_evagraph_errors(tmp_path):
    cases = {
        "missing.json": None,
        "binary.json": b"\xff\xfe\x00garbage",
        "list.json": b"[1, 2]",
        "deep.json": b"[" * 100_000,
        "rows.json": json.dumps({"layers": [], "settings": {}, "skipped": {}, "groups": {},
                                 "rows": [], "batches": {}, "steps": 1}).encode(),
    }  # fmt: skip
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ReportLoadError) as info:
            evagraph.Report.load(path)
        assert isinstance(info.value, ModelLoadError) and isinstance(info.value, ValueError)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        if content is not None:  # and the CLI says it in one line
            (tmp_path / "out").mkdir(exist_ok=True)
            shutil.copy(path, tmp_path / "out" / "report.json")
            result = CliRunner().invoke(main, ["report", str(tmp_path / "out")])
            error_line(result.exit_code, result.output, result.exception)
