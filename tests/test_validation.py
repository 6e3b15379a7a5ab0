"""Saved statistics and adapters are checked against the model they are applied to, and
malformed or tampered files are a ModelLoadError naming the file and the entry."""

import json
import subprocess

import pytest
import torch
from conftest import SharedMLP, SmallCNN, correlated, evagraph_cmd, loras, quiet
from safetensors import safe_open
from safetensors.torch import save_file
from test_artifacts import train_b

import evagraph
from evagraph import ConfigError, ModelLoadError
from evagraph.lora import refuse_adapted
from evagraph.merge import MERGED


def batches(d: int = 16) -> list[torch.Tensor]:
    rows = correlated(96, d)
    return [rows[i : i + 16] for i in range(0, 96, 16)]


def calibrate(model) -> evagraph.EvaState:
    return quiet(evagraph.calibrate, model, batches(), budget=2, rho=2, progress=False)


def adapted_mlp(h: int = 32):
    model = SharedMLP(h=h).eval()
    adapted, _ = quiet(evagraph.transform, model, batches(), budget=2, progress=False)
    train_b(adapted)
    return model, adapted


def read(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


# -- a state from another model with the same layer names ---------------------------------


@pytest.fixture(scope="module")
def wide_state(tmp_path_factory):
    """Statistics of SharedMLP(h=64), whose q, k, o have the names of SharedMLP()'s."""
    path = tmp_path_factory.mktemp("wide") / "eva_state.safetensors"
    calibrate(SharedMLP(h=64).eval()).save(path)
    return path


def test_state_from_a_wider_model_is_refused(wide_state):
    state = evagraph.EvaState.load(wide_state)
    narrow = SharedMLP().eval()
    with pytest.raises(ModelLoadError, match=r"layer q: EVA state .* linear 16 -> 64 .* 16 -> 32"):
        state.check_model(narrow)
    # a graph of ATen ops (a loaded .pt2): checked by the weight parameter's shape
    graph = torch.export.export(narrow, (torch.randn(4, 16),)).module()
    with pytest.raises(ModelLoadError, match=r"layer q: .* weight q.weight has shape \(32, 16\)"):
        state.check_model(graph)
    state.check_model(SharedMLP(h=64))  # the model it came from passes


def test_adapt_refuses_a_state_from_a_wider_model_naming_the_file(wide_state):
    state = evagraph.EvaState.load(wide_state)
    with pytest.raises(ModelLoadError, match=r"layer q: EVA state .*eva_state.safetensors has"):
        evagraph.adapt(SharedMLP().eval(), state)


def test_state_layer_missing_or_of_another_kind_is_refused(wide_state):
    state = evagraph.EvaState.load(wide_state)
    model = SharedMLP(h=64)
    model.q = torch.nn.Conv1d(16, 64, 1)  # same name and widths, another kind
    with pytest.raises(ModelLoadError, match="layer q: .* has linear 16 -> 64 .* Conv1d is conv"):
        state.check_model(model)
    del model.q
    with pytest.raises(ModelLoadError, match="layer q: .* no such linear/conv layer"):
        state.check_model(model)


def test_cli_state_from_a_wider_model_is_one_line_and_writes_nothing(wide_state, tmp_path):
    narrow = tmp_path / "narrow.pt2"
    torch.export.save(torch.export.export(SharedMLP().eval(), (torch.randn(4, 16),)), narrow)
    out = tmp_path / "out"
    cmd = ["compile", str(narrow), "--state", str(wide_state), "--format", "safetensors"]
    cmd += ["--budget", "2", "--rho", "2"]
    proc = subprocess.run(
        [*evagraph_cmd(), *cmd, "-o", str(out), "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
    assert "layer " in lines[0] and "16 -> 64" in lines[0] and "(32, 16)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow.pt2"]  # nothing written


# -- tampered EVA state files --------------------------------------------------------------


def _meta(edit):
    def mutate(meta, tensors):
        edit(meta)
        return json.dumps(meta)

    return mutate


def _tensor(key, value):
    """Replace (or with None, delete) one tensor of a saved state or adapter."""

    def mutate(meta, tensors):
        tensors[key] = value(tensors[key]) if callable(value) else value
        if tensors[key] is None:
            del tensors[key]
        return json.dumps(meta)

    return mutate


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


STATE_CASES = {
    "settings not an object": (_meta(lambda m: m.update(settings=[2, 2])), "'settings'"),
    "missing layer_group": (_meta(lambda m: m.pop("layer_group")), "missing 'layer_group'"),
    "width as a string": (
        _meta(lambda m: m["layers"]["q"].update(in_features="16")),
        "layer q: 'in_features' must be an integer >= 1",
    ),
    "unknown kind": (_meta(lambda m: m["layers"]["o"].update(kind="lstm")), "layer o: 'kind'"),
    "budget zero": (_meta(lambda m: m["settings"].update(budget=0)), "'budget'"),
    "rho infinite": (_meta(lambda m: m["settings"].update(rho=float("inf"))), "'rho'"),
    "unknown group": (
        _meta(lambda m: m["layer_group"].update(o="g9")),
        "layer o points to unknown group 'g9'",
    ),
    "inconsistent group": (
        _meta(lambda m: m["layer_group"].update(q="g1")),
        "group g1: layers q and o read rows of different width",
    ),
    "layer without a group": (_meta(lambda m: m["layer_group"].pop("k")), "layer_group"),
    "group without a layer": (
        _meta(lambda m: m["layer_group"].update(o="g0", q="g0")),
        "group(s) g1 have no layer",
    ),
    "unknown layer key": (
        _meta(lambda m: m["layers"]["q"].update(secret=1)),
        "layer q: unknown key",
    ),
    "missing tensor": (_tensor("g0.mean", None), "missing tensor g0.mean"),
    "components of the wrong width": (
        _tensor("g1.components", lambda t: t[:, :16].contiguous()),
        "tensor g1.components has shape (4, 16), expected (4, 32)",
    ),
    "more components than budget x rho": (
        _tensor("g0.components", lambda t: torch.cat([t, t])),
        "group g0 holds 8 components",
    ),
    "ratios of the wrong length": (
        _tensor("g0.explained_variance_ratio", lambda t: t[:2].contiguous()),
        "g0.explained_variance_ratio has shape (2,)",
    ),
    "NaN components": (_tensor("g0.components", _nan), "g0.components holds NaN or Inf"),
    "Inf variance": (_tensor("g1.explained_variance", _inf), "g1.explained_variance holds NaN"),
    "integer components": (_tensor("g0.components", lambda t: t.long()), "not a float type"),
    "extra tensor": (_tensor("g7.components", torch.zeros(2, 2)), "g7.components belong to no"),
    "duplicate key": (
        lambda meta, tensors: json.dumps(meta).replace('"steps":', '"steps": 1, "steps":'),
        "duplicate entry 'steps'",
    ),
    "metadata not JSON": (lambda meta, tensors: "{not json", "is not valid JSON"),
    "another format": (_meta(lambda m: m.update(format="x")), "not an evagraph EVA state"),
}


@pytest.mark.parametrize("case", STATE_CASES)
def test_tampered_state_file(tmp_path, case):
    mutate, words = STATE_CASES[case]
    path = tmp_path / "state.safetensors"
    calibrate(SharedMLP().eval()).save(path)
    tensors, metadata = read(path)
    text = mutate(json.loads(metadata["evagraph_state"]), tensors)
    save_file(tensors, str(path), metadata={"evagraph_state": text})
    with pytest.raises(ModelLoadError) as err:
        evagraph.EvaState.load(path)
    assert str(path) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{garbage}}}}"]
)
def test_state_file_that_is_not_safetensors(tmp_path, content):
    path = tmp_path / "state.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="cannot read EVA state"):
        evagraph.EvaState.load(path)


