"""DoRA (``use_dora``) and rsLoRA (``use_rslora``): equal to PEFT's own on the same A, the
base model's output at init, merge and unmerge, the saved adapter, the PEFT export, the CLI,
and the layers DoRA is refused for."""

import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import SharedMLP, correlated, loras, quiet
from safetensors.torch import load_file, save_file
from test_artifacts import train_b
from torch import nn

import evagraph
from evagraph.errors import ConfigError, ModelLoadError

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Mixed(nn.Module):
    """An nn.Linear, an HF Conv1D and a linear reading a product: EVA gives them different
    ranks on low-rank inputs (so alpha is adjusted per layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = Conv1D(16, 32)  # HF's (nf=out, nx=in), weight stored (in, out)
        self.c = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x))) + x
        return self.head(self.c(h * h))


class Convs(nn.Module):
    """Conv2d (padded; strided) and Conv1d: PEFT's DoRA conv kinds (no dilation)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2)
        self.c3 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(self.c3(h.flatten(2)).mean(-1))


def data(which: str) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    if which == "mixed":
        return Mixed().eval(), list(correlated(256, 16, rank=2, noise=0.01).split(64))
    g = torch.Generator().manual_seed(0)
    return Convs().eval(), [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]


def adapt(model, batches, **settings):
    settings = {"budget": 3, "rho": 2, "use_dora": True, "use_rslora": True, **settings}
    return quiet(evagraph.transform, model, batches, progress=False, **settings)


def train(adapted):
    """B and the magnitudes moved, as training would: a check that ignored either fails."""
    train_b(adapted)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in loras(adapted).values():
            if a.use_dora:
                m = a.lora_magnitude_vector
                m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


@pytest.mark.parametrize(
    "dora, rslora, adjust", [(True, False, True), (False, True, True), (True, True, True),
                             (True, True, False), (False, True, False)],
)  # fmt: skip
def test_equal_to_peft_eva_on_the_same_A(dora, rslora, adjust):
    """PEFT's own EVA (ranks, alpha adjusted per layer, rsLoRA's scale, DoRA's magnitude) on
    evagraph's A computes what evagraph's adapted model does, for linear and HF Conv1D."""
    model, batches = data("mixed")
    adapted, report, state = adapt(
        model, batches, use_dora=dora, use_rslora=rslora, adjust_scaling_factors=adjust,
        return_state=True,
    )  # fmt: skip
    assert len(set(report.ranks.values())) > 1, report.ranks  # alpha_pattern matters
    config = peft.LoraConfig(
        r=3, lora_alpha=8.0, target_modules=sorted(report.ranks), use_dora=dora,
        use_rslora=rslora, init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2.0, adjust_scaling_factors=adjust),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out set for Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(model), config, low_cpu_mem_usage=True)
        peft.initialize_lora_eva_weights(theirs, eva_state_dict=state.to_peft())
    ours = loras(adapted)
    assert set(ours) == set(report.ranks)
    for name, a in ours.items():
        layer = peft_layer(theirs, name)
        assert torch.equal(layer.lora_A["default"].weight, a.lora_A.weight)
        assert layer.scaling["default"] == pytest.approx(a.scaling, rel=1e-12)
        rank, alpha = a.rank, 8.0 * a.rank / 3 if adjust else 8.0
        assert a.scaling == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank))
        if dora:
            theirs_m = layer.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(theirs_m, a.lora_magnitude_vector)
    train(adapted)
    with torch.no_grad():
        for name, a in ours.items():
            layer = peft_layer(theirs, name)
            layer.lora_B["default"].weight.copy_(a.lora_B.weight)
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(a.lora_magnitude_vector)
        for x in batches:
            expected = adapted(x)
            assert not torch.allclose(expected, model(x), atol=1e-3)
            torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dora, rslora", [(True, False), (False, True), (True, True)])
def test_conv_equal_to_peft_on_the_same_A(dora, rslora):
    """PEFT's conv LoRA with DoRA (its own magnitude, of shape (1, out, 1, ...)) and rsLoRA,
    given evagraph's A and B, computes what evagraph does (rho 1: one rank for all layers,
    which PEFT's config can say without EVA, which has no convolutions)."""
    model, batches = data("convs")
    adapted, report = adapt(model, batches, rho=1, use_dora=dora, use_rslora=rslora)
    config = peft.LoraConfig(
        r=3, lora_alpha=8.0, target_modules=sorted(report.ranks), use_dora=dora,
        use_rslora=rslora,
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    ours = loras(adapted)
    assert set(ours) == {"c1", "c2", "c3"}
    for name, a in ours.items():
        layer = peft_layer(theirs, name)
        assert layer.scaling["default"] == pytest.approx(a.scaling, rel=1e-12)
        if dora:  # PEFT's own, from W (B is zero at init, so whatever its A)
            theirs_m = layer.lora_magnitude_vector["default"].weight
            assert theirs_m.shape == (1, a.lora_B.weight.shape[0], *(1,) * (theirs_m.dim() - 2))
            torch.testing.assert_close(theirs_m.flatten(), a.lora_magnitude_vector)
    train(adapted)
    with torch.no_grad():
        for name, a in ours.items():
            layer = peft_layer(theirs, name)
            layer.lora_A["default"].weight.copy_(a.lora_A.weight)
            layer.lora_B["default"].weight.copy_(a.lora_B.weight)
            if dora:
                magnitude = layer.lora_magnitude_vector["default"].weight
                magnitude.copy_(a.lora_magnitude_vector.reshape(magnitude.shape))
        for x in batches:
            expected = adapted(x)
            assert not torch.allclose(expected, model(x), atol=1e-3)
            torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["mixed", "convs"])
