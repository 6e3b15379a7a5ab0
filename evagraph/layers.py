"""Core types: what a layer is, and everything that differs between kinds of layer.

``ConvSpec`` (a convolution's geometry) and ``Layer`` (one adaptable layer: its name, kind,
widths, weight and where the graph calls it) are what the layer-graph pass returns and the
state, adapters and reports store.

The kinds of adaptable layer each have one ``LayerKind`` instance here (``KINDS``): plain
linear, convolution, HF ``Conv1D`` (a linear stored (in, out)) and one expert of a fused MoE
weight [E, ...]. A kind owns what differs between them: which modules it is
(``layer_of_module``), the rows of its input (``rows``), its LoRA A/B modules and their merge
delta (``adapter_modules``, ``delta``), where its outputs lie in its weight and its output
(DoRA's per-output norms: ``output_norms``, ``on_output``, ``on_weight``), its base weight's
shape (``weight_shape``), its fields in the adapter manifest and EVA state
(``manifest_fields``, ``read_manifest``, ``read_saved``), how it is described (``describe``)
and whether PEFT can express its adapter (``check_peft``). ``kind_of`` reads the kind off a
Layer, an adapter or a manifest entry from their existing fields (``kind_from``); the saved
``Layer.kind`` stays "linear" or "conv" (``LayerKind.serial``), so files keep their format.

A quantized linear module (bitsandbytes, torchao) is ``QUANTIZED``: a linear layer whose
widths come from the module, not its packed weight; the layers and adapters it gives are
plain "linear" ones (``kind_from`` never answers it).

To add a kind: subclass ``LayerKind`` (or the kind it refines), override what differs, add
the instance to ``KINDS`` and teach ``kind_from`` the saved fields that tell it apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ModelLoadError
from .quantized import quantization
from .validate import expect, is_int


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a convolution: enough to unfold its input rows and to build LoRA's A conv."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # per spatial dim, or "same" / "valid"
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def pad_amounts(self) -> list[int]:
        """Padding in ``F.pad`` order (last spatial dim first, left then right)."""
        pads: list[int] = []
        for i in reversed(range(self.ndim)):
            if self.padding == "same":  # as torch's _ConvNd: the odd extra goes right
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            elif self.padding == "valid":
                pads += [0, 0]
            else:
                pads += [self.padding[i], self.padding[i]]
        return pads


@dataclass
class Layer:
    """One adaptable layer. ``in_features`` is the width of its activation rows."""

    name: str
    kind: str  # "linear" or "conv": LayerKind.serial (kind_of gives the full kind)
    op: str  # what the graph calls: "Linear", "Conv2d", "Conv1D", "aten.linear.default", ...
    in_features: int
    out_features: int
    weight: str  # qualified name of the weight parameter
    nodes: list[str] = field(default_factory=list)  # fx nodes calling it
    inputs: list[str] = field(default_factory=list)  # fx nodes feeding those calls
    module: str | None = None  # owning nn.Module in the model, if the layer is one
    conv: ConvSpec | None = None
    weight_transposed: bool = False  # HF Conv1D stores (in, out)
    # An op on a parameter of a module that is no linear/conv layer (an MoE router's
    # F.linear, a fused expert weight): the module the op runs in, whose call the adapter
    # wraps by changing the weight it sees (None: module layers, and graphs of their own).
    host: str | None = None
    # One expert of a fused expert weight [E, ...]: its index, the node holding the group
    # offsets of the grouped matmul (its rows are input[offs[e-1]:offs[e]]), and the gather
    # that sorted the rows by expert, (source rows, index), when the graph shows one.
    expert: int | None = None
    offsets: str | None = None
    gather: list[str] | None = None

    @property
    def row_key(self) -> tuple:
        """Layers with the same inputs and row key see identical rows."""
        return (tuple(self.inputs), self.kind, self.conv, self.expert)


def conv_rows(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The vectors a convolution's kernel is applied to, one row per output position.

    Works for 1d/2d/3d with any stride, padding (including "same" and non-zero padding
    modes) and dilation; ``rows @ weight.reshape(C_out, -1).T`` is the conv's output.
    """
    n = spec.ndim
    if x.dim() == n + 1:  # unbatched input
        x = x.unsqueeze(0)
    # A row is C windows of the kernel's size; copied straight from (N, C, *spatial) it is
    # gathered in runs of one kernel row (3 values for a 3x3 conv), which on the CPU is slow.
    # For kernels of 2 to 9 positions, runs of C copied channels-last and transposed block by
    # block (``_BLOCK`` bytes at a time, so the blocks stay in cache and the extra memory is
    # one block) took 0.25-0.85x the time on one thread (3x3 and 5x5 convs of 3-512 channels;
    # resnet18 at 224: ``benchmarks/conv_copy.py``); 7x7 kernels took 1.0-3.7x, so they and 1x1
    # kernels (no windows to gather) keep the direct copy.
    fast = x.device.type == "cpu" and 1 < math.prod(spec.kernel_size) <= 9
    return _unfold(x, spec, channels_last=fast)