def test_untampered_state_round_trips(tmp_path):
    model = SmallCNN().eval()
    images = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    state = quiet(evagraph.calibrate, model, images, budget=2, progress=False)
    state.save(tmp_path / "s.safetensors")
    loaded = evagraph.EvaState.load(tmp_path / "s.safetensors")
    assert loaded.layers == state.layers and loaded.ranks(2, 2) == state.ranks(2, 2)
    loaded.check_model(model)


@pytest.mark.parametrize(
    "budget,rho",
    [
        (0, 2),
        (-1, 2),
        (1.5, 2),
        (True, 2),
        (2, 0),
        (2, 0.5),
        (2, float("inf")),
        (2, float("nan")),
        (float("inf"), 2),
    ],  # fmt: skip
)
def test_ranks_refuses_bad_budget_and_rho(budget, rho):
    state = calibrate(SharedMLP().eval())
    with pytest.raises(ConfigError, match="budget" if rho == 2 else "rho"):
        state.ranks(budget, rho)


# -- tampered adapter directories ----------------------------------------------------------


def _entry(layer, **values):
    def mutate(manifest, weights):
        entry = next(e for e in manifest["layers"] if e["name"] == layer)
        entry.update(values)
        return json.dumps(manifest)

    return mutate


def _rank_20(manifest, weights):
    """q at rank 20 > its 16 input features, shapes consistent everywhere else."""
    weights["q.lora_A.weight"] = torch.randn(20, 16)
    weights["q.lora_B.weight"] = torch.zeros(32, 20)
    _entry("q", rank=20, lora_A_shape=[20, 16], lora_B_shape=[32, 20])(manifest, weights)
    return json.dumps(manifest)


