"""Layers that are linear/conv modules but not plainly that op: subclasses overriding forward
(MoE routers, weight-standardised and TF-"same" convs) and grouped convs, and how transform,
merge, unmerge and the report treat them."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evagraph
from evagraph.errors import ConfigError
from evagraph.lora import LoraAdapter
from evagraph.passes.capture import export_program
from evagraph.passes.layer_graph import _module_layer, build_layer_graph, forward_mismatch

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d  # noqa: E402


def _transform(model, batches, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        return evagraph.transform(model, batches, budget=2, rho=2, progress=False, **kw)


def _call(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def _perturb_b(adapted):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in adapted.modules():
            if isinstance(m, LoraAdapter):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _check_adapted(model, adapted, report, batch):
    """Class kept, output unchanged at init, only LoRA trainable; every layer module reported."""
    assert type(adapted) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(_call(adapted, batch), _call(model, batch), atol=1e-5, rtol=1e-5)
    lora = {id(p) for m in adapted.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
    assert lora and {id(p) for p in adapted.parameters() if p.requires_grad} == lora
    layers = {n for n, m in model.named_modules() if _module_layer(m) is not None}
    reported = {layer.name for layer in report.layers} | set(report.skipped)
    assert layers <= reported
    params = dict(model.named_parameters())
    for extra in reported - layers:  # MoE expert weights (fused, or in an opaque module)
        why = report.skipped[extra]
        assert extra in params and (params[extra].dim() >= 3 or "opaque module" in why), extra
        assert "not adapted" in why, extra


MOE = {
    "llama4": (
        lambda: T.Llama4ForCausalLM(
            T.Llama4TextConfig(
                vocab_size=100, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
            )
        ),
        "model.layers.{}.feed_forward.router",
        "Llama4Router",
    ),
    "phimoe": (
        lambda: T.PhimoeForCausalLM(
            T.PhimoeConfig(
                vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                num_experts_per_tok=2, max_position_embeddings=64,
                original_max_position_embeddings=64, rope_scaling=None,
            )
        ),
        "model.layers.{}.mlp.router",
        "PhimoeTopKRouter",
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MOE))
def test_moe_router_returning_a_tuple_is_skipped(name):
    make, router, cls = MOE[name]
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 8), generator=g)} for _ in range(3)]
    adapted, report = _transform(model, batches)
    assert report.capture == "export"
    _check_adapted(model, adapted, report, batches[0])
    for i in range(2):
        assert report.skipped[router.format(i)] == (
            f"nn.Linear subclass {cls} overrides forward and returns a tuple, not the "
            "layer's output: not adapted"
        )
    assert "model.layers.0.self_attn.q_proj" in {r.name for r in report.layers}
    _perturb_b(adapted)
    merged = evagraph.merge(adapted)
    assert type(merged) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(
            _call(merged, batches[0]), _call(adapted, batches[0]), atol=1e-4, rtol=1e-4
        )


class _Convs(nn.Module):
    """Weight-standardised convs, a TF-"same" conv and a Linear subclass computing F.linear."""

    def __init__(self):
        super().__init__()
        self.std = ScaledStdConv2d(3, 8, 3)
        self.std2 = StdConv2d(8, 8, 3, padding=1)
        self.same = Conv2dSame(8, 8, 3, stride=2)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = timm.layers.Linear(8, 8)  # overrides forward, computes F.linear
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.std2(F.relu(self.std(x))))
        x = self.plain(self.same(x))
        return self.head(F.relu(self.mid(x.permute(0, 2, 3, 1))).mean((1, 2)))


def _images(n=3, size=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


def test_standardised_convs_adapt_but_refuse_to_merge():
    torch.manual_seed(0)
    model, batches = _Convs().eval(), _images()
    adapted, report = _transform(model, batches)
    _check_adapted(model, adapted, report, batches[0])
    assert {"std", "std2", "plain", "mid"} <= {r.name for r in report.layers}
    assert report.skipped["same"] == (
        "nn.Conv2d subclass Conv2dSame overrides forward and its output shape is not that of "
        "its weight's op: not adapted"
    )
    _perturb_b(adapted)
    # every standardised conv with an adapter is named, by merge and by unmerge alike
    expected = "; ".join(
        f"{name} (nn.Conv2d subclass {cls} overrides forward and does not compute the plain "
        "op of its weight (it transforms it))"
        for name, cls in (("std", "ScaledStdConv2d"), ("std2", "StdConv2d"))
        if report.ranks.get(name)
    )
    assert expected
    with pytest.raises(ConfigError, match=re.escape(f"cannot fold the adapter(s) of {expected}:")):
        evagraph.merge(adapted)
    with pytest.raises(ConfigError, match=re.escape(f"cannot fold the adapter(s) of {expected}:")):
        evagraph.unmerge(model, adapted, assume_merged=True)

    # without the standardised convs, merge and unmerge are exact, the Linear subclass included
    adapted, report = _transform(model, batches, exclude=["std*"])
    assert "mid" in {r.name for r in report.layers}
    _perturb_b(adapted)
    merged = evagraph.merge(adapted)
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-4)
        again = evagraph.unmerge(merged, adapted)
        torch.testing.assert_close(again(x), adapted(x), atol=1e-5, rtol=1e-4)
        for name, p in model.named_parameters():
            torch.testing.assert_close(again.get_parameter(_base(again, name)), p)


def _base(model, name):
    """``name`` in a model whose adapted layers are wrapped (``.base_layer``)."""
    owner, _, attr = name.rpartition(".")
    try:
        model.get_submodule(f"{owner}.base_layer")
        return f"{owner}.base_layer.{attr}"
    except AttributeError:
        return name


@pytest.mark.slow
def test_nf_regnet_merge_names_a_standardised_conv():
    torch.manual_seed(0)
    model = timm.create_model("nf_regnet_b0", pretrained=False, num_classes=5).eval()
    batches = _images(size=32)
    adapted, report = _transform(model, batches)
    assert report.capture == "fx"
    _check_adapted(model, adapted, report, batches[0])
    _perturb_b(adapted)
    with pytest.raises(ConfigError, match=r"cannot fold .*ScaledStdConv2d overrides forward"):
        evagraph.merge(adapted)


class _Depthwise(nn.Module):
    """A depthwise-separable block behind shape logic that fx cannot trace (export captures)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.std = StdConv2d(8, 8, 3, padding=1)  # its weight is computed in the graph
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        if x.shape[-1] > 16:  # a Python branch on a size: fx cannot trace it
            x = F.avg_pool2d(x, 2)
        x = self.std(self.pw(F.relu(self.dw(F.relu(self.stem(x))))))
        return self.head(x.mean((-1, -2)))


