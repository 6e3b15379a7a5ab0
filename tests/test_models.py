"""The model matrix: HF transformers (captured by torch.export) and timm (fx), random init."""

import warnings

import pytest
import torch

import evagraph
from evagraph.layers import module_kind
from evagraph.lora import LoraAdapter
from evagraph.passes.probe import activation_rows
from evagraph.stats import ExactCovariance, make_statistic

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def token_batches(n=3, batch=2, length=8, vocab=100, **extra):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, length - 3 :] = 0  # padding rows must not count
        b = {
            "input_ids": torch.randint(3, vocab, (batch, length), generator=g),
            "attention_mask": mask,
        }
        out.append({**b, **{k: v(g) for k, v in extra.items()}})
    return out


def images(n=3, batch=2, size=32, channels=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, size, size, generator=g) for _ in range(n)]


HF = {
    "llama": (
        lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SMALL)),
        token_batches,
    ),
    "gpt2": (
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
            )
        ),
        token_batches,
    ),
    "bert": (
        lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=100, **SMALL)),
        token_batches,
    ),
    "t5": (
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
        ),
        lambda: token_batches(
            decoder_input_ids=lambda g: torch.randint(3, 100, (2, 5), generator=g)
        ),
    ),
    "vit": (
        lambda: T.ViTForImageClassification(
            T.ViTConfig(image_size=32, patch_size=8, num_labels=3, **SMALL)
        ),
        lambda: [{"pixel_values": x} for x in images()],
    ),
    "whisper": (
        lambda: T.WhisperForConditionalGeneration(
            T.WhisperConfig(
                vocab_size=100,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=16,
                max_source_positions=16,
                max_target_positions=16,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
            )
        ),
        lambda: [
            {"input_features": x[:, 0, :16], "decoder_input_ids": torch.randint(3, 100, (2, 5))}
            for x in images(channels=1)
        ],
    ),
    "distilbert": (
        lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        ),
        token_batches,
    ),
}
TIMM = {
    "resnet18": {},
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8),
    "convnext_atto": {},
    "efficientnet_b0": {},
    "swin_tiny_patch4_window7_224": dict(
        img_size=32, window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    ),
    "mobilenetv3_small_050": {},
    "regnetx_002": {},
}
CASES = [("hf", name) for name in HF] + [("timm", name) for name in TIMM]


def build(source, name):
    torch.manual_seed(0)
    if source == "hf":
        make, data = HF[name]
        return make().eval(), data()
    model = timm.create_model(name, pretrained=False, num_classes=5, **TIMM[name]).eval()
    return model, images()


