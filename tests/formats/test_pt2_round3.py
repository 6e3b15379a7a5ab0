"""A crafted .pt2, round 3 (issue 28 items 2, 3, 5, 10a): call targets, shape expressions,
damaged archives, an expression that never finishes, and a fuzz over all of them.

Each attack is shown to work against torch's own loader first (a control), then refused by
evagraph with one line naming the archive entry (and node); marker files and captured output
prove that nothing from the file ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shlex
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import SharedMLP
from test_pt2_safety import craft, edit_json, in_graph
from torch import nn

import evagraph
from evagraph.errors import EvagraphError, ModelLoadError
from evagraph.formats.pt2 import (
    _HIGHER_ORDER,
    _Expression,
    _target_problem,
    check_batches,
    input_shapes,
    load_exported_program,
)
from evagraph.loading import load_model
from evagraph.runtime import check_batch_fits

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
S77 = "Symbol('s77', positive=True, integer=True)"  # the example's dynamic batch size
IMPORTS_BY_NAME = "torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def entries(path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """The archive's top folder and its (name, data) entries, names without the folder."""
    with zipfile.ZipFile(path) as src:
        top = src.namelist()[0].split("/")[0] + "/"
        return top, [(info.filename[len(top) :], src.read(info)) for info in src.infolist()]


def write_zip(dst: Path, top: str, items: list[tuple[str, bytes]], method: int = 0) -> Path:
    with warnings.catch_warnings():  # zipfile warns on the duplicate names some tests want
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(dst, "w", compression=method) as out:
            for name, data in items:
                out.writestr(top + name, data)
    return dst


