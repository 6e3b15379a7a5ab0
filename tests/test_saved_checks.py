"""What evagraph reads back (EVA states, adapter directories, reports, PEFT state dicts) is
checked value by value: a tampered or corrupted file is one typed error line naming the file
and the field, never a crash later (at forward, in the renderers); and nothing evagraph
itself writes is refused (round trips below, float32 and bfloat16)."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import SharedMLP, SmallCNN, loras, quiet
from safetensors import safe_open
from safetensors.torch import save_file
from test_bad_input import error_line
from torch import nn

import evagraph
from evagraph import ConfigError, ModelLoadError, ReportLoadError
from evagraph.cli import main
from evagraph.config import AdapterSettings, CalibrationSettings
from evagraph.errors import EvagraphError
from evagraph.passes.layer_graph import forward_mismatch
from evagraph.render import render_report, report_table
from evagraph.report import _LAYER_FIELDS, _REPORT_FIELDS, LayerReport, Report
from evagraph.validate import _SETTING_CHECKS


class Tiny(nn.Module):
    """A conv, two linears sharing their input (one decomposition), one more, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.q = nn.Linear(8, 16)
        self.k = nn.Linear(8, 16)
        self.o = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.c(x)).mean((2, 3))
        return self.head(h + self.o(torch.relu(self.q(h)) * self.k(h)))


def images(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def write_all(model: nn.Module, batches: list, directory: Path, **kw) -> tuple[nn.Module, Path]:
    """transform; the adapter, report.json and eva_state.safetensors as the CLI writes them."""
    adapted, report, state = quiet(
        evagraph.transform, model, batches, progress=False, return_state=True, **kw
    )
    evagraph.save_adapter(adapted, directory, report.settings)
    report.save(directory / "report.json")
    state.save(directory / "eva_state.safetensors")
    return adapted, directory


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return write_all(Tiny().eval(), images(), tmp_path_factory.mktemp("tiny"), budget=2)[1]


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_state(src: Path, dst: Path, meta_edit=None, tensor_edit=None) -> Path:
    """A copy of the state at ``src`` with its metadata JSON and/or tensors edited."""
    tensors, metadata = read(src)
    meta = json.loads(metadata["evagraph_state"])
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors, meta)
    save_file(tensors, str(dst), metadata={"evagraph_state": json.dumps(meta)})
    return dst


def group_of(meta: dict, layer: str) -> str:
    return meta["layer_group"][layer]


# -- PEFT state dicts ----------------------------------------------------------------------


def unit_rows(r: int, d: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r))[0].T.contiguous()


