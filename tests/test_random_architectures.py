"""Property tests: random small architectures through transform and merge.

Each drawn model (MLPs with residual, concat and shared-input blocks; Conv1d/Conv2d stacks
with random kernel, stride, padding (incl. "same", "valid", reflect and circular modes) and
dilation, ending in flatten + Linear or pooling; odd widths 1, 3, 7, primes) must come out of
``transform`` computing what it did, with only LoRA parameters trainable, ranks summing to
budget x L or to the components that carry variance, and ``merge`` equal to the adapted
model once B is non-zero.
"""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import loras
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import evagraph
from evagraph.lora import LoraAdapter, LoraLayer
from evagraph.stats import ExactCovariance, make_statistic


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: a second thread only adds synchronisation, and on a loaded machine
    # OpenMP's spin-waits made single examples erratic (measured: 0.1 s -> 15 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Deterministic in CI (derandomize) and cheap: tiny models, a few calibration batches.
PROPERTY = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

WIDTHS = st.sampled_from([1, 2, 3, 5, 7, 11, 13])
ACTS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "none": lambda h: h}
ACT = st.sampled_from(sorted(ACTS))
CONV = {1: nn.Conv1d, 2: nn.Conv2d}


class Dense(nn.Module):
    def __init__(self, d: int, out: int, act: str) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(d, out), act

    def forward(self, h):
        return ACTS[self.act](self.fc(h))


class Residual(nn.Module):
    def __init__(self, d: int, act: str) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(d, d), act

    def forward(self, h):
        return h + self.fc(ACTS[self.act](h))


class Shared(nn.Module):
    """Several layers reading the same input, combined by sum, product or concatenation."""

    def __init__(self, d: int, outs: list[int], how: str) -> None:
        super().__init__()
        self.fcs, self.how = nn.ModuleList(nn.Linear(d, o) for o in outs), how

    def forward(self, h):
        ys = [fc(h) for fc in self.fcs]
        if self.how == "cat":
            return torch.cat(ys, dim=-1)
        out = ys[0]
        for y in ys[1:]:
            out = out + y if self.how == "add" else out * torch.tanh(y)
        return out


class Conv(nn.Module):
    def __init__(self, ndim: int, c: int, out: int, geometry: dict, act: str) -> None:
        super().__init__()
        self.conv, self.act = CONV[ndim](c, out, **geometry), act

    def forward(self, h):
        return ACTS[self.act](self.conv(h))


class ConvResidual(nn.Module):
    def __init__(self, ndim: int, c: int, k: int, dilation: int, mode: str) -> None:
        super().__init__()
        self.conv = CONV[ndim](c, c, k, padding="same", dilation=dilation, padding_mode=mode)

    def forward(self, h):
        return h + self.conv(F.relu(h))


class ConvBranches(nn.Module):
    """Two convolutions of one geometry on the same input, added or concatenated."""

    def __init__(self, ndim: int, c: int, outs: tuple[int, int], geometry: dict, how: str):
        super().__init__()
        self.a, self.b = (CONV[ndim](c, o, **geometry) for o in outs)
        self.how = how

    def forward(self, h):
        a, b = self.a(h), F.gelu(self.b(h))
        return torch.cat([a, b], dim=1) if self.how == "cat" else a + b


class Twice(nn.Module):
    """One Linear called twice: one layer, two calls, one decomposition over both."""

    def __init__(self, d: int, act: str) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(d, d), act

    def forward(self, h):
        return self.fc(ACTS[self.act](self.fc(h)))


class Tokens(nn.Module):
    """A feature map read as tokens: a Linear over channels at every position."""

    def __init__(self, c: int, out: int, act: str) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(c, out), act

    def forward(self, h):
        return ACTS[self.act](self.fc(h.flatten(2).transpose(1, 2)))


class Net(nn.Module):
    def __init__(self, body: list[nn.Module], tail: str, width: int, classes: int) -> None:
        super().__init__()
        self.body, self.tail = nn.Sequential(*body), tail
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.body(x)
        if self.tail == "pool":  # (B, C, *spatial) -> (B, C)
            h = h.flatten(2).mean(-1)
        elif self.tail == "tokens":  # (B, T, C) -> (B, C)
            h = h.mean(1)
        return self.head(h)


