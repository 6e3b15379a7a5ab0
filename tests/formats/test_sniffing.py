"""Model files are recognised by their content, not their suffix."""

import warnings

import pytest
import torch
from torch import nn

from evagraph.errors import ModelLoadError
from evagraph.formats.pt2 import zip_kind
from evagraph.loading import load_model


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sniff")
    model, x = mlp(), torch.randn(2, 4)
    program = torch.export.export(model, (x,))
    for name in ("exported.pt2", "exported.pt", "exported"):
        with open(out / name, "wb") as f:  # a file object: torch only warns about suffixes
            torch.export.save(program, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.script(model).save(str(out / "scripted.pt"))
        torch.jit.script(model).save(str(out / "scripted.pt2"))
    torch.save(model.state_dict(), out / "state_dict.pt")
    torch.save(model.state_dict(), out / "state_dict.pt2")
    torch.save(model, out / "module.pt")
    return out, x, model


def test_zip_kinds(files):
    out, _, _ = files
    assert zip_kind(out / "exported.pt") == "pt2"
    assert zip_kind(out / "scripted.pt") == "torchscript"
    assert zip_kind(out / "state_dict.pt") == "pickle"
    assert zip_kind(out / "module.pt") == "pickle"
    (out / "text.pt").write_text("hello")
    assert zip_kind(out / "text.pt") is None


@pytest.mark.parametrize("name", ["exported.pt2", "exported.pt", "exported"])
def test_export_archive_loads_whatever_its_suffix(files, name):
    out, x, model = files
    module, kind = load_model(out / name)
    assert kind == "pt2"
    torch.testing.assert_close(module(x), model(x))


@pytest.mark.parametrize("name", ["scripted.pt", "scripted.pt2"])
def test_torchscript_is_one_line_saying_how_to_export(files, name):
    out, _, _ = files
    with pytest.raises(ModelLoadError) as err:
        load_model(out / name)
    message = str(err.value)
    assert "\n" not in message and "TorchScript archive" in message and name in message
    assert "torch.export.export(model, (example,))" in message and "torch.export.save" in message


@pytest.mark.parametrize("name", ["state_dict.pt", "state_dict.pt2"])
def test_state_dict_is_not_a_model(files, name):
    out, _, _ = files
    with pytest.raises(ModelLoadError, match="Dict, not a model|dict, not a model") as err:
        load_model(out / name)
    assert "\n" not in str(err.value)


def test_whole_module_pickle_still_needs_the_flag(files):
    out, x, model = files
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(out / "module.pt")
    module, kind = load_model(out / "module.pt", allow_pickle=True)
    assert kind == "pickle"
