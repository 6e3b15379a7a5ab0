"""Data-parallel calibration: two processes (gloo, CPU) give the result of one process that
saw the same global batches, whole-graph and block by block, through the Python API and
under ``torchrun``; a failure on one process stops both with its error shown once. The work
of the statistics is sharded: each decomposition's statistic is held and solved by one owner
process, the others reduce their products to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import evagraph_cmd

import evagraph
from evagraph.distributed import Sync, owners, shard
from evagraph.stats import ExactCovariance, IncrementalSVD, sketch_rank

WORLD = 2
# Each case: the settings both runs use. Layers converge at different batches before the data
# ends (so the processes must agree on when); sequential covers block-by-block mode.
BASE = {"budget": 1, "rho": 2.0, "tau": 0.99}
CASES = {
    "auto": BASE,
    "lowrank": {**BASE, "statistic": "lowrank"},
    "exact": {**BASE, "statistic": "exact"},
    "sequential": {**BASE, "sequential": True},
}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _batches():
    """Global batches of 5 samples (uneven slices: 3 and 2) and a last one of 2, with padding
    in the mask."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (37, 16), generator=g)
    mask = torch.ones(37, 16, dtype=torch.long)
    mask[::3, 11:] = 0  # padded samples: their rows must not count
    return [
        {"input_ids": ids[i : i + 5], "attention_mask": mask[i : i + 5]} for i in range(0, 37, 5)
    ]


def _result(state) -> dict:
    return {
        "ranks": state.ranks(BASE["budget"], BASE["rho"]),
        "components": {g: c.components for g, c in state.components.items()},
        "ratios": {g: c.explained_variance_ratio for g, c in state.components.items()},
        "rows": {g: c.n_rows for g, c in state.components.items()},
        "converged_at": state.converged_at,
        "batches": state.batches,
        "steps": state.steps,
    }


def _solves(results: dict, rank: int):
    """Count, per statistic kind, the solves this process runs for statistics it owns and for
    those it does not (which must be none): ``ExactCovariance.estimate``/``finalize`` and
    ``IncrementalSVD._solved`` (the small eigenproblem) and ``_basis`` (the QR)."""
    counts = results.setdefault("solves", {})
    patched = []

    def wrap(cls, name):
        original = getattr(cls, name)

        def counted(self, *args, **kwargs):
            key = f"{cls.__name__}.{name}:{'own' if self.owner == rank else 'other'}"
            counts[key] = counts.get(key, 0) + 1
            return original(self, *args, **kwargs)

        setattr(cls, name, counted)
        patched.append((cls, name, original))

    for cls, name in [(ExactCovariance, "estimate"), (ExactCovariance, "finalize"),
                      (IncrementalSVD, "_solved"), (IncrementalSVD, "_basis")]:  # fmt: skip
        wrap(cls, name)
    return patched


def _bytes_per_update(rank: int) -> dict:
    """Payload bytes and collectives of one steady-state update of each statistic (owner 1)."""
    sync, d, k, out = Sync(), 48, 4, {}
    g = torch.Generator().manual_seed(rank)
    for kind, cls in (("exact", ExactCovariance), ("lowrank", IncrementalSVD)):
        stat = cls(d, k, "cpu", sync=sync, owner=1)
        for _ in range(3):  # the sketch is full from the second update on
            before = sync.payload_bytes, sync.collectives
            stat.update(torch.randn(20 + rank, d, generator=g))
        out[kind] = (sync.payload_bytes - before[0], sync.collectives - before[1])
        out[f"{kind} holds"] = (stat.gram.numel(), stat.sum.numel()) if kind == "exact" else None
    return out


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        results = {}
        patched = _solves(results, rank)
        try:
            for name, settings in CASES.items():
                state = evagraph.calibrate(_llama(), _batches(), progress=False, **settings)
                results[name] = _result(state)
        finally:
            for cls, name, original in patched:
                setattr(cls, name, original)
        results["bytes"] = _bytes_per_update(rank)
        # Each process sharding the data itself (a DistributedSampler) is refused.
        own = _batches()[rank::WORLD]
        try:
            evagraph.calibrate(_llama(), own, progress=False, **BASE)
        except evagraph.errors.DataError as err:
            results["own shards"] = str(err)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    init = f"file://{out / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(out)), nprocs=WORLD, join=True)
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}