def call(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def rows_per_batch(model, name, batches):
    """Input rows of module ``name`` for each batch, padding excluded as the probes do."""
    module = model.get_submodule(name)
    kind, conv = module_kind(module)
    grabbed, mask = [], [None]

    def hook(m, args):
        rows, w = activation_rows(args[0], kind, conv, mask[0])
        grabbed[-1].append(rows if w is None else rows[w.bool()])

    handle = module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in batches:
            grabbed.append([])
            mask[0] = b.get("attention_mask") if isinstance(b, dict) else None
            call(model, b)
    handle.remove()
    return [torch.cat(r) for r in grabbed]


def check_components(model, adapted, report, batches):
    """A's rows are orthonormal and capture the top-rank variance of the rows the layer saw."""
    for layer in report.layers:
        if not layer.rank:
            continue
        per_batch = rows_per_batch(model, layer.name, batches)
        consumed = [i for start, stop in report.batches[layer.group] for i in range(start, stop)]
        x = torch.cat([per_batch[i] for i in consumed]).double()
        assert len(x) == report.rows[layer.group], layer.name
        x = x - x.mean(0)
        lora = next(
            m
            for m in adapted.modules()
            if isinstance(m, LoraAdapter) and m.layer_name == layer.name
        )
        A = lora.lora_A.weight.detach().reshape(layer.rank, -1).double()
        torch.testing.assert_close(A @ A.T, torch.eye(layer.rank, dtype=A.dtype), atol=1e-4, rtol=0)
        r = min(layer.rank, len(x) - 1)
        captured = (x @ A[:r].T).pow(2).sum()
        best = torch.linalg.svdvals(x)[:r].pow(2).sum()
        # the exact statistic's components are the PCA; the low-rank sketch's within 1% of it
        k = len(layer.explained_variance_ratio)
        exact = isinstance(make_statistic("auto", layer.in_features, k, "cpu"), ExactCovariance)
        assert captured >= best * (1 - (1e-3 if exact else 1e-2)) - 1e-6, layer.name


@pytest.mark.slow
@pytest.mark.parametrize("source,name", CASES, ids=[n for _, n in CASES])
def test_model_matrix(source, name):
    model, batches = build(source, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    assert type(adapted) is type(model)  # modules wrapped, class kept
    assert report.capture == ("export" if source == "hf" else "fx")

    with torch.no_grad():
        torch.testing.assert_close(
            call(adapted, batches[0]), call(model, batches[0]), atol=1e-4, rtol=1e-4
        )
    assert sum(report.ranks.values()) == 2 * len(report.layers)

    # the report accounts for every linear/conv module
    adaptable = {n for n, m in model.named_modules() if module_kind(m) is not None}
    assert adaptable == {layer.name for layer in report.layers} | set(report.skipped)

    check_components(model, adapted, report, batches)

    # one training step moves LoRA parameters only
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    call(adapted, batches[0]).float().pow(2).mean().backward()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.1).step()
    lora_ids = {
        id(p) for m in adapted.modules() if isinstance(m, LoraAdapter) for p in m.parameters()
    }
    assert {id(p) for p in trainable} == lora_ids
    moved = sum(
        int(m.lora_B.weight.abs().sum() > 0)
        for m in adapted.modules()
        if isinstance(m, LoraAdapter)
    )
    assert moved > 0
    adapted_base = {
        n.replace(".base_layer", ""): p for n, p in adapted.named_parameters() if ".lora." not in n
    }
    for n, p in base.items():
        assert torch.equal(adapted_base[n], p), n


def test_llama_shares_qkv_and_gate_up():
    model, batches = build("hf", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        _, report = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    group = {layer.name: layer.group for layer in report.layers}
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert group[f"{attn}.q_proj"] == group[f"{attn}.k_proj"] == group[f"{attn}.v_proj"]
        assert group[f"{mlp}.gate_proj"] == group[f"{mlp}.up_proj"]
        assert group[f"{attn}.o_proj"] != group[f"{attn}.q_proj"]
    assert len(report.groups) == 8 < len(report.layers) == 14
    assert report.skipped["lm_head"] == "output layer (model head)"
    # padding rows (attention_mask 0) are not counted: 3 batches x (8 + 5) tokens
    assert report.rows[group["model.layers.0.self_attn.q_proj"]] == 3 * 13


def test_bert_pooler_and_classifier_are_heads():
    model, batches = build("hf", "bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        _, report = evagraph.transform(model, batches, budget=2, progress=False)
    assert {"bert.pooler.dense", "classifier"} <= set(report.skipped)
    assert all("pooler" not in layer.name for layer in report.layers)


def test_gpt2_conv1d_mask_applies_to_flattened_rows():
    model, batches = build("hf", "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        _, report = evagraph.transform(model, batches, budget=2, progress=False)
    c_attn = next(r for r in report.layers if r.name == "transformer.h.0.attn.c_attn")
    assert c_attn.op == "aten.addmm.default" and (c_attn.in_features, c_attn.out_features) == (
        32,
        96,
    )
    assert report.rows[c_attn.group] == 3 * 13


def test_falcon_linear_layers_lowered_to_matmul():
    """FalconLinear computes ``x @ self.weight.T``: export records aten.matmul on a transpose
    of the weight, which is still the module's linear layer (module wrap, class kept)."""
    torch.manual_seed(0)
    config = T.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    model, batches = T.FalconForCausalLM(config).eval(), token_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    assert type(adapted) is type(model) and report.rewrite == "module"
    names = {
        f"transformer.h.{i}.{n}"
        for i in range(2)
        for n in ("self_attention.query_key_value", "self_attention.dense")
        + ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    }
    assert {r.name for r in report.layers} == names
    assert {r.op for r in report.layers} == {"aten.matmul.default"}
    assert report.skipped == {"lm_head": "output layer (model head)"}
    with torch.no_grad():
        torch.testing.assert_close(call(adapted, batches[0]), call(model, batches[0]))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora.lora_" in n for n in trainable)

    with torch.no_grad():
        for m in adapted.modules():
            if isinstance(m, LoraAdapter):
                m.lora_B.weight.normal_(0, 0.1)
        merged = evagraph.merge(adapted)
        assert type(merged) is type(model)
        torch.testing.assert_close(
            call(merged, batches[0]), call(adapted, batches[0]), atol=1e-5, rtol=1e-4
        )
    out = adapted.generate(batches[0]["input_ids"][:1], max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 10)


@pytest.mark.slow
def test_levit_after_a_forward_with_grad():
    """LeViT caches its attention biases (non-leaf tensors) on a forward with grad enabled,
    which deepcopy refuses: the adapted model's module tree shares them instead."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=5, img_size=64).eval()
    batches = images(n=2, size=64)
    model(batches[0])  # grad enabled: fills the caches
    cached = [
        m.attention_bias_cache for m in model.modules() if getattr(m, "attention_bias_cache", None)
    ]
    assert cached and any(t.grad_fn is not None for c in cached for t in c.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(model, batches, budget=2, rho=1, progress=False)
    assert type(adapted) is type(model) and report.layers
    with torch.no_grad():
        torch.testing.assert_close(adapted(batches[0]), model(batches[0]))
        for m in adapted.modules():
            if isinstance(m, LoraAdapter):
                m.lora_B.weight.normal_(0, 0.1)
        merged = evagraph.merge(adapted)
        torch.testing.assert_close(merged(batches[0]), adapted(batches[0]), atol=1e-5, rtol=1e-4)
