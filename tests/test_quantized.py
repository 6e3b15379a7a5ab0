"""Quantized bases (QLoRA): bitsandbytes 4-bit (nf4, fp4, double quantization) and 8-bit
linears, and torchao int8 weight-only ones, on a tiny random Llama. Adapting such a model
gives exactly its output at init, trains only the LoRA weights (float32) and lets gradients
reach A and B; an adapter calibrated on the float model applies to the quantized one and
exports to PEFT; merge re-quantizes (within the rounding it measures), unmerge refuses;
DoRA and .pt2 export are refused."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import evagraph
from evagraph.errors import ConfigError, EvagraphWarning
from evagraph.merge import ROUNDING

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

BNB = ["nf4", "fp4", "nf4-double", "int8"]
SCHEMES = [*BNB, "torchao-int8"]


@pytest.fixture(autouse=True)
def _quiet_bnb():
    with warnings.catch_warnings():  # bnb's 8-bit matmul says it casts its inputs, per call
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        warnings.filterwarnings("ignore", category=evagraph.ConvergenceWarning)  # tiny data
        yield


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(4)]


def _bnb_linear(linear: nn.Linear, scheme: str) -> nn.Module:
    """``linear`` as a bitsandbytes layer of ``scheme``, quantized on CPU."""
    w, bias = linear.weight.data.clone(), linear.bias is not None
    if scheme == "int8":
        q = bnb.nn.Linear8bitLt(*w.shape[::-1], bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        kind, double = scheme[:3], scheme.endswith("double")
        q = bnb.nn.Linear4bit(*w.shape[::-1], bias=bias, compute_dtype=torch.float32,
                              quant_type=kind, compress_statistics=double)  # fmt: skip
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind,
                                     compress_statistics=double)  # fmt: skip
    return q.to("cpu")  # bitsandbytes quantizes on the move to a device


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """A copy of ``model`` whose decoder linears (not lm_head) are quantized by ``scheme``."""
    model = copy.deepcopy(model)
    if scheme == "torchao-int8":
        ao = pytest.importorskip("torchao.quantization")
        ao.quantize_(model.model, ao.Int8WeightOnlyConfig())
        return model
    for parent in list(model.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _bnb_linear(child, scheme))
    return model.eval()  # the new layers too


@pytest.fixture(scope="module")
def calibrated(llama, batches):
    """``calibrated(scheme)``: (a fresh quantized model, the EVA state that calibrating the
    model quantized by ``scheme`` gave; "float": the float model's), calibrated once."""
    states: dict[str, evagraph.EvaState] = {}

    def get(scheme: str) -> tuple[nn.Module, evagraph.EvaState]:
        model = llama if scheme == "float" else quantize(llama, scheme)
        if scheme not in states:
            _, _, states[scheme] = evagraph.transform(
                model, batches, budget=2, progress=False, return_state=True
            )
        return (model if scheme == "float" else quantize(llama, scheme)), states[scheme]

    return get


@torch.no_grad()
def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    # bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward in eval mode
    # without grad, which changes the outputs' rounding: compare after it.
    model(**batch)
    return model(**batch).logits


def adapters(model: nn.Module) -> list[evagraph.LoraAdapter]:
    return [m for m in model.modules() if isinstance(m, evagraph.LoraAdapter)]


def train_b(model: nn.Module) -> None:
    """Give every adapter a non-zero B, as training would."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in adapters(model):
            a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapting_a_quantized_base(batches, calibrated, scheme):
    q, state = calibrated(scheme)
    adapted, report = evagraph.adapt(q, state)
    layers = [m for m in adapted.modules() if isinstance(m, evagraph.LoraLayer)]
    assert len(layers) == sum(r > 0 for r in report.ranks.values()) >= 10
    # the quantized modules are the bases, their packed weights shared, not rebuilt
    for layer in layers:
        original = q.get_submodule(layer.lora.layer_name)
        assert type(layer.base_layer) is type(original)
        assert layer.base_layer.weight is original.weight
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {a.lora_A.weight.dtype for a in adapters(adapted)} == {torch.float32}
    # Training first: bitsandbytes' CPU kernel for repacked 4-bit weights (logits below)
    # has no backward. Calibration left them as they were.
    train_b(adapted)
    adapted.train()
    adapted(**batches[1]).logits.square().mean().backward()
    for a in adapters(adapted):
        assert a.lora_A.weight.grad.abs().sum() > 0 and a.lora_B.weight.grad.abs().sum() > 0
        a.lora_B.weight.data.zero_()  # back to init
    adapted.eval()
    assert torch.equal(logits(adapted, batches[0]), logits(q, batches[0]))


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
def test_calibrate_in_float_apply_to_quantized(llama, batches, calibrated, scheme, tmp_path):
    """The adapter from the float model applied to the quantized one: its output at init,
    and the same model after a save/apply round trip, once B is trained."""
    float_adapted, _ = evagraph.adapt(*calibrated("float"))
    evagraph.save_adapter(float_adapted, tmp_path / "float")
    q = quantize(llama, scheme)
    on_q = evagraph.apply_adapter(q, tmp_path / "float")
    assert torch.equal(logits(on_q, batches[0]), logits(q, batches[0]))
    train_b(on_q)
    evagraph.save_adapter(on_q, tmp_path / "trained")
    again = evagraph.apply_adapter(q, tmp_path / "trained")
    assert torch.equal(logits(again, batches[0]), logits(on_q, batches[0]))


@pytest.mark.parametrize("load", ["load_in_4bit", "load_in_8bit"])
def test_a_model_transformers_loaded_quantized(llama, batches, calibrated, load, tmp_path):
    """Loaded from a save_pretrained directory with a BitsAndBytesConfig (bnb's own module
    replacement), then given the float model's adapters."""
    llama.save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(**{load: True})
    q = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    adapted, report = evagraph.adapt(q, calibrated("float")[1])
    assert type(adapted.model.layers[0].self_attn.q_proj.base_layer).__module__.startswith(
        "bitsandbytes"
    )
    assert torch.equal(logits(adapted, batches[0]), logits(q, batches[0]))


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
def test_peft_export_on_a_quantized_base(llama, batches, calibrated, scheme, tmp_path):
    """to_peft, and save_peft loaded by PEFT onto the quantized base (PEFT's own bnb and
    torchao LoRA layers)."""
    peft = pytest.importorskip("peft")
    adapted, _ = evagraph.adapt(*calibrated(scheme))
    train_b(adapted)
    evagraph.save_peft(adapted, tmp_path)
    loaded = peft.PeftModel.from_pretrained(quantize(llama, scheme), tmp_path)
    expected = logits(adapted, batches[0])
    tol = {"rtol": 1e-4, "atol": 1e-4 * float(expected.abs().max())}
    for peft_model in (evagraph.to_peft(adapted), loaded):
        torch.testing.assert_close(logits(peft_model, batches[0]), expected, **tol)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_requantizes_within_its_rounding(calibrated, scheme):
    adapted, _ = evagraph.adapt(*calibrated(scheme))
    train_b(adapted)
    with pytest.warns(EvagraphWarning, match="re-quantized"):
        merged = evagraph.merge(adapted)
    rounding = getattr(merged, ROUNDING)
    assert set(rounding) == {a.layer_name for a in adapters(adapted)}
    x = torch.randn(5, 64)
    for name, error in rounding.items():
        if not name.endswith("q_proj"):  # 64 wide inputs
            continue
        layer, folded = adapted.get_submodule(name), merged.get_submodule(name)
        assert type(folded) is type(layer.base_layer)  # still quantized, as it was
        assert folded.weight is not layer.base_layer.weight
        with torch.no_grad():
            want = layer.base_layer(x) + layer.lora(x)
            diff = (folded(x) - want).abs().max()
        # |requant(W + D) - (W + D)| <= error per entry, plus the kernels' own rounding
        assert diff <= error * x.abs().sum(-1).max() + 2e-2 * want.abs().max()
    with pytest.raises(ConfigError, match=r"quantized \(.*apply_adapter"):
        evagraph.unmerge(merged, adapted)


def test_merge_refuses_a_torchao_config_it_cannot_redo(calibrated):
    ao = pytest.importorskip("torchao.quantization")
    from torchao.quantization.granularity import PerTensor

    adapted, _ = evagraph.adapt(*calibrated("float"))
    q_proj = adapted.model.layers[0].self_attn.q_proj.base_layer
    per_tensor = nn.Linear(q_proj.in_features, q_proj.out_features, bias=False)
    per_tensor.weight = nn.Parameter(q_proj.weight.detach().clone(), requires_grad=False)
    ao.quantize_(per_tensor, ao.Int8WeightOnlyConfig(granularity=PerTensor()))
    adapted.model.layers[0].self_attn.q_proj.base_layer = per_tensor
    with pytest.raises(ConfigError, match="re-quantizing a torchao Int8Tensor weight"):
        evagraph.merge(adapted)


def test_pt2_export_is_refused(calibrated, batches, tmp_path):
    adapted, _ = evagraph.adapt(*calibrated("nf4"))
    with pytest.raises(ConfigError, match=r"self_attn.q_proj is nf4\): save the adapter"):
        evagraph.export(adapted, batches[0], tmp_path / "model.pt2")


@pytest.mark.parametrize("scheme", ["nf4", "torchao-int8"])
def test_dora_is_refused_on_quantized_weights(calibrated, batches, scheme):
    with pytest.raises(ConfigError, match=r"use_dora.*\(quantized\)"):
        evagraph.adapt(*calibrated(scheme), use_dora=True)
    q, _ = calibrated(scheme)
    with pytest.raises(ConfigError, match=r"use_dora.*q_proj.weight is .*\(quantized\)"):
        evagraph.transform(q, batches, use_dora=True)  # before calibrating


@pytest.mark.gpu
def test_nf4_on_cuda(llama, batches):
    q = quantize(llama, "nf4").to("cuda")
    cuda_batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
    adapted, _ = evagraph.transform(q, cuda_batches, budget=2, progress=False)
    assert torch.equal(logits(adapted, cuda_batches[0]), logits(q, cuda_batches[0]))
    train_b(adapted)
    adapted(**cuda_batches[1]).logits.square().mean().backward()
    assert all(a.lora_A.weight.grad.abs().sum() > 0 for a in adapters(adapted))


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_cli_quantize_writes_adapters_for_the_quantized_base(llama, quantize, tmp_path):
    """compile --quantize: calibrated in float, written from MODEL loaded quantized; PEFT
    loads the directory onto that base, which computes what it did at init."""
    peft = pytest.importorskip("peft")
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from evagraph.cli import main
    from evagraph.quantized import load_config

    # hidden 64: bitsandbytes' CPU 4-bit kernel fails on 32-wide inputs
    llama.save_pretrained(tmp_path / "llama")
    tokens = {"input_ids": torch.randint(0, 128, (8, 16))}
    save_file(tokens, str(tmp_path / "tokens.safetensors"))
    args = ["compile", str(tmp_path / "llama"), "--data", str(tmp_path / "tokens.safetensors"),
            "--budget", "2", "--quantize", quantize, "-q"]  # fmt: skip
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*args, "--format", "peft", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["run"]["quantize"] == quantize
    config = load_config(quantize)
    base = transformers.LlamaForCausalLM.from_pretrained(out.parent / "llama",
                                                         quantization_config=config)  # fmt: skip
    loaded = peft.PeftModel.from_pretrained(base, out)
    ours = load_file(str(out / "adapter.safetensors"))["model.layers.0.mlp.up_proj.lora_A.weight"]
    peft_layer = loaded.base_model.model.model.layers[0].mlp.up_proj
    assert torch.equal(peft_layer.lora_A["default"].weight.detach(), ours)  # the EVA A
    batch = {"input_ids": tokens["input_ids"][:2]}
    with_lora = logits(loaded, batch)
    with loaded.disable_adapter():
        assert torch.equal(with_lora, logits(loaded, batch))
    result = CliRunner().invoke(main, [*args, "--format", "pt2", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--format peft or safetensors" in result.output