def data_offset(path: Path, name: str) -> int:
    """Where the stored bytes of entry ``name`` start in the file (after its local header)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    return info.header_offset + 30 + name_len + extra_len


def leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_same(a, b) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        torch.testing.assert_close(x, y)


# --- Item 2: call targets --------------------------------------------------------------------


@pytest.fixture
def importable(tmp_path, monkeypatch):
    """An installed-looking module whose import creates a marker file: what a node calling
    torch's import-by-name helper imports. Yields (module name, marker)."""
    name = f"evagraph_marker_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "IMPORTED"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(
        textwrap.dedent(f"""
        import pathlib
        import torch
        pathlib.Path({str(marker)!r}).touch()

        class Relu(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.relu()
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield name, marker
    sys.modules.pop(name, None)


def first_node(program: dict, target: str) -> dict:
    return next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == target)


def call_by_name(files, function: str, target: str = IMPORTS_BY_NAME) -> None:
    """The example's first relu node becomes ``target("function", x)``."""

    def change(program: dict) -> None:
        node = first_node(program, "torch.ops.aten.relu.default")
        node["target"] = target
        tensor = {**node["inputs"][0], "name": ""}
        node["inputs"] = [{"name": "", "arg": {"as_string": function}, "kind": 1}, tensor]

    edit_json(files, "models/model.json", change)


def test_node_importing_a_module_by_name_is_refused(example, tmp_path, importable):
    """The issue's attack: torch's verifier allows _call_custom_autograd_function_in_pre_dispatch,
    which imports the module its string argument names and calls its ``.apply``."""
    name, marker = importable
    path = craft(example, tmp_path / "x.pt2", lambda f: call_by_name(f, f"{name}.Relu"))
    # Control: the file, trusted (--allow-pickle), imports the module when the graph runs.
    trusted = load_exported_program(path, allow_pickle=True).module()
    torch.testing.assert_close(trusted(X), load_model(example / "tiny_cnn.pt2")[0](X))
    assert marker.exists()
    marker.unlink()
    sys.modules.pop(name)

    for load in (load_model, load_exported_program):
        with pytest.raises(ModelLoadError) as err:
            load(path)
        message = one_line(err)
        assert "tiny_cnn/models/model.json" in message and "node relu" in message
        assert IMPORTS_BY_NAME in message and "--allow-pickle" in message
    assert not marker.exists() and name not in sys.modules


@pytest.mark.parametrize(
    "target,says",
    [
        (IMPORTS_BY_NAME, "could be any Python function"),
        ("torch.load", "could be any Python function"),
        ("torch.hub.load", "could be any Python function"),
        ("_operator.call", "could be any Python function"),  # operator.call(f, *args)
        ("math.prod", "could be any Python function"),
        ("builtins.eval", "could be any Python function"),
        ("torch.ops.aten.relu", "could be any Python function"),  # a packet, not an overload
        ("torch.ops.mylib.relu.default", "custom operator (mylib::relu)"),
        ("torch.ops.aten.from_file.default", "reads or writes files"),
        ("torch.ops.higher_order.flat_apply", "higher-order operator"),
        ("torch.ops.higher_order.invoke_leaf_function", "higher-order operator"),
        ("torch.ops.aten.no_such_op.default", "this torch does not have"),
    ],
)
def test_targets_outside_the_allow_list_are_refused(example, tmp_path, target, says):
    path = craft(example, tmp_path / "x.pt2", lambda f: call_by_name(f, "this.X", target))
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    message = one_line(err)
    assert f"node relu calls {target!r}" in message and says in message


def test_operator_argument_outside_the_allow_list_is_refused(example, tmp_path):
    """An operator may also arrive as an argument (auto_functionalized, with_effects, ...)."""

    def change(program: dict) -> None:
        node = first_node(program, "torch.ops.aten.relu.default")
        node["target"] = "torch.ops.higher_order.auto_functionalized"
        node["inputs"].insert(0, {"name": "", "arg": {"as_operator": "torch.load"}, "kind": 1})

    path = craft(example, tmp_path / "x.pt2", lambda f: edit_json(f, "models/model.json", change))
    with pytest.raises(ModelLoadError, match="an operator argument calls 'torch.load'") as err:
        load_model(path)
    one_line(err)


def test_misnamed_operator_argument_is_refused(example, tmp_path):
    """torch matches arguments to the operator's schema by name and drops the rest silently:
    conv2d with its bias renamed would run without the bias."""

    def change(program: dict) -> None:
        node = first_node(program, "torch.ops.aten.conv2d.default")
        node["inputs"][2]["name"] = "bias_"

    path = craft(example, tmp_path / "x.pt2", lambda f: edit_json(f, "models/model.json", change))
    with pytest.raises(ModelLoadError, match="passes aten::conv2d an argument it does not have"):
        load_model(path)


def test_subgraph_targets_are_checked(tmp_path, importable):
    """A cond's branches are graphs inside the node's arguments: their nodes are checked too."""
    name, marker = importable

    class Branchy(nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda a: a.relu(), lambda a: a.sigmoid(), (x,))

    x = torch.randn(4, 3)
    program = torch.export.export(Branchy(), (x,))
    torch.export.save(program, str(tmp_path / "cond.pt2"))
    assert_same(load_model(tmp_path / "cond.pt2")[0](x), program.module()(x))

    top, items = entries(tmp_path / "cond.pt2")
    text = dict(items)["models/model.json"].decode()
    assert text.count('"torch.ops.aten.relu.default"') == 1  # inside the true branch
    evil = json.loads(text)
    branch_node = None
    stack = [evil]
    while stack and branch_node is None:
        value = stack.pop()
        if isinstance(value, dict):
            if value.get("target") == "torch.ops.aten.relu.default":
                branch_node = value
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    branch_node["target"] = IMPORTS_BY_NAME
    branch_node["inputs"] = [
        {"name": "", "arg": {"as_string": f"{name}.Relu"}, "kind": 1},
        {**branch_node["inputs"][0], "name": ""},
    ]
    items = [(n, json.dumps(evil).encode() if n == "models/model.json" else d) for n, d in items]
    path = write_zip(tmp_path / "evil.pt2", top, items)
    with pytest.raises(ModelLoadError, match=f"calls '{IMPORTS_BY_NAME}'"):
        load_model(path)
    assert not marker.exists()


def test_allow_list_covers_what_torch_writes():
    """Every symbolic-shape operator torch's serializer writes resolves back to itself and is
    allowed; every allowed higher-order operator exists in this torch."""
    from torch._export.serde.serialize import _SYM_OPS, GraphModuleDeserializer

    deserializer = GraphModuleDeserializer()
    for op in _SYM_OPS:
        target = f"{op.__module__}.{op.__name__}"
        assert _target_problem(target) is None, target
        assert deserializer.deserialize_operator(target) is op
    for name in _HIGHER_ORDER:
        assert isinstance(getattr(torch.ops.higher_order, name), torch._ops.HigherOrderOperator)
    assert _target_problem("torch.ops.aten.add.Tensor") is None
    assert _target_problem("torch.ops.prims.convert_element_type.default") is None


class ControlFlow(nn.Module):
    """What ordinary exports hold beyond ATen ops: no_grad and autocast regions, cond,
    while_loop, symbolic-shape arithmetic, a data-dependent size with its runtime assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, n):
        with torch.no_grad():
            y = self.lin(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.lin(x).float()
        k = n.item()
        torch._check(k >= 0)
        torch._check(k < 10)
        w = torch.cond(x.sum() > 0, lambda a: a + 1, lambda a: a - 1, (y,))
        _, acc = torch._higher_order_ops.while_loop(
            lambda i, a: i < 3, lambda i, a: (i + 1, a * 2), (torch.tensor(0), x)
        )
        return w + z + acc, x.new_ones(x.shape[0] // 2 + 1, k), torch.sym_float(x.shape[0]) / 3


def real_programs(tmp_path: Path, example: Path):
    """(name, archive, program input) for each kind of real export evagraph meets."""
    from test_models import build

    yield "example", example / "tiny_cnn.pt2", (X,)
    inputs = (torch.randn(6, 4), torch.tensor(3))
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(ControlFlow(), inputs, dynamic_shapes=({0: batch}, None))
    torch.export.save(program, str(tmp_path / "control_flow.pt2"))
    yield "control-flow", tmp_path / "control_flow.pt2", inputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = SharedMLP()
        batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        adapted, _ = evagraph.transform(mlp, batches, budget=2, progress=False)
        evagraph.export(adapted, batches[0], tmp_path / "adapted.pt2")
    yield "evagraph-adapted", tmp_path / "adapted.pt2", (torch.randn(5, 16),)

    from evagraph.passes.capture import export_program

    for source, name in [
        ("hf", "llama"),
        ("hf", "gpt2"),
        ("hf", "bert"),
        ("timm", "resnet18"),
        ("timm", "vit_tiny_patch16_224"),
    ]:
        model, batches = build(source, name)
        program = export_program(model, batches[0])
        torch.export.save(program, str(tmp_path / f"{name}.pt2"))
        yield name, tmp_path / f"{name}.pt2", batches[0]


@pytest.mark.slow
def test_real_exports_load(example, tmp_path):
    """The allow-lists let real exports through: each loads and computes what torch's own
    loader computes (its shape expressions and call targets are what torch writes)."""
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    import transformers.modeling_outputs  # noqa: F401  (registers HF outputs with pytree)

    loaded = []
    for name, path, inputs in real_programs(tmp_path, example):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.export.load(str(path)).module()
            module, kind = load_model(path)
        if isinstance(inputs, dict):
            args, kwargs = (), inputs
        else:
            args, kwargs = (inputs if isinstance(inputs, tuple) else (inputs,)), {}
        with torch.no_grad():
            assert_same(module(*args, **kwargs), expected(*args, **kwargs))
        assert kind == "pt2"
        loaded.append(name)
    assert len(loaded) == 8


# --- Item 3: shape expressions ---------------------------------------------------------------


def test_builtin_as_a_sympy_argument_runs_nothing(example, tmp_path, capfd):
    """ImmutableMatrix(1, 1, print) passed the old deny-list: sympify calls print(0, 0)."""
    path = craft(
        example, tmp_path / "x.pt2", lambda f: in_graph(f, S77, "ImmutableMatrix(1, 1, print)")
    )
    with contextlib.suppress(Exception):  # control: torch's loader calls print, then fails
        torch.export.load(str(path))
    assert "0 0" in capfd.readouterr().out

    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    message = one_line(err)
    assert "tiny_cnn/models/model.json" in message and "ImmutableMatrix" in message
    assert capfd.readouterr().out == ""


@pytest.mark.parametrize(
    "expression",
    [
        "ImmutableMatrix(1, 1, exec)",
        "Max(Integer(1), eval)",
        "Add(open, Integer(1))",
        "Symbol('s0', positive=print)",
        "Mul(Integer(2), __import__)",
        "Lambda(x, x)",
        "S('1')",
        "s77.__class__",
        "Function('f')(s77)",
    ],
)
def test_builtins_and_other_callables_are_refused(example, tmp_path, expression):
    path = craft(example, tmp_path / "x.pt2", lambda f: in_graph(f, S77, expression))
    with pytest.raises(ModelLoadError, match="shape expression") as err:
        load_model(path)
    assert "tiny_cnn/models/model.json" in one_line(err)


ACCEPTED = [
    S77,
    f"Mul(Integer(2), {S77})",
    f"Add(FloorDiv(Add({S77}, Integer(-1)), Integer(2)), Integer(1))",
    f"Min(Integer(32), Mul(Integer(32), {S77}))",
    "Max(Integer(1), Symbol('u0', integer=True))",
    "LessThan(Symbol('u0', integer=True), Integer(9))",
    f"FloatTrueDiv(ToFloat({S77}), Float('3.0', precision=53))",
    f"Pow({S77}, Integer(2))",
    f"Pow({S77}, Rational(1, 2))",
    f"ModularIndexing({S77}, Integer(1), Integer(4))",
    "2*s0 + s1//3 - 1",  # str() form, older archives
    "-oo",
    "int_oo",
    "true",
]

REFUSED = [
    ("print", "neither a symbol"),
    ("ImmutableMatrix(1, 1, print)", "not an allowed function"),
    ("10**10**10", "exponent"),
    ("10^10^10", "not arithmetic"),  # sympify reads ^ as **
    ("Pow(Integer(10), Pow(Integer(10), Integer(10)))", "exponent"),
    ("PowByNatural(Integer(10), Integer(10000000000))", "exponent"),
    ("LShift(Integer(1), Integer(1000000000000))", "LShift"),
    ("((10**60)**60)**60", "bits"),
    (f"Integer({10**2000})", "literal"),
    ("Float('1e1000000')", "literal"),
    ("Float('1.5', precision=1000000000)", "precision"),
    ("Max(" + ", ".join(f"Symbol('a{i}')" for i in range(9)) + ")", "Max/Min"),
    ("Max(a, Max(b, Max(c, Max(d, Max(e, Max(f, g))))))", "Max/Min"),
    ("Add(" * 40 + "x" + ", 1)" * 40, "deeper"),
    ("s0 + " * 1000 + "1", "longer"),
    ("Integer('5')", "literal"),
    ("s0**s1", "exponent"),
    ("s0 and s1", "not arithmetic"),
    ("__builtins__", "neither a symbol"),
]


@pytest.mark.parametrize("expression", ACCEPTED)
def test_torchs_own_expressions_are_accepted(expression):
    assert _Expression().problem(expression) is None


@pytest.mark.parametrize(
    "expression,says", REFUSED, ids=[f"refused{i}" for i in range(len(REFUSED))]
)
def test_expressions_outside_bounded_arithmetic_are_refused(expression, says):
    problem = _Expression().problem(expression)
    assert problem is not None and says in problem, problem


# --- Item 10a: an expression that never finishes ---------------------------------------------

LOAD_IN_A_PROCESS = """
import sys, time
from evagraph.errors import ModelLoadError
from evagraph.loading import load_model
start = time.monotonic()
try:
    load_model(sys.argv[1])
except ModelLoadError as err:
    print(f"{type(err).__name__}: {err}")
    print(f"{time.monotonic() - start:.1f}", file=sys.stderr)
    sys.exit(3)
"""


def test_power_tower_is_refused_quickly(example, tmp_path):
    """10**10**10 in a shape expression made load_model never return (sympify evaluates it)."""
    path = craft(example, tmp_path / "x.pt2", lambda f: in_graph(f, S77, "10**10**10"))
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_PROCESS, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ModelLoadError: ")
    assert "tiny_cnn/models/model.json" in lines[0] and "10**10**10" in lines[0]
    assert float(proc.stderr.strip().splitlines()[-1]) < 5  # the load itself, not the imports


@pytest.mark.slow
def test_power_tower_hangs_torchs_loader(example, tmp_path):
    """Control: torch's own loader is still evaluating the tower when the timeout ends it."""
    path = craft(example, tmp_path / "x.pt2", lambda f: in_graph(f, S77, "10**10**10"))
    code = f"import torch; torch.export.load({str(path)!r}); print('returned')"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)


