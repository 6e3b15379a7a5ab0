"""EVA state: saved statistics rebuild adapters without data, for other budgets and rho."""

import warnings

import pytest
import torch
from conftest import loras, quiet
from test_models import build, call
from test_peft import zipf_batches

import evagraph
from evagraph.lora import LoraAdapter


def test_saved_state_rebuilds_the_same_adapters(tmp_path):
    model, batches = build("timm", "resnet18")
    adapted, report, state = quiet(
        evagraph.transform, model, batches, budget=2, rho=2, progress=False, return_state=True
    )
    state.save(tmp_path / "state.safetensors")
    loaded = evagraph.EvaState.load(tmp_path / "state.safetensors")
    rebuilt, report2 = evagraph.adapt(model, loaded)
    assert report2.ranks == report.ranks and report2.rows == report.rows
    for name, lora in loras(adapted).items():
        torch.testing.assert_close(loras(rebuilt)[name].lora_A.weight, lora.lora_A.weight)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batches[0]), model(batches[0]))


def test_other_budgets_and_rho_from_one_calibration():
    model, batches = build("hf", "llama")
    state = quiet(evagraph.calibrate, model, batches, budget=4, rho=2, progress=False)
    for budget, rho in [(4, 2), (2, 2), (4, 1), (8, 1), (2, 4)]:
        adapted, report = evagraph.adapt(model, state, budget=budget, rho=rho)
        assert sum(report.ranks.values()) == budget * len(report.layers)
        assert max(report.ranks.values()) <= round(budget * rho)
        assert type(adapted) is type(model)
    direct, _ = quiet(evagraph.transform, model, batches, budget=2, rho=2, progress=False)
    from_state, _ = evagraph.adapt(model, state, budget=2, rho=2)
    assert {n: a.rank for n, a in loras(direct).items()} == {
        n: a.rank for n, a in loras(from_state).items()
    }
    with pytest.raises(evagraph.ConfigError, match="holds 8"):
        evagraph.adapt(model, state, budget=8, rho=2)


def test_calibrate_does_not_modify_the_model():
    model, batches = build("hf", "gpt2")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    quiet(evagraph.calibrate, model, batches, budget=2, progress=False)
    assert not any(isinstance(m, LoraAdapter) for m in model.modules())
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])


@pytest.mark.slow
def test_state_exports_to_peft_eva_state_dict():
    peft = pytest.importorskip("peft")
    model, _ = build("hf", "llama")
    batches = zipf_batches(100, n=8, batch=2, length=16)
    adapted, report, state = quiet(
        evagraph.transform, model, batches, budget=2, alpha=4, progress=False, return_state=True
    )
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=[r.name for r in report.layers],
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2),
    )
    peft_model = peft.get_peft_model(build("hf", "llama")[0], config)
    quiet(peft.initialize_lora_eva_weights, peft_model, eva_state_dict=state.to_peft())
    inner = peft_model.base_model.model
    for name, lora in loras(adapted).items():
        target = inner.get_submodule(name)
        torch.testing.assert_close(target.lora_A["default"].weight, lora.lora_A.weight)
        assert target.scaling["default"] == pytest.approx(lora.scaling)
    for layer in report.layers:
        if not layer.rank:
            assert not hasattr(inner.get_submodule(layer.name), "lora_A")


@pytest.mark.slow
def test_import_a_peft_eva_state_dict():
    peft = pytest.importorskip("peft")
    model, _ = build("hf", "llama")
    batches = zipf_batches(100, n=8, batch=2, length=16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2),
    )
    eva_state_dict = peft.get_eva_state_dict(model, batches, config, show_progress_bar=False)
    adapted = evagraph.from_peft_eva_state_dict(model, eva_state_dict, budget=2, alpha=4)
    peft_model = peft.get_peft_model(build("hf", "llama")[0], config)
    # PEFT looks the layers up by their names inside the PeftModel; a state dict computed on
    # the plain model lacks that prefix (PEFT then falls back to random init, with a warning).
    prefixed = {f"base_model.model.{k}": v.clone() for k, v in eva_state_dict.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer may fall back to random init
        peft.initialize_lora_eva_weights(peft_model, eva_state_dict=prefixed)
    inner = peft_model.base_model.model
    for name, lora in loras(adapted).items():
        target = inner.get_submodule(name)
        torch.testing.assert_close(target.lora_A["default"].weight, lora.lora_A.weight)
        assert target.scaling["default"] == pytest.approx(lora.scaling)
    assert set(loras(adapted)) == {k for k, v in eva_state_dict.items() if v.shape[0]}
    with torch.no_grad():
        b = batches[0]
        torch.testing.assert_close(call(adapted, b), call(model, b))