def test_dora_output_is_the_base_at_init(which):
    model, batches = data(which)
    adapted, _ = adapt(model, batches)
    ours = loras(adapted)
    assert ours and all(a.use_dora and a.use_rslora for a in ours.values())
    with torch.no_grad():
        for x in batches:
            assert torch.equal(adapted(x), model(x))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert {f"{n}.lora.lora_magnitude_vector" for n in ours} <= trainable


@pytest.mark.parametrize("which", ["mixed", "convs"])
def test_dora_merge_and_unmerge(which, tmp_path):
    from test_merge import check_round_trip

    model, batches = data(which)
    adapted, _ = adapt(model, batches)
    train(adapted)
    check_round_trip(model, adapted, batches[0], tmp_path)


def test_unmerge_refuses_a_dora_merge_that_lost_its_norms():
    """Every output of a DoRA merge has norm m, whatever ||W + scale B A|| was: without the
    norms merge recorded, W cannot be had back."""
    model, batches = data("mixed")
    adapted, _ = adapt(model, batches)
    train(adapted)
    reloaded = Mixed()
    reloaded.load_state_dict(evagraph.merge(adapted).state_dict())  # saved and reloaded
    with pytest.raises(ConfigError, match=r"layer \w+: a DoRA adapter's merge cannot be undone"):
        evagraph.unmerge(reloaded, adapted, assume_merged=True)


def test_saved_dora_adapter_round_trip(tmp_path):
    model, batches = data("mixed")
    adapted, report = adapt(model, batches)
    train(adapted)
    evagraph.save_adapter(adapted, tmp_path / "a", report.settings)
    manifest = json.loads((tmp_path / "a" / "adapter.json").read_text())
    for entry in manifest["layers"]:
        assert entry["use_dora"] is True and entry["use_rslora"] is True
        assert entry["alpha"] == pytest.approx(entry["scaling"] * math.sqrt(entry["rank"]))
    assert manifest["settings"]["adapter"]["use_dora"] is True
    applied = evagraph.apply_adapter(copy.deepcopy(model), tmp_path / "a")
    for name, a in loras(applied).items():
        theirs = loras(adapted)[name]
        assert a.use_rslora and a.scaling == theirs.scaling
        assert torch.equal(a.lora_magnitude_vector, theirs.lora_magnitude_vector)
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(applied(x), adapted(x), atol=0, rtol=0)


@pytest.mark.parametrize("broken, words", [
    ("missing", "missing tensor a.lora_magnitude_vector (the manifest says DoRA)"),
    ("not dora", "tensor(s) a.lora_magnitude_vector belong to no layer"),
    ("shape", "layer a: lora_magnitude_vector has shape (3,), expected (32,)"),
])  # fmt: skip
def test_a_saved_dora_adapter_is_checked(tmp_path, broken, words):
    model, batches = data("mixed")
    adapted, _ = adapt(model, batches, use_rslora=False)
    evagraph.save_adapter(adapted, tmp_path)
    weights = load_file(str(tmp_path / "adapter.safetensors"))
    manifest = json.loads((tmp_path / "adapter.json").read_text())
    if broken == "missing":
        del weights["a.lora_magnitude_vector"]
    elif broken == "not dora":
        manifest["layers"][0]["use_dora"] = False
    else:
        weights["a.lora_magnitude_vector"] = torch.ones(3)
    save_file(
        weights, str(tmp_path / "adapter.safetensors"), metadata={"format": "evagraph-adapter/1"}
    )
    (tmp_path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=re.escape(words)):
        evagraph.apply_adapter(model, tmp_path)


@pytest.mark.parametrize("which", ["mixed", "convs"])
def test_peft_export_with_dora_and_rslora_computes_the_same(which, tmp_path):
    model, batches = data(which)
    adapted, _ = adapt(model, batches)
    train(adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out set for Conv1D
        evagraph.save_peft(adapted, tmp_path / "peft", example=batches[0])
        config = peft.PeftConfig.from_pretrained(tmp_path / "peft")
        assert config.use_dora and config.use_rslora
        assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) >= {
            f"base_model.model.{n}.lora_magnitude_vector" for n in loras(adapted)
        }
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    with torch.no_grad():
        for x in batches:
            expected = adapted(x)
            assert not torch.allclose(expected, model(x), atol=1e-3)
            torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)


