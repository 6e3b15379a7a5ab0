"""Each EVA option, with a test that shows its effect."""

import pytest
import torch
from conftest import SharedMLP, correlated, exact_pca, loras, quiet
from test_models import build

import evagraph


def lm_batches_with_labels(n=4):
    batches = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(3, 100, (2, 8), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # e.g. the prompt: ignored by the loss
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def first_layer_rows(report):
    return report.rows[report.layers[0].group]


def test_label_mask_excludes_ignored_rows_and_can_be_switched_off():
    model, _ = build("hf", "llama")
    batches = lm_batches_with_labels()
    _, on = quiet(evagraph.transform, model, batches, budget=2, progress=False, max_steps=2)
    _, off = quiet(
        evagraph.transform,
        model,
        batches,
        budget=2,
        progress=False,
        max_steps=2,
        use_label_mask=False,
    )
    assert first_layer_rows(on) == 2 * 2 * 5  # 2 batches x 2 sequences x (8 - 3) tokens
    assert first_layer_rows(off) == 2 * 2 * 8


def test_label_mask_rows_are_really_excluded_from_the_statistics():
    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x, labels=None):
            return self.head(torch.relu(self.fc(x)))

    x = correlated(40, 6, rank=3).reshape(4, 10, 6)
    labels = torch.zeros(4, 10, dtype=torch.long)
    labels[:, 7:] = -100
    x[:, 7:] = 1e3 * torch.randn(4, 3, 6)  # ignored rows would dominate the variance
    _, report = quiet(
        evagraph.transform, Tagger().eval(), [{"x": x, "labels": labels}], budget=2, progress=False
    )
    _, ref_ratio = exact_pca(x[:, :7].reshape(-1, 6), 4)
    torch.testing.assert_close(
        torch.tensor(report.layers[0].explained_variance_ratio), ref_ratio, rtol=1e-3, atol=1e-6
    )


