"""The benchmark scripts run end to end on a tiny model and write their tables (not timed)."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

TINY = ["--hidden=32", "--intermediate=64", "--heads=2", "--layers=1", "--vocab=200", "--seq=16"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a benchmark script; its output (stderr: the progress lines)."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          check=True, capture_output=True, text=True)  # fmt: skip


@pytest.mark.slow
def test_calibration_benchmark_writes_side_by_side_table(tmp_path):
    out = tmp_path / "results.md"
    stderr = run("calibration.py", *TINY, "--batches=20", "--heldout=5", "--repeats=2",
                 f"--out={out}").stderr  # fmt: skip
    text = out.read_text()
    for row in ("| evagraph |", "| peft |", "| plain forward |"):
        assert row in text
    # two alternated rounds: A B A B, and each round's time in the table's notes
    order = re.findall(r"running (evagraph|peft) \(round (\d)", stderr)
    assert order == [("evagraph", "1"), ("peft", "1"), ("evagraph", "2"), ("peft", "2")]
    rounds = re.search(r"Wall s of each round: evagraph ([\d.]+), ([\d.]+); peft", text)
    assert rounds, text
    assert "evagraph vs PEFT" in text and "per-layer ranks equal" in text
    # five similarities: to the seen and the held-out PCA at own and shared ranks, and the
    # exact PCA of the rows seen against the held-out one; then the held-out variance the
    # components capture at own and shared ranks
    for method in ("evagraph", "peft"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        sims = [float(v) for v in re.findall(r"\| (0\.\d{4}|1\.0000) ", row)]
        assert len(sims) == 7, row
        assert 0 < sims[5] <= 1 and 0 < sims[6] <= 1, row


@pytest.mark.slow
def test_rows_needed_benchmark_compares_with_held_out_pca(tmp_path):
    out = tmp_path / "results.md"
    args = ["--batches=20", "--grid=2,5,20", "--reference-batches=10", f"--out={out}"]
    run("rows_needed.py", *TINY, *args)
    text = out.read_text()
    for row in ("| peft |", "| evagraph |", "| exact PCA of the first 2 |", "first 20 |"):
        assert row in text
    assert "PEFT's components" in text or "every prefix reaches" in text


@pytest.mark.slow
def test_scaling_benchmark_writes_a_row_per_method(tmp_path):
    out = tmp_path / "results.md"
    raw = tmp_path / "raw.json"
    args = ["--widths=32", "--vocab=200", "--seq=16", "--batches=12", "--heldout=4",
            f"--out={out}", f"--json={raw}"]  # fmt: skip
    assert "running evagraph" in run("scaling.py", *args).stderr
    text = out.read_text()
    assert "| 32 / 64 | evagraph |" in text and "| 32 / 64 | peft |" in text
    # --resume reuses the measured width and computes only the quality it lacks
    rows = json.loads(raw.read_text())
    del rows[0][1]["peft"]["quality"]["heldout_common"]
    raw.write_text(json.dumps(rows))
    log = run("scaling.py", *args, "--resume").stderr
    assert "running" not in log and "quality ..." in log
    assert "heldout_common" in json.loads(raw.read_text())[0][1]["peft"]["quality"]
    assert out.read_text().count("| 32 / 64 | peft |") == 2
    # --seeds: seed 0 is reused, seed 1 runs, and a table averages the seeds
    log = run("scaling.py", *args, "--resume", "--seeds=0,1").stderr
    assert log.count("running evagraph") == 1 and "seed 1 ..." in log
    assert {a["seed"] for a, _ in json.loads(raw.read_text())} == {0, 1}
    assert "| 32 / 64, seed 1 | peft |" in out.read_text()
    assert "| 32 | 2 |" in out.read_text()


@pytest.mark.slow
def test_distributed_benchmark_writes_a_row_per_method_and_process_count(tmp_path):
    out = tmp_path / "results.md"
    raw = tmp_path / "raw.json"
    run("distributed.py", *TINY, "--batches=6", f"--out={out}", f"--json={raw}")
    text = out.read_text()
    assert "## Data-parallel calibration: communication, evagraph vs PEFT" in text
    for method in ("evagraph", "peft"):
        for processes in (1, 2):
            assert f"| {method} | {processes} |" in text
    assert "PEFT / evagraph bytes per minibatch:" in text
    results = json.loads(raw.read_text())
    # one process alone: evagraph calls no collective; two: some, and the same decisions
    assert results["evagraph"]["1"]["calls_per_minibatch"] == 0
    assert results["evagraph"]["2"]["payload_per_minibatch"] > 0
    assert results["sanity"]["evagraph"]["ranks_identical"]
    assert results["sanity"]["evagraph"]["sync_counters_agree"]


@pytest.mark.slow
def test_gpu_suite_smoke_run_on_any_device(tmp_path):
    out = tmp_path / "results.md"
    run("gpu_suite.py", "--smoke", "--batches=12", "--heldout=4", f"--out={out}")
    text = out.read_text()
    assert "GPU suite" in text and "| toy: 32 / 64 x 1 | evagraph |" in text
    assert "| tiny_llama |" in text  # then the limit matrix


def test_solver_latency_times_every_kind_of_work(tmp_path):
    out = tmp_path / "results.md"
    run("solver_latency.py", "--dims", "48", "64", "--blocks", "2", "--rows", "40", "--k", "4",
        "--repeats", "1", f"--out={out}")  # fmt: skip
    rows = dict(re.findall(r"^\| ([a-z0-9 ,()]+) \| ([\d.]+) \|$", out.read_text(), re.M))
    assert set(rows) == {
        "products", "gram of the coordinates (float64)", "qr, one per layer",
        "qr, batched by shape", "cholesky qr2, one per layer", "eigh, batched",
        "eigh, on the host",
    }  # fmt: skip
    assert all(float(ms) >= 0 for ms in rows.values())


def test_sketch_width_compares_each_statistic_with_the_exact_pca(tmp_path):
    out = tmp_path / "results.md"
    run("sketch_width.py", "--model=toy", "--blocks", "0", "--batches=3", "--seq=16", "--k=4",
        "--widths", "12", "64", "--ranks", "2", "4", f"--out={out}")  # fmt: skip
    rows = re.findall(r"^\| (model\S+) \| (\d+) \| ([a-z =\d]+) \| ([\d.]+) \| ([\d.]+) \| "
                      r"([\d.]+) \| [\d.]+ \|$", out.read_text(), re.M)  # fmt: skip
    assert len(rows) == 4 * 3  # four groups, exact and two widths
    for _, d, stat, top2, top4, span in rows:
        if stat == "exact" or stat == f"sketch q = {d}":  # a full-width sketch keeps every row
            assert float(top4) > 0.9999 and float(span) > 0.9999, (stat, d)
        assert float(top2) >= float(top4)


def test_cholesky_qr2_gives_an_orthonormal_basis_of_the_same_span():
    spec = importlib.util.spec_from_file_location("sl", ROOT / "benchmarks" / "solver_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cholesky_qr2 = module.cholesky_qr2
    a = torch.randn(300, 40)
    q = cholesky_qr2(a)
    torch.testing.assert_close(q.T @ q, torch.eye(40), atol=1e-5, rtol=0)
    householder = torch.linalg.qr(a).Q
    torch.testing.assert_close(torch.linalg.svdvals(q.T @ householder), torch.ones(40))


def test_memory_projection_matches_the_real_statistics(tmp_path):
    out = tmp_path / "results.md"
    run("memory.py", "--check-width=256", f"--out={out}")
    text = out.read_text()
    for model in ("Llama-3.2-1B", "Llama-3-8B", "Llama-3-70B"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {model} |"))
        assert float(re.search(r"\| ([\d.]+)x \|", row).group(1)) <= 2.0  # within 2x PEFT's
    for kind in ("evagraph", "before", "peft"):
        formula, measured = re.search(rf"\| {kind} \| ([\d,]+) \| ([\d,]+) \|", text).groups()
        assert formula == measured


@pytest.mark.slow
def test_zoo_sweep_records_every_check_per_model(tmp_path):
    raw, results = tmp_path / "zoo.json", tmp_path / "results.md"
    results.write_text("# Benchmark results\n\n## Model zoo sweep (issue 17)\n\nold\n\n## Next\n")
    readme = tmp_path / "README.md"
    readme.write_text("- a\n<!-- zoo:begin: generated -->\nold\n<!-- zoo:end -->\n- b\n")
    run("zoo.py", "--only=test_resnet,llama", f"--out={raw}", "--write-results",
        f"--results={results}", f"--readme={readme}")  # fmt: skip
    records = {r["name"]: r for r in json.loads(raw.read_text())["results"]}
    assert set(records) == {"test_resnet", "llama"}
    for record in records.values():
        assert record["status"] == "ran", record
        checks = record["checks"]
        assert set(checks) == {"init_equal", "lora_only", "merge", "class_kept", "peft", "skipped"}
        assert all(c["status"] == "pass" for c in checks.values()), checks
    text = results.read_text()
    assert "old" not in text and text.count("## Model zoo sweep (issue 17)") == 1
    assert "## Next" in text and "timm: 1 of 1 timm families pass every check" in text
    assert "| hf | llama | LlamaForCausalLM | export |" in text
    shown = " ".join(readme.read_text().split())  # the README bullet, from the same records
    assert "Last run: 1 of 1 timm families and 1 of 1 transformers model types" in shown
    assert "old" not in shown and shown.startswith("- a ") and shown.endswith(" - b")


@pytest.mark.slow
def test_limit_benchmark_splits_evagraph_and_times_peft_beside_the_forward(tmp_path):
    out = tmp_path / "results.md"
    run("limit.py", "--cases", "tiny_resnet", "tiny_llama", "--repeats=1", "--n0=1", "--n1=2",
        f"--out={out}")  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines()
            if line.startswith("| tiny_")}  # fmt: skip
    assert set(rows) == {"tiny_resnet", "tiny_llama"}
    assert "n/a (convs)" in rows["tiny_resnet"] and "faster" in rows["tiny_llama"]
    # Every part is reported. Not their signs: a tiny case's marginal (a difference of two
    # runs of about a second) is within the machine's noise, and came out negative under load.
    number = r"-?\d+\.\d\d"
    for row in rows.values():
        assert re.search(rf"rows {number} products {number} qr {number} eigh {number}", row), row


def test_limit_benchmark_stops_peft_without_leaving_its_hooks_behind():
    # Left behind, a stopped run's SVD hooks would run again in every later run of the
    # process and inflate PEFT's marginal (they did until stop 43).
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import eva

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import limit
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model, batches, _ = limit.build("tiny_llama", 2)
    config = peft.LoraConfig(
        r=4, target_modules=limit.LLM_TARGETS, init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2, tau=0.99999),
    )  # fmt: skip
    for n in (1, 2):
        assert limit.peft_minibatches(model, batches[:n], config, n) == n + 1  # + its hashing
        left = [h for m in model.modules() for h in m._forward_hooks.values()]
        assert not any(isinstance(h, eva._Hook) for h in left), left


def test_the_real_models_gguf_file_can_be_given_by_path(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import real
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    given = tmp_path / real.GGUF_NAME
    monkeypatch.setenv("EVAGRAPH_GGUF", str(given))
    with pytest.raises(real.Unavailable, match="EVAGRAPH_GGUF"):
        real.gguf_file(install=False)  # not there yet
    given.write_bytes(b"GGUF")
    assert real.gguf_file(install=False) == given
    monkeypatch.setenv("EVAGRAPH_GGUF", str(tmp_path / "other.gguf"))
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(real.Unavailable, match="named"):
        real.gguf_file(install=False)


@pytest.mark.slow
def test_time_split_accounts_for_the_whole_calibration():
    proc = run("time_split.py", *TINY, "--batches=12", "--r=4", "--statistic=lowrank")
    rows = {
        k.strip(): float(v)
        for k, v in re.findall(r"^\| ([^|]+?) \| ([\d.-]+) \|", proc.stdout, re.M)
    }
    # The parts do not overlap: what is left over ("rest") is not negative, and the QR and
    # the eigendecompositions are inside the updates.
    assert rows["rest"] >= -0.01, proc.stdout
    inside = rows["of which QR (low-rank statistic)"] + rows["of which eigh (low-rank statistic)"]
    assert 0 < inside <= rows["statistic updates"], proc.stdout
    assert rows["statistic updates"] > 0 and rows["graph only (forward less updates)"] > 0
    assert rows["trace (capture, layer graph, probes)"] > 0


def test_conv_copy_times_both_copies_of_every_adapted_conv():
    out = run("conv_copy.py", "--models", "resnet18", "--size=32", "--batch=1", "--repeats=1")
    rows = re.findall(r"^\| resnet18 \| (\d+) \| ([\d.]+) \| ([\d.]+) \| .* \| ([\d.]+) \|$",
                      out.stdout, re.M)  # fmt: skip
    assert len(rows) == 1
    convs, values, forward, ratio = rows[0]
    assert int(convs) == 20  # resnet18's convs, downsampling 1x1 included: all groups == 1
    assert float(values) > 0 and float(forward) > 0 and float(ratio) > 0
