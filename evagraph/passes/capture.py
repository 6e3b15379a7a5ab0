"""Capture pass: a model and one example batch -> a ``torch.fx.GraphModule``.

Takes an ``nn.Module`` (or a GraphModule already, e.g. a loaded ``.pt2``) and returns a
GraphModule whose nodes reference the model's own parameters (nothing is copied).

Two captures, tried in order:
1. ``torch.fx.symbolic_trace`` with adaptable layers (``nn.Linear``, ``nn.ConvNd``, HF
   ``Conv1D``) as leaves: cheap, and each layer call is one ``call_module`` node.
2. ``torch.export`` (non-strict), with the example batch and every dimension of every input
   left to ``Dim.AUTO``, so later batches of other sizes run. Python that fx cannot trace
   (HF transformers, timm models with shape logic) is executed with real values here, so
   this captures nearly any model that runs; its graph is ATen ops whose weights are the
   model's own parameters, which the layer-graph pass maps back to their modules.
3. ``torch.export`` with static shapes, when 2 fails on the dynamic shapes themselves (a
   guard on a size it cannot decide): the graph then takes only batches shaped as the
   example, which ``Captured.static`` tells calibration to check.
A guard on tensor values (DBRX loops over the experts its tokens were routed to) holds for no
shape. When it is raised inside a submodule whose output is shaped like one of its inputs, 2
and 3 are retried with every module of that class kept opaque: export sees a placeholder op
shaped like that input, which becomes a ``call_module`` node of the module itself, run eagerly.
Where no module can be kept opaque (the branch is in the model's own forward), export decides
it by the example's values and the graph asserts at run time that each batch decides alike.
Quantized linear modules (bitsandbytes, torchao: ``evagraph.quantized``) are kept opaque in
2 and 3 from the start, a placeholder shaped ``(..., out_features)`` standing for each: export
cannot trace bitsandbytes' packed weights, and calibration needs only their input.
We keep fx first rather than exporting everything (as pt2e does) because it is an order of
magnitude faster on the models it can trace and keeps the model's own leaf modules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..errors import CaptureError, EvagraphWarning, first_line
from ..layers import QUANTIZED, is_hf_conv1d


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_hf_conv1d(m):
            return True
        return super().is_leaf_module(m, qualname)


def _concrete_args(model: nn.Module, example: Any) -> dict[str, Any] | None:
    # Keyword inputs the batches never pass are fixed to their defaults, so `if mask is None`
    # branches trace the way the model will actually be called.
    if not isinstance(example, Mapping):
        return None
    params = inspect.signature(model.forward).parameters
    fixed = {
        name: p.default
        for name, p in params.items()
        if name not in example
        and p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return fixed or None


# Frames from these installed packages are not the user's. Compared by real path, not by a
# name: a user's checkout may itself live in a folder called "evagraph" (git's default).
# sympy: export's shape solver fails inside it.
_LIBRARY_DIRS = tuple(
    os.path.join(os.path.dirname(path), "")  # trailing separator: torch/ but not torchvision/
    for path in (
        os.path.realpath(torch.__file__),
        os.path.dirname(os.path.realpath(__file__)),  # evagraph/passes -> evagraph
        *(os.path.realpath(s.origin) for s in [importlib.util.find_spec("sympy")] if s),
    )
)


def _user_frame(err: BaseException) -> str:
    """Where in the model's own code tracing failed: ``file:line in fn: `code```, or ""."""
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not os.path.realpath(f.filename).startswith(_LIBRARY_DIRS)
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # A failing export logs a warning per failed guard and prints the partial graph to
    # stderr; the reason reaches the user once, in the CaptureError. On success whatever was
    # written (e.g. the model's own warnings) is passed on.
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
        sys.stderr.write(buffer.getvalue())
    finally:
        logger.setLevel(level)


