"""Probe pass: a LayerGraph and the selected targets -> a graph with activation probes.

Takes the ``LayerGraph`` and ``Selection`` and returns a ``ProbedGraph``: a copy of the captured
graph in which every distinct (input node, row geometry) feeding a target layer passes through
one ``Probe`` module, so layers that share an input share a probe. A probe returns its input
unchanged and hands the activation rows (spec: linear ``(N, d)``, conv unfolded patches
``(N, C_in * prod(kernel))``) to whatever sinks the calibration pass attaches. The model's
``attention_mask`` input, when the graph has one, is wired into each probe so padding rows
get weight 0; so is ``labels`` when a ``label_mask_value`` is given, and rows whose label is
that value (-100: ignored by the loss) get weight 0 too. Probes can be switched off
(``active = False``) once their layers converge.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..layers import ConvSpec, kind_from
from ..layers import conv_rows as conv_rows  # re-exported: it lived here
from .layer_graph import LayerGraph
from .select import Selection

# Subsampled conv rows keep at least this many output positions along each spatial
# dimension (64 of a 2d map): small late-stage maps give all their rows.
_MIN_POSITIONS = 8

RowSink = Callable[[torch.Tensor, "torch.Tensor | None"], None]


def activation_rows(
    x: torch.Tensor, kind: str, conv: ConvSpec | None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a layer input, plus per-row weights (1 keep, 0 padding) when a mask applies:
    ``LayerKind.rows`` of the kind saved as ``kind`` ("linear" or "conv")."""
    return kind_from(kind).rows(x, conv, mask)


class ProbeFailure(Exception):
    """An exception raised by evagraph's own code inside a probe (its ``__cause__``), kept
    apart from the model's exceptions, which the calibration reports as the data's."""


