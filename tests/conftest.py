from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def pytest_collection_modifyitems(config, items):
    # The real-model tests (issue 31) take minutes and install a package: opt in with
    # `-m real` (or EVAGRAPH_REAL=1).
    wanted = "real" in (config.getoption("-m") or "") or os.environ.get("EVAGRAPH_REAL") == "1"
    opt_in = pytest.mark.skip(reason="real-model test: opt in with `python -m pytest -m real`")
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "real" in item.keywords and not wanted:
            item.add_marker(opt_in)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]


def evagraph_cmd() -> list[str]:
    """The installed ``evagraph`` script beside this Python, else ``python -m evagraph``."""
    script = Path(sys.executable).with_name("evagraph")
    return [str(script)] if script.exists() else [sys.executable, "-m", "evagraph"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tokenizer and a tiny random Llama saved in one directory (``save_tiny_llama``)."""
    from test_text_data import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """``datasets`` writes its Arrow copies of the files under the test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> Path:
    """The bundled example (tiny_cnn.pt2 + calib.safetensors), written once per session."""
    out = tmp_path_factory.mktemp("example")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_example.py"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


class SharedMLP(nn.Module):
    """q and k read the same input (one decomposition); head is the output layer."""

    def __init__(self, d: int = 16, h: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.q = nn.Linear(d, h)
        self.k = nn.Linear(d, h)
        self.o = nn.Linear(h, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.relu(self.q(x)) * self.k(x)
        return self.head(x + self.o(h))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv1d(16, 16, 3, padding="same")
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        h = self.c3(h.flatten(2))
        return self.fc(h.mean(-1))


def correlated(n: int, d: int, rank: int = 4, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Rows with a few strong directions plus noise: components converge quickly."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    scales = torch.linspace(3.0, 1.0, rank)
    return (torch.randn(n, rank, generator=g) * scales) @ basis + noise * torch.randn(
        n, d, generator=g
    )


def subspace_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of a and b (0..1)."""
    qa, _ = torch.linalg.qr(a.detach().T.double())
    qb, _ = torch.linalg.qr(b.detach().T.double())
    return float(torch.linalg.svdvals(qa.T @ qb).pow(2).mean())


def exact_pca(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right-singular vectors of the centred rows and their explained-variance ratios."""
    x = rows.double() - rows.double().mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s.pow(2) / (x.shape[0] - 1)
    return vh[:k].float(), (var[:k] / var.sum()).float()


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with ConvergenceWarning silenced: tiny random data rarely converges."""
    from evagraph import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kwargs)


def loras(model: nn.Module) -> dict:
    """The model's LoRA adapters by layer name."""
    from evagraph.lora import LoraAdapter

    return {m.layer_name: m for m in model.modules() if isinstance(m, LoraAdapter)}


def assert_shares(model: nn.Module, derived: nn.Module, new: Iterable[str] = ()) -> None:
    """Every base weight of ``derived`` (LoRA's left out, named as in the un-adapted model) is
    ``model``'s of that name, in the same storage, except those named in ``new``: new tensors.
    """
    from evagraph.lora import LoraAdapter

    def base(m: nn.Module) -> dict[str, torch.Tensor]:
        lora = {id(p) for a in m.modules() if isinstance(a, LoraAdapter) for p in a.parameters()}
        return {
            n.replace(".base_layer", ""): p
            for n, p in m.named_parameters(remove_duplicate=False)
            if id(p) not in lora and not {"lora_A", "lora_B"} & set(n.split("."))
        }

    original, new = base(model), set(new)
    derived_weights = base(derived)
    assert derived_weights and new <= set(derived_weights)
    for name, p in derived_weights.items():
        same = p.data_ptr() == original[name].data_ptr()
        assert same != (name in new), f"{name}: {'shared' if same else 'copied'}"
