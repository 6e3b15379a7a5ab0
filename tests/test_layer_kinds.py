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
from evagraph.passes.layer_graph import build_layer_graph, forward_mismatch, module_kind

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
    layers = {n for n, m in model.named_modules() if module_kind(m) is not None}
    reported = {layer.name for layer in report.layers} | set(report.skipped)
    assert layers <= reported
    params = dict(model.named_parameters())
    for extra in reported - layers:
        if f"{extra}.weight" in params:  # an op on a module's parameter (a router's F.linear)
            continue
        why = report.skipped.get(extra, "")
        if extra in params and "opaque module" in why:  # inside a module kept opaque (DBRX)
            continue
        # fused MoE expert weights: by expert, or by parameter where not adapted
        weight = extra.rpartition("[")[0] if extra.endswith("]") else extra
        assert params[weight].dim() == 3, extra
        assert extra != weight or "not adapted yet" in why, extra


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
def test_moe_router_returning_a_tuple_is_adapted_in_weight_space(name):
    """Routers that are nn.Linear subclasses returning (scores, indices) cannot take an adapter
    on their output: their weight takes it (ParamLoraLayer), exact whatever forward returns;
    the fused experts behind them are adapted per expert. Merge and PEFT agree."""
    make, router, cls = MOE[name]
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 8), generator=g)} for _ in range(3)]
    adapted, report = _transform(model, batches)
    assert report.capture == "export"
    _check_adapted(model, adapted, report, batches[0])
    names = {r.name for r in report.layers}
    for i in range(2):
        assert router.format(i) in names
        assert type(adapted.get_submodule(router.format(i))).__name__ == "ParamLoraLayer"
        assert type(adapted.get_submodule(router.format(i)).base_layer).__name__ == cls
    if name == "phimoe":  # grouped matmul experts; Llama4's run every token through bmm
        assert any(n.endswith("experts.gate_up_proj[0]") for n in names)
    assert "model.layers.0.self_attn.q_proj" in names
    _perturb_b(adapted)
    merged = evagraph.merge(adapted)
    assert type(merged) is type(model)
    with torch.no_grad():
        out = _call(adapted, batches[0])
        assert not torch.allclose(out, _call(model, batches[0]), atol=1e-4)
        torch.testing.assert_close(_call(merged, batches[0]), out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_call(evagraph.to_peft(adapted), batches[0]), out)


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
    layers = {n for n, m in model.named_modules() if module_kind(m) is not None}
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


def _routed_rows(model, batches):
    """Per expert of layer 0, the rows each fused weight saw (exactly, from a hook on the
    experts module): gate_up_proj's inputs and down_proj's, padding left out."""
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def hook(module, args, _):
        hidden, index, _ = args
        seen["x"], seen["index"] = hidden.detach(), index

    handle = experts.register_forward_hook(hook)
    rows = {}
    try:
        for batch in batches:
            with torch.no_grad():
                model(**batch)
            keep = batch["attention_mask"].reshape(-1).bool()
            for e in range(experts.num_experts):
                routed = (seen["index"] == e).any(-1) & keep
                x = seen["x"][routed]
                gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                h = experts.act_fn(gate) * up
                rows.setdefault(("gate_up_proj", e), []).append(x)
                rows.setdefault(("down_proj", e), []).append(h)
    finally:
        handle.remove()
    return {key: torch.cat(r).double() for key, r in rows.items()}


def test_mixtral_experts_are_adapted_from_the_rows_routed_to_them(tmp_path):
    """Each expert of a fused weight is a layer of its own: its statistics are the PCA of
    exactly the (unpadded) rows the router sent it, experts that got too few rows get rank
    0 with the reason, and the adapted model keeps its class, its output at init, merges,
    saves and re-applies."""
    config = T.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=100, num_local_experts=8, num_experts_per_tok=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 7:] = 0
        ids = torch.randint(0, 100, (2, 12), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask})
    adapted, report, state = _transform(model, batches, tau=1.0, return_state=True)
    _check_adapted(model, adapted, report, batches[0])
    assert report.steps == 3  # tau = 1: every batch is consumed by every group
    expected = _routed_rows(model, batches)
    few = 0
    for (param, e), rows in expected.items():
        name = f"model.layers.0.mlp.experts.{param}[{e}]"
        group = state.layer_group[name]
        assert state.components[group].n_rows == len(rows), name
        if len(rows) <= 2:  # budget 2: a PCA of so few rows gives too few directions
            few += 1
            assert report.ranks[name] == 0
            assert "the router sent this expert" in report.skipped[name], name
            continue
        centred = rows - rows.mean(0)
        values, vectors = torch.linalg.eigh(centred.T @ centred / (len(rows) - 1))
        got = state.components[group]
        top = min(2, len(rows) - 1)
        ratios = values.flip(0)[:top] / values.sum()
        torch.testing.assert_close(
            got.explained_variance_ratio[:top].double(), ratios, rtol=1e-4, atol=1e-6
        )
        cos = (got.components[:top].double() * vectors.flip(1)[:, :top].T).sum(1).abs()
        assert bool((cos > 0.999).all()), (name, cos)
    assert few  # the seed routes few rows to some expert
    assert sum(r for n, r in report.ranks.items() if "experts" in n) > 0
    _perturb_b(adapted)
    batch = batches[0]
    with torch.no_grad():
        out = _call(adapted, batch)
        assert not torch.allclose(out, _call(model, batch), atol=1e-4)
        merged = evagraph.merge(adapted)
        assert type(merged) is type(model)
        torch.testing.assert_close(_call(merged, batch), out, atol=1e-4, rtol=1e-4)
        evagraph.save_adapter(adapted, tmp_path / "a")
        again = evagraph.apply_adapter(model, tmp_path / "a")
        torch.testing.assert_close(_call(again, batch), out, atol=1e-5, rtol=1e-5)
        back = evagraph.unmerge(merged, tmp_path / "a")
        torch.testing.assert_close(_call(back, batch), out, atol=1e-4, rtol=1e-4)
        # PEFT's target_parameters LoRA holds the routers' and experts' adapters exactly
        peft = pytest.importorskip("peft")
        config = evagraph.formats.peft.peft_config_for(adapted)
        assert "model.layers.0.mlp.experts.gate_up_proj" in config.target_parameters
        torch.testing.assert_close(_call(evagraph.to_peft(adapted), batch), out)
        evagraph.save_peft(adapted, tmp_path / "p")
        loaded = peft.PeftModel.from_pretrained(model, tmp_path / "p")
        torch.testing.assert_close(_call(loaded, batch), out)
    assert hasattr(adapted, "generate")
    adapted.generate(batch["input_ids"][:1, :4], max_new_tokens=2, do_sample=False)


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