# --- Item 5: damaged archives ----------------------------------------------------------------


def test_flipped_weight_byte_fails_the_crc(example, tmp_path):
    path = tmp_path / "x.pt2"
    path.write_bytes((example / "tiny_cnn.pt2").read_bytes())
    raw = bytearray(path.read_bytes())
    where = data_offset(path, "tiny_cnn/data/weights/weight_2") + 1000
    raw[where] ^= 0x40
    path.write_bytes(bytes(raw))
    # Control: torch reads the altered weight without noticing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        altered = torch.export.load(str(path)).state_dict["conv1.weight"]
    original = load_exported_program(example / "tiny_cnn.pt2").state_dict["conv1.weight"]
    assert not torch.equal(altered, original)

    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    message = one_line(err)
    assert "tiny_cnn/data/weights/weight_2" in message and "CRC" in message


@pytest.mark.parametrize("entry", ["models/model.json", "data/weights/weight_1"])
def test_duplicated_entry_is_refused(example, tmp_path, entry):
    """Two copies of a name: torch's reader took the first, zipfile (input_shapes) the last."""
    top, items = entries(example / "tiny_cnn.pt2")
    original = dict(items)[entry]
    if entry == "models/model.json":
        other = json.loads(original)
        other["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][1]["as_int"] = 4
        copy = json.dumps(other).encode()
    else:
        copy = bytes(len(original))
    path = write_zip(tmp_path / "x.pt2", top, [*items, (entry, copy)])
    if entry == "models/model.json":  # control: the two readers see different graphs
        first = torch._C.PyTorchFileReader(str(path)).get_record(entry)
        with zipfile.ZipFile(path) as archive:
            assert first == original and archive.read(top + entry) == copy

    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert f"tiny_cnn/{entry} appears 2 times" in one_line(err)
    assert input_shapes(path) == {}  # the shape check reads no copy either


@pytest.mark.parametrize("order,says", [("big", "big-endian"), ("middle", "unknown byte order")])
def test_foreign_byte_order_is_refused(example, tmp_path, order, says):
    path = craft(example, tmp_path / "x.pt2", lambda f: f.update(byteorder=order.encode()))
    if order == "big":  # control: torch ignores the entry and reads the bytes as native
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.load(str(path))
    with pytest.raises(ModelLoadError, match=says) as err:
        load_model(path)
    assert "tiny_cnn/byteorder" in one_line(err)


def test_entry_inflating_beyond_its_tensors_is_refused_unread(example, tmp_path):
    """stem.bias (64 bytes of tensor) stored as a deflated entry of 256 MiB of zeros: refused
    from the zip directory's sizes, before anything is inflated."""
    top, items = entries(example / "tiny_cnn.pt2")
    path = tmp_path / "bomb.pt2"
    declared = 256 << 20
    with zipfile.ZipFile(path, "w") as out:
        for name, data in items:
            if name != "data/weights/weight_1":
                out.writestr(top + name, data)
                continue
            info = zipfile.ZipInfo(top + name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with out.open(info, "w", force_zip64=True) as f:
                zeros = bytes(1 << 20)
                for _ in range(declared >> 20):
                    f.write(zeros)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ModelLoadError) as err:
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = one_line(err)
    assert f"tiny_cnn/data/weights/weight_1 holds {declared} bytes" in message
    assert "stem.bias" in message and "uses 64" in message
    assert peak < 32 << 20 and time.monotonic() - start < 10


@pytest.mark.parametrize(
    "damage,says",
    [
        (
            lambda f: f.update({"data/weights/weight_2": f["data/weights/weight_2"][:1000]}),
            "1000 bytes",
        ),
        (lambda f: zero_entry_huge_tensor(f), "0 bytes"),
    ],
    ids=["truncated", "empty-entry-huge-meta"],
)
def test_entry_smaller_than_its_tensors_is_refused(example, tmp_path, damage, says):
    path = craft(example, tmp_path / "x.pt2", damage)
    with pytest.raises(ModelLoadError, match=says) as err:
        load_model(path)
    assert "tiny_cnn/data/weights/weight_2 holds" in one_line(err)


def zero_entry_huge_tensor(files) -> None:
    """torch's reader makes torch.zeros(meta sizes) for an empty entry: 4 TB here."""
    files["data/weights/weight_2"] = b""

    def change(config: dict) -> None:
        meta = config["config"]["conv1.weight"]["tensor_meta"]
        meta["sizes"] = [{"as_int": n} for n in (10**6, 10**6, 1, 1)]
        meta["strides"] = [{"as_int": n} for n in (10**6, 1, 1, 1)]

    edit_json(files, "data/weights/model_weights_config.json", change)


def test_weight_unlike_the_graphs_placeholder_is_refused(example, tmp_path):
    """A tensor_meta edited to other strides reads other weights from the same bytes."""

    def change(config: dict) -> None:
        config["config"]["proj.weight"]["tensor_meta"]["strides"][1]["as_int"] = 0

    path = craft(
        example,
        tmp_path / "x.pt2",
        lambda f: edit_json(f, "data/weights/model_weights_config.json", change),
    )
    with pytest.raises(ModelLoadError, match="parameter proj.weight is stored as") as err:
        load_model(path)
    one_line(err)


def test_recompressed_and_sliced_storages_load(example, tmp_path):
    """What the size checks must let through: deflated entries, and a weight that is a view
    of a larger storage (torch writes the whole storage)."""
    top, items = entries(example / "tiny_cnn.pt2")
    path = write_zip(tmp_path / "deflated.pt2", top, items, zipfile.ZIP_DEFLATED)
    torch.testing.assert_close(load_model(path)[0](X), load_model(example / "tiny_cnn.pt2")[0](X))

    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(20)[:16])
            self.register_buffer("b", torch.arange(10.0)[2:6])

        def forward(self, x):
            return x * self.w.sum() + self.b.sum()

    x = torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(Sliced(), (x,))
        torch.export.save(program, str(tmp_path / "sliced.pt2"))
    torch.testing.assert_close(load_model(tmp_path / "sliced.pt2")[0](x), program.module()(x))


