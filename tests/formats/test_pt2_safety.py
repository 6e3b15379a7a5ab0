"""A crafted .pt2 runs no code: each way torch.export.load would run some, with a marker file.

Every archive is the bundled example with one part replaced by a payload that creates a marker
file when unpickled or evaluated. Without --allow-pickle the marker must never appear, through
``load_model`` and through ``evagraph compile``; a refusal names the archive entry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shlex
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import evagraph_cmd
from torch import nn

from evagraph.cli import main
from evagraph.errors import ModelLoadError
from evagraph.formats.pt2 import load_exported_program
from evagraph.loading import load_model

Files = dict[str, bytes]  # archive entries without the archive's top folder


def touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


class Payload:
    """Unpickling this runs ``touch marker`` (what an attacker's archive would carry)."""

    def __init__(self, marker: Path) -> None:
        self.command = touch(marker)

    def __reduce__(self):
        return (os.system, (self.command,))


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def craft(example: Path, dst: Path, edit: Callable[[Files], None]) -> Path:
    """Copy the example archive to ``dst`` with its entries changed by ``edit``."""
    with zipfile.ZipFile(example / "tiny_cnn.pt2") as src:
        top = src.namelist()[0].split("/")[0] + "/"
        files = {name[len(top) :]: src.read(name) for name in src.namelist()}
    edit(files)
    with zipfile.ZipFile(dst, "w") as out:
        for name, data in files.items():
            out.writestr(top + name, data)
    return dst


def edit_json(files: Files, name: str, change: Callable[[dict], None]) -> None:
    data = json.loads(files[name])
    change(data)
    files[name] = json.dumps(data).encode()


def pickled_weight(files: Files, payload: bytes) -> None:
    config = "data/weights/model_weights_config.json"
    edit_json(files, config, lambda c: c["config"]["stem.bias"].update(use_pickle=True))
    files["data/weights/weight_1"] = payload  # stem.bias


def constant(files: Files, path_name: str, payload: bytes) -> None:
    meta = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}
    config = "data/constants/model_constants_config.json"
    edit_json(files, config, lambda c: c["config"].update(extra=meta))
    files[f"data/constants/{path_name}"] = payload


def in_graph(files: Files, old: str, new: str) -> None:
    text = files["models/model.json"].decode()
    assert old in text
    files["models/model.json"] = text.replace(old, new).encode()


