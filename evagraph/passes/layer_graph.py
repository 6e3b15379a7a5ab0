"""Layer-graph pass: a captured GraphModule -> the adaptable layers and how data flows between them.

Takes the GraphModule from ``capture`` (plus the model it came from, to list layers the graph
never calls) and returns a ``LayerGraph``: every linear/conv layer with its qualified name,
kind, row width and calls; which layers read the same input node (one decomposition serves
them); which layers produce the model's output; and a networkx DiGraph of data dependence
between layers. Layers are recognised at two levels, so one pipeline serves both captures:
module calls (``nn.Linear``, ``nn.ConvNd``, HF ``Conv1D``) in fx graphs, and ATen / functional
ops (``aten.linear``, ``aten.conv2d``, ``F.linear`` ...) whose weight is a graph parameter, as
in a loaded ``torch.export`` archive, and matmuls whose operand is a 2-D parameter or a
transpose of one (``x @ self.weight.T`` in an ``nn.Linear`` subclass such as FalconLinear), and
grouped matmuls over fused expert weights (one layer per expert). An op on a parameter of a
module that is no plain linear/conv layer (an MoE router, a module using a child's weight, a
linear/conv subclass whose output is not the op's: routers returning tuples, convs padding
per input size) gets ``Layer.host``, the module whose call the rewrite wraps to change the
weight (weight-space LoRA). Called as a module in an fx graph, such a subclass
(``forward_mismatch``) is reported as not adapted: its op is not in the graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layers import ConvSpec, Layer, layer_of_module, module_kind
from ..quantized import quantization
from .capture import OPAQUE

_aten = torch.ops.aten


@dataclass
class LayerGraph:
    """Result of the layer-graph pass.

    layers: adaptable layers in graph order. groups: decomposition id -> layer names that
    read the same input with the same row geometry. outputs: layers whose result is a model
    output on its own (heads). unsupported: linear/conv layers found but not adaptable, with why.
    graph: DiGraph over layer names, an edge where one layer's result reaches another without
    passing through a third; node attribute ``depth`` is the longest path from an input.
    """

    gm: fx.GraphModule
    layers: dict[str, Layer]
    groups: dict[str, list[str]]
    outputs: set[str]
    unsupported: dict[str, str]
    graph: nx.DiGraph
    model_is_graph: bool = False  # the model itself is a GraphModule (a loaded .pt2)


# Functional and ATen ops that are a linear or a convolution; their arguments follow the
# ATen schema (input, weight, bias, stride, padding, dilation, groups).
_LINEAR_OPS = {_aten.linear.default, torch._C._nn.linear}
_CONV_OPS = {
    _aten.conv1d.default: 1,
    _aten.conv2d.default: 2,
    _aten.conv3d.default: 3,
    _aten.conv1d.padding: 1,
    _aten.conv2d.padding: 2,
    _aten.conv3d.padding: 3,
    torch.conv1d: 1,
    torch.conv2d: 2,
    torch.conv3d: 3,
}
# x @ V with V a parameter W, or a view of one: W stored (in, out) as HF Conv1D lowers to, or
# W.T (nn.Linear subclasses that compute `x @ self.weight.T`, e.g. FalconLinear), or W
# broadcast over a batch for bmm. (op, argument index of x, of V).
_MATMUL_OPS = {
    _aten.addmm.default: (1, 2),
    _aten.mm.default: (0, 1),
    _aten.matmul.default: (0, 1),
    _aten.bmm.default: (0, 1),
    torch.addmm: (1, 2),
    torch.mm: (0, 1),
    torch.matmul: (0, 1),
    torch.bmm: (0, 1),
    operator.matmul: (0, 1),
}
_SWAP_OPS = {_aten.t.default, _aten.numpy_T.default, torch.t, "t"}  # swap a 2-D tensor's dims
_TRANSPOSE_OPS = {_aten.transpose.int, torch.transpose, "transpose"}
_PERMUTE_OPS = {_aten.permute.default, torch.permute, "permute"}
_UNSQUEEZE_OPS = {_aten.unsqueeze.default, torch.unsqueeze, "unsqueeze"}
_EXPAND_OPS = {_aten.expand.default, "expand"}
_VIEW_OPS = _SWAP_OPS | _TRANSPOSE_OPS | _PERMUTE_OPS | _UNSQUEEZE_OPS | _EXPAND_OPS | {getattr}
# A weight cast to another dtype in the graph (an MoE router's `F.linear(h.float(),
# self.weight.float())`): the op still uses that parameter's values, so a weight-space adapter
# on the parameter is exact through the cast.
_CAST_OPS = {
    _aten._to_copy.default, _aten.to.dtype, "float", "double", "half", "bfloat16", "to", "type",
}  # fmt: skip
_CONV_TRANSPOSE_OPS = {
    _aten.conv_transpose1d.default, _aten.conv_transpose2d.input, _aten.conv_transpose3d.input,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
}  # fmt: skip
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = _CONV_ARGS[:6] + ("transposed", "output_padding", "groups")


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _tuple(value: Any, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def _param(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            return gm.get_parameter(node.target)
        except AttributeError:
            return None
    return None


def _is_cast(node: fx.Node) -> bool:
    """A dtype cast of its first argument (no other change of its values)."""
    if node.op not in ("call_function", "call_method") or node.target not in _CAST_OPS:
        return False
    same_values = {"dtype", "copy", "layout", "device", "memory_format", "non_blocking"}
    others = {k for k, v in node.kwargs.items() if v is not None} - same_values
    return not others and all(isinstance(a, torch.dtype) for a in node.args[1:])


def _uncast(node: Any) -> Any:
    """``node`` with the dtype casts applied to it peeled off."""
    while isinstance(node, fx.Node) and _is_cast(node):
        node = node.args[0]
    return node


def _source_param(node: Any) -> str | None:
    """The parameter a weight computed in the graph is made from, if one alone is."""
    seen: set[fx.Node] = set()
    while isinstance(node, fx.Node) and node not in seen:
        seen.add(node)
        if node.op == "get_attr":
            return str(node.target)
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _view_step(node: fx.Node, ndim: int, swapped: bool) -> tuple[int, bool] | None:
    """(ndim, swapped) after ``node``, a view of an ``ndim``-D tensor whose last two dims are a
    weight's (``swapped``: transposed); None unless it keeps those two dims as a matrix."""
    target, args = node.target, node.args[1:]  # call_method: the method's name
    if target is getattr:
        return (ndim, not swapped) if args[0] in ("T", "mT") else None
    if target in _SWAP_OPS:
        return (ndim, not swapped) if ndim == 2 else None
    if target not in _EXPAND_OPS and not all(isinstance(d, (int, list, tuple)) for d in args):
        return None  # dims computed in the graph
    last = {ndim - 2, ndim - 1}
    if target in _TRANSPOSE_OPS and len(args) == 2:
        dims = {d % ndim for d in args}
        if dims == last:
            return ndim, not swapped
        return (ndim, swapped) if not dims & last else None
    if target in _PERMUTE_OPS and args:
        dims = [d % ndim for d in (args[0] if isinstance(args[0], (list, tuple)) else args)]
        if set(dims[-2:]) != last:  # the matrix dims stay last; leading dims may move
            return None
        return ndim, swapped ^ (dims[-2] > dims[-1])
    if target in _UNSQUEEZE_OPS and len(args) == 1:
        d = args[0] % (ndim + 1)
        return (ndim + 1, swapped) if d < ndim - 1 else None  # a new leading (batch) dim
    if target in _EXPAND_OPS and args:
        sizes = args[0] if isinstance(args[0], (list, tuple)) else args
        return (len(sizes), swapped) if len(sizes) >= ndim else None
    return None