# --- Fuzz ------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "mlp.pt2"
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", max=64)  # a shape expression to mutate
    program = torch.export.export(TinyMLP(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def junk(marker: Path) -> list:
    """Values written over JSON fields: other types, and strings torch would run. No small
    integers or booleans: those can make another valid program (a dim, a stride), which
    no loader can tell from the original."""
    command = f"__import__('os').system({shlex.quote('touch ' + str(marker))!r})"
    return [None, "", "x", "s0", command, f"exec({command!r})", "print", "torch.load",
            IMPORTS_BY_NAME, "10**10**10", "ImmutableMatrix(1, 1, print)", [], {},
            {"as_int": "x"}, 2**70, 1.5, "torch.ops.mylib.relu.default"]  # fmt: skip


def mutate_json(data: dict, rng: random.Random, values: list) -> None:
    paths: list[list] = []
    stack: list[tuple[list, object]] = [([], data)]
    while stack:
        path, value = stack.pop()
        paths.append(path)
        if isinstance(value, dict):
            stack.extend((path + [k], v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + [i], v) for i, v in enumerate(value))
    path = rng.choice(paths[1:])
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]  # (not list items: dropping an optional argument is a valid graph)
    else:
        parent[path[-1]] = rng.choice(values)


def mutant(source: bytes, rng: random.Random, values: list) -> bytes:
    kind = rng.choice(["bytes", "entries", "json", "json"])
    if kind == "bytes":
        raw = bytearray(source)
        region = rng.choice([(0, len(raw)), (0, 256), (max(0, len(raw) - 2048), len(raw))])
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(*region)] ^= rng.randrange(1, 256)
        return bytes(raw)
    with zipfile.ZipFile(io.BytesIO(source)) as archive:
        items = [(info.filename, archive.read(info)) for info in archive.infolist()]
    method = zipfile.ZIP_STORED
    if kind == "entries":
        i, j = rng.randrange(len(items)), rng.randrange(len(items))
        # (Not swapping two entries' contents: that is a valid archive of other weights.)
        how = rng.choice(["duplicate", "drop", "rename", "recompress"])
        if how == "duplicate":
            items.insert(rng.randrange(len(items) + 1), (items[i][0], items[j][1]))
        elif how == "drop":
            items.pop(i)
        elif how == "rename":
            items[i] = (items[i][0] + rng.choice(["x", "/", ".pt", "/../x"]), items[i][1])
        else:
            method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
    else:
        which = rng.choice(["models/model.json", "models/model.json", "model_weights_config.json"])
        i = next(k for k, (name, _) in enumerate(items) if name.endswith(which))
        data = json.loads(items[i][1])
        mutate_json(data, rng, values)
        items[i] = (items[i][0], json.dumps(data).encode())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(buffer, "w", compression=method) as out:
            for name, data in items:
                out.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.slow
