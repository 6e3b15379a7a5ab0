"""A torch.compile'd model is refused with the eager module to pass; the eager module works
and its adapted model can be compiled."""

import pytest
import torch
from torch import nn

import evagraph
from evagraph.errors import ConfigError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(6)]


def test_compiled_model_is_refused_naming_the_eager_module():
    compiled = torch.compile(_model())
    with pytest.raises(ConfigError, match=r"torch.compile.*model\._orig_mod"):
        evagraph.transform(compiled, _batches(), budget=2, progress=False)


def test_compiled_submodule_is_refused_naming_it():
    model = _model()
    model[2] = torch.compile(model[2])
    with pytest.raises(ConfigError, match=r"\(at 2\).*2\._orig_mod"):
        evagraph.transform(model, _batches(), budget=2, progress=False)


def test_the_eager_module_adapts_and_its_result_compiles():
    compiled = torch.compile(_model())
    adapted, _ = evagraph.transform(compiled._orig_mod, _batches(), budget=2, progress=False)
    x = _batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(adapted)(x), compiled(x))