def _same_subspace(a: torch.Tensor, b: torch.Tensor) -> None:
    # Components are sign-fixed; rows of tiny variance gaps may rotate among themselves, so
    # compare per component where the ratios are apart and as subspaces overall.
    assert a.shape == b.shape
    cos = (a * b).sum(1).abs()
    assert float(cos.min()) > 0.999, cos


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_same_global_batches(two_processes, case):
    one = _result(evagraph.calibrate(_llama(), _batches(), progress=False, **CASES[case]))
    for rank in range(WORLD):
        got = two_processes[rank][case]
        assert got["ranks"] == one["ranks"]
        assert got["rows"] == one["rows"]  # masked rows left out on both processes
        assert got["converged_at"] == one["converged_at"]
        assert got["batches"] == one["batches"]
        assert got["steps"] == one["steps"]
        for g, comp in one["components"].items():
            _same_subspace(got["components"][g], comp)
            torch.testing.assert_close(got["ratios"][g], one["ratios"][g], rtol=1e-4, atol=1e-6)
    # The processes agree with each other exactly on every decision.
    assert two_processes[0][case]["ranks"] == two_processes[1][case]["ranks"]
    assert two_processes[0][case]["converged_at"] == two_processes[1][case]["converged_at"]


def test_some_layers_converge_early_so_the_processes_must_agree_when(two_processes):
    at = two_processes[0]["auto"]["converged_at"]
    assert len({v for v in at.values() if v is not None and v > 1}) >= 2, at


def test_each_process_solves_only_the_statistics_it_owns_and_owns_some(two_processes):
    for rank in range(WORLD):
        solves = two_processes[rank]["solves"]
        assert not {k: v for k, v in solves.items() if k.endswith(":other")}, solves
        # Both kinds ran (exact and lowrank cases), and every process owns some of each.
        for what in ("ExactCovariance.estimate", "IncrementalSVD._solved", "IncrementalSVD._basis"):
            assert solves.get(f"{what}:own", 0) > 0, (rank, solves)


def test_only_the_owner_holds_the_exact_sums_and_bytes_per_update_are_as_claimed(two_processes):
    d, k = 48, 4
    q = sketch_rank(k)
    c = min(d, 3 * q + 1) - q  # new directions beside V: the QR of [V^T, y, unit]
    for rank in range(WORLD):
        got = two_processes[rank]["bytes"]
        held = d if rank == 1 else 0
        assert got["exact holds"] == (held * held, held)
        # Exact: one all-reduce (float64) of the largest deviation's exponent (a one-hot over
        # 251) and the count; the sums (f32 d + d^2) reduced to the owner.
        assert got["exact"] == (8 * (251 + 1) + 4 * (d + d * d), 2)
        # Low rank: one all-reduce (float64) of the exponent, the count, the rows' sum and the
        # owner's V (q x d); the products [rows^T z, coef^T z] (d + q) x 2q reduced; the new
        # directions (d x c) broadcast; the small Gram (q + c)^2 and the total (f64) reduced.
        lowrank = 8 * (251 + 1 + d + q * d) + 4 * (d + q) * 2 * q + 4 * d * c
        lowrank += 8 * ((q + c) ** 2 + 1)
        assert got["lowrank"] == (lowrank, 4)


def test_owners_balance_the_cost_in_graph_order():
    costs = {"a": 4.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 2.0}
    assert owners(costs, 1) == dict.fromkeys(costs, 0)
    assert owners(costs, 2) == {"a": 0, "b": 1, "c": 1, "d": 1, "e": 1}
    got = owners(costs, 4)
    assert got == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 1}
    assert owners(costs, 4) == got  # deterministic: every process computes the same