def _auto_dims(value: Any) -> Any:
    # Every dimension of every tensor may vary (batch, sequence, image size); export keeps
    # static whatever the model's code pins down.
    if isinstance(value, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())} or None
    if isinstance(value, Mapping):
        return {k: _auto_dims(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_auto_dims(v) for v in value)
    return None


def _call_args(example: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) a model is called with for ``example``: a mapping as keyword arguments,
    a tuple/list positionally, anything else as the one input."""
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def export_program(
    model: nn.Module, example: Any, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model`` called with ``example``, all dims dynamic
    (``dynamic=False``: all static, the graph takes only ``example``'s shapes).

    A mapping is passed as keyword arguments, a tuple/list positionally, a tensor as the one
    input. HF models are exported without their KV cache (``config.use_cache``), which the
    graph has no use for and which export cannot always flatten.
    """
    args, kwargs = _call_args(example)
    # Export marks the input tensors' dims dynamic on the tensor objects themselves, which a
    # later export (the static retry, a user's torch.compile) would inherit: give it aliases.
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
    # Submodules may hold their own config copies (T5's decoder stack): switch off them all.
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    cached = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    for c in cached:
        c.use_cache = False
    try:
        with _quiet_export():
            return torch.export.export(
                model,
                args,
                kwargs,
                dynamic_shapes=(_auto_dims(kwargs) if kwargs else _auto_dims(args))
                if dynamic
                else None,
                strict=False,
            )
    finally:
        for c in cached:
            c.use_cache = True


@dataclass
class Captured:
    """Result of the capture pass. method: "graph" (given a GraphModule), "fx" or "export".
    static: why the graph takes only the example's input shapes (export with dynamic shapes
    failed on this), or None when it takes other shapes too."""

    gm: fx.GraphModule
    method: str
    static: str | None = None


# Meta key of the call_module nodes that stand for a module kept opaque.
OPAQUE = "evagraph_opaque"


@torch.library.custom_op("evagraph::opaque_module", mutates_args=())
def _opaque_module(inputs: list[torch.Tensor], like: int, call: int, width: int) -> torch.Tensor:
    """Placeholder, during export only, for call ``call`` of a module kept opaque, shaped like
    ``inputs[like]`` (with last dimension ``width`` unless it is -1); ``_export_graph``
    replaces it by a call of the module before any run."""
    raise RuntimeError("evagraph::opaque_module is a capture placeholder and never runs")


@_opaque_module.register_fake
def _(inputs: list[torch.Tensor], like: int, call: int, width: int) -> torch.Tensor:
    x = inputs[like]
    return torch.empty_like(x) if width < 0 else x.new_empty((*x.shape[:-1], width))


# How a module kept opaque is shaped: (which tensor input its output is shaped like, the
# output's last dimension or -1 for that input's own).
Like = tuple[int, int]


def _quantized_leaves(model: nn.Module) -> dict[nn.Module, Like]:
    """The quantized linear modules of ``model``, kept opaque: export cannot trace their packed
    weights (bitsandbytes rebuilds its tensor subclasses in forward), and calibration needs
    only their input. Each is ``x -> (..., out_features)``."""
    return {m: (0, m.out_features) for m in model.modules() if QUANTIZED.matches(m)}


# One call of an opaque module seen by export: the module, its (args, kwargs) spec, and the
# flattened leaves with the tensors (the placeholder's inputs, in order) left as None.
_Call = tuple[nn.Module, pytree.TreeSpec, list[Any]]


def _innermost_module(model: nn.Module, err: BaseException) -> nn.Module | None:
    """The innermost submodule of ``model`` (not ``model`` itself) whose ``forward`` was
    running where ``err`` was raised, or None."""
    submodules = {id(m) for name, m in model.named_modules() if name}
    found, tb = None, err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        this = frame.f_locals.get("self") if frame.f_code.co_name == "forward" else None
        if id(this) in submodules:
            found = this
        tb = tb.tb_next
    return found


def _output_like_input(
    model: nn.Module, example: Any, modules: list[nn.Module]
) -> dict[nn.Module, int] | None:
    """Runs ``model`` on ``example`` once and returns, for each of ``modules`` it calls, the
    position among the module's tensor inputs of the one its output is shaped like (shape and
    dtype); None when some call returns anything else, which a placeholder cannot stand for."""
    like: dict[nn.Module, int | None] = {}

    def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        i = next(
            (
                i
                for i, t in enumerate(tensors)
                if isinstance(out, torch.Tensor) and (t.shape, t.dtype) == (out.shape, out.dtype)
            ),
            None,
        )
        if like.setdefault(m, i) != i:  # each call must be shaped like the same input
            like[m] = None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        args, kwargs = _call_args(example)
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if any(i is None for i in like.values()):
        return None
    return {m: i for m, i in like.items() if i is not None}


def _opaque_forward(module: nn.Module, like: Like, calls: list[_Call]) -> Callable[..., Any]:
    """A ``forward`` for ``module`` during export: records the call in ``calls`` and returns
    the placeholder op on its tensor inputs."""

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves):
            # a size passed in would be frozen into the call_module node
            raise NotImplementedError(f"{type(module).__name__} takes a symbolic size")
        calls.append((module, spec, [None if isinstance(x, torch.Tensor) else x for x in leaves]))
        return torch.ops.evagraph.opaque_module(tensors, like[0], len(calls) - 1, like[1])

    return forward