def test_peft_export_refuses_adapters_that_differ_in_dora():
    model, batches = data("mixed")
    adapted, _ = adapt(model, batches)
    loras(adapted)["c"].lora_magnitude_vector = None  # c is plain LoRA now
    with pytest.raises(ConfigError, match=r"layers a and c: one has use_dora and the other not"):
        evagraph.to_peft(adapted)


class Gate(nn.Module):
    """F.linear on its own parameter (as an MoE router): adapted in weight space."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return F.linear(x, self.weight)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.fc, self.head = Gate(), nn.Linear(16, 16), nn.Linear(24, 2)

    def forward(self, x):
        return self.head(torch.cat([self.gate(x), self.fc(x)], -1))


def test_dora_is_refused_where_it_cannot_be_had():
    x = torch.randn(8, 16)
    batches = [x, x * 2, x + 1]
    needs = "use_dora needs a linear/conv module to wrap"
    with pytest.raises(ConfigError, match=rf"layer gate: {needs} .* op on gate.weight in module"):
        adapt(Gated().eval(), batches, budget=2)
    assert loras(adapt(Gated().eval(), batches, budget=2, exclude=["gate"])[0])  # the rest
    graph = torch.export.export(SharedMLP().eval(), (x,)).module()
    with pytest.raises(ConfigError, match=rf"layer \w+: {needs}"):
        adapt(graph, batches, budget=2)
    with torch.device("meta"):
        skeleton = SharedMLP()
    with pytest.raises(ConfigError, match="use_dora: DoRA's magnitudes .* not resident"):
        adapt(skeleton, batches, budget=2)
    model = SharedMLP().eval()
    with torch.no_grad():
        model.q.weight[3] = 0
    with pytest.raises(ConfigError, match=r"layer q: use_dora: 1 output\(s\) of q.weight have"):
        adapt(model, batches, budget=2)
    assert loras(adapt(model, batches, budget=2, use_dora=False)[0])  # plain LoRA is fine


def test_cli_dora_and_rslora_reach_every_output(tmp_path):
    from click.testing import CliRunner

    from evagraph.cli import main

    torch.save(SharedMLP().eval(), tmp_path / "mlp.pt")
    save_file({"x": correlated(32, 16)}, str(tmp_path / "calib.safetensors"))
    out = tmp_path / "out"
    args = ["compile", str(tmp_path / "mlp.pt"), "--allow-pickle", "--data",
            str(tmp_path / "calib.safetensors"), "--budget", "2", "--dora", "--rslora",
            "--format", "peft", "-o", str(out), "-q"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["adapter"]["use_dora"] is True
    assert report["settings"]["adapter"]["use_rslora"] is True
    for layer in report["layers"]:
        if layer["rank"]:
            assert layer["scaling"] == pytest.approx(8.0 * math.sqrt(layer["rank"]) / 2)
    entries = json.loads((out / "adapter.json").read_text())["layers"]
    assert entries and all(e["use_dora"] and e["use_rslora"] for e in entries)
    weights = load_file(str(out / "adapter.safetensors"))
    assert {f"{e['name']}.lora_magnitude_vector" for e in entries} <= set(weights)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True


@pytest.mark.parametrize("which", ["mixed", "convs"])
def test_dora_with_dropout_in_training_equals_peft(which):
    """While dropout is active, DoRA's base term is W of the dropped input, as in PEFT: one
    dropout mask for both terms (the same seed draws the same mask in both)."""
    model, batches = data(which)
    adapted, _ = adapt(model, batches, dropout=0.5)
    train(adapted)
    theirs = evagraph.to_peft(adapted)
    adapted.train()
    theirs.train()
    torch.manual_seed(5)
    ours = adapted(batches[0])
    torch.manual_seed(5)
    torch.testing.assert_close(theirs(batches[0]), ours, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(ours, adapted.eval()(batches[0]), atol=1e-4)


def test_rslora_fused_experts_and_router_export_to_peft():
    """Fused experts go to PEFT's parameter LoRA at scale 1 (their scales in B), which under
    rsLoRA is alpha sqrt(r); DoRA is refused for them and the router, as PEFT has none."""
    T = pytest.importorskip("transformers")
    config = T.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = T.MixtralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (2, 12), generator=g)} for _ in range(3)]
    with pytest.raises(ConfigError, match=r"layer model\.layers\.0\.mlp\.\S+: use_dora needs"):
        adapt(model, batches, budget=2)
    adapted, report = adapt(model, batches, budget=2, use_dora=False)
    assert any("experts" in n and r for n, r in report.ranks.items())
    train_b(adapted)
    with torch.no_grad():
        out = adapted(**batches[0]).logits
        assert not torch.allclose(out, model(**batches[0]).logits, atol=1e-4)
        torch.testing.assert_close(evagraph.to_peft(adapted)(**batches[0]).logits, out)
