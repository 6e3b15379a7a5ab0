"""Communication and time of data-parallel calibration: evagraph vs PEFT (CPU, gloo).

    python benchmarks/distributed.py                        # hidden 512, 40 global batches
    python benchmarks/distributed.py --hidden 1024 --out /tmp/dist_results.md --json dist.json

Four runs, each a fresh process group (gloo, rendezvous through a file) of separate
processes that build the same model and data (``calibration.py``'s Llama-style model and
Zipf token batches), so no two runs share memory or caches:

1. evagraph, 1 process, all global batches;
2. evagraph, ``--processes`` processes, every one given the same global batches (evagraph
   keeps each process's slice and all-reduces the statistics inside each update);
3. PEFT's ``get_eva_state_dict`` (its defaults, called as ``calibration.py`` calls it),
   1 process, the same global batches;
4. PEFT, ``--processes`` processes, each given its part of every global batch (samples
   [0:4] to process 0, [4:8] to process 1 for batches of 8): PEFT's own model of data
   parallelism, where each layer's input rows are all-gathered on every forward.

Communication is counted in each process by wrapping the collectives of ``torch.distributed``
(``all_reduce``, ``broadcast``, ``all_gather``, ``all_gather_into_tensor``, ...: both
libraries call them as ``torch.distributed.<name>``) while the calibration call runs:
"payload" is the bytes of the tensors the process hands in; "sent" the bytes the process
sends under the standard algorithms: ring all-reduce 2(W-1)/W x payload, ring all-gather
(W-1) x its input, broadcast from a flat tree (the root sends the payload to each of the
W-1 others, the others send nothing). Per minibatch: divided by the global minibatches
consumed (evagraph: ``state.steps``; PEFT: its forward calls, including its first, hashing,
pass). Process groups of one process are initialised too: evagraph then calls no collective
(it syncs only for more than one process); PEFT gathers whenever ``torch.distributed`` is
initialised, which sends nothing at W=1.

Torch threads per process: cores / processes, so every run has the whole machine
(``--threads N`` fixes it). Time the runs on an otherwise idle machine: with other work on
the cores, two threads per process lose far more than one (evagraph's many small operations
most: 112 s against 21 s at hidden 512 on 2 busy cores, 13 s idle).

``--marginal``: the scaling of the work itself (issue 34). For 1, 2 and 4 processes (one
torch thread each), evagraph alone, with ``--batches`` and ``--batches + --extra`` global
batches and tau = 1 (nothing converges, so every batch updates every statistic): the CPU
seconds of all processes together (``time.process_time``, gloo's threads included) between
taking batch ``--batches`` and the end, over the ``--extra`` batches, is the marginal CPU per
minibatch (one run: the fixed cost, imports, model and capture, which varies by seconds
with the machine's load, does not enter it), the rest of each worker's CPU the fixed cost.
``--baseline DIR`` runs
every case with the evagraph in DIR as well (e.g. ``git archive`` of the commit before),
interleaved with this one, so both see the same load.

Sanity: evagraph's multi-process components against its one-process ones (smallest |cos|
over all components of all groups, ranks identical), and likewise PEFT's at common ranks.
A table goes to stdout and is appended to ``--out`` (default benchmarks/results.md).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from calibration import TARGETS, build, header, parser, publish, worker_argv  # noqa: E402

from evagraph.stats import sketch_rank  # noqa: E402

TITLE = "Data-parallel calibration: communication, evagraph vs PEFT (issue 15)"
METHODS = ("evagraph", "peft")


# -- counting collectives ---------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pickled(obj: Any) -> int:
    return len(pickle.dumps(obj))


# name -> (payload of the bound arguments, bytes sent given payload, rank, world and arguments)
_RING_ALL_REDUCE = lambda p, r, w, a: 2 * (w - 1) / w * p  # noqa: E731
_RING_ALL_GATHER = lambda p, r, w, a: (w - 1) * p  # noqa: E731
_COLLECTIVES: dict[str, tuple[Callable, Callable]] = {
    "all_reduce": (lambda a: _nbytes(a["tensor"]), _RING_ALL_REDUCE),
    "all_reduce_coalesced": (lambda a: sum(map(_nbytes, a["tensors"])), _RING_ALL_REDUCE),
    "broadcast": (
        lambda a: _nbytes(a["tensor"]),
        lambda p, r, w, a: (w - 1) * p if r == a["src"] else 0,  # flat tree from the root
    ),
    "broadcast_object_list": (
        lambda a: _pickled(a["object_list"]),
        lambda p, r, w, a: (w - 1) * p if r == a.get("src", 0) else 0,
    ),
    "all_gather": (lambda a: _nbytes(a["tensor"]), _RING_ALL_GATHER),
    "all_gather_into_tensor": (lambda a: _nbytes(a["input_tensor"]), _RING_ALL_GATHER),
    "all_gather_object": (lambda a: _pickled(a["obj"]), _RING_ALL_GATHER),
    "gather": (
        lambda a: _nbytes(a["tensor"]),
        lambda p, r, w, a: 0 if r == a.get("dst", 0) else p,
    ),
    "reduce": (lambda a: _nbytes(a["tensor"]), lambda p, r, w, a: 0 if r == a["dst"] else p),
    "reduce_scatter_tensor": (
        lambda a: _nbytes(a["input"]),
        lambda p, r, w, a: (w - 1) / w * p,  # ring reduce-scatter
    ),
    "barrier": (lambda a: 0, lambda p, r, w, a: 0),
}


class Collectives:
    """Calls, payload and sent bytes of this process's collectives, by name, while
    ``counting()`` is active (the ``torch.distributed`` attributes are wrapped)."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.calls: dict[str, int] = {}
        self.payload: dict[str, float] = {}
        self.sent: dict[str, float] = {}

    def _wrap(self, name: str, fn: Callable) -> Callable:
        payload_of, sent_of = _COLLECTIVES[name]
        signature = inspect.signature(fn)

        def counted(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            p = payload_of(a)
            self.calls[name] = self.calls.get(name, 0) + 1
            self.payload[name] = self.payload.get(name, 0) + p
            self.sent[name] = self.sent.get(name, 0) + sent_of(p, self.rank, self.world, a)
            return fn(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def counting(self) -> Iterator[Collectives]:
        # Both libraries call ``torch.distributed.<name>`` (``import torch.distributed as
        # dist``); wrapping only these attributes counts what they hand in, and not the
        # calls c10d makes internally (all_gather_object -> all_gather) twice.
        originals = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}
        try:
            for n, fn in originals.items():
                setattr(dist, n, self._wrap(n, fn))
            yield self
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)

    def totals(self) -> dict:
        return {
            "calls": sum(self.calls.values()),
            "payload_bytes": sum(self.payload.values()),
            "sent_bytes": sum(self.sent.values()),
            "by_op": {
                n: {"calls": c, "payload_bytes": self.payload[n], "sent_bytes": self.sent[n]}
                for n, c in self.calls.items()
            },
        }