def _export_graph(
    model: nn.Module,
    example: Any,
    opaque: Mapping[nn.Module, Like],
    dynamic: bool = True,
    on_values: bool = False,
) -> fx.GraphModule:
    """``export_program(model, example, dynamic).module()``, with each module in ``opaque``
    (module -> how its output is shaped, ``Like``) one ``call_module`` node.
    ``on_values``: a branch on tensor values takes the way ``example``'s values take, and the
    graph asserts at run time that every later input takes it too (as ``draft_export`` does)."""
    calls: list[_Call] = []
    # An instance attribute shadows the class's forward; one already there (a hook some
    # library installed) is put back.
    saved = {m: m.__dict__.get("forward") for m in opaque}
    for m, like in opaque.items():
        m.forward = _opaque_forward(m, like, calls)
    try:
        import torch._functorch.config as functorch_config  # export has loaded it already

        with functorch_config.patch(fake_tensor_propagate_real_tensors=on_values):
            gm = export_program(model, example, dynamic).module()
    finally:
        for m, forward in saved.items():
            if forward is None:
                del m.forward
            else:
                m.forward = forward
    if not calls:
        return gm
    names = {id(m): name for name, m in model.named_modules()}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.evagraph.opaque_module.default:
            continue
        inputs, _, call, _ = node.args
        module, spec, leaves = calls[call]
        tensors = iter(inputs)
        args, kwargs = pytree.tree_unflatten(
            [next(tensors) if x is None else x for x in leaves], spec
        )
        gm.add_submodule(names[id(module)], module)  # the model's own module and weights
        with graph.inserting_before(node):
            new = graph.call_module(names[id(module)], tuple(args), kwargs)
        new.meta.update(node.meta)
        new.meta[OPAQUE] = True  # the layer-graph pass reports what it holds as not adapted
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    gm.recompile()
    return gm


