"""Models a sweep of models nobody here chose failed on (issue 29), built tiny as
``benchmarks/zoo.py`` builds them and put through its checks: output equal at init, only LoRA
trainable, merge, class kept, the PEFT round trip (``save_peft`` then ``PeftModel`` from the
directory) and every linear/conv layer adapted or listed with a reason. Each must pass every
check or have it refused with the reason this file expects (slow: real timm architectures)."""

from __future__ import annotations

import sys
import warnings

import pytest
from conftest import ROOT

pytest.importorskip("timm")
pytest.importorskip("peft")
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import zoo
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

# (source, name) -> {check: pattern its n/a reason must match}; checks not named must pass
REFUSED = {
    ("hf", "efficientnet"): {"merge": "vacuous"},  # random init: the output ignores the input
    ("hf", "ernie4_5_moe"): {"peft": "PEFT left"},  # a casting router, adapted through the cast
    ("hf", "fsmt"): {},  # a branch on values in the model's own forward
    ("hf", "higgs_audio_v2"): {},  # the audio MLP sees no row of text-only data
    ("timm", "legacy_xception"): {},  # layer names that end other layers' names
    ("timm", "hrnet_w18_small"): {},  # ranks that differ between such layers
    ("timm", "test_nfnet"): {"merge": "ScaledStdConv2d", "peft": "ScaledStdConv2d"},
    ("timm", "davit_tiny"): {"peft": "no 'kernel_size'"},
    ("timm", "lowformer_b0"): {},  # transposed convolutions listed, not adapted
}


def build(source: str, name: str):
    if source == "timm":
        return zoo.build_timm(name)
    case = next(c for c in zoo.hf_cases() if c["name"] == name)
    if "not_attempted" in case:
        pytest.skip(case["not_attempted"])
    return zoo.build_hf(case)


@pytest.mark.slow
@pytest.mark.parametrize("source,name", list(REFUSED), ids=[n for _, n in REFUSED])
def test_sweep_model(source, name):
    model, batches = build(source, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = zoo.run_checks(model, batches)
    checks, expected = result["checks"], REFUSED[source, name]
    for check in zoo.CHECKS:
        status, message = checks[check]["status"], checks[check]["message"]
        if check in expected:
            assert status == "n/a", (check, message)
            assert expected[check] in message, (check, message)
        else:
            assert status == "pass", (check, message)
    skipped = result["skipped"]
    if name == "lowformer_b0":
        transposed = [n for n, why in skipped.items() if why.startswith("transposed conv")]
        assert transposed and all(n.endswith("upsampling") for n in transposed)
    # every skipped weight is named by the module or parameter it is, never by a graph node
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    assert not [n for n in skipped if n.partition("[")[0] not in names], skipped
