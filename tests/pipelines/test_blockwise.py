"""Block-by-block calibration: the same statistics as whole-graph calibration, with only one
block's weights resident; models on the meta device, offloaded by accelerate, or read lazily
from a Hugging Face directory; resuming an interrupted run."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import evagraph
from evagraph.errors import ConfigError
from evagraph.passes.capture import capture
from evagraph.passes.layer_graph import build_layer_graph
from evagraph.passes.partition import partition
from evagraph.passes.probe import insert_probes
from evagraph.passes.select import select_targets
from evagraph.pipelines import Blockwise, Whole, choose
from evagraph.pipelines import blockwise as sequential_pass

# tau = 1 converges nothing early: both modes consume every batch, so they see the same rows.
SAME_ROWS = {"tau": 1.0, "progress": False, "return_state": True}


def _llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        vocab_size=64, decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def _cnn():
    torch.manual_seed(0)

    def stage(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(stage(8, 8), stage(8, 16)),
        nn.Sequential(stage(16, 16), stage(16, 16)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def _tokens(n=4, seq=12, vocab=64):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(n)]


def _seq2seq(n=4):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 64, (2, 10), generator=g),
            "decoder_input_ids": torch.randint(0, 64, (2, 6), generator=g),
        }
        for _ in range(n)
    ]


def _images(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 12, 12, generator=g) for _ in range(n)]


MODELS = {
    "llama": (_llama, _tokens),
    "gpt2": (_gpt2, _tokens),
    "t5": (_t5, _seq2seq),
    "cnn": (_cnn, _images),
}


def _assert_same(a: evagraph.EvaState, b: evagraph.EvaState, atol: float = 1e-5) -> None:
    assert a.layer_group == b.layer_group
    assert a.batches == b.batches
    for g, ca in a.components.items():
        cb = b.components[g]
        assert ca.n_rows == cb.n_rows, g
        torch.testing.assert_close(ca.components, cb.components, atol=atol, rtol=0)
        torch.testing.assert_close(
            ca.explained_variance_ratio, cb.explained_variance_ratio, atol=atol, rtol=1e-4
        )
    assert a.ranks(8, 2) == b.ranks(8, 2)


pytestmark = pytest.mark.filterwarnings("ignore::evagraph.ConvergenceWarning")


@pytest.mark.parametrize("name", list(MODELS))
def test_sequential_equals_whole_graph(name):
    build, data = MODELS[name]
    model, batches = build(), data()
    before = [p.detach().clone() for p in model.parameters()]
    _, whole_report, whole = evagraph.transform(model, batches, **SAME_ROWS)
    _, seq_report, seq = evagraph.transform(model, batches, sequential=True, **SAME_ROWS)
    _assert_same(whole, seq)
    assert whole_report.ranks == seq_report.ranks
    # The input model's weights are untouched (and back in place after the placeholders).
    for p, b in zip(model.parameters(), before):
        assert not p.is_meta and torch.equal(p, b)


def _padded_tokens(n=6, batch=4, seq=12, vocab=64):
    """Token batches with right padding (pad id 0, attention_mask 0) of 0 to 7 per row."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        pad = torch.randint(0, 8, (batch,), generator=g)
        mask = (torch.arange(seq) < seq - pad[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.mark.parametrize("tau", [1.0, 0.999])
def test_padded_batches_give_whole_graph_components_where_the_same_batches_were_consumed(tau):
    # Issue 29 item 4. The modes stop a layer by different rules (block by block waits for
    # all k components, whole-graph for its allotment's: a layer allotted rank 0 stops at
    # once, even at tau = 1, and re-opens if its allotment grows), so a layer can stop at
    # another minibatch; on the batches it consumed in both, its PCA is the same.
    model, batches = _llama(), _padded_tokens()
    kw = {**SAME_ROWS, "tau": tau, "budget": 2, "rho": 2}
    _, _, whole = evagraph.transform(model, batches, **kw)
    _, _, seq = evagraph.transform(model, batches, sequential=True, **kw)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    same = [g for g in whole.components if whole.batches[g] == seq.batches[g]]
    assert len(same) >= len(whole.components) - 2, (whole.batches, seq.batches)
    for g in same:
        runs = whole.batches[g]
        assert whole.components[g].n_rows == sum(sum(tokens[a:b]) for a, b in runs)  # no pads
        assert seq.components[g].n_rows == whole.components[g].n_rows, g
        a, b = whole.components[g].components, seq.components[g].components
        k = min(len(a), len(b))
        assert (a[:k] @ b[:k].T).pow(2).sum() / k > 0.9999, g
    # block by block nothing stops before all k components converged: at tau = 1, never
    assert tau < 1 or all(runs == [[0, len(batches)]] for runs in seq.batches.values())


def _partition_of(model, example, max_bytes=None):
    gm = capture(model, example).gm
    lg = build_layer_graph(gm, model)
    probed = insert_probes(lg, select_targets(lg))
    return partition(probed, max_bytes)


def test_blocks_are_the_repeated_layers():
    part = _partition_of(_llama(3), _tokens(1)[0])
    # The embedding (weights before the first numbered layer) is a block of its own.
    assert [b.key for b in part.blocks] == ["model.embed_tokens"] + [
        f"model.layers.{i}" for i in range(3)
    ]
    # The last block holds a probe; the lm_head (not before any probe) is not run.
    assert part.blocks[-1].probes
    assert not any("lm_head" in w for b in part.blocks for w in b.weights)


def test_blocks_of_a_cnn_are_its_stages():
    part = _partition_of(_cnn(), _images(1)[0])
    # The stem conv and two stages. The head is not a target: the last block is what feeds
    # the last probe (stage 2.1's first conv), stage 2.1 itself is never run.
    assert [b.key for b in part.blocks] == ["0", "1", "2"]


def test_max_memory_cuts_blocks_finer_or_names_the_block():
    model = _cnn()
    whole = _partition_of(model, _images(1)[0])
    stage = next(b.nbytes for b in whole.blocks if b.key == "2")
    conv = 16 * 16 * 9 * 4 + 16 * 4  # the stage's conv alone fits; with its norm it does not
    assert conv < stage
    finer = _partition_of(model, _images(1)[0], max_bytes=conv)
    assert [b.key for b in finer.blocks] == ["0", "1", "2.0.0", "2.0.1"]
    with pytest.raises(ConfigError, match=r"block 0 needs 896 B of weights .* \(100 B\)"):
        _partition_of(model, _images(1)[0], max_bytes=100)


def test_max_memory_switches_on_block_by_block_only_when_exceeded():
    model = _llama(2)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert isinstance(choose(model, max_memory=size + 1), Whole)
    assert isinstance(choose(model, max_memory=f"{size // 2}B"), Blockwise)
    with pytest.raises(ConfigError, match="max_memory must be a size"):
        choose(model, max_memory="lots")


def test_hf_directory_is_read_lazily(tmp_path):
    from transformers import LlamaForCausalLM

    from evagraph.loading import load_model

    model = _llama(3)
    model.save_pretrained(tmp_path / "llama")
    batches = _tokens()
    _, _, whole = evagraph.transform(
        LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval(), batches, **SAME_ROWS
    )
    skeleton, kind = load_model(tmp_path / "llama", lazy=True)
    assert kind == "hf" and all(p.is_meta for p in skeleton.parameters())
    adapted, report, seq = evagraph.transform(
        skeleton, batches, weights=tmp_path / "llama", max_memory="1MB", **SAME_ROWS
    )
    _assert_same(whole, seq)
    # Nothing was materialised: the base weights are still on the meta device.
    assert all(p.is_meta for n, p in adapted.named_parameters() if "lora" not in n)
    with pytest.raises(ConfigError, match="not all resident"):
        evagraph.calibrate(skeleton, batches, sequential=False, progress=False)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map"])
def test_accelerate_dispatched_models(how, tmp_path):
    import accelerate

    model, batches = _llama(3), _tokens()
    reference = model(**batches[0]).logits
    _, _, expected = evagraph.transform(model, batches, sequential=True, **SAME_ROWS)
    if how == "cpu_offload":
        dispatched = accelerate.cpu_offload(model, execution_device="cpu")
    elif how == "disk_offload":
        dispatched = accelerate.disk_offload(model, tmp_path / "off", execution_device="cpu")
    else:
        device_map = {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.layers.2": "disk",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "cpu",
        }
        dispatched = accelerate.dispatch_model(
            model, device_map, main_device="cpu", offload_dir=tmp_path / "off"
        )
    assert any(p.is_meta for p in dispatched.parameters())
    adapted, report, state = evagraph.transform(dispatched, batches, **SAME_ROWS)
    _assert_same(expected, state)
    # The user's model still runs as accelerate set it up.
    torch.testing.assert_close(dispatched(**batches[0]).logits, reference)
    # The adapted model runs too, and equals the base model at initialisation (B = 0).
    torch.testing.assert_close(adapted(**batches[0]).logits, reference)


def test_resume_gives_the_same_adapters(tmp_path, monkeypatch):
    model, batches = _llama(3), _tokens()
    _, _, expected = evagraph.transform(
        model, batches, sequential=True, progress=False, return_state=True
    )
    real = sequential_pass._calibrate_block
    calls = []

    def interrupted(run, part, b, *args):
        calls.append(b)
        if b == 2:
            raise KeyboardInterrupt
        return real(run, part, b, *args)

    monkeypatch.setattr(sequential_pass, "_calibrate_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evagraph.calibrate(model, batches, sequential=True, work_dir=tmp_path, progress=False)
    calls.clear()
    monkeypatch.setattr(sequential_pass, "_calibrate_block", real)
    resumed = evagraph.calibrate(
        model, batches, sequential=True, work_dir=tmp_path, resume=True, progress=False
    )
    _assert_same(expected, resumed, atol=0)
    assert resumed.converged == expected.converged
    # Other settings than the saved run's: refused, not mixed.
    with pytest.raises(ConfigError, match="started with other settings"):
        evagraph.calibrate(
            model, batches, sequential=True, work_dir=tmp_path, resume=True, progress=False,
            tau=0.9,
        )  # fmt: skip


def test_resume_without_progress_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        evagraph.calibrate(
            _llama(2), _tokens(), sequential=True, work_dir=tmp_path, resume=True, progress=False
        )


def test_converged_blocks_stop_consuming_and_all_components_converge():
    model, batches = _llama(2), _tokens(n=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = evagraph.calibrate(model, batches, sequential=True, tau=0.5, progress=False)
    k = state.max_components
    for g, flags in state.component_converged.items():
        ratios = state.components[g].explained_variance_ratio
        if all(state.converged[m] for m in state.groups[g]):
            # Every component with variance converged, not only an allotment's.
            assert bool(flags[: int((ratios > 0).sum())].all()) and len(flags) <= k
    assert any(runs[-1][1] < 12 for runs in state.batches.values())


def _cli(*args, cwd):
    import subprocess

    from conftest import evagraph_cmd

    return subprocess.run(
        [*evagraph_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_cli_compiles_a_model_directory_over_max_memory(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _llama(3)
    model.save_pretrained(tmp_path / "llama")
    on_disk = (tmp_path / "llama" / "model.safetensors").stat().st_size
    save_file({"input_ids": torch.randint(0, 64, (16, 12))}, tmp_path / "tokens.safetensors")
    common = ["--data", "tokens.safetensors", "--batch-size", "4", "--quiet", "--tau", "1"]
    bound = f"{on_disk // 3}B"  # the model is 3x the bound
    proc = _cli("compile", "llama", *common, "--max-memory", bound, "-o", "block", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    whole = _cli("compile", "llama", *common, "-o", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    a, b = (
        load_file(tmp_path / "block/adapter.safetensors"),
        load_file(tmp_path / "whole/adapter.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:  # the same rows (tau = 1: every batch), the same adapters
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert not (tmp_path / ".block.evagraph-work").exists()  # removed once the output is whole
    # The whole model cannot be written from a directory that was never loaded.
    proc = _cli(
        "compile", "llama", *common, "--max-memory", bound, "--format", "pt2", "-o", "x",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "--format pt2 writes the whole model" in proc.stderr
    proc = _cli("compile", "llama", *common, "--resume", "-o", "y", cwd=tmp_path)
    assert proc.returncode != 0 and "--resume: no interrupted" in proc.stderr
    proc = _cli("compile", "llama", *common, "--max-memory", "lots", "-o", "z", cwd=tmp_path)
    assert proc.returncode != 0 and "--max-memory must be a size" in proc.stderr


# Runs the CLI with a SIGTERM (as a scheduler's time limit sends) raised when block 2 starts.
_TERMINATED_AT_BLOCK_2 = """
import os, signal, sys
import evagraph.pipelines.blockwise as s
real = s._calibrate_block
def block(run, part, b, *args):
    if b == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(run, part, b, *args)
s._calibrate_block = block
from evagraph.cli import main
sys.argv = ["evagraph", *sys.argv[1:]]
main()
"""


def test_cli_resume_after_sigterm_gives_the_same_adapters(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    _llama(4).save_pretrained(tmp_path / "llama")
    save_file({"input_ids": torch.randint(0, 64, (16, 12))}, tmp_path / "tokens.safetensors")
    common = ["llama", "--data", "tokens.safetensors", "--batch-size", "4", "--sequential"]
    common += ["--quiet"]
    full = _cli("compile", *common, "-o", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    cut = subprocess.run(
        [sys.executable, "-c", _TERMINATED_AT_BLOCK_2, "compile", *common, "-o", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cut.returncode == 143, cut.stderr
    assert "run the same command with --resume" in cut.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.evagraph-work").is_dir()
    resumed = _cli("compile", *common[:-1], "--resume", "-o", "out", cwd=tmp_path)  # not quiet
    assert resumed.returncode == 0, resumed.stderr
    # says what it resumed (issue 29 item 13)
    assert re.search(r"resuming after block [1-9]\d* of \d+ \(\d+ of \d+ batch-steps done\)",
                     resumed.stderr), resumed.stderr  # fmt: skip
    a = load_file(tmp_path / "out/adapter.safetensors")
    b = load_file(tmp_path / "full/adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".out.evagraph-work").exists()