ADAPTER_CASES = {
    "manifest not JSON": (lambda m, w: "{", "adapter.json is not valid JSON"),
    "layers not a list": (lambda m, w: json.dumps({**m, "layers": {}}), "'layers' must be"),
    "rank as a string": (_entry("q", rank="2"), "layer q: 'rank' must be an integer >= 1"),
    "rank zero": (_entry("q", rank=0), "layer q: 'rank'"),
    "scaling null": (_entry("q", scaling=None), "layer q: 'scaling' must be a finite number > 0"),
    "missing scaling": (
        lambda m, w: json.dumps({**m, "layers": [{"name": "q", "kind": "linear", "rank": 2}]}),
        "layer q: missing",
    ),
    "infinite scaling": (_entry("k", scaling=float("inf")), "layer k: 'scaling' must be"),
    "negative scaling": (_entry("k", scaling=-1.0), "layer k: 'scaling'"),
    "dropout one": (_entry("o", dropout=1.0), "layer o: 'dropout' must be"),
    "dropout NaN": (_entry("o", dropout=float("nan")), "layer o: 'dropout'"),
    "unknown kind": (_entry("q", kind="embedding"), "layer q: 'kind'"),
    "duplicate layer": (
        lambda m, w: json.dumps({**m, "layers": m["layers"] + m["layers"][:1]}),
        "duplicate entry",
    ),
    "duplicate key": (
        lambda m, w: json.dumps(m).replace('"format":', '"format": 1, "format":', 1),
        "duplicate entry 'format'",
    ),
    "missing tensor": (_tensor("o.lora_B.weight", None), "layer o: missing tensor o.lora_B"),
    "extra tensor": (_tensor("head.lora_A.weight", torch.zeros(2, 16)), "belong to no layer"),
    "rank not matching A": (_entry("q", rank=3), "layer q: lora_A has shape"),
    "A not matching the manifest": (
        _tensor("q.lora_A.weight", lambda t: t[:1].contiguous()),
        "layer q: lora_A has shape (1, 16) but the manifest says",
    ),
    "NaN in B": (_tensor("k.lora_B.weight", _nan), "layer k: lora_B holds NaN or Inf"),
    "Inf in A": (_tensor("k.lora_A.weight", _inf), "layer k: lora_A holds NaN or Inf"),
    "integer A": (_tensor("k.lora_A.weight", lambda t: t.int()), "not a float type"),
    "rank above width": (_rank_20, "layer q: rank 20 exceeds the layer's input width 16"),
    "another format": (lambda m, w: json.dumps({**m, "format": "x"}), "not an evagraph adapter"),
}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    evagraph.save_adapter(adapted_mlp()[1], directory)
    return directory


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_tampered_adapter(saved_adapter, tmp_path, case):
    mutate, words = ADAPTER_CASES[case]
    manifest = json.loads((saved_adapter / "adapter.json").read_text())
    weights, metadata = read(saved_adapter / "adapter.safetensors")
    (tmp_path / "adapter.json").write_text(mutate(manifest, weights))
    save_file(weights, str(tmp_path / "adapter.safetensors"), metadata=metadata)
    with pytest.raises(ModelLoadError) as err:
        evagraph.apply_adapter(SharedMLP(), tmp_path)
    assert str(tmp_path) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    "content", [b"", b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x08" + b"\0" * 7 + b"[1,2,3]"]
)
def test_adapter_weights_that_are_not_safetensors(saved_adapter, tmp_path, content):
    (tmp_path / "adapter.json").write_text((saved_adapter / "adapter.json").read_text())
    (tmp_path / "adapter.safetensors").write_bytes(content)
    with pytest.raises(ModelLoadError, match="cannot read adapter weights .*adapter.safetensors"):
        evagraph.apply_adapter(SharedMLP(), tmp_path)


