"""Reading torch.export archives (``.pt2``) without running code from them.

Takes the path of an archive written by ``torch.export.save`` and returns the
``ExportedProgram`` stored in it as ``model``; :func:`input_shapes` reads the shapes its
inputs were exported with (for the CLI's batch size and shape checks).
``torch.export.load`` is not used: it unpickles parts of the archive with
``weights_only=False`` (code runs while loading), and it turns strings from the archive into
Python code (sympy expressions are ``eval``-ed, node names and attribute paths are pasted
into generated source, guards are ``exec``-ed). :func:`load_exported_program` calls torch's
lower-level readers with those steps guarded.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .data import check_shapes
from .errors import ModelLoadError

MODEL_NAME = "model"  # the program torch.export.save writes and torch.export.load returns

# Strings the deserializer pastes into generated Python source must not be able to leave
# their place in it: names are identifiers, other strings carry no quote, backslash or
# control character. Keys whose values are prose or JSON only ever become data or comments.
_IDENTIFIER = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?\Z")
_PLAIN = re.compile(r"[^'\"\\\x00-\x1f\x7f]*\Z")
_NO_CONTROL = re.compile(r"[^\x00-\x1f\x7f]*\Z")
_NO_CONTROL_BUT_LINES = re.compile(r"[^\x00-\x08\x0b-\x1f\x7f]*\Z")  # \t and \n allowed
_NAME_KEYS = frozenset({"name", "as_name", "as_names", "forward_arg_names"})
_TEXT_KEYS = frozenset(
    {"in_spec", "out_spec", "custom", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn"}
)
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp,
    ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


def load_exported_program(
    path: str | Path, *, allow_pickle: bool = False
) -> torch.export.ExportedProgram:
    """Load the ``ExportedProgram`` in the torch.export archive ``path``, running no code from it.

    Loaded: the graph (``models/model.json``), the weights and tensor constants stored as raw
    tensor data, and pickled tensors that torch's safe unpickler (``weights_only=True``) reads.
    Never read: the sample inputs (``data/sample_inputs/*``, unpickled by torch with
    ``weights_only=False``; evagraph does not need them), AOTInductor shared libraries, extra
    files. Refused with a :class:`ModelLoadError` naming the entry, unless ``allow_pickle``:
    pickled weights or constants the safe unpickler refuses, custom (torchbind) and opaque
    object constants, and graph strings that would become Python code (a sympy expression
    outside arithmetic, a name that is not an identifier, a quote in a string). A malformed
    archive is a one-line ``ModelLoadError`` too.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:  # reads only the zip's directory
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        raise ModelLoadError(
            f"cannot read torch.export archive {path}: not a zip file (truncated, or not a .pt2)"
        ) from err
    except OSError as err:
        raise ModelLoadError(f"cannot read torch.export archive {path}: {err.strerror}") from err
    prefix = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
    if f"{prefix}archive_format" not in names:
        old = any(name.endswith("serialized_exported_program.json") for name in names)
        raise ModelLoadError(
            f"{path} is in torch.export's old archive format, whose weights are pickles: save "
            "it again with torch.export.save"
            if old
            else f"{path} is a zip file but not a torch.export archive (no archive_format entry)"
        )
    try:
        return _load(path, prefix, allow_pickle)
    except ModelLoadError:
        raise
    except Exception as err:
        reason = _first_line(err)
        raise ModelLoadError(f"cannot load torch.export archive {path}: {reason}") from err


def _load(path: Path, prefix: str, allow_pickle: bool) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import _package as package
    from torch.export.pt2_archive import constants as names

    reader = package.PT2ArchiveReader(str(path))
    version = reader.read_string(names.ARCHIVE_VERSION_PATH)
    if version != names.ARCHIVE_VERSION_VALUE:
        raise ModelLoadError(
            f"{path} is a torch.export archive of version {version}; this torch reads version "
            f"{names.ARCHIVE_VERSION_VALUE}: save it again with this torch"
        )
    records = set(reader.get_file_names())
    model_file = names.MODELS_FILENAME_FORMAT.format(MODEL_NAME)
    if model_file not in records:
        raise ModelLoadError(f"{path} has no {prefix}{model_file}: not a torch.export.save archive")
    program = json.loads(reader.read_bytes(model_file))
    if not allow_pickle:
        _check_strings(program, f"{path} entry {prefix}{model_file}")
    # Guards are exec-ed by ExportedProgram.module(); without sample inputs torch builds no
    # guard function, and dropping them keeps it so (inputs are still checked against the
    # program's range constraints).
    program["guards_code"] = []
    load = _Loader(reader, path, prefix, allow_pickle)
    state_dict = load.payloads(MODEL_NAME, weights=True)
    constants = load.payloads(MODEL_NAME, weights=False)
    serialized = _dict_to_dataclass(schema.ExportedProgram, program)
    # example_inputs=None: the sample inputs are never unpickled.
    return ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, None)


class _Loader:
    """Weights and constants of one archive, each pickle either safe, refused or allowed."""

    def __init__(self, reader: Any, path: Path, prefix: str, allow_pickle: bool) -> None:
        self.reader, self.path, self.prefix, self.allow_pickle = reader, path, prefix, allow_pickle

    def payloads(self, model: str, *, weights: bool) -> dict[str, Any]:
        from torch._export.serde.serialize import (
            deserialize_size,
            deserialize_storage_offset,
            deserialize_stride,
        )
        from torch.export.pt2_archive import _package as package
        from torch.export.pt2_archive import constants as names

        directory = names.WEIGHTS_DIR if weights else names.CONSTANTS_DIR
        kind = "weight" if weights else "constant"
        legacy = f"{directory}{model}.pt"  # older torch: one torch.save'd dict
        if legacy in self.reader.get_file_names():
            return self.unpickle(legacy, f"{kind}s", self.reader.read_bytes(legacy))
        formats = (names.CONSTANTS_CONFIG_FILENAME_FORMAT, names.WEIGHTS_CONFIG_FILENAME_FORMAT)
        config_file = formats[weights].format(model)
        config = package._load_payload_config(self.reader, config_file)
        # Raw tensor data only: torch's reader skips the entries marked use_pickle.
        flat = package._build_file_map(self.reader, config, directory)
        out: dict[str, Any] = {}
        for fqn, meta in config.config.items():
            entry = directory + meta.path_name
            if not weights and meta.path_name.startswith(names.CUSTOM_OBJ_FILENAME_PREFIX):
                self.refuse(entry, f"custom-object constant {fqn}", "a TorchScript object")
                out[fqn] = torch._C._pickle_load_obj(self.reader.read_bytes(entry))
            elif not weights and meta.path_name.startswith(names.OPAQUE_OBJ_FILENAME_PREFIX):
                self.refuse(entry, f"opaque-object constant {fqn}", "a pickled Python object")
                out[fqn] = pickle.loads(self.reader.read_bytes(entry))
            elif not weights and not meta.path_name.startswith(
                names.TENSOR_CONSTANT_FILENAME_PREFIX
            ):
                raise ModelLoadError(
                    f"{self.path} entry {self.prefix}{entry}: unknown kind of constant {fqn}"
                )
            elif meta.use_pickle:
                out[fqn] = self.unpickle(entry, f"{kind} {fqn}", self.reader.read_bytes(entry))
            else:
                tensor_meta = meta.tensor_meta
                tensor = torch.as_strided(
                    flat[meta.path_name],
                    deserialize_size(tensor_meta.sizes),
                    deserialize_stride(tensor_meta.strides),
                    deserialize_storage_offset(tensor_meta.storage_offset),
                )
                if weights and meta.is_param:
                    tensor = torch.nn.Parameter(tensor, requires_grad=tensor_meta.requires_grad)
                out[fqn] = tensor
        return out

    def unpickle(self, entry: str, what: str, data: bytes) -> Any:
        """Read a torch.save'd entry with the safe unpickler; anything else needs the flag."""
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            needs = re.search(r"GLOBAL (\S+)", str(err))
            self.refuse(entry, what, f"a pickle naming {needs.group(1) if needs else 'globals'}")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def refuse(self, entry: str, what: str, holds: str) -> None:
        if not self.allow_pickle:
            raise ModelLoadError(
                f"{self.path} entry {self.prefix}{entry} ({what}) holds {holds}: loading it "
                "runs code from the file. Pass --allow-pickle (allow_pickle=True) only if you "
                "trust it"
            )


def _check_strings(program: Any, where: str) -> None:
    """Refuse graph strings that torch's deserializer would turn into Python code."""
    stack: list[tuple[str, Any]] = [("", program)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string("", k, where)
                stack.append((k, v))
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str) and key != "guards_code":  # dropped before deserializing
            _check_string(key, value, where)


def _check_string(key: str, value: str, where: str) -> None:
    if key == "expr_str":
        ok = _is_arithmetic(value)
    elif key == "stack_trace":
        ok = _NO_CONTROL_BUT_LINES.match(value) is not None
    elif key in _TEXT_KEYS:
        ok = _NO_CONTROL.match(value) is not None
    elif key in _NAME_KEYS:
        ok = _IDENTIFIER.match(value) is not None
    else:
        ok = _PLAIN.match(value) is not None
    if not ok:
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ModelLoadError(
            f"{where}: {key or 'a key'} {shown!r} could run as Python code in torch's loader; "
            "refused (pass --allow-pickle only if you trust the file)"
        )


def _is_arithmetic(text: str) -> bool:
    """Whether a sympy expression string only calls sympy classes on numbers and symbols.

    torch parses these with ``sympy.sympify``, which ``eval``-s its input (srepr form, e.g.
    ``Mul(Integer(2), Symbol('s0', positive=True, integer=True))``).
    """
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    classes, namespace = _sympy_names()
    callees = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
        if isinstance(node, ast.Name):
            if id(node) in callees:
                ok = node.id in classes
            else:  # a new symbol, or a constant: never one of sympy's functions
                ok = node.id in _SYMPY_CONSTANTS or node.id not in namespace
            if not (ok and _SYMBOL.match(node.id)):
                return False
        if isinstance(node, ast.Constant) and not (
            isinstance(node.value, (int, float, bool, type(None)))
            or (isinstance(node.value, str) and _SYMBOL.match(node.value))
        ):
            return False
    return True


_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "pi", "E", "I"})


@cache
def _sympy_names() -> tuple[frozenset[str], frozenset[str]]:
    """(sympy's and torch's expression classes, every name sympify resolves without a symbol)."""
    import sympy
    import torch.utils._sympy.functions as functions

    modules = (sympy, functions)
    namespace = frozenset(name for module in modules for name in vars(module))
    classes = frozenset(
        name
        for module in modules
        for name, obj in vars(module).items()
        if not name.startswith("_") and isinstance(obj, type) and issubclass(obj, sympy.Basic)
    )
    return classes, namespace


def _first_line(err: BaseException) -> str:
    """The message of ``err`` on one line, without the advice torch's C++ reader appends."""
    text = str(err).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    return re.split(r"\.?\s+(?=This is an internal miniz error|\(Could this error)", text)[0]


def input_shapes(path: str | Path) -> dict[str, tuple[int | None, ...]]:
    """The tensor inputs of the program in the torch.export archive ``path``, by name in call
    order, with their exported shapes (``None`` for a dynamic dimension).

    Read from the graph's JSON only (nothing is deserialised). ``{}`` for a file that is not
    a readable archive: loading it reports why.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefix = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
            if f"{prefix}archive_format" not in names:
                return {}
            model_file = f"{prefix}models/{MODEL_NAME}.json"
            program = json.loads(archive.read(model_file))
        module = program["graph_module"]
        tensors = module["graph"]["tensor_values"]
        shapes: dict[str, tuple[int | None, ...]] = {}
        for spec in module["signature"]["input_specs"]:
            arg = spec.get("user_input", {}).get("arg", {})
            name = arg.get("as_tensor", {}).get("name")
            if name in tensors:
                sizes = tensors[name]["sizes"]
                shapes[name] = tuple(size.get("as_int") for size in sizes)
        return shapes
    except (OSError, KeyError, TypeError, AttributeError, ValueError, zipfile.BadZipFile):
        return {}


def static_batch_size(shapes: dict[str, tuple[int | None, ...]]) -> int | None:
    """The batch size a program exported with a static batch dimension takes (the first
    dimension of its first input), or ``None`` where that dimension is dynamic."""
    first = next(iter(shapes.values()), ())
    return first[0] if first else None


def check_batches(
    path: str | Path, shapes: dict[str, tuple[int | None, ...]], batches: list
) -> None:
    """Raise a one-line ``DataError`` for the first calibration batch whose tensors do not
    have the shapes the archive ``path`` was exported for (its static dimensions)."""
    for _ in check_shapes(str(path), shapes, batches):
        pass