_BLOCK = 2**21  # bytes of rows transposed at a time by the channels-last copy


def _unfold(x: torch.Tensor, spec: ConvSpec, channels_last: bool) -> torch.Tensor:
    """``conv_rows`` of a batched input (padded here), by either copy (same result)."""
    pads = spec.pad_amounts()
    if any(pads):
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x = F.pad(x, pads, mode=mode)
    n, channels, size = spec.ndim, x.shape[1], math.prod(spec.kernel_size)
    first = 2  # the first spatial dimension
    if channels_last:
        x, first = x.movedim(1, -1), 1
    for i in range(n):
        k, s, d = spec.kernel_size[i], spec.stride[i], spec.dilation[i]
        x = x.unfold(first + i, d * (k - 1) + 1, s)  # window appended as the last dim
        if d > 1:
            x = x[..., ::d]
    if not channels_last:
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
        return x.reshape(-1, channels * size)
    # (B, *out, C, *kernel) -> (B, *out, *kernel, C): each block copied as (kernel, C) runs,
    # then transposed into its rows (C, kernel)
    x = x.permute(0, *range(1, n + 1), *range(n + 2, 2 * n + 2), n + 1)
    out = x.new_empty(*x.shape[: n + 1], channels, size)
    step = max(1, _BLOCK // (math.prod(x.shape[2 : n + 1]) * channels * size * x.element_size()))
    for b in range(x.shape[0]):
        for i in range(0, x.shape[1], step):
            block = x[b, i : i + step]
            block = block.reshape(*block.shape[:n], size, channels)
            out[b, i : i + step].copy_(block.transpose(-1, -2))
    return out.view(-1, channels * size)


_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LayerKind:
    """A kind of adaptable layer. This base is the plain linear layer, weight (out, in); the
    other kinds override what differs. One instance per kind, in ``KINDS``."""

    name = "linear"
    serial = "linear"  # Layer.kind as saved: "linear" or "conv"
    transposed = False  # weight stored (in, out)

    def __repr__(self) -> str:
        return f"<LayerKind {self.name}>"

    # --- Modules: which are layers of this kind, and the Layer they are.
    def matches(self, m: Any) -> bool:
        return isinstance(m, nn.Linear)

    def conv_of(self, m: nn.Module) -> ConvSpec | None:
        """The conv geometry of a module of this kind (a layer, or an adapter's A)."""
        return None

    def widths(self, weight: torch.Tensor) -> tuple[int, int]:
        """(in_features, out_features) read off the base weight."""
        return weight.shape[1], weight.shape[0]

    def layer_of_module(self, name: str, m: nn.Module) -> Layer:
        in_f, out_f = self.widths(m.weight)
        layer = Layer(name, self.serial, type(m).__name__, in_f, out_f, f"{name}.weight")
        layer.conv, layer.module, layer.weight_transposed = self.conv_of(m), name, self.transposed
        return layer

    # --- Calibration: the rows the layer's weight multiplies.
    def rows(
        self, x: torch.Tensor, conv: ConvSpec | None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of the layer's input, plus per-row weights (1 keep, 0 padding) when a mask
        applies."""
        rows = x.reshape(-1, x.shape[-1])
        if mask is None:
            return rows, None
        if tuple(mask.shape) == tuple(x.shape[:-1]) or (x.dim() == 2 and mask.numel() == len(rows)):
            # (batch, seq, d) rows, or the same rows already flattened (HF Conv1D under export)
            return rows, mask.reshape(-1).to(torch.float32)
        return rows, None

    # --- LoRA: the A/B modules and the weight delta they amount to.
    def adapter_modules(
        self, A: torch.Tensor, out_features: int, conv: ConvSpec | None
    ) -> tuple[nn.Module, nn.Module]:
        """A (whose weight rows are ``A``, rank x d) and B (zero) of an adapter of this kind."""
        rank, d = A.shape
        lora_A = nn.Linear(d, rank, bias=False, device=A.device, dtype=A.dtype)
        lora_B = nn.Linear(rank, out_features, bias=False, device=A.device, dtype=A.dtype)
        return _init(lora_A, lora_B, A)

    def delta(self, adapter: Any, grad: bool = False) -> torch.Tensor:
        """``scale * B A`` shaped like the base weight (one expert's slice of it), float32."""
        return _product(adapter, grad)[0]

    # --- DoRA: a magnitude per output, the norm of that output's weights (its row of W).
    def output_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """The L2 norm of each output's weights in ``weight`` (shaped like the base weight),
        shape (out,): DoRA's ``||W||_c``, computed as PEFT does."""
        return torch.linalg.vector_norm(weight, dim=1)

    def on_output(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per output) shaped to broadcast against the layer's output."""
        return v

    def on_weight(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per output) shaped to broadcast against the base ``weight``."""
        return v[:, None]

    # --- Checks of saved layers against a model.
    def weight_shape(self, layer: Layer) -> tuple[int, ...]:
        """The shape the base weight has (for an expert, its slice of the fused weight)."""
        return (layer.out_features, layer.in_features)

    def expected_weight(self, layer: Layer, weight: torch.Tensor, source: str) -> tuple[int, ...]:
        """The shape ``weight`` (the model's parameter ``layer.weight``) must have."""
        return self.weight_shape(layer)

    def describe(self, layer: Layer) -> str:
        """What sets the layer apart in an error message, after its kind and widths."""
        return ""

    # --- The adapter manifest (adapter.json) and the EVA state.
    def manifest_fields(self, adapter: Any) -> dict[str, Any]:
        """The entry's fields that depend on the kind (``formats.adapter`` orders them)."""
        return {"kind": self.serial, "weight_transposed": self.transposed, "expert": None,
                "conv": None}  # fmt: skip

    def read_manifest(self, e: dict, host: str | None, source: str, where: str) -> ConvSpec | None:
        """Check a manifest entry's kind-specific fields (their JSON types already checked);
        its conv geometry."""
        if e.get("conv") is not None:
            raise ModelLoadError(f"{source}: {where}: a linear layer with conv geometry")
        return None

    def read_saved(self, d: dict, source: str, where: str) -> ConvSpec | None:
        """The conv geometry of a Layer saved in an EVA state (``asdict``), checked."""
        if d.get("conv") is not None:
            raise ModelLoadError(f"{source}: {where}: conv geometry must be given for conv only")
        return None

    # --- PEFT export.
    def check_peft(self, name: str, adapter: Any) -> None:
        """Raise ConfigError if PEFT's LoRA cannot express this module adapter."""

    def peft_reads_transposed(self, owner: nn.Module) -> bool:
        """Whether PEFT's parameter LoRA reads this layer's weight, in module ``owner``, as
        (in, out)."""
        return False


def _product(adapter: Any, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``scale * B A`` as a matrix, A, B) in float32; detached unless ``grad``."""
    A, B = adapter.lora_A.weight.float(), adapter.lora_B.weight.float()
    if not grad:
        A, B = A.detach(), B.detach()
    B = B.reshape(B.shape[0], -1)
    return adapter.scaling * (B @ A.reshape(A.shape[0], -1)), A, B


def _init(
    lora_A: nn.Module, lora_B: nn.Module, weight_A: torch.Tensor
) -> tuple[nn.Module, nn.Module]:
    with torch.no_grad():
        lora_A.weight.copy_(weight_A)
        lora_B.weight.zero_()
    return lora_A, lora_B


class HFConv1DKind(LayerKind):
    """A linear layer whose weight is stored (in, out): HF's GPT-2 ``Conv1D``, and ops
    ``x @ W`` on a parameter."""

    name = "hf_conv1d"
    transposed = True

    def matches(self, m: Any) -> bool:
        return is_hf_conv1d(m)

    def widths(self, weight: torch.Tensor) -> tuple[int, int]:
        return weight.shape[0], weight.shape[1]

    def delta(self, adapter: Any, grad: bool = False) -> torch.Tensor:
        return _product(adapter, grad)[0].T

    def output_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight, dim=0)

    def on_weight(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v[None, :]

    def weight_shape(self, layer: Layer) -> tuple[int, ...]:
        return (layer.in_features, layer.out_features)

    def describe(self, layer: Layer) -> str:
        return " stored (in, out)"


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d`` (and conv ops): rows are unfolded patches, ``in_features`` is
    in_channels x prod(kernel); the adapter is an A conv with the base kernel, stride,
    padding and dilation and a 1x1 B conv, so A sees exactly the patches the kernel sees."""

    name = "conv"
    serial = "conv"

    def matches(self, m: Any) -> bool:
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def conv_of(self, m: nn.Module) -> ConvSpec | None:
        return ConvSpec(
            kernel_size=tuple(m.kernel_size),
            stride=tuple(m.stride),
            padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
            dilation=tuple(m.dilation),
            groups=m.groups,
            padding_mode=m.padding_mode,
        )

    def widths(self, weight: torch.Tensor) -> tuple[int, int]:
        return weight.shape[1] * math.prod(weight.shape[2:]), weight.shape[0]

    def rows(
        self, x: torch.Tensor, conv: ConvSpec | None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return conv_rows(x, conv), None  # output positions carry no per-token mask

    def adapter_modules(
        self, A: torch.Tensor, out_features: int, conv: ConvSpec | None
    ) -> tuple[nn.Module, nn.Module]:
        rank, d = A.shape
        in_channels = d // math.prod(conv.kernel_size)
        conv_cls = _CONV_MODULES[conv.ndim]
        lora_A = conv_cls(
            in_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=conv.padding_mode,
            device=A.device,
            dtype=A.dtype,
        )
        lora_B = conv_cls(rank, out_features, 1, bias=False, device=A.device, dtype=A.dtype)
        return _init(lora_A, lora_B, A.reshape(rank, in_channels, *conv.kernel_size))

    def delta(self, adapter: Any, grad: bool = False) -> torch.Tensor:
        delta, A, B = _product(adapter, grad)  # B is 1x1, so B(A(x)) is one conv, weight B @ A
        return delta.reshape(B.shape[0], *A.shape[1:])

    def output_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())))

    def on_output(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *(1,) * (weight.dim() - 2))  # channels, then the spatial dims

    def on_weight(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *(1,) * (weight.dim() - 1))

    def weight_shape(self, layer: Layer) -> tuple[int, ...]:
        kernel = layer.conv.kernel_size  # in_features = in_channels x kernel, by construction
        return (layer.out_features, layer.in_features // math.prod(kernel), *kernel)

    def describe(self, layer: Layer) -> str:
        c = layer.conv
        return (
            f" (kernel {c.kernel_size}, stride {c.stride}, padding {c.padding}, dilation "
            f"{c.dilation}, groups {c.groups}, padding_mode {c.padding_mode})"
        )

    def manifest_fields(self, adapter: Any) -> dict[str, Any]:
        conv = self.conv_of(adapter.lora_A)
        geometry = {
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation),
            "padding_mode": conv.padding_mode,
        }
        return {**super().manifest_fields(adapter), "conv": geometry}

    def read_manifest(self, e: dict, host: str | None, source: str, where: str) -> ConvSpec | None:

        conv = parse_conv(e.get("conv"), source, where)
        if e.get("weight_transposed"):
            raise ModelLoadError(f"{source}: {where}: a conv layer cannot be weight_transposed")
        if e.get("expert") is not None:
            raise ModelLoadError(f"{source}: {where}: a conv layer cannot be an expert")
        return conv

    def read_saved(self, d: dict, source: str, where: str) -> ConvSpec | None:

        if d.get("conv") is None:
            raise ModelLoadError(f"{source}: {where}: conv geometry must be given for conv only")
        conv = parse_conv(d["conv"], source, where)
        if d["in_features"] % math.prod(conv.kernel_size):
            raise ModelLoadError(
                f"{source}: {where}: in_features {d['in_features']} is not a multiple of the "
                f"kernel size {conv.kernel_size}"
            )
        return conv

    def check_peft(self, name: str, adapter: Any) -> None:
        conv = self.conv_of(adapter.lora_A)
        if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
            raise ConfigError(
                f"layer {name}: PEFT's conv LoRA has no dilation or padding mode, so this "
                "adapter cannot be expressed in PEFT's format"
            )


class ExpertKind(LayerKind):
    """One expert ``e`` of a fused MoE weight [E, out, in] (or [E, in, out]:
    ``weight_transposed``), adapted in weight space inside its host module
    (``Layer.host``): no module is one; its rows are the input rows routed to it."""

    name = "expert"

    def matches(self, m: Any) -> bool:
        return False

    def delta(self, adapter: Any, grad: bool = False) -> torch.Tensor:
        delta = _product(adapter, grad)[0]
        return delta.T if adapter.weight_transposed else delta

    def weight_shape(self, layer: Layer) -> tuple[int, ...]:
        if layer.weight_transposed:
            return (layer.in_features, layer.out_features)
        return (layer.out_features, layer.in_features)

    def expected_weight(self, layer: Layer, weight: torch.Tensor, source: str) -> tuple[int, ...]:
        experts = weight.shape[0] if weight.dim() == 3 else 0
        if layer.expert >= experts:
            raise ModelLoadError(
                f"layer {layer.name}: {source} has expert {layer.expert} of {layer.weight}, "
                f"but the model's weight has shape {tuple(weight.shape)}"
            )
        return (experts, *self.weight_shape(layer))

    def describe(self, layer: Layer) -> str:
        return " stored (in, out)" if layer.weight_transposed else ""

    def manifest_fields(self, adapter: Any) -> dict[str, Any]:
        return {**super().manifest_fields(adapter), "weight_transposed": adapter.weight_transposed,
                "expert": adapter.expert}  # fmt: skip

    def read_manifest(self, e: dict, host: str | None, source: str, where: str) -> ConvSpec | None:
        super().read_manifest(e, host, source, where)
        if host is None:
            raise ModelLoadError(f"{source}: {where}: an expert adapter needs its host module")
        return None

    def peft_reads_transposed(self, owner: nn.Module) -> bool:
        return bool(getattr(owner, "is_transposed", False))


class QuantizedKind(LayerKind):
    """A quantized linear module (``evagraph.quantized``: bitsandbytes 4-bit and 8-bit, torchao
    weight subclasses): a linear layer as far as LoRA goes, whose packed weight says nothing of
    its widths (4-bit packs two values a byte): they are the module's ``in_features`` and
    ``out_features``. Captured as an opaque leaf (its input is what calibration needs), adapted
    by a ``LoraLayer`` on its output. Saved as "linear": an adapter fits the layer whether the
    base is quantized or not, so it can be calibrated on one and applied to the other."""

    name = "quantized_linear"

    def matches(self, m: Any) -> bool:
        return quantization(m) is not None

    def layer_of_module(self, name: str, m: nn.Module) -> Layer:
        return Layer(name, self.serial, type(m).__name__, m.in_features, m.out_features,
                     f"{name}.weight", module=name)  # fmt: skip


LINEAR, HF_CONV1D, CONV, EXPERT = LayerKind(), HFConv1DKind(), ConvKind(), ExpertKind()
QUANTIZED = QuantizedKind()
# Most specific first: kind_of_module takes the first that matches (bnb's layers are
# nn.Linear subclasses).
KINDS: tuple[LayerKind, ...] = (QUANTIZED, LINEAR, HF_CONV1D, CONV, EXPERT)


def kind_from(serial: str, weight_transposed: bool = False, expert: int | None = None) -> LayerKind:
    """The kind of a layer from its saved fields: ``Layer.kind`` ("linear" or "conv"),
    ``weight_transposed`` and ``expert``."""
    if serial == "conv":
        return CONV
    if expert is not None:
        return EXPERT
    return HF_CONV1D if weight_transposed else LINEAR


def kind_of(x: Any) -> LayerKind:
    """The kind of a ``Layer``, a ``LoraAdapter`` or an adapter manifest entry."""
    lora_A = getattr(x, "lora_A", None)  # an adapter: a conv A is a conv layer's
    serial = x.kind if lora_A is None else ("conv" if CONV.matches(lora_A) else "linear")
    return kind_from(serial, x.weight_transposed, x.expert)


def kind_of_module(m: Any) -> LayerKind | None:
    """The kind of a linear/conv module (nn.Linear, nn.ConvNd, HF Conv1D), else None."""
    return next((k for k in KINDS if k.matches(m)), None)


def module_kind(m: Any) -> tuple[str, ConvSpec | None] | None:
    """("linear" | "conv", conv geometry) for a linear/conv module (nn.Linear, nn.ConvNd, HF
    Conv1D), else None: which modules are layers."""
    kind = kind_of_module(m)
    return None if kind is None else (kind.serial, kind.conv_of(m))


def layer_of_module(name: str, m: Any) -> Layer | None:
    """The Layer a linear/conv module at ``name`` is (widths from its weight), or None."""
    kind = kind_of_module(m)
    return None if kind is None else kind.layer_of_module(name, m)


def parse_conv(d: Any, source: str, where: str) -> ConvSpec:
    """A ConvSpec from its JSON form (as ``_describe`` and ``asdict(ConvSpec)`` write it)."""
    if not isinstance(d, dict):
        raise ModelLoadError(f"{source}: {where}: 'conv' must be an object, got {d!r:.40}")
    kernel = expect(d, "kernel_size", "a list of integers >= 1", source, where)
    n = len(kernel)
    padding = d.get("padding")
    if not (padding in ("same", "valid") or isinstance(padding, list)
            and all(is_int(p) and p >= 0 for p in padding)):  # fmt: skip
        raise ModelLoadError(
            f"{source}: {where}: conv 'padding' must be 'same', 'valid' or a list of integers "
            f">= 0, got {padding!r:.40}"
        )
    spec = ConvSpec(
        kernel_size=tuple(kernel),
        stride=tuple(expect(d, "stride", "a list of integers >= 1", source, where)),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(expect(d, "dilation", "a list of integers >= 1", source, where)),
        groups=expect(d, "groups", "an integer >= 1", source, where, default=1),
        padding_mode=expect(d, "padding_mode", "a string", source, where, default="zeros"),
    )
    lengths = {len(spec.stride), len(spec.dilation)}
    if not isinstance(padding, str):
        lengths.add(len(padding))
    if not 1 <= n <= 3 or lengths != {n}:
        raise ModelLoadError(
            f"{source}: {where}: conv geometry of mixed or unsupported dimensions: {d!r:.80}"
        )
    if spec.groups != 1:
        raise ModelLoadError(f"{source}: {where}: grouped convolution (groups={spec.groups})")
    if spec.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ModelLoadError(f"{source}: {where}: unknown padding_mode {spec.padding_mode!r:.40}")
    if spec.padding == "same" and any(s != 1 for s in spec.stride):
        raise ModelLoadError(f"{source}: {where}: padding 'same' with stride {spec.stride}")
    return spec