PEFT_CASES = {  # SharedMLP: q, k are 16 -> 32, o is 32 -> 16
    "NaN": ({"q": torch.full((2, 16), float("nan"))}, "entry q holds NaN or Inf"),
    "Inf": ({"o": unit_rows(2, 32) / 0.0}, "entry o holds NaN or Inf"),
    "rank 10000 on a 32-wide layer": (
        {"o": torch.randn(10000, 32)},
        "entry o has rank 10000, more than the layer's input width 32",
    ),
    "integer tensor": ({"q": torch.ones(2, 16, dtype=torch.long)}, "entry q has dtype torch.int64"),
    "boolean tensor": ({"q": torch.ones(2, 16, dtype=torch.bool)}, "entry q has dtype torch.bool"),
    "wrong width": ({"q": unit_rows(2, 7)}, "entry q has shape (2, 7), expected (rank, 16)"),
    "one-dimensional": ({"q": torch.randn(16)}, "entry q has shape (16,), expected (rank, 16)"),
    "three-dimensional": ({"q": torch.randn(2, 16, 1)}, "entry q has shape (2, 16, 1)"),
    "not a tensor": ({"q": [[1.0] * 16] * 2}, "entry q must be a tensor, got list"),
    "rank 0 of the wrong width": ({"q": torch.zeros(0, 7)}, "entry q has shape (0, 7)"),
    "no such layer": ({"v": unit_rows(2, 16)}, "names v, which the model does not have"),
    "not a linear layer": ({"": unit_rows(2, 16)}, "entry  is not a linear layer"),
    "key not a string": ({3: unit_rows(2, 16)}, "key 3 is not a module name"),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_state_dict_entries_are_checked(case):
    state_dict, words = PEFT_CASES[case]
    with pytest.raises(ConfigError) as err:
        evagraph.from_peft_eva_state_dict(SharedMLP(), state_dict, budget=2)
    assert str(err.value).startswith("the PEFT state dict") and words in str(err.value)
    assert "\n" not in str(err.value)


def test_peft_rank_0_entries_give_no_adapter_as_in_peft():
    """PEFT writes (0, d) for layers that got no rank and removes their LoRA: no adapter."""
    adapted = evagraph.from_peft_eva_state_dict(
        SharedMLP(), {"q": unit_rows(2, 16), "k": torch.zeros(0, 16)}, budget=2
    )
    assert set(loras(adapted)) == {"q"}


# -- adapter.json conv geometry against the model ------------------------------------------


@pytest.fixture(scope="module")
def cnn_adapter(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cnn")
    adapted, _ = quiet(evagraph.transform, SmallCNN().eval(), images(3), progress=False)
    evagraph.save_adapter(adapted, directory)
    return directory


GEOMETRY = {  # SmallCNN.c1: kernel 3x3, stride 1, padding 1, dilation 1, zeros
    "stride": ([2, 2], "conv stride (2, 2) but the model's {} has stride (1, 1)"),
    "padding": ([0, 0], "conv padding (0, 0) but the model's {} has padding (1, 1)"),
    "dilation": ([2, 2], "conv dilation (2, 2) but the model's {} has dilation (1, 1)"),
    "padding_mode": ("reflect", "conv padding_mode 'reflect' but the model's {} has padding_mode"),
}


@pytest.mark.parametrize("graph", [False, True], ids=["module", "graph"])
@pytest.mark.parametrize("field", GEOMETRY)
def test_adapter_conv_geometry_must_be_the_models(cnn_adapter, tmp_path, field, graph):
    value, words = GEOMETRY[field]
    manifest = json.loads((cnn_adapter / "adapter.json").read_text())
    next(e for e in manifest["layers"] if e["name"] == "c1")["conv"][field] = value
    copy_dir(cnn_adapter, tmp_path)
    (tmp_path / "adapter.json").write_text(json.dumps(manifest))
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    if graph:  # a loaded .pt2: the geometry lives in the graph's conv ops
        model = torch.export.export(model, (x,)).module()
    with pytest.raises(ModelLoadError) as err:
        evagraph.apply_adapter(model, tmp_path, example=x)
    what = "aten.conv2d.default" if graph else "Conv2d"
    assert str(err.value).startswith(f"layer c1: adapter {tmp_path} has ")
    assert words.format(what) in str(err.value)
    evagraph.apply_adapter(model, cnn_adapter, example=x)(x)  # the untouched one applies


def test_adapter_padding_compares_by_what_it_pads(cnn_adapter):
    """c3 was saved with padding 'same'; explicit padding 1 pads alike (kernel 3): it applies."""
    model = SmallCNN().eval()
    model.c3 = nn.Conv1d(16, 16, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    evagraph.apply_adapter(model, cnn_adapter)(x)
    model.c3 = nn.Conv1d(16, 16, 3, padding=2, dilation=1)
    with pytest.raises(ModelLoadError, match=r"layer c3: .* conv padding 'same' .* padding \(2,\)"):
        evagraph.apply_adapter(model, cnn_adapter)


# -- EVA states ----------------------------------------------------------------------------


def _scale_components(factor: float):
    def edit(tensors, meta):
        g = group_of(meta, "q")
        tensors[f"{g}.components"] = tensors[f"{g}.components"] * factor

    return edit


def _same_rows(tensors, meta):
    g = group_of(meta, "c")
    c = tensors[f"{g}.components"].clone()
    c[1] = c[0]
    tensors[f"{g}.components"] = c


def _swap(name: str):
    def edit(tensors, meta):
        g = group_of(meta, "o")
        tensors[f"{g}.{name}"] = tensors[f"{g}.{name}"].flip(0).contiguous()

    return edit


def _set(name: str, index: int, value: float):
    def edit(tensors, meta):
        g = group_of(meta, "o")
        t = tensors[f"{g}.{name}"].clone()
        t[index] = value
        tensors[f"{g}.{name}"] = t

    return edit


def _n_rows(value):
    def edit(meta):
        meta["n_rows"][group_of(meta, "o")] = value

    return edit


def _setting(key, value):
    return lambda meta: meta["settings"].update({key: value})


STATE_CASES = {  # (meta edit, tensor edit, words in the error)
    "components scaled by 1000": (
        None,
        _scale_components(1000.0),
        r"tensor g\d\.components row \d has norm 1000, expected 1",
    ),
    "all-zero components": (
        None,
        _scale_components(0.0),
        r"tensor g\d\.components row \d has norm 0, expected 1",
    ),
    "components not orthogonal": (
        None,
        _same_rows,
        r"tensor g\d\.components rows 0 and 1 have dot product 1, expected 0",
    ),
    "n_rows 0": (_n_rows(0), None, r"group g\d: 0 row\(s\) carry no variance"),
    "n_rows a string": (_n_rows("96"), None, r"n_rows: 'g\d' must be an integer >= 0"),
    "n_rows a float": (_n_rows(96.0), None, r"n_rows: 'g\d' must be an integer >= 0"),
    "n_rows negative": (_n_rows(-1), None, r"n_rows: 'g\d' must be an integer >= 0"),
    "n_rows beyond int64": (_n_rows(2**70), None, r"n_rows: 'g\d' must be an integer >= 0"),
    "variance from 1 row": (_n_rows(1), None, r"group g\d: 1 row\(s\) carry no variance"),
    "ratios increasing": (
        None,
        _swap("explained_variance_ratio"),
        r"tensor g\d\.explained_variance_ratio increases at index 1",
    ),
    "variances increasing": (
        None,
        _swap("explained_variance"),
        r"tensor g\d\.explained_variance increases",
    ),
    "negative ratio": (
        None,
        _set("explained_variance_ratio", -1, -0.1),
        r"tensor g\d\.explained_variance_ratio holds a negative value",
    ),
    "ratio above 1": (
        None,
        _set("explained_variance_ratio", 0, 1.5),
        r"tensor g\d\.explained_variance_ratio sums to 1\.\d+, more than 1",
    ),
    "NaN ratio": (
        None,
        _set("explained_variance_ratio", 0, float("nan")),
        r"tensor g\d\.explained_variance_ratio holds NaN or Inf",
    ),
    "negative singular value": (
        None,
        _set("singular_values", -1, -1.0),
        r"tensor g\d\.singular_values holds a negative value",
    ),
    "steps negative": (
        lambda m: m.update(steps=-1),
        None,
        "steps: 'steps' must be an integer >= 0",
    ),
    "steps a float": (lambda m: m.update(steps=2.5), None, "'steps' must be an integer >= 0"),
    "converged_at negative": (
        lambda m: m["converged_at"].update(o=-3),
        None,
        "converged_at: 'o' must be null or an integer >= 0",
    ),
    "depth a string": (lambda m: m["depth"].update(o="2"), None, "depth: 'o' must be an integer"),
    "boolean setting as a string": (
        _setting("use_label_mask", "false"),
        None,
        "settings: 'use_label_mask' must be a boolean, got 'false'",
    ),
    "boolean setting as an int": (
        _setting("use_label_mask", 0),
        None,
        "settings: 'use_label_mask' must be a boolean, got 0",
    ),
    "converged as a string": (
        lambda m: m["converged"].update(o="true"),
        None,
        "converged: 'o' must be a boolean",
    ),
    "tau out of range": (
        _setting("tau", 2.0),
        None,
        r"settings: tau must be in \(0, 1\], got 2\.0",
    ),
    "statistic unknown": (_setting("statistic", "svd"), None, "settings: statistic must be one"),
    "max_steps zero": (_setting("max_steps", 0), None, "settings: max_steps must be positive"),
    "targets not strings": (_setting("targets", [1]), None, "'targets' must be null or a list"),
}


@pytest.mark.parametrize("case", STATE_CASES)
def test_tampered_state_is_refused_naming_the_field(saved, tmp_path, case):
    meta_edit, tensor_edit, words = STATE_CASES[case]
    path = edit_state(saved / "eva_state.safetensors", tmp_path / "s.safetensors", meta_edit,
                      tensor_edit)  # fmt: skip
    with pytest.raises(ModelLoadError) as err:
        evagraph.EvaState.load(path)
    message = str(err.value)
    assert message.startswith(f"EVA state {path}: ") and "\n" not in message
    assert re.search(words, message), message


def test_state_checks_are_tolerant_of_honest_storage(saved, tmp_path):
    """Components stored in bfloat16 are not orthonormal to float32's precision but are to
    their own: they load. So does an MoE expert the router sent no row (0 rows, identity
    directions, no variance: what evagraph writes for it)."""

    def bf16(tensors, meta):
        for key in [k for k in tensors if k.endswith(".components")]:
            tensors[key] = tensors[key].bfloat16()

    state = evagraph.EvaState.load(
        edit_state(saved / "eva_state.safetensors", tmp_path / "bf16.safetensors", None, bf16)
    )
    assert state.ranks(2, 2) == evagraph.EvaState.load(saved / "eva_state.safetensors").ranks(2, 2)

    def expert_without_rows(tensors, meta):
        g = group_of(meta, "o")
        meta["layers"]["o"].update(expert=0, host="o")
        meta["n_rows"][g] = 0
        k, d = tensors[f"{g}.components"].shape
        tensors[f"{g}.components"] = torch.eye(k, d)
        for name in ("explained_variance", "explained_variance_ratio", "singular_values"):
            tensors[f"{g}.{name}"] = torch.zeros_like(tensors[f"{g}.{name}"])

    path = edit_state(saved / "eva_state.safetensors", tmp_path / "e.safetensors", None,
                      expert_without_rows)  # fmt: skip
    assert evagraph.EvaState.load(path).few_rows(2) == {"o": 0}


# -- reports -------------------------------------------------------------------------------


def _layer(key, value, name="o"):
    def edit(data):
        next(x for x in data["layers"] if x["name"] == name)[key] = value

    return edit


REPORT_CASES = {
    "NaN ratio": (
        _layer("explained_variance_ratio", [float("nan"), 0.1]),
        "layer 'o': 'explained_variance_ratio' must be a list of numbers in [0, 1], got [nan",
    ),
    "ratio above 1": (_layer("explained_variance_ratio", [1.5]), "'explained_variance_ratio'"),
    "ratio a string": (_layer("explained_variance_ratio", ["0.5"]), "'explained_variance_ratio'"),
    "negative rank": (_layer("rank", -1), "layer 'o': 'rank' must be an integer >= 0, got -1"),
    "rank a float": (_layer("rank", 2.0), "layer 'o': 'rank' must be an integer >= 0, got 2.0"),
    "rank a boolean": (_layer("rank", True), "layer 'o': 'rank' must be an integer >= 0"),
    "rank beyond its ratios": (_layer("rank", 9), "layer 'o': rank 9 but only 4 explained-"),
    "steps negative": (lambda d: d.update(steps=-2), "report: 'steps' must be an integer >= 0"),
    "steps a string": (lambda d: d.update(steps="4"), "report: 'steps' must be an integer >= 0"),
    "steps to converge negative": (
        _layer("steps_to_converge", -1),
        "layer 'o': 'steps_to_converge' must be null or an integer >= 0",
    ),
    "converged a string": (_layer("converged", "false"), "layer 'o': 'converged' must be a bool"),
    "width zero": (_layer("in_features", 0), "layer 'o': 'in_features' must be an integer >= 1"),
    "alpha infinite": (_layer("alpha", float("inf")), "layer 'o': 'alpha' must be a finite"),
    "kind unknown": (_layer("kind", "lstm"), "layer 'o': 'kind' must be 'linear' or 'conv'"),
    "name missing": (lambda d: d["layers"][0].pop("name"), "layers[0]: missing 'name'"),
    "layer not an object": (lambda d: d["layers"].append(3), "layers[4] must be an object"),
    "rows negative": (lambda d: d["rows"].update(g0=-1), "rows: 'g0' must be an integer >= 0"),
    "groups not lists": (lambda d: d["groups"].update(g0="o"), "groups: 'g0' must be a list"),
    "batches malformed": (lambda d: d["batches"].update(g0=[[3, 1]]), "batches: 'g0' must be"),
    "unconverged not strings": (lambda d: d.update(unconverged=[1]), "'unconverged' must be"),
    "boolean setting as a string": (
        lambda d: d["settings"]["adapter"].update(whiten="false"),
        "settings.adapter: 'whiten' must be a boolean, got 'false'",
    ),
    "rho infinite": (
        lambda d: d["settings"]["calibration"].update(rho=float("inf")),
        "settings.calibration: 'rho' must be a finite number",
    ),
    "settings section not an object": (
        lambda d: d["settings"].update(adapter=[]),
        "settings: 'adapter' must be an object",
    ),
}


@pytest.mark.parametrize("case", REPORT_CASES)
def test_tampered_report_is_refused_naming_the_field(saved, tmp_path, case):
    edit, words = REPORT_CASES[case]
    data = json.loads((saved / "report.json").read_text())
    assert [x["name"] for x in data["layers"]] == ["c", "q", "k", "o"]
    edit(data)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportLoadError) as err:
        evagraph.Report.load(path)
    message = str(err.value)
    assert message.startswith(f"cannot read report {path}: ") and "\n" not in message
    assert words in message, message


@pytest.mark.parametrize("case", ["NaN ratio", "negative rank"])
def test_cli_report_on_a_bad_report_is_one_line(saved, tmp_path, case):
    edit, words = REPORT_CASES[case]
    data = json.loads((saved / "report.json").read_text())
    edit(data)
    (tmp_path / "report.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    line = error_line(result.exit_code, result.output, result.exception)
    assert words in line and str(tmp_path / "report.json") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_report_field_tables_cover_the_dataclasses():
    """Report.load checks every field: a new one must get its entry in the tables."""
    from dataclasses import fields

    assert set(_LAYER_FIELDS) == {f.name for f in fields(LayerReport)}
    assert set(_REPORT_FIELDS) | {"layers"} == {f.name for f in fields(Report)}
    for cls in (CalibrationSettings, AdapterSettings):
        assert set(_SETTING_CHECKS[cls]) == {f.name for f in fields(cls)}


# -- adapter.json settings -----------------------------------------------------------------


def test_adapter_settings_booleans_are_booleans(saved, tmp_path):
    manifest = json.loads((saved / "adapter.json").read_text())
    manifest["settings"]["adapter"]["adjust_scaling_factors"] = "true"
    copy_dir(saved, tmp_path)
    (tmp_path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as err:
        evagraph.apply_adapter(Tiny(), tmp_path)
    assert f"{tmp_path / 'adapter.json'}: settings.adapter: 'adjust_scaling_factors' must be a " \
        "boolean, got 'true'" in str(err.value)  # fmt: skip
    # and save_adapter refuses to write what would not load back
    adapted = evagraph.apply_adapter(Tiny(), saved)
    with pytest.raises(ConfigError, match="save_adapter: settings: 'whiten' must be a boolean"):
        evagraph.save_adapter(adapted, tmp_path / "new", {"whiten": "no"})
    assert not (tmp_path / "new").exists()


# -- nothing evagraph writes is refused ----------------------------------------------------


def _llama():
    from test_models import build

    return build("hf", "llama")


def _moe():
    from test_layer_kinds import MOE

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 8), generator=g)} for _ in range(3)]
    return MOE["phimoe"][0]().eval(), batches


