import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SharedMLP, evagraph_cmd
from safetensors.torch import load_file, save_file

from evagraph.formats.pt2 import load_exported_program

# compile draws its report: report.html, and report.png where matplotlib is installed
PICTURES = ["report.html"] + (["report.png"] if importlib.util.find_spec("matplotlib") else [])


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*evagraph_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_compile_bundled_example_writes_three_outputs(example, tmp_path):
    out = tmp_path / "out"
    proc = run(
        "compile",
        str(example / "tiny_cnn.pt2"),
        "--data",
        str(example / "calib.safetensors"),
        "--budget",
        "4",
        "--rho",
        "2",
        "-o",
        str(out),
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter.json", "adapter.safetensors", "eva_state.safetensors", "model.pt2", "report.json"]
        + PICTURES
    )
    report = json.loads((out / "report.json").read_text())
    ranks = {layer["name"]: layer["rank"] for layer in report["layers"]}
    assert sum(ranks.values()) == 4 * len(ranks) and "head" in report["skipped"]
    adapter = load_file(str(out / "adapter.safetensors"))
    assert set(adapter) == {f"{n}.lora_{m}.weight" for n, r in ranks.items() if r for m in "AB"}
    original = load_exported_program(example / "tiny_cnn.pt2").module()
    adapted = load_exported_program(out / "model.pt2").module()
    x = load_file(str(example / "calib.safetensors"))["x"][:8]
    torch.testing.assert_close(adapted(x), original(x), atol=1e-5, rtol=1e-5)
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temp left

    # saved statistics: another budget and rho without the data
    proc = run(
        "compile",
        str(example / "tiny_cnn.pt2"),
        "--state",
        str(out / "eva_state.safetensors"),
        "--budget",
        "2",
        "--rho",
        "1",
        "--format",
        "safetensors",
        "-o",
        str(tmp_path / "again"),
        "-q",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert {layer["rank"] for layer in again["layers"]} == {2}
    assert again["rows"] == report["rows"]


@pytest.mark.parametrize(
    "flags,reason",
    [
        (["--rho", "0.5"], "rho must be >= 1"),
        (["--budget", "0"], "budget must be a positive integer"),
        (["--tau", "1.5"], "tau must be in (0, 1]"),
    ],
)
def test_bad_flags_exit_nonzero_with_one_line(example, tmp_path, flags, reason):
    proc = run(
        "compile",
        str(example / "tiny_cnn.pt2"),
        "--data",
        str(example / "calib.safetensors"),
        "-o",
        str(tmp_path / "o"),
        *flags,
        cwd=tmp_path,
    )
    assert reason in one_line_error(proc)
    assert not (tmp_path / "o").exists()


def test_missing_data_file(example, tmp_path):
    proc = run(
        "compile",
        str(example / "tiny_cnn.pt2"),
        "--data",
        "nope.pt",
        "-o",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert "calibration data file not found" in one_line_error(proc)


def test_pickle_needs_opt_in_and_payload_is_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    torch.save(SharedMLP().eval(), tmp_path / "mlp.pt")
    save_file({"x": torch.randn(32, 16)}, str(tmp_path / "calib.safetensors"))
    proc = run("compile", "evil.pt", "--data", "calib.safetensors", "-o", "o", cwd=tmp_path)
    assert "--allow-pickle" in one_line_error(proc) and not marker.exists()
    proc = run("compile", "mlp.pt", "--data", "calib.safetensors", "-o", "o", cwd=tmp_path)
    assert "whole-module pickle" in one_line_error(proc)
    # conftest defines SharedMLP: the unpickling process must be able to import it
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    pickle_ok = ("mlp.pt", "--data", "calib.safetensors", "-o", "o", "--allow-pickle")
    proc = run("compile", *pickle_ok, "-q", "--budget", "2", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "model.pt").exists()
    # an existing, non-empty output directory is refused without --force
    proc = run("compile", *pickle_ok, cwd=tmp_path, env=env)
    assert "--force" in one_line_error(proc)


def test_help_explains_the_options():
    proc = subprocess.run(
        [*evagraph_cmd(), "compile", "--help"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0
    for flag in ("--budget", "--rho", "--tau", "--data", "--allow-pickle", "--quiet"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_compile_hf_directory_to_pt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    ids = torch.randint(3, 100, (12, 10))
    mask = torch.ones(12, 10, dtype=torch.long)
    mask[::2, 7:] = 0
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "tokens.safetensors"))
    proc = run(
        "compile",
        "llama",
        "--data",
        "tokens.safetensors",
        "--batch-size",
        "4",
        "--format",
        "pt2",
        "--budget",
        "2",
        "-o",
        "out",
        "-q",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["capture"] == "export" and "lm_head" in report["skipped"]
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    adapted = load_exported_program(tmp_path / "out" / "model.pt2").module()
    x = {"input_ids": ids[:3, :9], "attention_mask": mask[:3, :9]}
    with torch.no_grad():
        torch.testing.assert_close(adapted(**x).logits, base(**x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compile_timm_name_with_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    import evagraph

    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "rn18.safetensors"))
    torch.save(torch.randn(6, 3, 32, 32), tmp_path / "images.pt")
    proc = run(
        "compile",
        "resnet18",
        "--checkpoint",
        "rn18.safetensors",
        "--data",
        "images.pt",
        "--batch-size",
        "2",
        "--budget",
        "2",
        "-o",
        "out",
        "-q",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["adapter.json", "adapter.safetensors", "eva_state.safetensors", "report.json"] + PICTURES
    )
    base = timm.create_model("resnet18")
    base.load_state_dict(load_file(str(tmp_path / "rn18.safetensors")))
    base.eval()
    adapted = evagraph.apply_adapter(base, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    n_lora = sum(isinstance(m, evagraph.LoraAdapter) for m in adapted.modules())
    assert n_lora == sum(1 for layer in report["layers"] if layer["rank"]) > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), base(x))


def test_unknown_model_name(tmp_path):
    save_file({"x": torch.randn(4, 3)}, str(tmp_path / "d.safetensors"))
    proc = run("compile", "no_such_model_xyz", "--data", "d.safetensors", "-o", "o", cwd=tmp_path)
    assert "neither a file, a directory, nor a timm model name" in one_line_error(proc)


def test_warnings_are_one_line(example, tmp_path):
    # Python would print the warning with the source line that raised it under it.
    proc = run(
        "compile", str(example / "tiny_cnn.pt2"), "--data", str(example / "calib.safetensors"),
        "--max-steps", "1", "--batch-size", "32", "--format", "safetensors", "-o", "o", "-q",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "not converged" in line]
    assert len(warned) == 1 and warned[0].startswith("evagraph: warning: "), proc.stderr
    assert "warnings.warn" not in proc.stderr and "ConvergenceWarning" not in proc.stderr