# -- one process of one run --------------------------------------------------------------------


def _part(batch: dict, rank: int, world: int) -> dict:
    """Process ``rank``'s contiguous part of a global batch (PEFT's data parallelism)."""
    n = batch["input_ids"].shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    return {k: v[lo:hi] for k, v in batch.items()}


def worker(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run one method in this process of a process group; its measurements and components."""
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group(
        "gloo", init_method=f"file://{args.rdzv}", rank=args.rank, world_size=args.world,
        timeout=timedelta(minutes=10),
    )  # fmt: skip
    try:
        model, batches = build(args)
        counter = Collectives()
        out: dict = {"rank": args.rank, "threads": torch.get_num_threads()}
        dist.barrier()  # start together: the first collective must not time a peer's build
        if args.worker == "evagraph":
            import evagraph
            import evagraph.distributed as ed

            # The Sync the calibration makes (``current()`` makes a new one per call), for its
            # own counters: a cross-check of the wrapped collectives.
            syncs: list = []
            current = ed.current

            def recorded() -> ed.Sync | None:
                syncs.append(current())
                return syncs[-1]

            ed.current = recorded
            try:
                with counter.counting():
                    t = time.perf_counter()
                    state = evagraph.calibrate(
                        model, _clocked(batches, out), budget=args.r, rho=args.rho, tau=args.tau,
                        progress=False, targets=[f"*.{n}" for n in TARGETS],
                        statistic=args.statistic,
                    )  # fmt: skip
                    out["seconds"] = time.perf_counter() - t
            finally:
                ed.current = current
            out["minibatches"] = state.steps
            out["process_cpu"] = time.process_time()  # this whole process so far
            out["ranks"] = state.ranks(args.r, args.rho)
            out["converged"] = not state.unconverged
            mine = [s for s in syncs if s is not None]
            out["sync_payload_bytes"] = sum(s.payload_bytes for s in mine)
            out["sync_collectives"] = sum(s.collectives for s in mine)
            components = {g: c.components.float() for g, c in state.components.items()}
        else:
            import peft

            if args.world > 1:  # PEFT's model: each process's loader yields only its part
                batches = [_part(b, args.rank, args.world) for b in batches]
            forwards = [0]

            def forward_fn(m: torch.nn.Module, inputs: dict) -> Any:
                forwards[0] += 1
                return m(**inputs)

            config = peft.LoraConfig(
                r=args.r, target_modules=TARGETS, init_lora_weights="eva",
                eva_config=peft.EvaConfig(rho=args.rho, tau=args.tau),
            )  # fmt: skip
            with counter.counting():
                t = time.perf_counter()
                state = peft.get_eva_state_dict(
                    model, batches, config, forward_fn=forward_fn, show_progress_bar=False
                )
                out["seconds"] = time.perf_counter() - t
            out["minibatches"] = forwards[0]
            out["ranks"] = {k: v.shape[0] for k, v in state.items()}
            out["converged"] = True  # PEFT cycles the data until every layer converges
            components = {k: v.float() for k, v in state.items()}
        out.update(counter.totals())
        return out, components
    finally:
        dist.destroy_process_group()


def _clocked(batches: list, out: dict) -> Iterator[Any]:
    """``batches``, recording this process's CPU seconds as each is taken (and at the end) in
    ``out["cpu_at"]``: the calibration takes batch i + 1 once batch i's work is done."""
    out["cpu_at"] = []
    for b in batches:
        out["cpu_at"].append(time.process_time())
        yield b
    out["cpu_at"].append(time.process_time())


# -- the runs ----------------------------------------------------------------------------------


def run(
    method: str, world: int, argv: list[str], env: dict | None = None
) -> tuple[list[dict], list[dict]]:
    """One run: ``world`` processes of this script in a fresh process group; per process its
    measurements and its components. If one process fails, the others are stopped. ``env``:
    the workers' environment (default: this one's)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, *argv, "--worker", method, f"--world={world}",
               f"--rdzv={tmp}/rdzv", f"--result={tmp}/out"]  # fmt: skip
        # stdout carries the table only
        procs = [
            subprocess.Popen([*cmd, f"--rank={r}"], stdout=sys.stderr, env=env)
            for r in range(world)
        ]
        failed = None
        while any(p.poll() is None for p in procs) and failed is None:
            failed = next((p for p in procs if p.returncode not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed or next((p for p in procs if p.returncode != 0), None)
        if failed is not None:
            for p in procs:  # peers would wait in a collective until the timeout
                if p.poll() is None:
                    p.kill()
                    p.wait()
            r = procs.index(failed)
            raise RuntimeError(f"{method}, {world} process(es): process {r} failed (above)")
        results = [json.loads(Path(f"{tmp}/out.{r}.json").read_text()) for r in range(world)]
        comps = [torch.load(f"{tmp}/out.{r}.pt") for r in range(world)]
    return results, comps


def summarise(per_process: list[dict]) -> dict:
    """A run's row: the slowest process's wall time; bytes and calls per global minibatch,
    the largest over the processes (under evagraph, process 0: the broadcasts' root)."""
    steps = per_process[0]["minibatches"]
    return {
        "seconds": max(p["seconds"] for p in per_process),
        "minibatches": steps,
        "minibatches_agree": all(p["minibatches"] == steps for p in per_process),
        "payload_per_minibatch": max(p["payload_bytes"] for p in per_process) / steps,
        "sent_per_minibatch": max(p["sent_bytes"] for p in per_process) / steps,
        "calls_per_minibatch": max(p["calls"] for p in per_process) / steps,
        "converged": all(p["converged"] for p in per_process),
        "ranks": per_process[0]["ranks"],
        "processes": per_process,
    }


def min_abs_cos(a: dict, b: dict, ranks: dict | None = None) -> float:
    """Smallest |cos| between corresponding rows of ``a`` and ``b`` (per key; the first
    ``ranks[key]`` rows when given, else all); rows that are zero in either are skipped."""
    worst = 1.0
    for k, x in a.items():
        n = min(x.shape[0], b[k].shape[0]) if ranks is None else ranks[k]
        x, y = x[:n].double(), b[k][:n].double()
        norms = x.norm(dim=1) * y.norm(dim=1)
        live = norms > 0
        if live.any():
            cos = ((x * y).sum(1)[live] / norms[live]).abs()
            worst = min(worst, float(cos.min()))
    return worst


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def sanity(method: str, one: tuple, many: tuple) -> dict:
    """The multi-process run against the one-process run (components and ranks), and the
    processes of the multi-process run against each other."""
    (res1, comps1), (resw, compsw) = one, many
    r1, rw = res1[0]["ranks"], resw[0]["ranks"]
    # evagraph's components are per group (all k of them); PEFT's per layer, at its ranks
    common = None if method == "evagraph" else {k: min(r1[k], rw.get(k, 0)) for k in r1}
    out = {
        "ranks_identical": r1 == rw,
        "min_abs_cos": min_abs_cos(comps1[0], compsw[0], common),
        "processes_max_abs_diff": max(
            (_diff(c[k], compsw[0][k]) for c in compsw[1:] for k in c), default=0.0
        ),
        "minibatches": (res1[0]["minibatches"], resw[0]["minibatches"]),
    }
    if method == "evagraph":  # evagraph's own counters against the wrapped collectives
        out["sync_counters_agree"] = all(
            p["sync_payload_bytes"] == p["payload_bytes"] and p["sync_collectives"] == p["calls"]
            for p in resw
        )
    return out


# -- the table ---------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    return f"{n:,.0f}"


def table(args: argparse.Namespace, results: dict) -> list[str]:
    k = round(args.rho * args.r)
    kind = (
        f"statistic {args.statistic}: exact d x d sums for rows up to {8 * k} wide, else the "
        f"rank-{sketch_rank(k)} incremental SVD"
        if args.statistic == "auto"
        else f"statistic {args.statistic}"
    )
    model = (
        f"- model: Llama-style, {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads, vocab {args.vocab}, {args.dtype}, "
        f"{args.device}; global batches {args.batch} x {args.seq} Zipf tokens, "
        f"{args.batches} of them; r={args.r}, rho={args.rho}, tau={args.tau}; targets: "
        f"{', '.join(TARGETS)}; evagraph {kind}; gloo, one process group per run; torch "
        f"threads per process: {args.threads or 'cores / processes'}"
    )
    lines = [f"## {TITLE}", *header(TITLE, model)[1:]]
    lines += [
        "| method | processes | wall s | minibatches | payload bytes/process/minibatch "
        "| sent bytes/process/minibatch (ring) | collectives/minibatch | converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        for w, r in results.get(m, {}).items():
            lines.append(
                f"| {m} | {w} | {r['seconds']:.1f} | {r['minibatches']}"
                f"{'' if r['minibatches_agree'] else ' (processes differ)'} "
                f"| {_bytes(r['payload_per_minibatch'])} | {_bytes(r['sent_per_minibatch'])} "
                f"| {r['calls_per_minibatch']:.1f} "
                f"| {'yes' if r['converged'] else 'no (data ran out)'} |"
            )
    w = str(args.processes)
    lines.append("")
    if all(w in results.get(m, {}) for m in METHODS):
        ours, theirs = results["evagraph"][w], results["peft"][w]
        lines.append(
            f"PEFT / evagraph bytes per minibatch: "
            f"{theirs['payload_per_minibatch'] / ours['payload_per_minibatch']:.1f} x "
            f"(payload), {theirs['sent_per_minibatch'] / ours['sent_per_minibatch']:.1f} x "
            f"(sent, ring), at {w} processes"
        )
        lines.append("")
    notes = [
        "bytes and collectives are the largest over a run's processes (evagraph: process 0, "
        "the root of its broadcasts), divided by the global minibatches consumed (evagraph: "
        "`state.steps`; PEFT: forward calls, its first, hashing, pass included); wall s: the "
        "slowest process's calibration call",
        "payload: bytes of the tensors a process hands to collectives; sent: ring all-reduce "
        "2(W-1)/W x payload, ring all-gather (W-1) x its input, broadcast from a flat tree "
        "(the root sends the payload to each of the W-1 others, the others nothing)",
        "1-process runs initialise a process group of one: evagraph calls no collective "
        "there; PEFT gathers whenever torch.distributed is initialised (nothing is sent)",
        "PEFT cycles its data until every layer converges (forwards beyond the batches "
        "reuse them); evagraph stops when the batches run out",
        "load average (1 min) at the start and the end: "
        + ", ".join(f"{v:.1f}" for v in results["load"])
        + f" on {os.cpu_count()} cores (other work on the machine slows every row)",
    ]
    for m in METHODS:
        s = results.get("sanity", {}).get(m)
        if s is None:
            continue
        what = "all components of all groups" if m == "evagraph" else "rows at common ranks"
        line = (
            f"{m}, {w} processes vs 1: smallest |cos| over {what} "
            f"{s['min_abs_cos']:.6f}; ranks {'identical' if s['ranks_identical'] else 'DIFFER'}; "
            f"minibatches {s['minibatches'][1]} vs {s['minibatches'][0]}; the processes' "
            f"components differ by at most {s['processes_max_abs_diff']:.1e}"
        )
        if m == "evagraph":
            line += (
                "; its own Sync counters "
                f"{'agree' if s['sync_counters_agree'] else 'DISAGREE'} with the wrapped "
                "collectives"
            )
        notes.append(line)
    lines += [f"- {n}" for n in notes]
    return lines


# -- marginal cost (issue 34) -------------------------------------------------------------------

WORLDS = (1, 2, 4)


def _code_env(path: Path) -> dict:
    """Workers that import evagraph from ``path`` (before any installed one)."""
    return {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}


def marginal_runs(args: argparse.Namespace) -> dict:
    """For each code and process count, a run of ``--batches + --extra`` global batches: its
    marginal and fixed CPU, bytes and components (see the module docstring)."""
    codes = {"sharded": Path(__file__).resolve().parents[1]}
    if args.baseline:
        codes["today"] = Path(args.baseline).resolve()
    n0, n = args.batches, args.batches + args.extra
    out: dict = {}
    for w in WORLDS:
        for code, path in codes.items():  # interleaved: both see the same load
            argv = [*worker_argv(args), f"--batches={n}", "--tau=1.0", "--threads=1"]
            print(f"{code}, {w} process(es), {n} batches ...", file=sys.stderr, flush=True)
            res, comps = run("evagraph", w, argv, _code_env(path))
            assert all(p["minibatches"] == n for p in res), "a layer converged at tau=1"
            out.setdefault(code, {})[w] = _marginal(res, comps, n0, n)
    # The floor without communication: one process on a W-th of each batch, W times over.
    for w in WORLDS[1:]:
        argv = [*worker_argv(args), f"--batches={n}", "--tau=1.0", "--threads=1"]
        argv.append(f"--batch={args.batch // w}")
        print(f"no communication, 1 process, batch / {w} ...", file=sys.stderr, flush=True)
        res, comps = run("evagraph", 1, argv, _code_env(codes["sharded"]))
        row = _marginal(res, comps, n0, n)
        row["marginal"] *= w
        out.setdefault("1 process on batch/W, x W", {1: out["sharded"][1]})[w] = row
    return out


def _marginal(res: list[dict], comps: list[dict], n0: int, n: int) -> dict:
    per = sum(p["cpu_at"][-1] - p["cpu_at"][n0] for p in res) / (n - n0)
    w = len(res)
    return {
        "marginal": per,
        "fixed": sum(p["process_cpu"] for p in res) / w - per * n / w,
        "payload": max(p["payload_bytes"] for p in res) / n,
        "sent": max(p["sent_bytes"] for p in res) / n,
        "calls": max(p["calls"] for p in res) / n,
        "components": comps[0],
    }


def marginal_table(args: argparse.Namespace, runs: dict) -> list[str]:
    n0, n1, m = args.batches, args.batches + args.extra, args.extra
    model = (
        f"- model: Llama-style, {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads; global batches {args.batch} x {args.seq} "
        f"Zipf tokens, {n1} of them ({n0} before the clock starts), tau=1 (nothing "
        f"converges); r={args.r}, "
        f"rho={args.rho}, statistic {args.statistic}; gloo, one torch thread per process"
    )
    title = f"Marginal CPU per minibatch, 1/2/4 processes, hidden {args.hidden} (issue 34)"
    lines = [*header(title, model)]
    load = runs.pop("load", "?")
    lines += [
        "| code | processes | marginal CPU s/minibatch (all processes) | vs 1 process "
        "| fixed CPU s/process | payload bytes/minibatch (max process) "
        "| sent bytes/minibatch (max process) | collectives/minibatch | min abs cos vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for code, by_world in runs.items():
        one = by_world[1]["marginal"]
        for w, r in by_world.items():
            cos = min_abs_cos(by_world[1]["components"], r["components"])
            cos = "n/a" if code.startswith("1 process") else f"{cos:.6f}"
            lines.append(
                f"| {code} | {w} | {r['marginal']:.3f} | {r['marginal'] / one:.2f}x "
                f"| {r['fixed']:.1f} | {_bytes(r['payload'])} | {_bytes(r['sent'])} "
                f"| {r['calls']:.1f} | {cos} |"
            )
    lines += [
        "",
        f"- marginal: CPU seconds from taking batch {n0} to the end of batch {n1 - 1}, over "
        f"{m}, summed over the processes (time.process_time in each, gloo's threads "
        f"included); fixed: a process's CPU less its share of the {n1} batches at the "
        "marginal rate (imports, model, capture); bytes and collectives: per minibatch over "
        "the whole run, the largest process (reduce: a non-root sends its payload, the root "
        "nothing)",
        "- '1 process on batch/W, x W': one process calibrating on a W-th of each global batch, "
        "its marginal CPU times W: what W processes would cost with no communication and no "
        "replicated work at all (its components are of other data: cos not comparable)",
        f"- load average (1 min) at the start and the end: {load} on {os.cpu_count()} cores",
    ]
    return lines


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", dest="r", type=int, default=argparse.SUPPRESS, help="= --r")
    p.add_argument("--processes", type=int, default=2, help="processes of the parallel runs")
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rdzv", default=None, help=argparse.SUPPRESS)
    # intermediate and heads follow hidden (as in scaling.py) unless given
    p.set_defaults(layers=2, vocab=32000, batch=8, seq=128, batches=40, r=8, rho=2.0,
                   tau=0.99, intermediate=0, heads=0)  # fmt: skip
    p.add_argument("--marginal", action="store_true", help="the marginal-cost table (issue 34)")
    p.add_argument("--extra", type=int, default=20, help="--marginal: the extra batches")
    p.add_argument("--baseline", default=None, help="--marginal: also evagraph from this dir")
    args = p.parse_args()
    args.intermediate = args.intermediate or round(2.7 * args.hidden / 64) * 64
    args.heads = args.heads or max(1, args.hidden // 64)
    if args.worker:
        out, components = worker(args)
        Path(f"{args.result}.{args.rank}.json").write_text(json.dumps(out))
        torch.save(components, f"{args.result}.{args.rank}.pt")
        return
    if args.batch % args.processes:
        p.error(f"--batch {args.batch} does not split evenly over {args.processes} processes")

    if args.marginal:
        load = os.getloadavg()[0]
        runs = marginal_runs(args)
        runs_load = f"{load:.1f}, {os.getloadavg()[0]:.1f}"
        publish(marginal_table(args, {**runs, "load": runs_load}), args.out)
        return
    argv = worker_argv(args)
    results: dict = {"sanity": {}, "load": [os.getloadavg()[0]]}
    for m in args.methods.split(","):
        runs = {}
        for w in (1, args.processes):
            print(f"running {m}, {w} process(es) ...", file=sys.stderr, flush=True)
            runs[w] = run(m, w, argv)
            row = summarise(runs[w][0])
            results.setdefault(m, {})[str(w)] = row
            print(
                f"{m} x{w}: {row['seconds']:.1f} s, {row['minibatches']} minibatches, "
                f"{_bytes(row['payload_per_minibatch'])} B/minibatch",
                file=sys.stderr,
                flush=True,
            )
        results["sanity"][m] = sanity(m, runs[1], runs[args.processes])
    results["load"].append(os.getloadavg()[0])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=1))
    publish(table(args, results), args.out)


if __name__ == "__main__":
    main()