@st.composite
def mlps(draw):
    """(model, input shape without batch)."""
    d = d_in = draw(WIDTHS)
    seq = draw(st.sampled_from([(), (1,), (3,)]))  # (B, d) or (B, T, d) inputs
    body = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["dense", "residual", "shared", "twice"]))
        if kind == "dense":
            out = draw(WIDTHS)
            body.append(Dense(d, out, draw(ACT)))
        elif kind in ("residual", "twice"):
            body.append((Residual if kind == "residual" else Twice)(d, draw(ACT)))
            out = d
        else:
            how = draw(st.sampled_from(["add", "gate", "cat"]))
            if how == "cat":
                outs = draw(st.lists(WIDTHS, min_size=2, max_size=3))
                out = sum(outs)
            else:
                out = draw(WIDTHS)
                outs = [out] * draw(st.integers(2, 3))
            body.append(Shared(d, outs, how))
        d = out
    return Net(body, "none", d, draw(WIDTHS)), (*seq, d_in)


def _out_size(size: int, k: int, stride: int, padding, dilation: int) -> int:
    if padding == "same":
        return size
    p = 0 if padding == "valid" else padding
    return (size + 2 * p - dilation * (k - 1) - 1) // stride + 1


@st.composite
def geometries(draw, size: int):
    """Conv keyword arguments legal for inputs of spatial ``size``."""
    dilation, stride = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    choices = st.integers(0, 2)
    if stride == 1:  # torch rejects padding="same" with stride > 1
        choices = st.one_of(choices, st.sampled_from(["same", "valid"]))
    padding = draw(choices)
    if padding == "same":  # any kernel fits; the odd extra padding goes on the right
        k = draw(st.integers(1, 3))
        widest = dilation * (k - 1) - dilation * (k - 1) // 2
    else:  # the dilated kernel must fit the padded input
        widest = 0 if padding == "valid" else padding
        k = draw(st.integers(1, max(1, min(3, (size + 2 * widest - 1) // dilation + 1))))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    if widest == 0 or (mode == "reflect" and widest >= size) or widest > size:
        mode = "zeros"  # torch: reflect needs padding < size, circular padding <= size
    return dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)


@st.composite
def cnns(draw):
    ndim = draw(st.sampled_from([1, 2]))
    c = c_in = draw(st.sampled_from([1, 2, 3, 5]))
    size = size_in = draw(st.integers(3, 7))
    body = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "residual", "branches"]))
        if kind == "residual":
            k, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            total = dilation * (k - 1)
            mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
            if total - total // 2 >= size:
                mode = "zeros"
            body.append(ConvResidual(ndim, c, k, dilation, mode))
            continue
        geometry = draw(geometries(size))
        if kind == "conv":
            out = draw(WIDTHS)
            body.append(Conv(ndim, c, out, geometry, draw(ACT)))
        else:
            how = draw(st.sampled_from(["add", "cat"]))
            outs = (draw(WIDTHS), draw(WIDTHS)) if how == "cat" else (draw(WIDTHS),) * 2
            body.append(ConvBranches(ndim, c, outs, geometry, how))
            out = sum(outs) if how == "cat" else outs[0]
        g = geometry
        size = _out_size(size, g["kernel_size"], g["stride"], g["padding"], g["dilation"])
        c = out
    # pooled into the head, or a Linear on the flattened map, or on every position
    tail = draw(st.sampled_from(["pool", "flatten", "tokens"]))
    if tail != "pool":
        width = draw(WIDTHS)
        if tail == "flatten":
            body += [nn.Flatten(1), Dense(c * size**ndim, width, draw(ACT))]
            tail = "none"
        else:
            body.append(Tokens(c, width, draw(ACT)))
        c = width
    return Net(body, tail, c, draw(WIDTHS)), (c_in, *(size_in,) * ndim)


def _widths(model: nn.Module) -> list[int]:
    """The row widths of the model's linear and conv layers (unfolded patches for a conv)."""
    return [
        m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]


