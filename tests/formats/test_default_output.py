"""`evagraph compile` without -o: MODEL.eva next to the model, never over an existing output."""

import shutil
import warnings
from pathlib import Path

from click.testing import CliRunner

from evagraph import ConvergenceWarning
from evagraph.cli import main
from evagraph.formats.outdir import default_output


def test_default_output_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pt2").write_bytes(b"x")
    (tmp_path / "my-llama").mkdir()
    assert default_output(str(tmp_path / "model.pt2")) == tmp_path / "model.eva"
    assert default_output("model.pt2") == Path("model.eva")
    assert default_output("./my-llama") == Path("my-llama.eva")
    assert default_output("./my-llama/") == Path("my-llama.eva")
    assert default_output("resnet18") == Path("resnet18.eva")  # a timm name: here
    assert default_output("hf-hub:org/vit") == Path("hf-hub_org_vit.eva")
    (tmp_path / "my-llama" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "my-llama")
    assert default_output(".") == tmp_path / "my-llama.eva"  # beside it, not inside


def test_default_output_is_never_an_existing_one(tmp_path):
    model = tmp_path / "model.pt2"
    model.write_bytes(b"x")
    (tmp_path / "model.eva").mkdir()  # empty: taken as it is
    assert default_output(str(model)) == tmp_path / "model.eva"
    (tmp_path / "model.eva" / "report.json").write_text("{}")
    assert default_output(str(model)) == tmp_path / "model.eva-2"
    (tmp_path / "model.eva-2").write_text("a file")
    assert default_output(str(model)) == tmp_path / "model.eva-3"
    assert default_output(str(model), force=True) == tmp_path / "model.eva"


def test_compile_without_output_writes_beside_the_model(example, tmp_path, monkeypatch):
    shutil.copy(example / "tiny_cnn.pt2", tmp_path / "model.pt2")
    monkeypatch.chdir(tmp_path)
    args = ["compile", "model.pt2", "--data", str(example / "calib.safetensors")]
    args += ["--budget", "2", "--rho", "2", "--max-steps", "2", "--batch-size", "32", "-q"]
    for expected in ("model.eva", "model.eva-2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert f"evagraph: writing to {expected}\n" in result.stderr
        assert (tmp_path / expected / "adapter.safetensors").is_file()
        assert f"wrote {expected}/" in result.stdout
    # -o is as before, and says nothing about a default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = CliRunner().invoke(main, [*args, "-o", "chosen"])
    assert result.exit_code == 0, result.output
    assert "writing to" not in result.stderr and (tmp_path / "chosen" / "report.json").is_file()
    # a run that fails while loading does not say it was writing anywhere (issue 29 item 13)
    result = CliRunner().invoke(main, ["compile", "model.pt2", "--data", "missing.pt"])
    assert result.exit_code != 0 and "writing to" not in result.stderr, result.stderr
