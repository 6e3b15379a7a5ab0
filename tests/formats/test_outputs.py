"""write_outputs: the OUTDIR ``evagraph compile`` writes, from Python, byte for byte; and a
format registered from outside the package, used by write_outputs and by ``--format``."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import evagraph
from evagraph.cli import main
from evagraph.data import load_calibration
from evagraph.formats import WRITERS, register_writer, write_outputs
from evagraph.loading import load_model


def _comparable(path: Path) -> bytes:
    """The bytes of an output, less what differs from run to run: the seconds a run took
    (report.json's run.elapsed_s, report.html's line), and in a .pt2 the random id torch
    writes and the ids of the graphs it traced."""
    data = path.read_bytes()
    if path.name == "report.json":
        report = json.loads(data)
        del report["run"]["elapsed_s"]
        return json.dumps(report).encode()
    if path.name == "report.html":
        return re.sub(rb"; [0-9.]+ s;", b";", data)
    if path.suffix == ".pt2":
        with zipfile.ZipFile(path) as archive:
            entries = [
                name.encode() + b"\0" + re.sub(rb'graph_id\\": [0-9]+', b"", archive.read(name))
                for name in sorted(archive.namelist())
                if not name.endswith("serialization_id")
            ]
        return b"\1".join(entries)
    return data


def _python_outdir(model: Path, data: Path, out: Path, fmt: str, **settings) -> list[str]:
    """What ``compile MODEL --data DATA --format FMT`` does, through the Python API."""
    random.seed(0)
    torch.manual_seed(0)
    module, _ = load_model(model)
    batches = load_calibration(data, 8)
    adapted, report, state = evagraph.transform(
        module, batches, progress=False, inplace=True, return_state=True, **settings
    )
    report.run.update(model=str(model), data=str(data))
    return write_outputs(adapted, report, state, out, fmt, example=batches[0])


def _cli_outdir(model: Path, data: Path, out: Path, fmt: str) -> str:
    args = ["compile", str(model), "--data", str(data), "--format", fmt, "-o", str(out), "-q"]
    result = CliRunner().invoke(main, [*args, "--budget", "4", "--rho", "2"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    "which, fmt", [("cnn", "pt2"), ("cnn", "safetensors"), ("llama", "peft")]
)  # fmt: skip
def test_write_outputs_writes_the_outdir_compile_writes(which, fmt, example, hf_dir, tmp_path):
    if which == "cnn":
        model, data = example / "tiny_cnn.pt2", example / "calib.safetensors"
    else:
        vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        ids = torch.randint(4, vocab, (16, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[::2, 9:] = 0
        model, data = hf_dir, tmp_path / "tokens.safetensors"
        save_file({"input_ids": ids, "attention_mask": mask}, str(data))
    said = _cli_outdir(model, data, tmp_path / "cli", fmt)
    written = _python_outdir(
        model, data, tmp_path / "py", fmt, budget=4, rho=2.0
    )  # a float, as --rho
    assert f"wrote {tmp_path / 'cli'}/{{{', '.join(written)}}}" in said
    files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert files == sorted(written) == sorted(p.name for p in (tmp_path / "py").iterdir())
    for name in files:
        cli, py = tmp_path / "cli" / name, tmp_path / "py" / name
        assert _comparable(cli) == _comparable(py), name


def _toy(adapted: torch.nn.Module, outdir: Path, example: object) -> list[str]:
    """A format from outside the package: the adapted layers' names, one a line."""
    names = [m.layer_name for m in adapted.modules() if isinstance(m, evagraph.LoraAdapter)]
    (outdir / "toy.txt").write_text("".join(f"{name}\n" for name in names))
    return ["toy.txt"]


def test_a_format_registered_outside_the_package(example, tmp_path, monkeypatch):
    model, data = example / "tiny_cnn.pt2", example / "calib.safetensors"
    monkeypatch.setitem(WRITERS, "toy", None)  # put back as it was after the test
    register_writer("toy", _toy)
    written = _python_outdir(model, data, tmp_path / "py", "toy", budget=4, rho=2.0)
    assert written[-1] == "toy.txt" and "model.pt2" not in written
    assert (tmp_path / "py" / "toy.txt").read_text().splitlines() == ["stem", "conv1", "conv2",
                                                                     "proj", "gate"]  # fmt: skip
    # The command line offers it as --format toy when it is registered before evagraph.cli
    # is imported (its --format choice reads WRITERS).
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import evagraph.formats

        def toy(adapted, outdir, example):
            (Path(outdir) / "toy.txt").write_text("from the command line")
            return ["toy.txt"]

        evagraph.formats.register_writer("toy", toy)
        from evagraph.cli import main
        main(sys.argv[1:])
        """
    )
    out = tmp_path / "cli"
    args = ["compile", str(model), "--data", str(data), "--format", "toy", "-o", str(out), "-q"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "toy.txt").read_text() == "from the command line"
    assert proc.stdout.rstrip().endswith(", toy.txt}"), proc.stdout
    unknown = CliRunner().invoke(main, ["compile", str(model), "--format", "nope"])
    assert unknown.exit_code != 0 and "'nope' is not one of" in unknown.output