def capture(model: nn.Module, example: Any = None) -> Captured:
    """Capture ``model`` as a GraphModule: fx symbolic trace, else torch.export.

    ``example`` is one calibration batch (tensor, tuple, or dict of keyword inputs), used by
    fx to fix absent keyword inputs to their defaults and by export as the example input.
    Raises ``CaptureError`` naming what each method failed on.
    """
    if isinstance(model, fx.GraphModule):
        return Captured(model, "graph")
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, example))
        return Captured(fx.GraphModule(tracer.root, graph, type(model).__name__), "fx")
    except Exception as err:  # fx raises many types; all mean "not traceable by fx"
        fx_error = err
    if example is None:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__} ({first_line(fx_error, typed=True)}"
            f"{_user_frame(fx_error)}) and "
            "torch.export needs an example batch"
        ) from fx_error
    opaque = _quantized_leaves(model)
    while True:
        try:
            return Captured(_export_graph(model, example, opaque), "export")
        except Exception as err:
            dynamic_error = err
        if not isinstance(dynamic_error, GuardOnDataDependentSymNode):
            break
        # A guard on tensor values holds for no static shape either: keep the module that
        # raised it opaque, with all of its class (same code), if a placeholder can stand for it.
        culprit = _innermost_module(model, dynamic_error)
        if culprit is None or culprit in opaque:
            break
        cls = type(culprit)
        like = _output_like_input(model, example, [m for m in model.modules() if type(m) is cls])
        if like is None or culprit not in like:
            break
        opaque.update((m, (i, -1)) for m, i in like.items())
    dynamic = f"{first_line(dynamic_error, typed=True)}{_user_frame(dynamic_error)}"
    captured = _retry_export(model, example, opaque, dynamic_error)
    if isinstance(captured, Captured):
        return captured
    err = captured
    static = f"{first_line(err, typed=True)}{_user_frame(err)}"
    raise CaptureError(
        f"cannot capture {type(model).__name__} as a graph. torch.fx: "
        f"{first_line(fx_error, typed=True)}{_user_frame(fx_error)}; torch.export: {static}"
        + (f" (with dynamic shapes: {dynamic})" if dynamic != static else "")
        + ". Check that the model runs on the calibration batch as given (a dict is "
        "passed as keyword arguments), or exclude the construct named above from the model."
    ) from err


def _retry_export(
    model: nn.Module, example: Any, opaque: Mapping[nn.Module, Like], dynamic_error: Exception
) -> Captured | Exception:
    """The last tries after export with dynamic shapes failed with ``dynamic_error``: the
    graph, or the error the last try raised."""
    name, where = type(model).__name__, _user_frame(dynamic_error)
    data_dependent = isinstance(dynamic_error, GuardOnDataDependentSymNode)
    try:
        # A branch on tensor values that no opaque module could hide (FSMT's `if not
        # padding_mask.any()` in the model's own forward) is decided by the first batch; torch
        # asserts it in the graph, so a batch that would branch otherwise fails, never silently.
        # Shape logic export cannot decide for every size (timm's CPUBone pads to a multiple
        # of its stride) is decided for the example's sizes.
        gm = _export_graph(model, example, opaque, data_dependent, on_values=data_dependent)
    except Exception as err:
        return err
    if data_dependent:
        _explain_assertions(gm, name, where)
        warnings.warn(
            f"torch.export could not capture {name} for all input values (a branch on them"
            f"{where}); it is captured taking the first calibration batch's way there, which "
            "every batch must then take",
            EvagraphWarning,
            stacklevel=3,
        )
        return Captured(gm, "export")
    warnings.warn(
        f"torch.export could not capture {name} for inputs of any shape "
        f"({first_line(dynamic_error, typed=True)}{where}); it is captured for the first "
        "calibration batch's shapes, which every batch must then have",
        EvagraphWarning,
        stacklevel=3,
    )
    return Captured(gm, "export", static=f"{first_line(dynamic_error, typed=True)}{where}")


def _explain_assertions(gm: fx.GraphModule, name: str, where: str) -> None:
    """Says in each run-time assertion of ``gm`` why it is there, so that a batch that fails
    one learns where the model decides on its values."""
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten._assert_scalar.default and len(node.args) == 2:
            node.args = (
                node.args[0],
                f"{node.args[1]}: {name} was captured deciding on input values as the first "
                f"calibration batch's decide (the first such decision{where}) and this batch "
                "decides otherwise; give batches that decide alike (e.g. all padded or none)",
            )
    gm.recompile()