MODELS = {
    "cnn": lambda: (SmallCNN().eval(), images(4)),
    "tiny": lambda: (Tiny().eval(), images(4)),
    "llama": _llama,
    "moe": _moe,
}
SLOW = {"llama", "moe"}


def _call(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS]
)
def test_what_evagraph_writes_loads_back_unchanged(tmp_path, name, dtype):
    torch.manual_seed(0)
    model, batches = MODELS[name]()
    model = model.to(dtype)
    batches = [b.to(dtype) if isinstance(b, torch.Tensor) else b for b in batches]
    adapted, _ = write_all(model, batches, tmp_path, budget=2, rho=2)
    state = evagraph.EvaState.load(tmp_path / "eva_state.safetensors")
    tensors, _ = read(tmp_path / "eva_state.safetensors")
    state.save(tmp_path / "again.safetensors")
    again, _ = read(tmp_path / "again.safetensors")
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    report = evagraph.Report.load(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text()) == report.to_dict()
    reapplied = evagraph.apply_adapter(model, tmp_path, example=batches[0])
    for layer, lora in loras(adapted).items():
        assert torch.equal(loras(reapplied)[layer].lora_A.weight, lora.lora_A.weight)
    rebuilt, _ = evagraph.adapt(model, state)
    with torch.no_grad():
        out = _call(rebuilt, batches[0])
    assert torch.isfinite(out).all()
    for whiten in (False, True):  # PEFT's format, rank 0 entries included
        peft_dict = state.to_peft(prefix="", whiten=whiten)
        # to_peft also exports MoE routers (nn.Linear subclasses returning a tuple) and fused
        # experts, which no module-wrapping LoRA (PEFT's, or this import) can take
        peft_dict = {
            k: v
            for k, v in peft_dict.items()
            if state.layers[k].expert is None and forward_mismatch(model.get_submodule(k)) is None
        }
        if peft_dict:
            evagraph.from_peft_eva_state_dict(model, peft_dict, budget=2)