def test_export_reports_each_unadapted_layer_once_under_its_module():
    model, batches = _Depthwise().eval(), _images(size=32)
    adapted, report = _transform(model, batches)
    assert report.capture == "export"
    _check_adapted(model, adapted, report, batches[0])
    skipped = {n: why for n, why in report.skipped.items() if not why.startswith("rank 0")}
    assert skipped == {
        "dw": "grouped convolution (groups=8) is not adapted",
        "std": "weight is computed in the graph, not a parameter",
        "head": "output layer (model head)",
    }


@pytest.mark.slow
def test_export_of_efficientnet_reports_depthwise_convs_once():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5).eval()
    gm = export_program(model, torch.randn(2, 3, 32, 32)).module()
    graph = build_layer_graph(gm, model)
    depthwise = {
        n: f"grouped convolution (groups={m.groups}) is not adapted"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    }
    assert depthwise and graph.unsupported == depthwise
    layers = {n for n, m in model.named_modules() if _module_layer(m) is not None}
    assert set(graph.layers) | set(graph.unsupported) == layers
    assert all(graph.layers[n].module == n for n in graph.layers)


def test_forward_mismatch_checks_overriding_classes_only():
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits.argmax(-1)

    assert forward_mismatch(nn.Linear(4, 3), values=True) is None
    assert forward_mismatch(timm.layers.Linear(4, 3), values=True) is None
    assert forward_mismatch(Router(4, 3)) == (
        "nn.Linear subclass Router overrides forward and returns a tuple, not the layer's output"
    )
    std = ScaledStdConv2d(3, 4, 3)
    assert forward_mismatch(std) is None  # shapes agree: adaptable
    assert "does not compute the plain op" in forward_mismatch(std, values=True)
    with torch.device("meta"):  # weights not resident: only shapes can be checked
        assert forward_mismatch(ScaledStdConv2d(3, 4, 3), values=True) is None
        assert "output shape" in forward_mismatch(Conv2dSame(3, 4, 3, stride=2))