def test_processes_passing_different_batches_are_refused(two_processes):
    for rank in range(WORLD):
        assert "differs between processes" in two_processes[rank]["own shards"]


def test_shard_slices_every_tensor_with_the_sample_dimension():
    batch = {"input_ids": torch.arange(10).view(5, 2), "scale": torch.tensor(2.0), "n": 3}
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert all(p["scale"] is batch["scale"] and p["n"] == 3 for p in parts)


# -- the command line under torchrun --------------------------------------------------------


def _torchrun(args: list[str], cwd: Path, nproc: int = WORLD) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += ["--standalone", "-m", "evagraph", "compile", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _hf_model(tmp_path: Path) -> Path:
    path = tmp_path / "llama"
    _llama().save_pretrained(path)
    return path


def _data(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    path = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 128, (37, 16), generator=g)}, str(path))
    return path


def test_torchrun_compile_equals_one_process_and_only_process_0_writes(tmp_path):
    model, data = _hf_model(tmp_path), _data(tmp_path)
    flags = ["--data", str(data), "--budget", "1", "--rho", "2", "--tau", "0.99"]
    flags += ["--batch-size", "5", "--device", "cpu", "--quiet"]
    one = subprocess.run(
        [*evagraph_cmd(), "compile", str(model), *flags, "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = _torchrun([str(model), *flags, "-o", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("adapted ") == 1  # one summary line, from process 0
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    for report in (a, b):
        for layer in report["layers"]:
            layer["explained_variance_ratio"] = torch.tensor(layer["explained_variance_ratio"])
    for la, lb in zip(a.pop("layers"), b.pop("layers")):
        ra, rb = la.pop("explained_variance_ratio"), lb.pop("explained_variance_ratio")
        torch.testing.assert_close(ra, rb, rtol=1e-4, atol=1e-6)
        assert la == lb
    for report in (a, b):  # the seconds each run took differ; the rest of run must not
        del report["run"]["elapsed_s"]
    assert a == b
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_torchrun_failure_on_one_process_stops_both_with_one_message(tmp_path):
    model, data = _hf_model(tmp_path), tmp_path / "calib.safetensors"
    from safetensors.torch import save_file

    ids = torch.randint(0, 128, (8, 16))
    ids[6, 3] = 100_000  # out of the vocabulary: only process 1's slice of batch 1 fails
    save_file({"input_ids": ids}, str(data))
    run = _torchrun(
        [str(model), "--data", str(data), "--batch-size", "4", "--device", "cpu", "--quiet",
         "--tau", "1", "-o", str(tmp_path / "out")],
        tmp_path,
    )  # fmt: skip
    assert run.returncode != 0
    assert run.stderr.count("the model failed on calibration batch 1") == 1, run.stderr
    assert "process 1: the model failed" in run.stderr
    assert not (tmp_path / "out").exists()


def test_the_shared_scale_is_the_scale_of_the_largest_magnitude():
    from evagraph.stats.base import power_of_two_scale, shared_scale

    class Peer:  # this process and another, whose largest magnitude is ``theirs``
        def __init__(self, theirs: float) -> None:
            self.theirs = theirs

        def sum(self, flat):
            e = int(torch.frexp(torch.tensor(self.theirs)).exponent.clamp(-125, 125))
            peer = torch.zeros_like(flat)
            peer[e + 125] = float(self.theirs != 0)  # its one-hot; it adds 0 to the sums
            return [flat + peer]

    values = [0.0, 8e-41, 1e-30, 0.3, 0.5, 1.0, 3.0, 1e30]
    for a in values:
        for b in values:
            stand_in, (n,) = shared_scale(Peer(b), torch.tensor(a), torch.tensor(2.0))
            want = power_of_two_scale(torch.tensor(max(a, b)))
            assert torch.equal(power_of_two_scale(stand_in), want), (a, b)
            assert float(n) == 2.0