def test_fuzzed_archives_load_the_same_or_fail_typed(tiny_archive, tmp_path):
    """Mutated bytes, zip entries (duplicated, dropped, renamed, recompressed) and
    JSON fields of a real archive, as evagraph uses a model: load it, check the batch against
    the archive's input shapes, run it (a failure there is evagraph's DataError). Every
    outcome is an EvagraphError or the original outputs: no other exception, no hang, no
    code from the file."""
    marker = tmp_path / "RAN"
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    reference = load_model(tiny_archive)[0](x)
    source, values = tiny_archive.read_bytes(), junk(marker)
    rng = random.Random(28)
    outcomes: Counter = Counter()
    path = tmp_path / "mutant.pt2"
    slowest = 0.0
    for _ in range(300):
        path.write_bytes(mutant(source, rng, values))
        start = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module, _ = load_model(path)
                check_batches(path, input_shapes(path), [x])
                check_batch_fits(module, x, None)
                out = module(x)
        except EvagraphError as err:
            assert "\n" not in str(err), str(err)
            outcomes[type(err).__name__] += 1
        else:
            torch.testing.assert_close(out, reference, rtol=0, atol=0)
            outcomes["same"] += 1
        slowest = max(slowest, time.monotonic() - start)
        assert not marker.exists()
    assert outcomes["same"] > 30 and outcomes["ModelLoadError"] > 100, outcomes
    assert slowest < 10, slowest