# variant -> (edit(files, marker), refused entry or None when it loads with the payload unused)
VARIANTS: dict[str, tuple[Callable[[Files, Path], None], str | None]] = {
    "sample-inputs": (
        lambda f, m: f.update({"data/sample_inputs/model.pt": saved(((Payload(m),), {}))}),
        None,
    ),
    "pickled-weight": (
        lambda f, m: pickled_weight(f, saved(Payload(m))),
        "data/weights/weight_1",
    ),
    "legacy-weights": (
        lambda f, m: f.update({"data/weights/model.pt": saved({"stem.bias": Payload(m)})}),
        "data/weights/model.pt",
    ),
    "pickled-constant": (
        lambda f, m: constant(f, "tensor_constant_0", saved(Payload(m))),
        "data/constants/tensor_constant_0",
    ),
    "opaque-object-constant": (
        lambda f, m: constant(f, "opaque_obj_0", pickle.dumps(Payload(m))),
        "data/constants/opaque_obj_0",
    ),
    "custom-object-constant": (
        lambda f, m: constant(f, "custom_obj_0", saved(Payload(m))),
        "data/constants/custom_obj_0",
    ),
    # torch's loader eval-s shape expressions (sympy.sympify) ...
    "sympy-expression": (
        lambda f, m: in_graph(
            f,
            "Symbol('s77', positive=True, integer=True)",
            f"__import__('os').system({touch(m)!r})",
        ),
        "models/model.json",
    ),
    # ... pastes input names into the Python source it generates ...
    "input-name": (
        lambda f, m: in_graph(f, '"x"', json.dumps(f"x=__import__('os').system({touch(m)!r})")),
        "models/model.json",
    ),
    # ... and exec-s guards when it has the sample inputs.
    "guards": (
        lambda f, m: edit_json(
            f,
            "models/model.json",
            lambda p: p.update(guards_code=[f"__import__('os').system({touch(m)!r}) == 0"]),
        ),
        None,
    ),
}


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def run_compile(example: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*evagraph_cmd(), "compile", str(model), "--data", str(example / "calib.safetensors")]
    return subprocess.run(
        [*cmd, "--budget", "2", "-o", str(out), "--quiet", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_loader_runs_the_payload(example, tmp_path, marker, variant):
    """The crafted archives are real attacks: torch.export.load runs them (controls)."""
    edit, _ = VARIANTS[variant]
    if variant == "custom-object-constant":
        pytest.skip("TorchScript's unpickler refuses os.system; evagraph refuses the entry anyway")
    path = craft(example, tmp_path / "x.pt2", lambda f: edit(f, marker))
    with contextlib.suppress(Exception):  # several payloads break loading, after they ran
        torch.export.load(str(path)).module()(torch.randn(2, 3, 32, 32))
    assert marker.exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_model_runs_no_code(example, tmp_path, marker, variant):
    edit, entry = VARIANTS[variant]
    path = craft(example, tmp_path / "x.pt2", lambda f: edit(f, marker))
    if entry is None:  # the payload's part is never read (or never becomes code)
        module, kind = load_model(path)
        assert kind == "pt2" and module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    else:
        with pytest.raises(ModelLoadError) as err:
            load_model(path)
        message = str(err.value)
        assert f"tiny_cnn/{entry}" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compile_runs_no_code(example, tmp_path, marker, variant):
    edit, entry = VARIANTS[variant]
    path = craft(example, tmp_path / "x.pt2", lambda f: edit(f, marker))
    out = tmp_path / "out"
    args = ["compile", str(path), "--data", str(example / "calib.safetensors")]
    result = CliRunner().invoke(main, [*args, "--budget", "2", "-o", str(out), "--quiet"])
    assert "Traceback" not in result.stderr and not isinstance(result.exception, Exception)
    if entry is None:
        assert result.exit_code == 0, result.stderr
    else:
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: ") and f"tiny_cnn/{entry}" in lines[0]
        assert "--allow-pickle" in lines[0] and not out.exists()
    assert not marker.exists()


def test_the_issues_reproduction_in_a_real_process(example, tmp_path, marker):
    """The report's attack as reported: sample inputs carrying a payload, `evagraph compile`."""
    edit, _ = VARIANTS["sample-inputs"]
    path = craft(example, tmp_path / "x.pt2", lambda f: edit(f, marker))
    proc = run_compile(example, path, tmp_path / "out")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_allow_pickle_unlocks_a_refused_entry(example, tmp_path, marker):
    """The flag is what stands between the file and its code: with it, the pickle is run."""
    edit, _ = VARIANTS["pickled-weight"]
    path = craft(example, tmp_path / "x.pt2", lambda f: edit(f, marker))
    with pytest.raises(ModelLoadError, match="Parameter"):  # os.system returned 0
        load_model(path, allow_pickle=True)
    assert marker.exists()


def original_bias(files: Files) -> nn.Parameter:
    data = bytearray(files["data/weights/weight_1"])
    return nn.Parameter(torch.frombuffer(data, dtype=torch.float32).clone())


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize(
    "legit",
    [
        lambda f: pickled_weight(f, saved(original_bias(f))),
        lambda f: constant(f, "tensor_constant_0", saved(torch.ones(3))),
        lambda f: f.update({"data/sample_inputs/model.pt": b"not even a pickle"}),
    ],
    ids=["pickled-weight", "pickled-constant", "damaged-sample-inputs"],
)
def test_tensors_that_the_safe_unpickler_reads_load(example, tmp_path, legit, allow_pickle):
    """torch pickles some tensors (subclasses, old archives): plain ones load with or without
    the flag, and give the model the original weights."""
    path = craft(example, tmp_path / "x.pt2", legit)
    x = torch.randn(2, 3, 32, 32)
    expected = load_exported_program(example / "tiny_cnn.pt2").module()(x)
    module, _ = load_model(path, allow_pickle=allow_pickle)
    torch.testing.assert_close(module(x), expected)


def test_legacy_weights_file_loads_with_the_safe_unpickler(example, tmp_path):
    state = dict(load_exported_program(example / "tiny_cnn.pt2").state_dict)

    def legacy(files: Files) -> None:
        for name in [n for n in files if n.startswith("data/weights/")]:
            del files[name]
        files["data/weights/model.pt"] = saved(state)

    x = torch.randn(2, 3, 32, 32)
    module, _ = load_model(craft(example, tmp_path / "x.pt2", legacy))
    torch.testing.assert_close(module(x), load_model(example / "tiny_cnn.pt2")[0](x))


def test_real_exports_pass_the_graph_checks(tmp_path):
    """Dynamic and derived dims (guards, sympy expressions), dict inputs, ModuleList and
    ModuleDict names, a lifted constant and a string argument all load and compute the same."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
            self.named = nn.ModuleDict({"my-layer": nn.Linear(8, 8)})
            self.constant = torch.ones(8)

        def forward(self, inputs, y):
            h = self.layers[1](self.layers[0](inputs["a"])) + self.constant
            h = torch.div(self.named["my-layer"](h), 2.0, rounding_mode="floor")
            return {"out": h[: y.shape[0] * 2], "total": h.sum()}

    d = torch.export.Dim("d", min=1, max=30)
    args = ({"a": torch.randn(8, 8)}, torch.randn(4, 3))
    program = torch.export.export(Model(), args, dynamic_shapes=({"a": {0: 2 * d}}, {0: d}))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = load_exported_program(tmp_path / "m.pt2")
    assert loaded.constants and loaded.range_constraints
    for a, b in [(8, 4), (12, 6)]:
        x = ({"a": torch.randn(a, 8)}, torch.randn(b, 3))
        torch.testing.assert_close(loaded.module()(*x), program.module()(*x))


def other_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/b", "x")


@pytest.mark.parametrize(
    "damage,says",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:5000]), "not a zip file"),
        (lambda p: p.write_text("hello"), "not a zip file"),
        (lambda p: other_zip(p), "not a torch.export archive"),
        (lambda p: p.write_bytes(b""), "not a zip file"),
    ],
    ids=["truncated", "text", "other-zip", "empty"],
)
def test_malformed_archive_is_one_line(example, tmp_path, damage, says):
    path = tmp_path / "bad.pt2"
    path.write_bytes((example / "tiny_cnn.pt2").read_bytes())
    damage(path)
    with pytest.raises(ModelLoadError, match=says):
        load_model(path)
    proc = run_compile(example, path, tmp_path / "out")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"Error: cannot read torch.export archive {path}") or (
        proc.stderr.startswith(f"Error: {path} is a zip file")
    )


def test_damaged_entry_is_one_line_with_no_logged_traceback(example, tmp_path):
    path = craft(
        example, tmp_path / "x.pt2", lambda f: f.update({"models/model.json": b"{not json"})
    )
    proc = run_compile(example, path, tmp_path / "out")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot load torch.export archive" in proc.stderr
    assert "Ran into the following error" not in proc.stderr