def test_max_rows_takes_every_nth_row_of_each_minibatch_and_its_mask():
    """With ``max_rows`` each minibatch hands every n-th row (n the smallest leaving at most
    that many) and its mask to the statistic: the components are the exact PCA of those rows,
    padding among them still left out."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g) * torch.logspace(0, -2, 8)[:, None]
    xs = [torch.randn(3, 9, 8, generator=g) @ mix for _ in range(4)]  # 27 rows each
    masks = [torch.ones(3, 9) for _ in xs]
    for x, mask in zip(xs, masks):
        mask[:, 7:] = 0
        x[:, 7:] = 1e3  # padding that would dominate the variance if it were counted

    def forward_fn(m, batch):
        return m(batch["x"])

    batches = [{"x": x, "attention_mask": m} for x, m in zip(xs, masks)]
    state = quiet(
        evagraph.calibrate, model, batches, budget=2, rho=2, statistic="exact", max_rows=10, tau=1,
        forward_fn=forward_fn, progress=False,
    )  # fmt: skip
    assert state.settings["max_rows"] == 10
    kept = [(x.reshape(-1, 8)[::3], m.reshape(-1)[::3]) for x, m in zip(xs, masks)]  # 27 -> 9
    rows = torch.cat([x[m > 0] for x, m in kept])
    got = state.components[state.layer_group["0"]]
    assert got.n_rows == rows.shape[0] < 4 * 21
    ref, _ = exact_pca(rows, 4)
    cos = (got.components[:4].double() @ ref.double().T).diagonal().abs()
    assert cos.min() > 0.999


def test_tau_lower_converges_sooner():
    model = SharedMLP().eval()
    batches = list(correlated(400, 16, rank=6, noise=0.3).reshape(100, 4, 16))
    _, strict = quiet(evagraph.transform, model, batches, tau=0.999, progress=False)
    _, loose = quiet(evagraph.transform, model, batches, tau=0.5, progress=False)
    assert loose.steps < strict.steps


def test_rho_one_is_uniform_and_rho_two_redistributes():
    model, batches = build("timm", "resnet18")
    _, uniform = quiet(evagraph.transform, model, batches, budget=2, rho=1, progress=False)
    _, spread = quiet(evagraph.transform, model, batches, budget=2, rho=2, progress=False)
    assert set(uniform.ranks.values()) == {2}
    assert len(set(spread.ranks.values())) > 1 and max(spread.ranks.values()) == 4
    assert sum(spread.ranks.values()) == sum(uniform.ranks.values())


@pytest.mark.parametrize("adjust", [True, False])
def test_alpha_and_scaling(adjust):
    model = SharedMLP().eval()
    batches = list(correlated(64, 16).reshape(16, 4, 16))
    adapted, report = quiet(
        evagraph.transform,
        model,
        batches,
        budget=4,
        alpha=16,
        adjust_scaling_factors=adjust,
        progress=False,
    )
    for layer in report.layers:
        if layer.rank:
            scale = 16 / 4 if adjust else 16 / layer.rank
            assert loras(adapted)[layer.name].scaling == pytest.approx(scale)
            assert layer.alpha == pytest.approx(16 * layer.rank / 4 if adjust else 16)


def test_dropout_applies_to_the_adapter_input_in_training_only():
    model = SharedMLP().eval()
    batches = list(correlated(64, 16).reshape(16, 4, 16))
    adapted, _ = quiet(evagraph.transform, model, batches, dropout=0.5, progress=False)
    lora = loras(adapted)["q"]
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(64, 16)
    lora.eval()
    torch.testing.assert_close(lora(x), lora(x))
    lora.train()
    torch.manual_seed(0)
    a = lora(x)
    assert not torch.allclose(a, lora(x))  # a fresh dropout mask each call
    assert isinstance(lora.lora_dropout, torch.nn.Dropout) and lora.lora_dropout.p == 0.5


def test_whiten_divides_rows_by_sqrt_singular_values():
    model = SharedMLP().eval()
    batches = list(correlated(64, 16).reshape(16, 4, 16))
    plain, report = quiet(evagraph.transform, model, batches, budget=2, progress=False)
    white, _ = quiet(evagraph.transform, model, batches, budget=2, whiten=True, progress=False)
    q = next(r for r in report.layers if r.name == "q")
    seen = [i for start, stop in report.batches[q.group] for i in range(start, stop)]
    rows = torch.cat([batches[i].reshape(-1, 16) for i in seen])
    s = torch.linalg.svdvals(rows - rows.mean(0))
    norms = loras(white)["q"].lora_A.weight.norm(dim=1)
    torch.testing.assert_close(norms, s[: q.rank].rsqrt(), rtol=1e-3, atol=0)
    torch.testing.assert_close(
        loras(white)["q"].lora_A.weight / norms[:, None],
        loras(plain)["q"].lora_A.weight,
        atol=1e-5,
        rtol=0,
    )


def test_attention_mask_and_label_mask_combine():
    model, _ = build("hf", "llama")
    batches = lm_batches_with_labels(2)
    for b in batches:
        b["attention_mask"][1, 6:] = 0
    _, report = quiet(evagraph.transform, model, batches, budget=2, progress=False, max_steps=1)
    assert first_layer_rows(report) == 5 + 3  # sequence 0: 5 labelled; sequence 1: 5 - 2 padded


def test_each_setting_reaches_the_report_from_where_it_was_set():
    batches = list(correlated(64, 16).split(8))
    state = quiet(
        evagraph.calibrate, SharedMLP(), batches, budget=2, targets=["q", "k"], max_steps=3,
        min_batches=2, progress=False,
    )  # fmt: skip
    _, report = evagraph.adapt(SharedMLP(), state, budget=1, alpha=4.0)
    calibration, adapter = report.settings["calibration"], report.settings["adapter"]
    assert calibration["targets"] == ["q", "k"] and calibration["exclude"] == []
    assert calibration["max_steps"] == 3 and calibration["min_batches"] == 2
    assert calibration["budget"] == 2 and calibration["statistic"] == "auto"
    assert adapter == {
        "budget": 1, "rho": 2.0, "alpha": 4.0, "adjust_scaling_factors": True, "whiten": False,
        "dropout": 0.0, "use_dora": False, "use_rslora": False,
    }  # fmt: skip


@pytest.mark.parametrize(
    "call,settings,words",
    [
        ("transform", {"alpha": float("inf")}, "alpha must be a finite number"),
        ("transform", {"rho": float("inf")}, "rho must be a finite number"),
        ("transform", {"tau": float("nan")}, "tau must be a finite number"),
        ("transform", {"budget": 2.0}, "budget must be a positive integer"),
        ("transform", {"max_steps": 1.5}, "max_steps must be an integer"),
        ("transform", {"max_rows": 0}, "max_rows must be >= 1"),
        ("calibrate", {"max_rows": 2.5}, "max_rows must be an integer"),
        ("transform", {"bugdet": 2}, "unknown setting(s) bugdet"),
        ("calibrate", {"alpha": 2.0}, "unknown setting(s) alpha"),
        ("adapt", {"tau": 0.9}, "unknown setting(s) tau"),
        ("adapt", {"budget": 0}, "budget must be a positive integer"),
        ("adapt", {"rho": 0}, "rho must be >= 1"),
    ],
)
def test_settings_are_checked_by_name_and_value(call, settings, words):
    batches = list(correlated(32, 16).split(8))
    model = SharedMLP()
    with pytest.raises(evagraph.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        if call == "adapt":
            state = quiet(evagraph.calibrate, model, batches, budget=2, progress=False)
            evagraph.adapt(model, state, **settings)
        else:
            quiet(getattr(evagraph, call), model, batches, progress=False, **settings)