def test_saved_adapter_is_not_applied_to_a_router(tmp_path):
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.argmax(-1)

    def mlp():
        return nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        )

    model, g = mlp(), torch.Generator().manual_seed(0)
    adapted, report = _transform(model, [torch.randn(16, 4, generator=g) for _ in range(3)])
    assert report.ranks.get("2")
    evagraph.save_adapter(adapted, tmp_path / "a", report.settings)
    other = mlp()
    other[2] = Router(8, 8)
    with pytest.raises(evagraph.ModelLoadError, match=r"layer 2: nn.Linear subclass Router"):
        evagraph.apply_adapter(other, tmp_path / "a")


def test_fused_moe_expert_weights_are_reported_not_silently_left_out():
    """Mixtral's experts are 3-D parameters used by a grouped matmul: not adapted yet, so each
    is listed in report.skipped with the reason; the rest is adapted as usual."""
    config = T.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = T.MixtralForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 8))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted, report = evagraph.transform(model, [batch], budget=2, progress=False)
    for name in ("gate_up_proj", "down_proj"):
        reason = report.skipped[f"model.layers.0.mlp.experts.{name}"]
        assert "3-D parameter" in reason and "not adapted yet" in reason, reason
    assert "model.layers.0.self_attn.q_proj" in report.ranks
    # the class is not kept yet (the router is spliced into the graph: issue 17, item 2)
    with torch.no_grad():
        assert torch.allclose(adapted(**batch).logits, model(**batch).logits, atol=1e-5)


@pytest.mark.slow
def test_dbrx_experts_kept_opaque():
    """DBRX loops over the experts its tokens were routed to, which export cannot trace: its
    experts are one opaque call each, their weights reported; attention and router adapt."""
    config = T.DbrxConfig(
        d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=100,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    )  # fmt: skip
    model = T.DbrxForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 8), generator=g)} for _ in range(3)]
    adapted, report = _transform(model, batches)
    assert report.capture == "export"
    _check_adapted(model, adapted, report, batches[0])
    for i in range(2):
        experts = f"transformer.blocks.{i}.ffn.experts"
        for name in ("w1", "v1", "w2"):
            assert report.skipped[f"{experts}.mlp.{name}"] == (
                f"a 2-D parameter inside DbrxExperts {experts}, which the captured graph "
                "calls as one opaque module: not adapted"
            )
        block = f"transformer.blocks.{i}"
        assert {f"{block}.norm_attn_norm.attn.Wqkv", f"{block}.ffn.router.layer"} <= {
            r.name for r in report.layers
        }
    _perturb_b(adapted)
    merged = evagraph.merge(adapted)
    assert type(merged) is type(model)
    other = {"input_ids": torch.randint(3, 100, (3, 5), generator=g)}  # another shape
    with torch.no_grad():
        for batch in (batches[0], other):
            torch.testing.assert_close(
                _call(merged, batch), _call(adapted, batch), atol=1e-4, rtol=1e-4
            )
