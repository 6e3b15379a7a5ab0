"""The ``.pt2`` artefact: torch.export archives written, told by content, and read without
running code from them.

``export`` writes an adapted model as an archive (``write``: ``--format pt2``); ``zip_kind``
tells a ``.pt2`` from TorchScript and a pickle by its entries; :func:`input_shapes` reads the
shapes an archive's inputs were exported with, from which ``calibration_batches`` takes the
batch size of one exported for a static batch, and checks the data against its shapes.

:func:`load_exported_program` takes the path of an archive written by ``torch.export.save``
and returns the ``ExportedProgram`` stored in it as ``model``. ``torch.export.load`` is not
used: it unpickles parts of the archive with
``weights_only=False`` (code runs while loading), it turns strings from the archive into
Python code (sympy expressions are ``eval``-ed, node names and attribute paths are pasted
into generated source, guards are ``exec``-ed), and a node's target may name any function
under ``torch`` (one of them imports any installed module by name and calls it).
:func:`load_exported_program` reads the archive with Python's zipfile (every entry it reads
is CRC-checked, duplicated entry names are refused, a raw tensor entry is sized against
its tensor metadata before it is read), checks the graph (call targets from an allow-list,
shape expressions from a small bounded arithmetic) and then calls torch's deserializer.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import io
import json
import math
import operator
import pickle
import re
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import open_data
from ..errors import ConfigError, DataError, ModelLoadError, first_line
from ..passes.capture import export_program
from ..quantized import quantization
from ..runtime import check_shapes
from .outdir import disk_errors, zip_target

MODEL_NAME = "model"  # the program torch.export.save writes and torch.export.load returns


def export(adapted: nn.Module, example_inputs: Any, path: str | Path) -> Path:
    """Write ``adapted`` as a torch.export archive (``.pt2``) that ``torch.export.load`` reads.

    ``example_inputs``: one batch as the model takes it (a dict is keyword arguments). Batch,
    sequence and image dimensions stay dynamic where the model allows.
    """
    path = Path(path)
    _refuse_quantized(adapted)
    program = export_program(adapted, example_inputs)  # traced first: errors below are the disk's
    with disk_errors(str(path)), zip_target(path) as f:
        torch.export.save(program, f)
    return path


def write(adapted: nn.Module, outdir: Path, example: Any) -> list[str]:
    """``--format pt2``: the adapted model as ``outdir/model.pt2``, traced on ``example``."""
    _refuse_quantized(adapted)
    program = export_program(adapted, example)
    with zip_target(outdir / "model.pt2") as f:
        torch.export.save(program, f)
    return ["model.pt2"]


def _refuse_quantized(model: nn.Module) -> None:
    """Raise ``ConfigError`` naming a quantized layer of ``model``: torch.export cannot trace
    bitsandbytes' packed weights (nor write torchao's without its own serialization)."""
    for name, m in model.named_modules():
        scheme = quantization(m)
        if scheme is not None:
            name = name.removesuffix(".base_layer")  # the layer an adapter wraps
            raise ConfigError(
                f"cannot export a model with quantized layers as a .pt2 ({name} is {scheme}): "
                "save the adapter (save_adapter, save_peft) and apply it to the quantized base "
                "model where it is loaded"
            )


# Strings the deserializer pastes into generated Python source must not be able to leave
# their place in it: names are identifiers, other strings carry no quote, backslash or
# control character. Keys whose values are prose or JSON only ever become data or comments.
_IDENTIFIER = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?\Z")
_PLAIN = re.compile(r"[^'\"\\\x00-\x1f\x7f]*\Z")
_NO_CONTROL = re.compile(r"[^\x00-\x1f\x7f]*\Z")
_NO_CONTROL_BUT_LINES = re.compile(r"[^\x00-\x08\x0b-\x1f\x7f]*\Z")  # \t and \n allowed
_NAME_KEYS = frozenset({"name", "as_name", "as_names", "forward_arg_names"})
# String arguments of nodes reach generated source only through repr() (torch.fx's codegen),
# and quotes are common in them (torch's runtime-assertion messages quote the node).
_TEXT_KEYS = frozenset(
    {"in_spec", "out_spec", "custom", "from_node", "nn_module_stack", "source_fn_stack",
     "torch_fn", "as_string", "as_strings"}
)  # fmt: skip

# Archive limits. JSON entries are parsed whole (a graph of a large model is tens of MB).
# A raw tensor entry may hold more bytes than its tensors use (torch writes a view's whole
# storage) but not unboundedly more: a small deflated entry can claim gigabytes.
_MAX_JSON_BYTES = 256 << 20
_SPARE_BYTES = 1 << 20
_CHUNK = 1 << 20


def load_exported_program(
    path: str | Path, *, allow_pickle: bool = False
) -> torch.export.ExportedProgram:
    """Load the ``ExportedProgram`` in the torch.export archive ``path``, running no code from it.

    Loaded: the graph (``models/model.json``), the weights and tensor constants stored as raw
    tensor data, and pickled tensors that torch's safe unpickler (``weights_only=True``) reads.
    Never read: the sample inputs (``data/sample_inputs/*``, unpickled by torch with
    ``weights_only=False``; evagraph does not need them), AOTInductor shared libraries, extra
    files. Refused with a :class:`ModelLoadError` naming the entry (and node), unless
    ``allow_pickle``: pickled weights or constants the safe unpickler refuses, custom
    (torchbind) and opaque object constants, graph strings that would become Python code (a
    name that is not an identifier, a quote in a string, a shape expression outside bounded
    arithmetic on integers and symbols), and nodes calling anything but ATen/prims operators,
    the symbolic-shape operators torch writes and a few control-flow higher-order operators
    (custom ``torch.library`` operators included). Always refused: a damaged archive (a CRC
    mismatch, a duplicated entry name, a tensor entry smaller than its tensors or far larger,
    a big-endian archive on a little-endian machine), each as one line.
    """
    path = Path(path)
    try:
        archive = _Archive(path)
    except zipfile.BadZipFile as err:
        raise ModelLoadError(
            f"cannot read torch.export archive {path}: not a zip file (truncated, or not a .pt2)"
        ) from err
    except (ValueError, EOFError, NotImplementedError) as err:  # e.g. a name not in UTF-8
        raise ModelLoadError(
            f"cannot read torch.export archive {path}: its zip directory is damaged "
            f"({_reason(err)})"
        ) from err
    except OSError as err:
        raise ModelLoadError(f"cannot read torch.export archive {path}: {err.strerror}") from err
    with archive:
        if not archive.has("archive_format"):
            old = any(name.endswith("serialized_exported_program.json") for name in archive.names)
            raise ModelLoadError(
                f"{path} is in torch.export's old archive format, whose weights are pickles: "
                "save it again with torch.export.save"
                if old
                else f"{path} is a zip file but not a torch.export archive (no archive_format "
                "entry)"
            )
        try:
            return _load(archive, allow_pickle)
        except ModelLoadError:
            raise
        except Exception as err:
            reason = _reason(err)
            raise ModelLoadError(f"cannot load torch.export archive {path}: {reason}") from err


def _load(archive: _Archive, allow_pickle: bool) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import constants as names

    path, prefix = archive.path, archive.prefix
    if archive.read("archive_format", limit=64) != names.ARCHIVE_FORMAT_VALUE.encode():
        raise ModelLoadError(f"{path} entry {prefix}archive_format: not a torch.export archive")
    version = archive.read(names.ARCHIVE_VERSION_PATH, limit=64).decode(errors="replace")
    if version != names.ARCHIVE_VERSION_VALUE:
        raise ModelLoadError(
            f"{path} is a torch.export archive of version {_shown(version)}; this torch reads "
            f"version {names.ARCHIVE_VERSION_VALUE}: save it again with this torch"
        )
    archive.check_byteorder()
    model_file = names.MODELS_FILENAME_FORMAT.format(MODEL_NAME)
    if not archive.has(model_file):
        raise ModelLoadError(f"{path} has no {prefix}{model_file}: not a torch.export.save archive")
    program = archive.json(model_file)
    where = f"{path} entry {prefix}{model_file}"
    if not allow_pickle:
        _check_strings(program, where)
    # Guards are exec-ed by ExportedProgram.module(); without sample inputs torch builds no
    # guard function, and dropping them keeps it so (inputs are still checked against the
    # program's range constraints).
    program["guards_code"] = []
    serialized = _dict_to_dataclass(schema.ExportedProgram, program)
    _check_graph(serialized, where, allow_pickle)  # what torch will deserialize, not the JSON
    load = _Loader(archive, allow_pickle)
    state_dict = load.payloads(MODEL_NAME, weights=True)
    constants = load.payloads(MODEL_NAME, weights=False)
    _check_payloads(serialized, state_dict, constants, where)
    # example_inputs=None: the sample inputs are never unpickled.
    return ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, None)


class _Archive:
    """The entries of a torch.export archive (under one top folder), read with Python's
    zipfile, which checks each entry's CRC as it reaches the entry's end.

    torch's own reader is not used at all, so the graph evagraph checks and the graph torch
    deserializes come from the same bytes; names appearing twice are refused for the same
    reason (readers disagree on which copy a name means).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)  # reads only the zip's directory
        infos = self.zip.infolist()
        self.names = [info.filename for info in infos]
        self.prefix = (
            self.names[0].split("/")[0] + "/" if self.names and "/" in self.names[0] else ""
        )
        twice = [name for name, n in Counter(self.names).items() if n > 1]
        if twice:
            self.zip.close()
            raise ModelLoadError(
                f"{path} entry {_shown(twice[0])} appears {self.names.count(twice[0])} times "
                "in the archive: readers disagree on which copy counts; refused (damaged or "
                "crafted)"
            )
        self.infos = {info.filename: info for info in infos}

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zip.close()

    def has(self, name: str) -> bool:
        return self.prefix + name in self.infos

    def info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.infos[self.prefix + name]
        except KeyError:
            raise self.damaged(name, "is missing") from None

    def where(self, name: str) -> str:
        return f"{self.path} entry {_shown(self.prefix + name)}"

    def damaged(self, name: str, reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"cannot load torch.export archive {self.path}: entry {_shown(self.prefix + name)} "
            f"{reason}"
        )

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        info = self.info(name)
        if limit is not None and info.file_size > limit:
            raise ModelLoadError(
                f"{self.where(name)} holds {info.file_size} bytes, more than the {limit} "
                "evagraph reads from such an entry; refused"
            )
        with self._reading(name):
            return self.zip.read(info)

    def json(self, name: str) -> Any:
        data = self.read(name, limit=_MAX_JSON_BYTES)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:
            raise self.damaged(name, f"is not JSON ({_reason(err)})") from err

    def read_tensor_bytes(self, name: str, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the entry as a uint8 tensor (no other copy is kept); the
        rest of the entry is read in chunks and dropped, so that its CRC is checked."""
        info = self.info(name)
        data = bytearray(nbytes)
        view = memoryview(data)
        with self._reading(name), self.zip.open(info) as entry:
            done = 0
            while done < nbytes:
                got = entry.readinto(view[done : done + _CHUNK])
                if not got:
                    raise self.damaged(name, f"ends after {done} bytes")
                done += got
            while entry.read(_CHUNK):
                pass
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(data, dtype=torch.uint8)

    def check_byteorder(self) -> None:
        # Raw tensor entries hold the writer's native byte order, which torch records here
        # (older writers did not: those were little-endian machines).
        if not self.has("byteorder"):
            return
        order = self.read("byteorder", limit=16).decode(errors="replace").strip()
        if order not in ("little", "big"):
            raise ModelLoadError(f"{self.where('byteorder')}: unknown byte order {order!r}")
        if order != sys.byteorder:
            raise ModelLoadError(
                f"{self.where('byteorder')}: the archive was written on a {order}-endian "
                f"machine and this one is {sys.byteorder}-endian; evagraph does not swap "
                f"bytes: save it again on a {sys.byteorder}-endian machine"
            )

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """What zipfile raises on a damaged entry, as one ModelLoadError line naming it
        (RuntimeError: encrypted; NotImplementedError: an unknown compression)."""
        try:
            yield
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
                NotImplementedError) as err:  # fmt: skip
            reason = _reason(err)
            if "CRC" in reason:
                raise self.damaged(name, "does not match its CRC (damaged or altered)") from err
            raise self.damaged(name, f"is unreadable: {reason}") from err


class _Loader:
    """Weights and constants of one archive, each pickle either safe, refused or allowed."""

    def __init__(self, archive: _Archive, allow_pickle: bool) -> None:
        self.archive, self.allow_pickle = archive, allow_pickle

    def payloads(self, model: str, *, weights: bool) -> dict[str, Any]:
        from torch._export.serde import schema
        from torch._export.serde.serialize import _dict_to_dataclass
        from torch.export.pt2_archive import constants as names

        directory = names.WEIGHTS_DIR if weights else names.CONSTANTS_DIR
        kind = "weight" if weights else "constant"
        legacy = f"{directory}{model}.pt"  # older torch: one torch.save'd dict
        if self.archive.has(legacy):
            return self.unpickle(legacy, f"{kind}s", self.archive.read(legacy))
        formats = (names.CONSTANTS_CONFIG_FILENAME_FORMAT, names.WEIGHTS_CONFIG_FILENAME_FORMAT)
        config_file = formats[weights].format(model)
        config = _dict_to_dataclass(schema.PayloadConfig, self.archive.json(config_file))
        raw: dict[str, Any] = {}
        out: dict[str, Any] = {}
        for fqn, meta in config.config.items():
            entry = directory + meta.path_name
            if not weights and meta.path_name.startswith(names.CUSTOM_OBJ_FILENAME_PREFIX):
                self.refuse(entry, f"custom-object constant {_shown(fqn)}", "a TorchScript object")
                out[fqn] = torch._C._pickle_load_obj(self.archive.read(entry))
            elif not weights and meta.path_name.startswith(names.OPAQUE_OBJ_FILENAME_PREFIX):
                self.refuse(
                    entry, f"opaque-object constant {_shown(fqn)}", "a pickled Python object"
                )
                out[fqn] = pickle.loads(self.archive.read(entry))
            elif not weights and not meta.path_name.startswith(
                names.TENSOR_CONSTANT_FILENAME_PREFIX
            ):
                raise ModelLoadError(
                    f"{self.archive.where(entry)}: unknown kind of constant {_shown(fqn)}"
                )
            elif meta.use_pickle:
                out[fqn] = self.unpickle(entry, f"{kind} {_shown(fqn)}", self.archive.read(entry))
            else:
                raw[fqn] = meta
        out.update(self.raw_tensors(directory, raw, weights))
        return {fqn: out[fqn] for fqn in config.config}  # the config's order

    def raw_tensors(self, directory: str, metas: dict[str, Any], weights: bool) -> dict[str, Any]:
        """The tensors stored as raw bytes, views into one buffer per entry (so tensors that
        shared a storage when saved share it again), each entry read once, CRC-checked."""
        from torch._export.serde.serialize import deserialize_device, deserialize_scalar_type

        needs: dict[str, int] = {}
        for fqn, meta in metas.items():
            if meta.tensor_meta is None:
                raise ModelLoadError(
                    f"{self.archive.where(directory + meta.path_name)}: {_shown(fqn)} has no "
                    "tensor metadata"
                )
            what = f"{_shown(directory + meta.path_name)} ({_shown(fqn)})"
            extent = _extent_bytes(meta.tensor_meta, what)
            needs[meta.path_name] = max(needs.get(meta.path_name, 0), extent)
        flat: dict[str, torch.Tensor] = {}
        for path_name, need in needs.items():
            entry = directory + path_name
            held = self.archive.info(entry).file_size
            if held < need or held > need + max(need, _SPARE_BYTES):
                users = [fqn for fqn, meta in metas.items() if meta.path_name == path_name]
                several = len(users) > 1
                raise self.archive.damaged(
                    entry,
                    f"holds {held} bytes, but the tensor{'s' if several else ''} stored in it "
                    f"({', '.join(map(_shown, users[:3]))}{', ...' if len(users) > 3 else ''}) "
                    f"use{'' if several else 's'} {need}: damaged or crafted",
                )
            flat[path_name] = self.archive.read_tensor_bytes(entry, need)
        out: dict[str, Any] = {}
        for fqn, meta in metas.items():
            tensor_meta = meta.tensor_meta
            dtype = deserialize_scalar_type(tensor_meta.dtype)
            data = flat[meta.path_name]
            size = torch._utils._element_size(dtype)
            data = data[: data.numel() // size * size].view(dtype)
            device = deserialize_device(tensor_meta.device)
            if device != torch.device("cpu"):
                data = data.to(device)
            tensor = torch.as_strided(
                data,
                _ints(tensor_meta.sizes),
                _ints(tensor_meta.strides),
                tensor_meta.storage_offset.as_int,
            )
            if weights and meta.is_param:
                tensor = torch.nn.Parameter(tensor, requires_grad=tensor_meta.requires_grad)
            elif tensor_meta.requires_grad:
                tensor.requires_grad_(True)
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
                f"{self.archive.where(entry)} ({what}) holds {holds}: loading it runs code from "
                "the file. Pass --allow-pickle (allow_pickle=True) only if you trust it"
            )


def _ints(values: list[Any]) -> list[int]:
    """A tensor_meta's sizes or strides (symbolic ones are refused, as torch does)."""
    out = []
    for value in values:
        if value.type != "as_int" or type(value.as_int) is not int:
            raise ValueError(f"tensor metadata holds a {value.type}, not an integer")
        out.append(value.as_int)
    return out


def _extent_bytes(tensor_meta: Any, what: str) -> int:
    """The bytes a strided tensor reaches into its storage: offset + the farthest element."""
    from torch._export.serde.serialize import deserialize_scalar_type

    sizes, strides = _ints(tensor_meta.sizes), _ints(tensor_meta.strides)
    offset = tensor_meta.storage_offset
    if offset.type != "as_int" or type(offset.as_int) is not int:
        raise ValueError(f"{what}: storage offset is not an integer")
    if len(sizes) != len(strides) or min([*sizes, *strides, offset.as_int, 0]) < 0:
        raise ValueError(f"{what}: sizes {sizes}, strides {strides}, offset {offset.as_int}")
    if 0 in sizes:
        return 0
    last = offset.as_int + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    return (last + 1) * torch._utils._element_size(deserialize_scalar_type(tensor_meta.dtype))


# --- Graph strings ---------------------------------------------------------------------------


def _check_strings(program: Any, where: str) -> None:
    """Refuse graph strings that torch's deserializer would turn into Python code."""
    budget = _ExpressionBudget()
    stack: list[tuple[str, Any]] = [("", program)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string("", k, where, budget)
                stack.append((k, v))
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str) and key != "guards_code":  # dropped before deserializing
            _check_string(key, value, where, budget)


def _check_string(key: str, value: str, where: str, budget: _ExpressionBudget) -> None:
    if key == "expr_str":
        problem = budget.problem(value)
        if problem:
            shown = value if len(value) <= 60 else value[:57] + "..."
            raise ModelLoadError(
                f"{where}: shape expression {shown!r} refused: {problem} (torch's loader "
                "evaluates it as Python; pass --allow-pickle only if you trust the file)"
            )
        return
    if key == "stack_trace":
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


# --- Call targets ----------------------------------------------------------------------------

# torch's deserializer resolves a node's target string by attribute lookups under torch,
# operator or math, and calls whatever callable it finds when the graph runs: among them
# torch.export.custom_ops._call_custom_autograd_function_in_pre_dispatch, which imports any
# module named by a string argument. A graph torch.export writes calls only these.
_OP_TARGET = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\Z")
_OP_NAMESPACES = frozenset({"aten", "prims"})
# ATen operators that touch files: aten::from_file(shared=True) maps any file writably,
# aten::save (TorchScript's) writes one.
_FILE_OPS = frozenset({"from_file", "save"})
# Control flow and context wrappers whose arguments are subgraphs of the same archive (and
# operators, checked like targets): what exports of ordinary models contain. Not allowed:
# those that run compiled code, kernels, delegates or arbitrary Python callables
# (flat_apply, invoke_leaf_function, inductor_compiled_code, triton kernels, torchbind).
_HIGHER_ORDER = frozenset(
    {
        "cond", "while_loop", "while_loop_stack_output", "map_impl", "scan",
        "associative_scan", "wrap_with_set_grad_enabled", "wrap_with_autocast",
        "invoke_subgraph", "auto_functionalized", "auto_functionalized_v2", "with_effects",
        "flex_attention", "out_dtype", "hints_wrapper", "_export_tracepoint",
    }
)  # fmt: skip


@cache
def _symbolic_targets() -> frozenset[str]:
    """The strings torch writes for its symbolic-shape operators (``_operator.add``,
    ``math.trunc``, ``torch.sym_max``...): ``module.name`` of each of ``_SYM_OPS``."""
    from torch._export.serde.serialize import _SYM_OPS

    return frozenset(f"{op.__module__}.{op.__name__}" for op in (*_SYM_OPS, operator.getitem))


def _target_problem(target: Any) -> str | None:
    """Why a node may not call ``target`` (a serialized target string), or None."""
    if not isinstance(target, str):
        return "a target that is not a string"
    if target in _symbolic_targets():
        return None
    if target.startswith("torch.ops.higher_order."):
        if target.removeprefix("torch.ops.higher_order.") in _HIGHER_ORDER:
            return None
        return "a higher-order operator evagraph does not load (it runs code beyond the graph)"
    match = _OP_TARGET.match(target)
    if match is None:
        return (
            "not an ATen/prims operator, a symbolic-shape operator or a control-flow operator "
            "(it could be any Python function)"
        )
    namespace, op, _ = match.groups()
    if namespace not in _OP_NAMESPACES:
        return (
            f"a custom operator ({namespace}::{op}): its implementation is the exporter's code, "
            "not torch's (import the library defining it yourself)"
        )
    if namespace == "aten" and op in _FILE_OPS:
        return "an operator that reads or writes files"
    if _operator(target) is None:
        return "an operator this torch does not have"
    return None


def _operator(target: Any) -> torch._ops.OpOverload | None:
    """The ``torch.ops.<namespace>.<op>.<overload>`` a target names, if this torch has it."""
    match = _OP_TARGET.match(target) if isinstance(target, str) else None
    if match is None:
        return None
    namespace, op, overload = match.groups()
    try:  # looks up torch's operator registry; imports and runs nothing
        resolved = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        return None
    return resolved if isinstance(resolved, torch._ops.OpOverload) else None


def _check_graph(program: Any, where: str, allow_pickle: bool) -> None:
    """Check each node of the graph and of its subgraphs (``program``: the schema dataclass
    torch deserializes, ``schema.ExportedProgram``).

    Unless ``allow_pickle``: nodes and operator arguments may call only the operators of
    :func:`_target_problem`'s allow-list. Always: a node calling an operator passes only
    arguments the operator has, each once (torch drops any other silently, so a damaged name
    would run the operator without that argument).
    """
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    stack: list[Any] = [program]
    while stack:
        value = stack.pop()
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, _Union):  # one field set; reading another raises
            operator_argument = isinstance(value, schema.Argument) and value.type == "as_operator"
            if operator_argument and not allow_pickle:
                _refuse_target(value.value, "an operator argument", where)
            stack.append(value.value)
        elif dataclasses.is_dataclass(value):
            if isinstance(value, schema.Node):
                if not allow_pickle:
                    _refuse_target(value.target, _node_name(value), where)
                _check_argument_names(value, where)
            stack.extend(getattr(value, field.name) for field in dataclasses.fields(value))


def _check_argument_names(node: Any, where: str) -> None:
    op = _operator(node.target)
    if op is None:
        return
    names = [argument.name for argument in node.inputs]
    known = {argument.name for argument in op._schema.arguments}
    for name in names:
        if name not in known or names.count(name) > 1:
            how = "twice" if name in known else "an argument it does not have"
            raise ModelLoadError(
                f"{where}: {_node_name(node)} passes {op._schema.name} {how} "
                f"({str(name)[:40]!r}): damaged or crafted"
            )


def _check_payloads(
    program: Any, state_dict: dict[str, Any], constants: dict[str, Any], where: str
) -> None:
    """Refuse a weight or constant whose dtype, shape or strides differ from what the graph
    says its placeholder takes: torch does not compare them, and a damaged tensor_meta would
    otherwise give the model other weights (or fail only when it runs)."""
    from torch._export.serde.serialize import deserialize_scalar_type

    tensors = program.graph_module.graph.tensor_values
    for spec in program.graph_module.signature.input_specs:
        if spec.type == "parameter":
            arg, name = spec.value.arg.name, spec.value.parameter_name
        elif spec.type == "buffer":
            arg, name = spec.value.arg.name, spec.value.buffer_name
        elif spec.type == "tensor_constant":
            arg, name = spec.value.arg.name, spec.value.tensor_constant_name
        else:
            continue
        tensor = state_dict.get(name, constants.get(name))
        meta = tensors.get(arg)
        if not isinstance(tensor, torch.Tensor) or meta is None:
            continue  # torch's deserializer reports what is missing
        sizes = [s.value if s.type == "as_int" else None for s in meta.sizes]
        strides = [s.value if s.type == "as_int" else None for s in meta.strides]
        same = (
            tensor.dtype == deserialize_scalar_type(meta.dtype)
            and len(sizes) == tensor.dim() == len(strides)
            and all(want in (None, got) for want, got in zip(sizes, tensor.shape, strict=False))
            and all(
                want in (None, got) or size <= 1
                for want, got, size in zip(strides, tensor.stride(), tensor.shape, strict=False)
            )
        )
        if not same:
            raise ModelLoadError(
                f"{where}: {spec.type.replace('_', ' ')} {_shown(name)} is stored as "
                f"{tensor.dtype} {list(tensor.shape)} (strides {list(tensor.stride())}) but the "
                f"graph takes {deserialize_scalar_type(meta.dtype)} {sizes} (strides {strides}): "
                "damaged or crafted"
            )


def _refuse_target(target: Any, node: str, where: str) -> None:
    problem = _target_problem(target)
    if problem:
        shown = str(target) if len(str(target)) <= 80 else str(target)[:77] + "..."
        raise ModelLoadError(
            f"{where}: {node} calls {shown!r}: {problem}; refused (pass --allow-pickle only if "
            "you trust the file)"
        )


def _node_name(node: Any) -> str:
    name = node.name
    if not name and node.outputs and node.outputs[0].type == "as_tensor":
        name = node.outputs[0].value.name
    return f"node {name}" if isinstance(name, str) and name else "a node"


# --- Shape expressions -----------------------------------------------------------------------

# torch parses a shape expression with sympy.sympify, which eval-s it (and turns ^ into **):
# anything a name resolves to can be called, and 10**10**10 never returns. torch writes them
# with sympy.srepr, e.g. Mul(Integer(2), Symbol('s0', positive=True, integer=True)); older
# archives wrote str() forms (2*s0). Allowed: the classes below called on numbers, symbols
# and allowed expressions, + - * / // % ** with small literal exponents, comparisons, and a
# few constants. Bounds keep any allowed expression cheap for sympy: a cap on length, depth
# and arguments, on the size of any number it can evaluate to (symbols counted as 64-bit),
# and on Max/Min arguments (sympy compares them pairwise: 64 of them take seconds).
_MAX_EXPRESSION = 4096  # characters; torch's are under 300
_MAX_DEPTH = 32
_MAX_ARGS = 64
_MAX_BITS = 4096
_MAX_EXPONENT = 64
_MAX_MINMAX_ARGS = 8  # in one expression
_MAX_ARCHIVE_EXPRESSIONS = 1 << 18  # characters of distinct expressions in one archive
_MAX_ARCHIVE_MINMAX_ARGS = 512
_SYMBOL_BITS = 64

_SUMS = frozenset(
    {
        "Add", "Max", "Min", "Abs", "Mod", "PythonMod", "FloorDiv", "CeilDiv", "CleanDiv",
        "ModularIndexing", "Where", "floor", "ceiling", "FloorToInt", "CeilToInt",
        "TruncToInt", "TruncToFloat", "RoundToInt", "ToFloat", "Identity", "RShift",
        "IsNonOverlappingAndDenseIndicator", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality",
        "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And",
        "Or", "Not",
    }
)  # fmt: skip
_PRODUCTS = frozenset({"Mul", "FloatTrueDiv", "IntTrueDiv"})
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_NUMBERS = frozenset({"Integer", "Rational", "Float", "Symbol"})
_SHIFTS = frozenset({"LShift", "RoundDecimal"})  # (expression, small literal integer)
_CALLEES = _SUMS | _PRODUCTS | _POWERS | _NUMBERS | _SHIFTS
_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "pi", "E"})
_SYMBOL = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_BINARY = {ast.Add: "sum", ast.Sub: "sum", ast.Mult: "product", ast.Div: "product",
           ast.FloorDiv: "sum", ast.Mod: "sum", ast.Pow: "power"}  # fmt: skip
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


class _Refused(Exception):
    """Why a shape expression is refused."""


class _ExpressionBudget:
    """Checks the shape expressions of one archive, within per-archive totals."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.characters = 0
        self.minmax = 0

    def problem(self, text: str) -> str | None:
        if text in self.seen:  # sympy caches it; torch parses it again at no real cost
            return None
        self.seen.add(text)
        self.characters += len(text)
        if self.characters > _MAX_ARCHIVE_EXPRESSIONS:
            return f"the archive's shape expressions exceed {_MAX_ARCHIVE_EXPRESSIONS} characters"
        check = _Expression()
        problem = check.problem(text)
        self.minmax += check.minmax
        if problem is None and self.minmax > _MAX_ARCHIVE_MINMAX_ARGS:
            return f"the archive's Max/Min calls take over {_MAX_ARCHIVE_MINMAX_ARGS} arguments"
        return problem


class _Expression:
    """One shape expression: allowed, with an upper bound on the bits of any number it can
    evaluate to, or refused."""

    def __init__(self) -> None:
        self.minmax = 0

    def problem(self, text: str) -> str | None:
        if len(text) > _MAX_EXPRESSION:
            return f"longer than {_MAX_EXPRESSION} characters"
        try:
            tree = ast.parse(text, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return "not an arithmetic expression"
        try:
            self.bits(tree.body, 0)
        except _Refused as err:
            return str(err)
        return None

    def bits(self, node: ast.AST, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise _Refused(f"nested deeper than {_MAX_DEPTH}")
        bits = self._bits(node, depth + 1)
        if bits > _MAX_BITS:
            raise _Refused(f"it can evaluate to a number of over {_MAX_BITS} bits")
        return bits

    def _bits(self, node: ast.AST, depth: int) -> int:
        if isinstance(node, ast.Constant):
            return _number_bits(node.value)
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return 1
            if _SYMBOL.match(node.id) and node.id not in _sympify_names():
                return _SYMBOL_BITS
            raise _Refused(f"{node.id[:40]!r} is neither a symbol nor an allowed constant")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return self.bits(node.operand, depth)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            how = _BINARY[type(node.op)]
            if how == "power":
                return self.power(node.left, node.right, depth)
            return _combine(how, [self.bits(node.left, depth), self.bits(node.right, depth)])
        if isinstance(node, ast.Compare) and all(isinstance(o, _COMPARISONS) for o in node.ops):
            return _combine("sum", [self.bits(n, depth) for n in (node.left, *node.comparators)])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return self.call(node.func.id, node, depth)
        raise _Refused(f"{type(node).__name__} is not arithmetic")

    def call(self, name: str, node: ast.Call, depth: int) -> int:
        if name not in _CALLEES:
            raise _Refused(f"{name[:40]!r} is not an allowed function")
        args = node.args
        if any(isinstance(a, ast.Starred) for a in args):
            raise _Refused(f"{name} with a starred argument")
        if len(args) > _MAX_ARGS:
            raise _Refused(f"{name} takes over {_MAX_ARGS} arguments")
        if name in _NUMBERS:
            return _number_call(name, node)
        if node.keywords:
            raise _Refused(f"{name} takes no keyword arguments")
        if name in ("Max", "Min"):
            self.minmax += len(args)
            if self.minmax > _MAX_MINMAX_ARGS:
                raise _Refused(f"its Max/Min calls take over {_MAX_MINMAX_ARGS} arguments")
        if name in _SUMS or name in _PRODUCTS:
            if not args:
                raise _Refused(f"{name} without arguments")
            bits = [self.bits(a, depth) for a in args]
            return _combine("sum" if name in _SUMS else "product", bits)
        if len(args) != 2:
            raise _Refused(f"{name} takes two arguments")
        if name in _POWERS:
            return self.power(args[0], args[1], depth)
        amount = _literal(args[1])  # LShift, RoundDecimal
        if amount is None or amount.denominator != 1 or abs(amount) > _MAX_EXPONENT:
            raise _Refused(f"{name} by something other than an integer up to {_MAX_EXPONENT}")
        return self.bits(args[0], depth) + (int(amount) if name == "LShift" else 0)

    def power(self, base: ast.AST, exponent: ast.AST, depth: int) -> int:
        value = _literal(exponent)
        if value is None or abs(value) > _MAX_EXPONENT or value.denominator > _MAX_EXPONENT:
            raise _Refused(f"an exponent that is not a number up to {_MAX_EXPONENT}")
        return self.bits(base, depth) * max(1, math.ceil(abs(value)))


def _combine(how: str, bits: list[int]) -> int:
    if how == "product":
        return sum(bits)
    return max(bits) + len(bits).bit_length()


def _number_bits(value: Any) -> int:
    """Bits of a literal: an int, or a finite float (bool: 1); anything else is refused."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return max(1, abs(value).bit_length())
    if isinstance(value, float) and math.isfinite(value):
        return max(1, math.frexp(value)[1])
    raise _Refused(f"the literal {str(value)[:40]!r} is not a number")


def _literal(node: ast.AST) -> Fraction | None:
    """The value of a literal number (``3``, ``-2``, ``0.5``, ``Integer(2)``, ``-Integer(2)``,
    ``Rational(1, 2)``, ``Float('0.5', precision=53)``), or None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand)
        return None if inner is None else -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name not in ("Integer", "Rational", "Float"):
            return None
        try:
            _number_call(name, node)
        except _Refused:
            return None
        values = [_plain_number(arg, text=name == "Float") for arg in node.args]
        if len(values) == 2:  # Rational(p, q)
            return values[0] / values[1] if values[0] is not None and values[1] else None
        return values[0]
    return _plain_number(node)


def _plain_number(node: ast.AST, *, text: bool = False) -> Fraction | None:
    """An int or finite float literal, maybe negated; with ``text``, a decimal string too."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _plain_number(node.operand, text=text)
        return None if inner is None else -inner if isinstance(node.op, ast.USub) else inner
    if not isinstance(node, ast.Constant) or isinstance(node.value, bool):
        return None
    value = node.value
    if isinstance(value, str) and text and _FLOAT_TEXT.match(value):
        value = float(value)
    if isinstance(value, int) and abs(value).bit_length() <= _MAX_BITS:
        return Fraction(value)
    if isinstance(value, float) and math.isfinite(value):
        return Fraction(value)
    return None


def _number_call(name: str, node: ast.Call) -> int:
    """Integer(n), Rational(p, q), Float('x', precision=p), Symbol('s0', integer=True, ...)."""
    args, keywords = node.args, node.keywords
    if name == "Symbol":
        if len(args) != 1 or not (
            isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, str)
            and _SYMBOL.match(args[0].value)
        ):
            raise _Refused("Symbol takes one name")
        for keyword in keywords:
            if keyword.arg not in _assumptions() or not (
                isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, bool)
            ):
                raise _Refused("Symbol takes only True/False assumptions")
        return _SYMBOL_BITS
    if name == "Float":
        if len(args) != 1 or any(
            k.arg != "precision"
            or not isinstance(k.value, ast.Constant)
            or type(k.value.value) is not int
            or not 1 <= k.value.value <= 1024
            for k in keywords
        ):
            raise _Refused("Float takes one number and a precision up to 1024")
    elif keywords or not 1 <= len(args) <= (2 if name == "Rational" else 1):
        raise _Refused(f"{name} takes {'one or two integers' if name == 'Rational' else 'one'}")
    bits = 0
    for arg in args:
        value = _plain_number(arg, text=name == "Float")
        if value is None or (name != "Float" and value.denominator != 1):
            raise _Refused(f"{name} of something other than a literal number")
        bits += max(1, abs(math.floor(value)).bit_length())
    return bits


@cache
def _sympify_names() -> frozenset[str]:
    """Every name sympify may resolve to something other than a new symbol: sympy's namespace
    (``from sympy import *`` and more), Python's builtins and torch's sympy functions (the
    classes torch passes it)."""
    import sympy
    import torch.utils._sympy.functions as functions

    torch_classes = {name for name, obj in vars(functions).items() if isinstance(obj, type)}
    return frozenset({*vars(sympy), *vars(builtins), *torch_classes})


@cache
def _assumptions() -> frozenset[str]:
    import importlib

    return frozenset(importlib.import_module("sympy.core.assumptions")._assume_defined)


def _shown(text: str, limit: int = 80) -> str:
    """A string from the archive as it may appear in a one-line message."""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if text.isprintable() else repr(text)


def _reason(err: BaseException) -> str:
    """The message of ``err`` on one line, without the advice torch's C++ reader appends."""
    return re.split(
        r"\.?\s+(?=This is an internal miniz error|\(Could this error)", first_line(err)
    )[0]


def zip_kind(path: Path) -> str | None:
    """What the zip archive ``path`` holds, told by its entries (all under one top folder):
    ``"pt2"`` (torch.export.save: ``archive_format``, or the old format's
    ``serialized_exported_program.json``), ``"torchscript"`` (torch.jit.save: ``code/``,
    ``constants.pkl``), ``"pickle"`` (torch.save: ``data.pkl``); None for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:  # reads only the zip's directory
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):  # damaged
        return None
    prefix = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
    if f"{prefix}archive_format" in names or any(
        n.endswith("serialized_exported_program.json") for n in names
    ):
        return "pt2"
    if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
        return "torchscript"
    return "pickle" if f"{prefix}data.pkl" in names else None


def input_shapes(path: str | Path) -> dict[str, tuple[int | None, ...]]:
    """The tensor inputs of the program in the torch.export archive ``path``, by name in call
    order, with their exported shapes (``None`` for a dynamic dimension).

    Read from the graph's JSON only (nothing is deserialised), through the same reader as
    :func:`load_exported_program`. ``{}`` for a file that is not a readable archive: loading
    it reports why.
    """
    try:
        with _Archive(Path(path)) as archive:
            if not archive.has("archive_format"):
                return {}
            program = archive.json(f"models/{MODEL_NAME}.json")
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
    except (ModelLoadError, OSError, KeyError, TypeError, AttributeError, ValueError):
        return {}
    except zipfile.BadZipFile:
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


def calibration_batches(
    model_path: str | Path,
    data: str | Path,
    batch_size: int,
    *,
    world: int = 1,
    tell: Callable[[str], None] | None = None,
    **reader: Any,
) -> Iterable:
    """``data`` in minibatches of ``batch_size`` for the model file ``model_path``
    (``evagraph.data.open_data``; ``reader``: its options), tensor data checked against a
    ``.pt2``'s input shapes. A program exported with a static batch dimension only runs
    batches of that size: they are used instead (``tell``: how to say so; ``world``: the
    processes a global batch is cut into), and a smaller last batch is dropped."""
    shapes = input_shapes(model_path) if Path(model_path).is_file() else {}
    static = static_batch_size(shapes)
    name = Path(model_path).name
    tell = tell or (lambda text: None)
    if static is not None and batch_size != static * world:
        batch_size = static * world
        each = f" ({static} per process)" if world > 1 else ""
        tell(f"evagraph: {name} was exported for batches of {static}: using --batch-size "
             f"{batch_size}{each}")  # fmt: skip
    batches = open_data(data, batch_size, **reader)
    if not isinstance(batches, list):  # text, read lazily: not a .pt2's usual input
        return batches
    if static is not None:
        last = batches[-1]
        rows = (next(iter(last.values())) if isinstance(last, dict) else last).shape[0]
        if rows < batch_size and len(batches) == 1:
            raise DataError(
                f"{data} holds {rows} sample(s), fewer than one batch of {batch_size}, the "
                f"batch size {name} was exported for"
            )
        if rows < batch_size:
            batches.pop()
            tell(f"evagraph: dropping the last {rows} sample(s): {name} takes batches of "
                 f"exactly {batch_size}")  # fmt: skip
    check_batches(model_path, shapes, batches)
    return batches