def _weight_operand(
    gm: fx.GraphModule, node: Any, ndim: int = 2
) -> tuple[torch.Tensor, str, bool] | None:
    """A matmul operand that is an ``ndim``-D parameter (a matrix, or a stack of expert
    matrices) seen through transposes of its last two dims, and leading dims added to
    broadcast it over a batch. (parameter, its qualified name, whether the operand is its
    transpose), or None."""
    chain = []
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if _is_cast(node):
            node = node.args[0]
            continue
        if node.op not in ("call_function", "call_method") or node.target not in _VIEW_OPS:
            return None  # an activation, or a weight computed with more than views
        chain.append(node)
        node = node.args[0] if node.args else None
    weight = _param(gm, node)
    if weight is None or weight.dim() != ndim:
        return None
    swapped = False
    for step in reversed(chain):
        after = _view_step(step, ndim, swapped)
        if after is None:
            return None
        ndim, swapped = after
    return weight, node.target, swapped


def _where(node: fx.Node, args: dict[str, Any], model: nn.Module) -> str:
    """The name to report an unadaptable op under: the linear/conv module it ran inside (as
    a module call is reported), else the layer its weight parameter names, else the node."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if stack:
        try:
            if module_kind(model.get_submodule(stack[-1][0])) is not None:
                return stack[-1][0]
        except AttributeError:
            pass
    source = _source_param(args.get("weight"))
    if source is not None:
        return source.removesuffix(".weight")
    return node.name


Unsupported = tuple[str, str]  # (layer or node name, why it is not adapted)


def _function_layer(
    gm: fx.GraphModule, node: fx.Node, model: nn.Module
) -> tuple[Layer | None, Unsupported | None]:
    """A functional/ATen call -> (Layer, None), or (None, (name, reason)) if it is one but
    unusable, or (None, None) if it is no linear/conv."""
    target = node.target
    if target in _MATMUL_OPS:
        i_x, i_w = _MATMUL_OPS[target]
        operand = _weight_operand(gm, node.args[i_w]) if len(node.args) > i_w else None
        if operand is None:
            return None, None  # an ordinary matmul of activations
        weight, wname, swapped = operand
        args, ndim = {"input": node.args[i_x]}, 0
    elif target in _LINEAR_OPS:
        args, ndim = _bind(node, ("input", "weight", "bias")), 0
    elif target in _CONV_OPS:
        args, ndim = _bind(node, _CONV_ARGS), _CONV_OPS[target]
    elif target is _aten.convolution.default:
        args, ndim = _bind(node, _CONVOLUTION_ARGS), -1  # dims read off the weight below
        if args.get("transposed"):
            return None, (_where(node, args, model), "transposed convolution is not adapted")
    elif target in _CONV_TRANSPOSE_OPS:
        args = _bind(node, ("input", "weight"))
        return None, (_where(node, args, model), "transposed convolution is not adapted")
    else:
        return None, None
    if target not in _MATMUL_OPS:
        args["weight"] = _uncast(args.get("weight"))
        weight, swapped = _param(gm, args["weight"]), False
        if weight is None:
            source = _source_param(args["weight"])
            reason = "weight is computed in the graph, not a parameter"
            if source is not None:
                reason = f"its weight is computed in the graph from {source}, not the parameter"
            return None, (_where(node, args, model), reason)
        wname = args["weight"].target
    if ndim < 0:
        ndim = weight.dim() - 2
    name = wname.removesuffix(".weight")
    op = str(target) if isinstance(target, torch._ops.OpOverload) else f"torch.{target.__name__}"
    if target in _MATMUL_OPS and not swapped:  # x @ W: W stored (in, out)
        layer = Layer(name, "linear", op, weight.shape[0], weight.shape[1], wname)
        layer.weight_transposed = True
    elif ndim == 0:  # F.linear(x, W) or x @ W.T: W is (out, in)
        layer = Layer(name, "linear", op, weight.shape[1], weight.shape[0], wname)
    else:
        spec = ConvSpec(
            kernel_size=tuple(weight.shape[2:]),
            stride=_tuple(args.get("stride"), ndim, 1),
            padding=args["padding"]
            if isinstance(args.get("padding"), str)
            else _tuple(args.get("padding"), ndim, 0),
            dilation=_tuple(args.get("dilation"), ndim, 1),
            groups=int(args.get("groups") or 1),
        )
        if spec.groups != 1:
            reason = f"grouped convolution (groups={spec.groups}) is not adapted"
            return None, (_where(node, args, model), reason)
        rows = weight.shape[1] * math.prod(spec.kernel_size)
        layer = Layer(name, "conv", op, rows, weight.shape[0], wname, conv=spec)
    _place(layer, weight, wname, node, model)
    layer.inputs.append(args["input"].name if isinstance(args["input"], fx.Node) else "")
    return layer, None


def _place(layer: Layer, weight: torch.Tensor, wname: str, node: fx.Node, model: nn.Module) -> None:
    """Set where ``layer``'s adapter goes: ``module``, the module whose own call the op is, or
    ``host``, the module the op runs in (the adapter then changes the weight it reads)."""
    # The op is a module of the model when it ran inside that module's forward on that
    # module's own weight (torch.export keeps the parameters and records nn_module_stack).
    owner_name = wname.rpartition(".")[0]
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    stack = list(node.meta.get("nn_module_stack", {}).values())
    innermost = stack[-1][0] if stack else None
    # It must also store its weight as the op reads it: an nn.Linear whose weight some op
    # reads as (in, out) is not a linear layer the module wrap would see.
    own = layer_of_module(owner_name, owner) if owner is not None else None
    if (
        own is not None
        and owner.weight is weight
        and innermost == owner_name
        and own.weight_transposed == layer.weight_transposed
    ):
        # A module whose forward does more than this op (an MoE router returning a tuple,
        # a conv padding per input size) cannot take an adapter on its output: its weight
        # takes the update instead (weight space, exact whatever the forward does).
        if forward_mismatch(owner) is None:
            layer.module = owner_name
        else:
            layer.host = owner_name
    else:
        layer.host = _host(innermost, owner_name)


def _host(innermost: str | None, owner: str) -> str | None:
    """The module an op on ``owner``'s parameter runs in, for the adapter to wrap: the
    innermost module of the call and the weight's owner, or the closest module holding both
    (a parent that reads a child's weight). None at the model's root, which cannot be
    wrapped (the graph is rewritten instead)."""
    if innermost is None:
        return owner or None
    a, b = innermost.split("."), owner.split(".") if owner else []
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return ".".join(common) or None


_GROUPED_MM = ("grouped_mm", "_grouped_mm", "grouped_mm_fallback")
_CASTS = {_aten.to.dtype, _aten._to_copy.default, _aten.to.dtype_layout, _aten.contiguous.default}


def _expert_layers(
    gm: fx.GraphModule, node: fx.Node, model: nn.Module
) -> tuple[list[Layer], Unsupported | None]:
    """A grouped matmul ``x @ W[e]`` on rows grouped by expert (HF's fused experts,
    ``experts.gate_up_proj [E, out, in]``) -> one linear Layer per expert, named
    ``{weight}[e]``; [] if the weight operand is not a 3-D parameter (or a transposed view)."""
    args = _bind(node, ("input", "weight", "offs"))
    operand = _weight_operand(gm, args.get("weight"), ndim=3)
    offs = args.get("offs")
    if operand is None or not isinstance(offs, fx.Node) or not isinstance(args["input"], fx.Node):
        return [], None
    weight, wname, swapped = operand
    experts, first, second = weight.shape
    # x @ W'[e] with W' = W[e].T: W[e] is (out, in) as nn.Linear stores it; else (in, out).
    in_f, out_f = (second, first) if swapped else (first, second)
    stack = list(node.meta.get("nn_module_stack", {}).values())
    host = _host(stack[-1][0] if stack else None, wname.rpartition(".")[0])
    # Rows sorted by expert by a gather of the token rows: the mask of a token follows it.
    src = args["input"]
    while src.op == "call_function" and src.target in _CASTS:
        src = src.args[0]
    gather = None
    if src.op == "call_function" and src.target is _aten.index.Tensor:
        index = src.args[1]
        if len(index) == 1 and isinstance(index[0], fx.Node):
            gather = [src.args[0].name, index[0].name]
    op = _op_name(gm, node)
    layers = []
    for e in range(experts):
        layer = Layer(f"{wname}[{e}]", "linear", op, in_f, out_f, wname)
        layer.weight_transposed, layer.host, layer.expert = not swapped, host, e
        layer.offsets, layer.gather = offs.name, gather
        layer.inputs.append(args["input"].name)
        layers.append(layer)
    return layers, None


_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _nn_class(m: nn.Module) -> type[nn.Module] | None:
    return next((c for c in _PLAIN if isinstance(m, c)), None)


def _reference(m: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    # What the plain nn class computes from these parameters: the op LoRA and merge assume.
    if isinstance(m, nn.Linear):
        return F.linear(x, params["weight"], params.get("bias"))
    return _nn_class(m)._conv_forward(m, x, params["weight"], params.get("bias"))


def forward_mismatch(m: nn.Module, values: bool = False) -> str | None:
    """Why the linear/conv module ``m`` is not plainly ``F.linear``/``F.conv`` of its weight.

    None for a module whose class keeps the nn class's ``forward`` (and HF ``Conv1D``, and
    quantized linears, whose packed weight no plain op takes). A
    subclass that overrides it is run on a small random input, beside the nn class's op: with
    ``values`` False on the meta device (shapes only, as weights may not be resident): a
    non-tensor result (MoE routers that return scores and indices) or another output shape
    (TF "same" padding computed per input) means an adapter on its input cannot be added to its
    output; with ``values`` True on its own weights: other values (weight standardisation)
    mean ``W + B A`` does not reproduce ``m(x) + B A x``, so the adapter cannot be folded.
    """
    base = _nn_class(m)
    if base is None or type(m).forward is base.forward:
        return None  # HF Conv1D included: it is its own class
    if quantization(m) is not None:
        return None  # F.linear of its dequantized weight (which merge folds into)
    what = f"nn.{base.__name__} subclass {type(m).__name__} overrides forward"
    w = m.weight
    if isinstance(m, nn.Linear):
        shape: tuple[int, ...] = (2, w.shape[1])
    else:  # odd sizes, a few strides past the kernel: padding that depends on them shows
        extent = [
            d * (k - 1) + 1 + 2 * s + 3 for k, s, d in zip(m.kernel_size, m.stride, m.dilation)
        ]
        shape = (1, w.shape[1] * m.groups, *extent)
    values = values and not w.is_meta  # weights not resident: shapes are all we can check
    device = w.device if values else torch.device("meta")
    params = dict(m.named_parameters())
    params.update(m.named_buffers())
    if not values:
        params = {n: t.to("meta") for n, t in params.items()}
    x = torch.randn(shape, dtype=w.dtype, device=device)
    training = m.training
    try:
        m.eval()  # no jitter or dropout in the comparison
        with torch.no_grad():
            out = torch.func.functional_call(m, params, (x.clone(),))
            ref = _reference(m, x, params)
    except Exception as err:  # any failure means we cannot vouch for it
        return f"{what} and fails on a test input ({type(err).__name__})"
    finally:
        m.train(training)
    if not isinstance(out, torch.Tensor):
        return f"{what} and returns a {type(out).__name__}, not the layer's output"
    if out.shape != ref.shape:
        return f"{what} and its output shape is not that of its weight's op"
    if values and not torch.allclose(
        out.float(), ref.float(), rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-6
    ):
        return f"{what} and does not compute the plain op of its weight (it transforms it)"
    return None


def _opaque_weights(gm: fx.GraphModule, node: fx.Node) -> dict[str, str]:
    """Parameter name -> reason, for the weights of a module ``node`` calls that is no layer:
    one capture kept opaque (its Python branches on tensor values, as DBRX's experts do).
    Linear/conv modules inside it are reported by module, not here."""
    m = gm.get_submodule(node.target)
    found: dict[str, str] = {}
    for owner, sub in m.named_modules():
        if module_kind(sub) is not None:
            continue
        for local, p in sub.named_parameters(recurse=False):
            name = ".".join(part for part in (node.target, owner, local) if part)
            found[name] = (
                f"a {p.dim()}-D parameter inside {type(m).__name__} {node.target}, which the "
                "captured graph calls as one opaque module: not adapted"
            )
    return found


def _callmodule_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[Layer | None, Unsupported | None]:
    m = gm.get_submodule(node.target)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # a leaf fx keeps: listed, not lost
        return None, (node.target, "transposed convolution is not adapted")
    layer = layer_of_module(node.target, m)
    if layer is None:
        return None, None
    if layer.conv is not None and layer.conv.groups != 1:
        return None, (
            node.target,
            f"grouped convolution (groups={layer.conv.groups}) is not adapted",
        )
    reason = forward_mismatch(m)
    if reason is not None:
        return None, (node.target, f"{reason}: not adapted")
    src = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    layer.inputs.append(src.name if isinstance(src, fx.Node) else "")
    return layer, None


_REDUCTIONS = {
    "select", "mean", "sum", "amax", "amin", "max", "min", "logsumexp", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices",
}  # fmt: skip


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _is_position_reduction(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that pool or pick positions (tokens, pixels): what separates a head from the body."""
    name = _op_name(gm, node)
    if node.op == "call_module":
        return "Pool" in name
    if name == "getitem":  # x[:, 0] selects a token; a plain int indexes a tuple result
        index = node.args[1] if len(node.args) > 1 else None
        return isinstance(index, tuple) and any(isinstance(i, int) for i in index)
    return name in _REDUCTIONS


def _is_shape(node: fx.Node, memo: dict) -> bool:
    """Nodes that compute sizes rather than tensors (x.size(0), sym_size, their arithmetic)."""
    # Iterative (post-order): a deep graph (MobileNetV5) exceeds Python's recursion limit.
    stack = [node]
    while stack:
        top = stack[-1]
        if top in memo:
            stack.pop()
            continue
        val = top.meta.get("val")
        if (
            isinstance(val, (int, torch.SymInt))
            or (top.op == "call_method" and top.target in ("size", "dim"))
            or top.op == "call_function"
            and top.target is getattr
        ):
            memo[top] = True
        elif top.op in ("placeholder", "get_attr", "call_module") or not top.all_input_nodes:
            memo[top] = False
        else:
            pending = [n for n in top.all_input_nodes if n not in memo]
            if pending:
                stack.extend(pending)
                continue
            memo[top] = all(memo[n] for n in top.all_input_nodes)
        stack.pop()
    return memo[node]


def _head_layers(gm: fx.GraphModule, layer_of_node: dict[fx.Node, str]) -> set[str]:
    """Layers that form the model's head(s).

    From each output, walk back while a node has a single tensor input. If the walk crosses
    a position reduction (token select, pooling), every layer met before it is head (a BERT
    pooler and its classifier, a CNN's classifier MLP); otherwise only the first layer met
    (an LM head; in a plain chain of layers, its last layer).
    """
    memo: dict = {}
    heads: set[str] = set()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for leaf in output.all_input_nodes:
        chain, node, reduced = [], leaf, False
        while True:
            if node in layer_of_node:
                chain.append(layer_of_node[node])
            if _is_position_reduction(gm, node) and chain:
                reduced = True
                break
            srcs = [
                n
                for n in node.all_input_nodes
                if n.op != "get_attr"
                and not _is_shape(n, memo)
                and _weight_operand(gm, n) is None  # a weight's transpose is no data path
            ]
            if node.op == "placeholder" or len(srcs) != 1:
                break
            node = srcs[0]
        heads.update(chain if reduced else chain[:1])
    return heads


def build_layer_graph(gm: fx.GraphModule, model: nn.Module | None = None) -> LayerGraph:
    """Find the adaptable layers of ``gm`` and the data flow between them.

    ``model`` (the module ``gm`` was captured from) lets the pass report linear/conv modules
    that the graph never calls as layers, e.g. ones inside an opaque leaf module.
    """
    layers, unsupported, layer_of_node, experts_of_node = _find_layers(gm, model)
    model_is_graph = model is None or isinstance(model, fx.GraphModule)
    if model_is_graph:  # a flat graph: no experts module to wrap
        _drop_graph_experts(layers, unsupported, layer_of_node, experts_of_node)
    graph = _data_flow(gm, layers, layer_of_node, experts_of_node)
    outputs = _head_layers(gm, layer_of_node)
    groups: dict[str, list[str]] = {}
    by_key: dict[tuple, str] = {}
    for name, layer in layers.items():
        gid = by_key.setdefault(layer.row_key, f"g{len(by_key)}")
        groups.setdefault(gid, []).append(name)
    if model is not None:
        for qualname, m in model.named_modules():
            if qualname in layers or qualname in unsupported or module_kind(m) is None:
                continue
            if not any(layer.weight == f"{qualname}.weight" for layer in layers.values()):
                unsupported[qualname] = (
                    "not called as a layer in the captured graph (inside an opaque module, "
                    "or unused)"
                )
    # Experts of one grouped matmul share its row order: the gather found for one applies
    # to all calls on the same offsets (down_proj reads what gate_up_proj's rows became).
    gathers = {la.offsets: la.gather for la in layers.values() if la.gather is not None}
    for layer in layers.values():
        if layer.expert is not None and layer.gather is None:
            layer.gather = gathers.get(layer.offsets)
    for name, reason in _batched_weights(gm, layers).items():
        unsupported.setdefault(name, reason)
    return LayerGraph(gm, layers, groups, outputs, unsupported, graph, model_is_graph)


def _find_layers(
    gm: fx.GraphModule, model: nn.Module | None
) -> tuple[dict[str, Layer], dict[str, str], dict[fx.Node, str], dict[fx.Node, list[str]]]:
    """The layers ``gm`` calls, the linear/conv weights it uses that are not adaptable (with
    why), and per calling node its layer (the first, for a grouped matmul) and its experts."""
    layers: dict[str, Layer] = {}
    unsupported: dict[str, str] = {}
    layer_of_node: dict[fx.Node, str] = {}
    experts_of_node: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        found: list[Layer] = []
        if node.op == "call_module":
            layer, reason = _callmodule_kind(gm, node)
            if layer is None and reason is None and node.meta.get(OPAQUE):
                for name, why in _opaque_weights(gm, node).items():
                    unsupported.setdefault(name, why)
        elif node.op == "call_function" and _op_name(gm, node) in _GROUPED_MM:
            found, reason = _expert_layers(gm, node, model if model is not None else gm)
            layer = None
        elif node.op == "call_function":
            layer, reason = _function_layer(gm, node, model if model is not None else gm)
        else:
            continue
        if reason is not None:
            unsupported.setdefault(*reason)
            continue
        if layer is not None:
            found = [layer]
        for layer in found:
            if not layer.inputs[-1]:
                unsupported.setdefault(layer.name, "its input is not a graph value")
                continue
            existing = layers.setdefault(layer.name, layer)  # called twice: keeps both calls
            if existing is not layer:
                existing.inputs.append(layer.inputs[-1])
            existing.nodes.append(node.name)
            # One node, several experts: the first stands for the node in the data flow.
            layer_of_node.setdefault(node, layer.name)
            experts_of_node.setdefault(node, []).append(layer.name)
    return layers, unsupported, layer_of_node, experts_of_node


def _drop_graph_experts(
    layers: dict[str, Layer],
    unsupported: dict[str, str],
    layer_of_node: dict[fx.Node, str],
    experts_of_node: dict[fx.Node, list[str]],
) -> None:
    """Fused experts found in a model that is itself a graph: reported, not adapted (there is
    no experts module to wrap)."""
    for node, names in list(experts_of_node.items()):
        if layers[names[0]].expert is None:
            continue
        for name in names:
            layers.pop(name, None)
        unsupported[names[0].rpartition("[")[0]] = (
            "fused expert weights in a graph of its own (.pt2): not adapted yet; adapt "
            "the model as a module"
        )
        del layer_of_node[node], experts_of_node[node]


def _data_flow(
    gm: fx.GraphModule,
    layers: dict[str, Layer],
    layer_of_node: dict[fx.Node, str],
    experts_of_node: dict[fx.Node, list[str]],
) -> nx.DiGraph:
    """The layers as a graph: an edge where one layer's result reaches another without
    passing through a third; node attribute ``depth``, the longest path from an input."""
    # Sources each node depends on without passing through a layer: layers and graph inputs.
    reach: dict[fx.Node, frozenset] = {}
    graph = nx.DiGraph()
    for name, layer in layers.items():
        graph.add_node(
            name,
            kind=layer.kind,
            op=layer.op,
            in_features=layer.in_features,
            out_features=layer.out_features,
        )
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            reach[node] = frozenset([node.name])
            continue
        upstream = frozenset().union(*(reach.get(n, frozenset()) for n in node.all_input_nodes))
        if node in layer_of_node:
            for me in experts_of_node[node]:
                graph.add_edges_from((s, me) for s in upstream if s in layers and s != me)
            reach[node] = frozenset(experts_of_node[node])
        else:
            reach[node] = upstream
    depth: dict[str, int] = {}
    for name in nx.topological_sort(graph) if nx.is_directed_acyclic_graph(graph) else layers:
        preds = [depth[p] for p in graph.predecessors(name) if p in depth]
        depth[name] = 1 + max(preds, default=-1)
    nx.set_node_attributes(graph, depth, "depth")
    return graph


_BATCHED_MATMULS = ("mm", "bmm", "matmul", "linear", "einsum", "baddbmm", "addmm", "grouped_mm")
_INDEX_OPS = {operator.getitem, _aten.select.int, _aten.index.Tensor, _aten.slice.Tensor}


def _batched_weights(gm: fx.GraphModule, layers: dict[str, Layer]) -> dict[str, str]:
    """Parameters of 3 or more dims that reach a matmul (through views or indexing) but are
    no layer's weight: fused MoE experts (``experts.gate_up_proj [E, 2F, D]`` used through
    grouped matmuls), which are not adapted yet and must be reported, not silently left out."""
    weights = {layer.weight for layer in layers.values()}
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in weights:
            continue
        param = _param(gm, node)
        if param is None or param.dim() < 3:
            continue
        frontier, seen = list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.target in _VIEW_OPS or user.target in _INDEX_OPS:
                frontier.extend(user.users)
            elif _op_name(gm, user).lstrip("_").removesuffix("_fallback") in _BATCHED_MATMULS:
                shape = "x".join(str(d) for d in param.shape)
                found[node.target] = (
                    f"a {param.dim()}-D parameter [{shape}] used by {_op_name(gm, user)} "
                    "(fused mixture-of-experts weights): not adapted yet"
                )
                break
    return found