def test_adapter_conv_kernel_not_matching_its_weights(tmp_path):
    model = SmallCNN().eval()
    adapted, _ = quiet(evagraph.transform, model, [torch.randn(4, 3, 16, 16)] * 3, progress=False)
    evagraph.save_adapter(adapted, tmp_path)
    manifest = json.loads((tmp_path / "adapter.json").read_text())
    entry = next(e for e in manifest["layers"] if e["name"] == "c1")
    entry["conv"]["kernel_size"] = [5, 5]
    (tmp_path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="layer c1: lora_A has shape .* for a conv layer"):
        evagraph.apply_adapter(model, tmp_path)


# -- adapters against the model ------------------------------------------------------------


def test_adapter_from_a_wider_model_is_refused(tmp_path):
    evagraph.save_adapter(adapted_mlp(h=64)[1], tmp_path)
    narrow = SharedMLP().eval()
    with pytest.raises(ModelLoadError, match=r"layer q: adapter .* 16 -> 64 .* 16 -> 32"):
        evagraph.apply_adapter(narrow, tmp_path)
    graph = torch.export.export(narrow, (torch.randn(4, 16),)).module()
    with pytest.raises(ModelLoadError, match=r"layer q: .* weight q.weight has shape \(32, 16\)"):
        evagraph.apply_adapter(graph, tmp_path)


def test_adapter_on_a_conv_of_other_geometry_is_refused(tmp_path):
    model = SmallCNN().eval()
    adapted, _ = quiet(evagraph.transform, model, [torch.randn(4, 3, 16, 16)] * 3, progress=False)
    evagraph.save_adapter(adapted, tmp_path)
    other = SmallCNN().eval()
    other.c2 = torch.nn.Conv2d(8, 16, 3, stride=1, padding=2, dilation=2)  # same widths
    with pytest.raises(ModelLoadError, match=r"layer c2: .*stride \(2, 2\).* stride \(1, 1\)"):
        evagraph.apply_adapter(other, tmp_path)
    evagraph.apply_adapter(SmallCNN().eval(), tmp_path)  # the same geometry still applies


# -- unmerge -------------------------------------------------------------------------------


def test_unmerge_refuses_a_model_that_was_never_merged(tmp_path):
    model, adapted = adapted_mlp()
    evagraph.save_adapter(adapted, tmp_path)
    for source in (adapted, tmp_path):
        with pytest.raises(ConfigError, match="not made by evagraph.merge"):
            evagraph.unmerge(model, source)
    with pytest.raises(ConfigError, match="already carries evagraph LoRA adapters"):
        evagraph.unmerge(adapted, adapted, assume_merged=True)