# -- fuzz: corrupted bytes and JSON fields of real files -----------------------------------

_POOL = [None, True, False, 0, 1, -1, 2, 3.5, -0.5, 1e308, 2**63, 2**70, float("nan"),
         float("inf"), -float("inf"), "", "x", "same", "linear", "conv", "zeros", "reflect",
         [], [1], [0, 0], [1, 1], [2, 2], [[0, 1]], {}, {"a": 1}, "g0", "q", "o", "c"]  # fmt: skip


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def mutate_json(data, rng: random.Random, focus: str = "layers"):
    """One random edit: replace a value (by one of _POOL, or a number nudged), delete a key or
    item, add a key, or duplicate a list item. Half the edits fall under ``data[focus]`` (the
    layers, where most of the fields are) when there is one."""
    data = copy.deepcopy(data)
    paths = list(_paths(data))[1:]
    focused = [(p, v) for p, v in paths if p[0] == focus and len(p) > 1]
    path, value = rng.choice(focused if focused and rng.random() < 0.5 else paths)
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    op = rng.random()
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and op < 0.5:  # often still a valid file, with other contents: reaches past
        parent[last] = rng.choice([value + 1, value - 1, -value, value * 1000, value / 3, 0])
    elif op < 0.6:
        parent[last] = rng.choice(_POOL)
    elif op < 0.8:
        del parent[last]
    elif op < 0.9 and isinstance(parent, dict):
        parent[rng.choice(["extra", "secret", "conv", "expert", "host"])] = rng.choice(_POOL)
    elif isinstance(parent, list):
        parent.insert(last, copy.deepcopy(value))
    else:
        parent[last] = [value]
    return data


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Flip, overwrite, insert or cut bytes, in the header of a safetensors file (its first
    8 + N bytes) or anywhere."""
    b = bytearray(data)
    header = 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)
    at = rng.randrange(min(header, len(b)) if rng.random() < 0.5 else len(b))
    op = rng.random()
    if op < 0.4:
        b[at] ^= 1 << rng.randrange(8)
    elif op < 0.7:
        b[at] = rng.randrange(256)
    elif op < 0.85:
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    else:
        del b[at:]
    return bytes(b)


def _safetensors_header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + rest


def _state_tensors(state: evagraph.EvaState) -> dict:
    return {f"{g}.{k}": getattr(c, k) for g, c in state.components.items()
            for k in ("components", "explained_variance", "explained_variance_ratio",
                      "singular_values", "mean")}  # fmt: skip


def _same_state(a: evagraph.EvaState, b: evagraph.EvaState) -> bool:
    ta, tb = _state_tensors(a), _state_tensors(b)
    fa, fb = a.component_converged, b.component_converged
    plain = ("settings", "layers", "layer_group", "converged", "converged_at", "batches",
             "steps", "unconverged", "skipped", "depth", "capture")  # fmt: skip
    return (
        ta.keys() == tb.keys()
        and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
        and fa.keys() == fb.keys()
        and all(torch.equal(fa[k], fb[k]) for k in fa)
        and {g: c.n_rows for g, c in a.components.items()}
        == {g: c.n_rows for g, c in b.components.items()}
        and all(getattr(a, k) == getattr(b, k) for k in plain)
    )


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def _use_state(state: evagraph.EvaState, base: nn.Module, x: torch.Tensor) -> None:
    """A loaded state that differs from the original must still work, or fail typed."""
    state.ranks(state.settings["budget"], state.settings["rho"])
    adapted, report = evagraph.adapt(base, state)
    with torch.no_grad():
        assert torch.isfinite(adapted(x)).all()
    report_table(report)


def _use_adapter(adapted: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.isfinite(adapted(x)).all()


def _use_report(report: Report, tmp: Path) -> None:
    report_table(report)
    render_report(report, tmp)
    report.save(tmp / "again.json")
    assert Report.load(tmp / "again.json") == report  # NaN would compare unequal


def test_fuzzed_files_load_as_before_or_fail_typed(saved, tmp_path, monkeypatch):
    """300 seeded corruptions of a real state, adapter directory and report (bytes anywhere,
    the safetensors header's JSON, the state's metadata JSON, adapter.json, report.json).
    Each must raise an EvagraphError, or load to what the untouched file holds, or load to
    something different that still works end to end (adapt / forward / render): never
    another exception, never a hang. (A byte flip in a float or a legal new value, such as
    another alpha, is a valid file with other contents, so "equal" cannot be required.)
    EVAGRAPH_FUZZ_CASES=40000 runs longer (about 80 s; found the scaling and rho overflows)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the HTML only: fast
    x = images(1)[0]
    # a module tree, and a graph (a loaded .pt2), whose conv geometry lives in its ops
    bases = (Tiny().eval(), torch.export.export(Tiny().eval(), (x,)).module())
    original_state = evagraph.EvaState.load(saved / "eva_state.safetensors")
    original_adapter = evagraph.apply_adapter(Tiny().eval(), saved)
    original_report = Report.load(saved / "report.json")
    names = ("eva_state.safetensors", "adapter.safetensors", "adapter.json", "report.json")
    files = {name: (saved / name).read_bytes() for name in names}

    def state_variant(rng):
        data = files["eva_state.safetensors"]
        op = rng.random()
        if op < 0.4:
            return mutate_bytes(data, rng)
        header, rest = _safetensors_header(data)
        meta = header["__metadata__"]
        if op < 0.8:  # the state's own JSON, inside the header's metadata
            meta["evagraph_state"] = json.dumps(
                mutate_json(json.loads(meta["evagraph_state"]), rng)
            )
            return _with_header(header, rest)
        return _with_header(mutate_json(header, rng), rest)  # dtypes, shapes, offsets

    def adapter_variant(rng):
        which = rng.choice(["adapter.json", "adapter.json", "adapter.safetensors"])
        data = files[which]
        if rng.random() < 0.4:
            return which, mutate_bytes(data, rng)
        if which == "adapter.json":
            return which, json.dumps(mutate_json(json.loads(data), rng)).encode()
        header, rest = _safetensors_header(data)
        return which, _with_header(mutate_json(header, rng), rest)

    def report_variant(rng):
        data = files["report.json"]
        if rng.random() < 0.3:
            return mutate_bytes(data, rng)
        return json.dumps(mutate_json(json.loads(data), rng)).encode()

    outcomes: dict[str, dict[str, int]] = {}
    previous = signal.signal(signal.SIGALRM, _alarm)
    start = time.monotonic()
    try:
        for seed in range(int(os.environ.get("EVAGRAPH_FUZZ_CASES", 300))):
            rng = random.Random(seed)
            kind = ("state", "adapter", "report")[seed % 3]
            case = tmp_path / str(seed)
            case.mkdir()
            signal.alarm(20)  # a hang fails the test instead of stalling the suite
            try:
                try:
                    if kind == "state":
                        (case / "s.safetensors").write_bytes(state_variant(rng))
                        loaded = evagraph.EvaState.load(case / "s.safetensors")
                        same = _same_state(loaded, original_state)
                        if not same:
                            _use_state(loaded, bases[seed % 2], x)
                    elif kind == "adapter":
                        copy_dir(saved, case)
                        which, data = adapter_variant(rng)
                        (case / which).write_bytes(data)
                        loaded = evagraph.apply_adapter(bases[seed % 2], case)
                        same = _same_adapters(loaded, original_adapter)
                        if not same:
                            _use_adapter(loaded, x)
                    else:
                        (case / "report.json").write_bytes(report_variant(rng))
                        loaded = Report.load(case / "report.json")
                        same = loaded == original_report
                        if not same:
                            _use_report(loaded, case)
                    outcome = "same" if same else "different, works"
                except EvagraphError as err:
                    assert "\n" not in str(err), f"seed {seed} ({kind}): {err}"
                    outcome = "typed error"
            except _Hang:
                pytest.fail(f"seed {seed} ({kind}) hung")
            except AssertionError as err:  # a check of the loaded result: say which case
                raise AssertionError(f"seed {seed} ({kind}): {err}"[:1000]) from None
            except Exception as err:
                pytest.fail(f"seed {seed} ({kind}): {type(err).__name__}: {err}"[:500])
            finally:
                signal.alarm(0)
            outcomes.setdefault(kind, {}).setdefault(outcome, 0)
            outcomes[kind][outcome] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    # the corruptions do reach the checks: most are refused
    for counts in outcomes.values():
        assert counts.get("typed error", 0) > sum(counts.values()) / 2, outcomes
    assert time.monotonic() - start < 120, outcomes


def _same_adapters(a: nn.Module, b: nn.Module) -> bool:
    la, lb = loras(a), loras(b)
    if la.keys() != lb.keys():
        return False
    for name, x in la.items():
        y = lb[name]
        if (x.rank, x.scaling, type(x.lora_A), x.host, x.expert, x.weight_transposed) != (
            y.rank, y.scaling, type(y.lora_A), y.host, y.expert, y.weight_transposed,
        ):  # fmt: skip
            return False
        if repr(x.lora_A) != repr(y.lora_A) or repr(x.lora_dropout) != repr(y.lora_dropout):
            return False  # conv geometry, dropout
        for p, q in ((x.lora_A.weight, y.lora_A.weight), (x.lora_B.weight, y.lora_B.weight)):
            if p.dtype != q.dtype or not torch.equal(p, q):
                return False
    return True


def test_fuzz_helpers_change_something():
    """The mutators are not no-ops (else the fuzz would test nothing)."""
    rng = random.Random(0)
    data = {"a": [1, 2, {"b": "c"}], "d": 1.5}
    assert sum(mutate_json(data, rng) != data for _ in range(50)) > 40
    raw = bytes(range(64))
    assert sum(mutate_bytes(raw, rng) != raw for _ in range(50)) > 40