def check_transform(model: nn.Module, shape: tuple, budget: int, rho: float) -> None:
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, *shape, generator=g) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        try:
            adapted, report, state = evagraph.transform(
                model, batches, budget=budget, rho=rho, progress=False, return_state=True
            )
        except evagraph.ConfigError as err:  # a budget no layer has the width for
            found = re.search(r"widest layer input has (\d+) features", str(err))
            assert found is not None, err
            assert budget > int(found.group(1)) and int(found.group(1)) <= max(_widths(model))
            return
    x = torch.randn(5, *shape, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), atol=1e-5, rtol=1e-5)

    # ranks: the top budget x L of the components that carry variance, at most k per layer
    k = round(budget * rho)
    achievable = {
        layer.name: min(k, sum(r > 0 for r in layer.explained_variance_ratio))
        for layer in report.layers
    }
    for layer in report.layers:
        ratios = torch.tensor(layer.explained_variance_ratio)
        assert torch.isfinite(ratios).all() and (ratios >= 0).all(), layer.name
        assert 0 <= layer.rank <= achievable[layer.name], layer.name
    total = sum(report.ranks.values())
    assert total == min(budget * len(report.layers), sum(achievable.values()))

    # only LoRA parameters train, and all of them
    adapters = loras(adapted)
    assert set(adapters) == {n for n, r in report.ranks.items() if r}
    lora_params = {id(p) for a in adapters.values() for p in a.parameters()}
    for name, p in adapted.named_parameters():
        assert p.requires_grad == (id(p) in lora_params), name
    for a in adapters.values():
        assert torch.isfinite(a.lora_A.weight).all()
    check_components(adapted, report, state, batches)

    # merge, with B moved off zero so the folded delta is not trivially 0
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.weight.copy_(0.1 * torch.randn(a.lora_B.weight.shape, generator=g))
            assert a.delta_weight().abs().sum() > 0
    merged = evagraph.merge(adapted)
    assert not any(isinstance(m, (LoraAdapter, LoraLayer)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-4, rtol=1e-4)


def check_components(adapted: nn.Module, report, state, batches: list) -> None:
    """A's rows are orthonormal principal directions of what each layer really received.

    Independent of the probes: each LoraLayer's inputs are caught by a hook and projected by
    lora_A itself (for a conv, torch's own padding and striding), so the variance along each
    row must be the variance its decomposition reported.
    """
    adapters = loras(adapted)
    seen: dict[str, list] = {name: [] for name in adapters}  # (minibatch, input) per call
    step = [0]
    hooks = [
        adapted.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append((step[0], args[0]))
        )
        for name in adapters
    ]
    with torch.no_grad():
        for step[0], batch in enumerate(batches):
            adapted(batch)
    for hook in hooks:
        hook.remove()
    for name, lora in adapters.items():
        A = lora.lora_A.weight.reshape(lora.rank, -1)
        torch.testing.assert_close(A @ A.T, torch.eye(lora.rank), atol=1e-4, rtol=0)
        runs = report.batches[state.layer_group[name]]  # minibatches its decomposition used
        conv = isinstance(lora.lora_A, (nn.Conv1d, nn.Conv2d))
        with torch.no_grad():
            ys = [lora.lora_A(h) for i, h in seen[name] if any(a <= i < b for a, b in runs)]
        y = torch.cat([(y.movedim(1, -1) if conv else y).reshape(-1, lora.rank) for y in ys])
        ev = state.components[state.layer_group[name]].explained_variance
        # exact statistic: the variance along A; the low-rank sketch's estimate: within 1%
        width, k = state.layers[name].in_features, state.max_components
        rtol = (
            1e-3 if isinstance(make_statistic("auto", width, k, "cpu"), ExactCovariance) else 1e-2
        )
        torch.testing.assert_close(
            y.double().var(0), ev[: lora.rank].double(), atol=1e-4 * float(ev[0]), rtol=rtol
        )


BUDGETS = st.integers(1, 3)
RHOS = st.sampled_from([1.0, 1.5, 2.0])


def built(make):
    """A model for an explicit example, with fixed weights (examples are built at import)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make()


# Corners the generator reaches rarely, always run: a width-1 bottleneck with uniform ranks
# (the layer after it has one component, so the ranks sum to less than budget x L), and
# "same" padding with an even kernel (padded unevenly) in reflect and circular modes.
BOTTLENECK = built(lambda: Net([Dense(1, 7, "none"), Dense(7, 5, "relu")], "none", 5, 2))
SAME_EVEN = {
    mode: built(lambda mode=mode: Net([ConvResidual(1, 3, 2, 1, mode)], "pool", 3, 2))
    for mode in ("reflect", "circular")
}


@PROPERTY
@given(arch=mlps(), budget=BUDGETS, rho=RHOS)
@example(arch=(BOTTLENECK, (1,)), budget=3, rho=1.0)
def test_random_mlps(arch, budget, rho):
    check_transform(*arch, budget, rho)


@PROPERTY
@given(arch=cnns(), budget=BUDGETS, rho=RHOS)
@example(arch=(SAME_EVEN["reflect"], (3, 5)), budget=2, rho=2.0)
@example(arch=(SAME_EVEN["circular"], (3, 5)), budget=2, rho=1.0)
def test_random_cnns(arch, budget, rho):
    check_transform(*arch, budget, rho)