def test_unmerge_of_a_merged_model_works_and_a_reloaded_one_needs_assume_merged(tmp_path):
    model, adapted = adapted_mlp()
    merged = evagraph.merge(adapted)
    x = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(evagraph.unmerge(merged, adapted)(x), adapted(x))
        reloaded = SharedMLP()  # merged weights saved and loaded elsewhere: the mark is gone
        reloaded.load_state_dict(merged.state_dict())
        with pytest.raises(ConfigError, match="assume_merged=True"):
            evagraph.unmerge(reloaded, adapted)
        restored = evagraph.unmerge(reloaded, adapted, assume_merged=True)
        torch.testing.assert_close(restored(x), adapted(x))
    assert not hasattr(restored, MERGED)


def test_unmerge_with_other_adapters_than_were_merged_is_refused():
    model, adapted = adapted_mlp()
    only_q, _ = quiet(evagraph.transform, model, batches(), budget=2, targets=["q"], progress=False)
    with pytest.raises(ConfigError, match="merged with other adapters .* k, o"):
        evagraph.unmerge(evagraph.merge(adapted), only_q)


def test_unmerge_of_adapters_that_do_not_fit_is_refused(tmp_path):
    wide = evagraph.merge(adapted_mlp(h=64)[1])
    _, narrow_adapted = adapted_mlp()
    with pytest.raises(ModelLoadError, match="layer q: .* 16 -> 32 .* 16 -> 64"):
        evagraph.unmerge(wide, narrow_adapted, assume_merged=True)


# -- adapting a model that already carries adapters ----------------------------------------


def _evagraph_adapted():
    return adapted_mlp()[1]


def _evagraph_pt2():
    """A .pt2 exported from an adapted model: no adapter classes, only lora_A/lora_B weights."""
    adapted = adapted_mlp()[1]
    return torch.export.export(adapted, (torch.randn(4, 16),)).module()


def _peft_model():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q", "k"])
    return peft.get_peft_model(SharedMLP(), config)


def _peft_layers():
    return _peft_model().base_model.model  # the bare model, holding PEFT's LoraLayers


ADAPTED = {
    "evagraph": (_evagraph_adapted, "already carries evagraph LoRA adapters"),
    "evagraph pt2": (_evagraph_pt2, "already carries LoRA weights"),
    "peft model": (_peft_model, "already carries PEFT adapters"),
    "peft layers": (_peft_layers, "already carries PEFT adapters"),
}


def _apply(model, tmp_path):
    evagraph.save_adapter(adapted_mlp()[1], tmp_path)
    return evagraph.apply_adapter(model, tmp_path)


ENTRIES = {
    "refuse_adapted": lambda model, tmp_path: refuse_adapted(model),
    "transform": lambda model, tmp_path: evagraph.transform(model, batches(), progress=False),
    "calibrate": lambda model, tmp_path: evagraph.calibrate(model, batches(), progress=False),
    "adapt": lambda model, tmp_path: evagraph.adapt(model, calibrate(SharedMLP().eval())),
    "apply_adapter": _apply,
    "from_peft_eva_state_dict": lambda model, tmp_path: evagraph.from_peft_eva_state_dict(
        model, {"q": torch.randn(2, 16)}, budget=2
    ),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", ADAPTED)
def test_adapting_an_adapted_model_is_refused(tmp_path, kind, entry):
    build, words = ADAPTED[kind]
    model = build()
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(ConfigError, match=words):
        quiet(ENTRIES[entry], model, tmp_path)
    assert {n for n, _ in model.named_parameters()} == before


def test_a_base_model_is_not_refused():
    refuse_adapted(SharedMLP())
    refuse_adapted(evagraph.merge(adapted_mlp()[1]))
    assert loras(
        evagraph.from_peft_eva_state_dict(SharedMLP(), {"q": torch.randn(2, 16)}, budget=2)
    )
