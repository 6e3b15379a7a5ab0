"""Partition pass: a probed graph -> blocks that can be calibrated one at a time.

Takes the ``ProbedGraph`` and returns a ``Partition``: the part of the graph the probes need,
cut into consecutive ``Block`` subgraphs, each a GraphModule that takes the values earlier
blocks (or the batch) produced and returns the values later blocks read. A batch runs
through the blocks in order, which is what block-by-block (sequential) calibration exploits:
it runs all batches through one block, with only that block's weights resident, before
moving on.

Blocks come from the graph, not from architecture names: every node is keyed by the
parameters it reads, and a key is a parameter's path up to its first numbered component
(``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``, ``stages.1.blocks.0.conv``
-> ``stages.1``): the repeated layers of a transformer, the stages of a CNN. Nodes that read
no numbered parameter (a final norm, masks) join the block in progress, except that
weights before the first numbered block (an embedding) are a block of their own. A
block whose weights exceed ``max_bytes`` is cut again at the next numbered component
(``stages.1.blocks.0``). Weight references (``get_attr``) are copied into every block that
reads them rather than passed between blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import ConfigError
from .probe import ProbedGraph, cut_graph, with_inputs

_NUMBERED = re.compile(r"^\d+$")
_MAX_LEVEL = 4


@dataclass
class Block:
    """One subgraph. ``gm(*[value of n for n in inputs])`` returns the values of ``outputs``.

    weights: qualified names of the parameters and buffers it reads. probes: probe modules
    in it. nbytes: bytes of those weights. key: the numbered path that names it.
    """

    key: str
    gm: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    weights: list[str]
    probes: list[str]
    nbytes: int
    live_after: list[str] = field(default_factory=list)  # values later blocks still read


@dataclass
class Partition:
    """Result of the partition pass. ``head(batch)`` returns the graph inputs, by name in
    ``head_names``; ``blocks`` run in order, the last one holding a probe."""

    head: fx.GraphModule
    head_names: list[str]
    blocks: list[Block]


def _key(path: str, level: int) -> str | None:
    parts = path.split(".")
    numbered = [i for i, p in enumerate(parts) if _NUMBERED.match(p)]
    if not numbered:
        return None
    return ".".join(parts[: numbered[min(level, len(numbered)) - 1] + 1])


def _weights_of(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Qualified names of the parameters and buffers ``node`` reads directly."""
    if node.op == "get_attr":
        return [node.target] if isinstance(_attr(gm, node.target), torch.Tensor) else []
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        prefix = f"{node.target}."
        return [prefix + n for n, _ in m.named_parameters(remove_duplicate=False)] + [
            prefix + n for n, _ in m.named_buffers(remove_duplicate=False)
        ]
    return []


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _node_key(gm: fx.GraphModule, node: fx.Node, level: int) -> str | None:
    names = _weights_of(gm, node) + [
        w for a in node.all_input_nodes if a.op == "get_attr" for w in _weights_of(gm, a)
    ]
    keys = [k for w in names if (k := _key(w, level)) is not None]
    return keys[0] if keys else None


def _segments(
    gm: fx.GraphModule, nodes: list[fx.Node], level: int
) -> list[tuple[str | None, list[fx.Node]]]:
    segments: list[tuple[str | None, list[fx.Node]]] = [(None, [])]
    for node in nodes:
        key = _node_key(gm, node, level)
        if key is not None and key != segments[-1][0]:
            glue = segments[-1][1]
            if segments[-1][0] is None and not _segment_weights(gm, glue):
                segments[-1] = (key, glue)  # weightless glue (masks, positions) joins the block
            else:  # a glue with weights (an embedding) is a block of its own
                if segments[-1][0] is None:
                    label = _segment_weights(gm, glue)[0].rpartition(".")[0]
                    segments[-1] = (label or None, glue)
                segments.append((key, []))
        segments[-1][1].append(node)
    return [s for s in segments if s[1]]


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _nbytes(gm: fx.GraphModule, names: list[str]) -> int:
    seen: dict[int, int] = {}
    for n in names:
        t = _attr(gm, n)
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _segment_weights(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[str]:
    names: dict[str, None] = {}
    for node in nodes:
        for w in _weights_of(gm, node):
            names[w] = None
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                for w in _weights_of(gm, a):
                    names[w] = None
    return list(names)


def _split(
    gm: fx.GraphModule, nodes: list[fx.Node], level: int, max_bytes: int | None
) -> list[tuple[str | None, list[fx.Node]]]:
    """(key, nodes) segments at ``level``, each cut further while over ``max_bytes``."""
    out = []
    for key, seg in _segments(gm, nodes, level):
        size = _nbytes(gm, _segment_weights(gm, seg))
        if max_bytes is None or size <= max_bytes:
            out.append((key, seg))
            continue
        finer = _split(gm, seg, level + 1, max_bytes) if level < _MAX_LEVEL else [(key, seg)]
        if len(finer) == 1:
            raise ConfigError(
                f"block {key or 'outside the numbered layers'} needs {_human(size)} of weights "
                f"at once, more than the memory bound ({_human(max_bytes)}), and cannot be "
                "split further: raise --max-memory (max_memory)"
            )
        out += finer
    return out


def partition(probed: ProbedGraph, max_bytes: int | None = None) -> Partition:
    """Cut ``probed.gm`` into blocks of at most ``max_bytes`` of weights (None: no bound).

    Only what the probes depend on is kept (the model's outputs are not computed).
    """
    gm = probed.gm
    graph = gm.graph
    keep = with_inputs(
        n for n in graph.nodes if n.op == "call_module" and n.target in probed.probes
    )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    body = [n for n in graph.nodes if n in keep and n.op not in ("placeholder", "get_attr")]
    segments = _split(gm, body, 1, max_bytes)

    where = {n: i for i, (_, seg) in enumerate(segments) for n in seg}
    last_use: dict[fx.Node, int] = {}
    for n in placeholders + body:
        users = [where[u] for u in n.users if u in where]
        last_use[n] = max(users, default=-1)

    blocks = []
    for i, (key, seg) in enumerate(segments):
        members = set(seg)
        inputs = list(
            dict.fromkeys(
                a for n in seg for a in n.all_input_nodes if a not in members and a.op != "get_attr"
            )
        )
        live_after = [n for n in placeholders + body if where.get(n, -1) <= i < last_use[n]]
        outputs = [n for n in live_after if n in members]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {a: sub.placeholder(a.name) for a in inputs}

        def arg(a: fx.Node, env=env, sub=sub) -> fx.Node:
            if a not in env:  # a weight reference, copied into every block that reads it
                env[a] = sub.node_copy(a)
            return env[a]

        for n in seg:
            env[n] = sub.node_copy(n, arg)
        sub.output(tuple(env[n] for n in outputs))
        block_gm = fx.GraphModule(gm, sub, f"Block{i}")
        weights = _segment_weights(gm, seg)
        blocks.append(
            Block(
                key=key or f"block {i}",
                gm=block_gm,
                inputs=[a.name for a in inputs],
                outputs=[n.name for n in outputs],
                weights=weights,
                probes=[n.target for n in seg if n.target in probed.probes],
                nbytes=_nbytes(gm, weights),
                live_after=[n.name for n in live_after],
            )
        )
    return Partition(_head(gm), [p.name for p in placeholders], blocks)


def _head(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule called like the model that returns its graph inputs as a tuple."""
    head = fx.GraphModule(
        torch.nn.Module(), cut_graph(gm.graph, lambda n: False, return_inputs=True), "Inputs"
    )
    head.recompile()
    return head