class Probe(nn.Module):
    """Identity on its input; feeds the input's rows to ``sinks`` while ``active``.

    With ``experts`` (the input of a grouped matmul over fused expert weights, its rows
    sorted by expert), the rows between consecutive group offsets go to that expert's sinks
    (``expert_sinks[e]``): each expert sees only the rows routed to it. A token's mask
    follows it through the gather that sorted the rows, when the graph shows one.
    """

    def __init__(
        self,
        kind: str,
        conv: ConvSpec | None,
        label_mask_value: int | None = None,
        dim: int | None = None,
        experts: int | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.conv, self.dim = kind, conv, dim
        self.every = 1  # conv rows: of every n-th output position (see ``keep_every``)
        self.max_rows: int | None = None  # rows handed on per call, evenly spaced (``_thin``)
        self.label_mask_value = label_mask_value
        self.active = True
        self.sinks: list[RowSink] = []
        self.experts = experts
        self.expert_sinks: dict[int, list[RowSink]] = {e: [] for e in range(experts or 0)}
        self.fired = False  # sinks called since the flag was last cleared (see ``replay``)

    def keep_every(self, stride: int) -> None:
        """Hand the sinks a convolution's rows at every ``stride``-th output position along
        each spatial dimension only (1: all), keeping at least ``_MIN_POSITIONS`` positions
        along each: the input is unfolded with the conv's stride times that, so the rows left
        out are never built."""
        self.every = stride

    def _thin(
        self, rows: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every n-th row (and its weight), n the smallest that leaves at most ``max_rows``:
        a view, so the rows left out are never copied."""
        n = -(-rows.shape[0] // self.max_rows) if self.max_rows else 1
        if n == 1:
            return rows, weights
        return rows[::n], None if weights is None else weights[::n]

    def _row_conv(self, x: torch.Tensor) -> ConvSpec | None:
        """The geometry this input's rows are unfolded with (``keep_every``)."""
        conv = self.conv
        if conv is None or self.every == 1:
            return conv
        spatial = x.shape[-conv.ndim :]
        pads = conv.pad_amounts()[::-1]  # F.pad order reversed: (right, left) first dim first
        steps = []
        for i, size in enumerate(spatial):
            reach = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            positions = (size + pads[2 * i] + pads[2 * i + 1] - reach) // conv.stride[i] + 1
            steps.append(conv.stride[i] * max(1, min(self.every, positions // _MIN_POSITIONS)))
        return dataclasses.replace(conv, stride=tuple(steps))

    def sinks_for(self, expert: int | None) -> list[RowSink]:
        """The sink list a statistic of all rows (None) or of one expert's rows joins."""
        return self.sinks if expert is None else self.expert_sinks[expert]

    def _fed(self) -> bool:
        return bool(self.sinks) or any(self.expert_sinks.values())

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.active and self._fed():
            # Token labels line up with the mask; sequence labels (one per sample) do not.
            use_labels = labels is not None and self.label_mask_value is not None
            if use_labels and (mask is None or labels.shape == mask.shape):
                keep = labels != self.label_mask_value
                mask = keep if mask is None else mask.bool() & keep
            try:
                with torch.no_grad():
                    if self.experts is None:
                        conv = self._row_conv(x)
                        rows, weights = activation_rows(x.detach(), self.kind, conv, mask)
                        rows, weights = self._thin(rows, weights)
                    else:
                        rows, weights = self._expert_rows(x.detach(), mask, source, index)
                    # Rows of another width: the layer after the probe raises the model's own
                    # error for data that does not fit it; the statistics must not raise first.
                    if self.dim is None or rows.shape[-1] == self.dim:
                        self.fired = True
                        for sink in self.sinks:
                            sink(rows, weights)
                        if self.experts is not None:
                            self._feed_experts(rows, weights, offsets)
            except Exception as err:
                raise ProbeFailure from err
        return x

    @staticmethod
    def _expert_rows(
        x: torch.Tensor,
        mask: torch.Tensor | None,
        source: torch.Tensor | None,
        index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = x.reshape(-1, x.shape[-1])
        if mask is None or source is None or index is None:
            return rows, None
        if mask.numel() != source.shape[0] or index.numel() != len(rows):
            return rows, None  # not the token rows the mask describes
        return rows, mask.reshape(-1)[index.reshape(-1)].to(torch.float32)

    def _feed_experts(
        self, rows: torch.Tensor, weights: torch.Tensor | None, offsets: torch.Tensor
    ) -> None:
        ends = offsets.tolist()  # one host sync per call, for every expert
        start = 0
        for e, end in enumerate(ends[: self.experts]):
            if self.expert_sinks[e] and end > start:
                w = None if weights is None else weights[start:end]
                for sink in self.expert_sinks[e]:
                    sink(rows[start:end], w)
            start = end

    def replay(self, device: torch.device) -> None:
        """Feed the sinks one row of weight 0 if they were not fed since ``fired`` was cleared:
        a process whose forward failed still joins the collectives its peers' statistics are
        waiting in (data-parallel calibration), adding nothing to them."""
        if self.active and self._fed() and not self.fired and self.dim is not None:
            rows = torch.zeros(1, self.dim, device=device)
            for sink in self.sinks + [s for ss in self.expert_sinks.values() for s in ss]:
                sink(rows, torch.zeros(1, device=device))


@dataclass
class ProbedGraph:
    """Result of the probe pass.

    gm: copy of the captured graph with probes inserted (it shares the model's parameters).
    probes: probe submodule name -> Probe. groups: decomposition id -> target layers it serves.
    group_probes: decomposition id -> probes whose rows it consumes. dims: id -> row width.
    experts: decomposition id -> the expert whose routed rows it takes from its probes.
    """

    gm: fx.GraphModule
    probes: dict[str, Probe]
    groups: dict[str, list[str]]
    group_probes: dict[str, list[str]]
    dims: dict[str, int]
    experts: dict[str, int] = field(default_factory=dict)  # group -> its expert's index


def insert_probes(
    layer_graph: LayerGraph, selection: Selection, label_mask_value: int | None = None
) -> ProbedGraph:
    """Insert one probe per distinct (input node, row geometry) of the target layers.

    ``label_mask_value``: rows whose ``labels`` input equals it are excluded (None: labels
    are not looked at).
    """
    # A new GraphModule over a copied graph: shares the model's modules, not its graph.
    gm = fx.GraphModule(layer_graph.gm, copy.deepcopy(layer_graph.gm.graph), "ProbedGraph")
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    inputs = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels") if label_mask_value is not None else None
    targets = set(selection.targets)

    # (input node, kind, conv, the grouped matmul's offsets for experts) -> calling nodes
    consumers: dict[tuple, list[str]] = {}
    widths: dict[tuple, int] = {}  # the same key -> row width
    extra: dict[tuple, tuple[int, list[str] | None]] = {}  # experts: (E, gather nodes)
    groups: dict[str, list[str]] = {}
    group_keys: dict[str, list[tuple]] = {}
    experts: dict[str, int] = {}
    for gid, members in layer_graph.groups.items():
        members = [m for m in members if m in targets]
        if not members:
            continue
        groups[gid] = members
        first = layer_graph.layers[members[0]]
        group_keys[gid] = [
            (inp, first.kind, first.conv, first.offsets) for inp in dict.fromkeys(first.inputs)
        ]
        if first.expert is not None:
            experts[gid] = first.expert
        for m in members:
            layer = layer_graph.layers[m]
            for node_name, inp in zip(layer.nodes, layer.inputs):
                key = (inp, layer.kind, layer.conv, layer.offsets)
                consumers.setdefault(key, []).append(node_name)
                widths[key] = layer.in_features
                if layer.expert is not None:
                    count = layer_graph.gm.get_parameter(layer.weight).shape[0]
                    extra[key] = (count, layer.gather)

    probes: dict[str, Probe] = {}
    probe_of_key: dict[tuple, str] = {}
    for i, (key, calls) in enumerate(consumers.items()):
        inp, kind, conv, offsets = key
        name = f"evagraph_probe_{i}"
        count, gather = extra.get(key, (None, None))
        probe = Probe(kind, conv, label_mask_value, widths[key], count)
        probes[name], probe_of_key[key] = probe, name
        gm.add_submodule(name, probe)
        first_call = nodes[min(calls, key=order.__getitem__)]
        args = (nodes[inp], mask, labels)
        if offsets is not None:
            source, index = (nodes[n] for n in gather) if gather else (None, None)
            args += (nodes[offsets], source, index)
        # Before the first consumer, so the mask placeholder is always already defined.
        with graph.inserting_before(first_call):
            probe_node = graph.call_module(name, args)
        for call in calls:
            nodes[call].replace_input_with(nodes[inp], probe_node)

    gm.recompile()
    group_probes = {gid: [probe_of_key[k] for k in keys] for gid, keys in group_keys.items()}
    dims = {gid: layer_graph.layers[m[0]].in_features for gid, m in groups.items()}
    return ProbedGraph(gm, probes, groups, group_probes, dims, experts)


_ASSERTIONS = (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg)


def with_inputs(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they depend on."""
    keep: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in keep:
            keep.add(node)
            stack.extend(node.all_input_nodes)
    return keep


def _kept(graph: fx.Graph, keep: Callable[[fx.Node], bool]) -> set[fx.Node]:
    # An assertion is how a graph captured on the first batch's values refuses a batch that
    # would take another branch; cutting it away would calibrate on the wrong branch silently.
    return with_inputs(n for n in graph.nodes if keep(n) or n.target in _ASSERTIONS)


def cut_graph(
    graph: fx.Graph, keep: Callable[[fx.Node], bool], return_inputs: bool = False
) -> fx.Graph:
    """A copy of ``graph`` with only the nodes ``keep`` selects, its run-time assertions, what
    they depend on and the inputs; it returns nothing, or its inputs as a tuple
    (``return_inputs``)."""
    graph = copy.deepcopy(graph)
    kept = _kept(graph, keep)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(placeholders) if return_inputs else (),)
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None:  # export graphs unflatten outputs by a spec that no longer applies
        graph._codegen.pytree_info = info._replace(out_spec=None)
    # Users come after their inputs, and a kept node's inputs are kept: erase back to front.
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and node not in kept:
            graph.erase_node(node)
    return graph


def needed_nodes(probed: ProbedGraph, names: set[str]) -> frozenset[str]:
    """The nodes of ``probed.gm`` that ``slice_to_probes(probed, names)`` keeps, by name:
    cheap (no copy, no code generation), to decide whether a new slice is worth making."""
    keep = _kept(probed.gm.graph, lambda n: n.op == "call_module" and n.target in names)
    return frozenset(n.name for n in keep)


def slice_to_probes(probed: ProbedGraph, names: set[str]) -> fx.GraphModule:
    """The probed graph cut down to what the probes in ``names`` need.

    Everything those probes do not depend on is dropped: the LM head, and layers that only
    feed converged probes. The graph returns nothing, so each activation is freed after its
    last use, as in the model's own forward (returning the probed activations would hold every
    layer's input until the end: +94 MB at hidden 4096 with 2 layers, growing with depth).
    Shares modules (and probes) with ``probed.gm``.
    """
    graph = cut_graph(probed.gm.graph, lambda n: n.op == "call_module" and n.target in names)
    return fx.GraphModule(probed.gm, graph, "SlicedProbedGraph")  # compiles its code once
