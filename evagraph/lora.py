"""LoRA modules that the rewrite pass emits.

``LoraAdapter`` is the trainable update ``scale * B(A(dropout(x)))``; ``LoraLayer`` wraps a
base layer and adds its adapter's output. The A/B modules and the merge delta depend on the
layer's kind (``evagraph.layers.LayerKind``): linear A/B for linear layers, an A conv with the
base kernel and a 1x1 B conv for convolutions. A DoRA adapter (``use_dora``) also holds a
magnitude per output, and its ``LoraLayer`` computes ``m * (W + scale B A) / ||W + scale B A||``
(per output) as PEFT's DoRA does (``LoraAdapter.dora``).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from .config import scale_divisor
from .errors import ConfigError
from .layers import ConvSpec, kind_from, kind_of
from .quantized import is_quantized_weight, shared_state


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the adapter of a base ``weight``: half-precision and quantized bases
    (packed uint8/int8, torchao subclasses) train their adapters in float32, as PEFT's
    ``autocast_adapter_dtype``; others in the weight's own dtype."""
    if is_quantized_weight(weight) or not weight.is_floating_point():
        return torch.float32
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class LoraAdapter(nn.Module):
    """``scale * B(A(dropout(x)))``, computed in the adapter's dtype, returned in x's.

    ``use_rslora``: ``scaling`` is alpha / sqrt(rank), not alpha / rank (what ``alpha`` reads
    back). ``magnitude`` (DoRA, one value per output; see ``init_magnitude``): the trainable
    ``lora_magnitude_vector``, PEFT's name; None for plain LoRA.
    """

    def __init__(
        self,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        dropout: float = 0.0,
        layer_name: str = "",
        base_weight: str = "",
        weight_transposed: bool = False,
        host: str | None = None,
        expert: int | None = None,
        *,
        use_rslora: bool = False,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.use_rslora = use_rslora
        self.register_parameter(
            "lora_magnitude_vector", None if magnitude is None else nn.Parameter(magnitude)
        )
        self.layer_name = layer_name  # qualified name of the layer it adapts
        # Where the base weight lives in the un-adapted model, and whether it is stored
        # (in, out) like HF Conv1D: what merging needs.
        self.base_weight = base_weight or f"{layer_name}.weight"
        self.weight_transposed = weight_transposed
        # Adapters of ops on parameters (``Layer.host``): the module whose call sees the
        # changed weight, and the expert's index in a fused [E, ...] weight.
        self.host, self.expert = host, expert

    @property
    def rank(self) -> int:
        return self.lora_A.weight.shape[0]

    @property
    def alpha(self) -> float:
        """LoRA's alpha: ``scaling`` times the rank (its square root for rsLoRA)."""
        return self.scaling * scale_divisor(self.rank, self.use_rslora)

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return (self.lora_B(h) * self.scaling).to(x.dtype)

    def delta_weight(self, grad: bool = False) -> torch.Tensor:
        """``scale * B A`` shaped like the base weight (one expert's slice of it), float32:
        what merging adds to it; with ``grad``, differentiable (weight-space adapters)."""
        return kind_of(self).delta(self, grad)

    # --- DoRA.
    def dora_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + scale B A||`` per output of the base ``weight``, float32, detached: the
        DoRA paper (section 4.3) and PEFT treat it as a constant in the gradient."""
        delta = self.delta_weight().to(weight.device)
        with torch.no_grad():
            return kind_of(self).output_norms(weight.float() + delta)

    def init_magnitude(self, weight: torch.Tensor) -> None:
        """Make this a DoRA adapter of the base ``weight``: magnitude = ``dora_norms(weight)``,
        which is ``||W||`` while B is zero, so the layer computes exactly what its base does.

        Raises ``ConfigError`` naming the layer where the weight's values are not at hand
        (meta device) or are no floats (quantized), or where an output's weights are all
        zero: its direction ``W / ||W||`` is 0 / 0 there (PEFT's DoRA gives NaN).
        """
        where = f"layer {self.layer_name}: use_dora"
        if weight.is_meta:
            raise ConfigError(
                f"{where}: DoRA's magnitude is the norm of the base weight, and "
                f"{self.base_weight} is not resident (on the meta device: offloaded, or loaded "
                "block by block); load the model's weights, or adapt without use_dora"
            )
        if not weight.is_floating_point() or is_quantized_weight(weight):
            what = type(weight).__name__ if is_quantized_weight(weight) else weight.dtype
            raise ConfigError(
                f"{where}: the base weight {self.base_weight} is {what} (quantized), "
                "and DoRA needs its values to normalise it; adapt without use_dora"
            )
        norms = self.dora_norms(weight)
        if not bool((norms > 0).all()):
            raise ConfigError(
                f"{where}: {int((norms == 0).sum())} output(s) of {self.base_weight} have all "
                "weights zero, whose direction W / ||W|| DoRA cannot take (PEFT's gives NaN); "
                "exclude the layer, or adapt without use_dora"
            )
        self.lora_magnitude_vector = nn.Parameter(norms.to(self.lora_A.weight.dtype))

    def dora(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """What DoRA adds to ``base_out = base_layer(x)``: ``(f - 1) W x + f scale B A x``,
        ``f = m / ||W + scale B A||`` per output, so that the layer computes
        ``f (W + scale B A) x + bias``. As PEFT's: ``W x`` is the base output less its bias,
        or, while dropout is active, the base layer of the dropped input that B A sees too."""
        weight, kind = base_layer.weight, kind_of(self)
        dtype = self.lora_A.weight.dtype
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            x = self.lora_dropout(x)
            base_out = base_layer(x)
        plain = base_out.to(dtype)
        if getattr(base_layer, "bias", None) is not None:
            plain = plain - kind.on_output(base_layer.bias.to(dtype), weight)
        f = kind.on_output(self.lora_magnitude_vector / self.dora_norms(weight).to(dtype), weight)
        lora = self.lora_B(self.lora_A(x.to(dtype))) * self.scaling
        return ((f - 1) * plain + f * lora).to(base_out.dtype)

    @classmethod
    def build(
        cls,
        A: torch.Tensor,
        out_features: int,
        conv: ConvSpec | None,
        scaling: float,
        dropout: float = 0.0,
        layer_name: str = "",
        base_weight: str = "",
        weight_transposed: bool = False,
        host: str | None = None,
        expert: int | None = None,
        *,
        use_rslora: bool = False,
        magnitude: torch.Tensor | None = None,
    ) -> LoraAdapter:
        """An adapter whose A rows are ``A`` (rank x d) and whose B is zero."""
        kind = kind_from("linear" if conv is None else "conv", weight_transposed, expert)
        lora_A, lora_B = kind.adapter_modules(A, out_features, conv)
        return cls(
            lora_A, lora_B, scaling, dropout, layer_name, base_weight, weight_transposed, host,
            expert, use_rslora=use_rslora, magnitude=magnitude,
        )  # fmt: skip


class LoraLayer(nn.Module):
    """A base layer plus a LoRA adapter: ``base_layer(x) + lora(x)`` (DoRA: ``lora.dora``)."""

    def __init__(self, base_layer: nn.Module, lora: LoraAdapter) -> None:
        super().__init__()
        self.base_layer, self.lora = base_layer, lora

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.lora.use_dora:  # DoRA rescales the base output too: it needs it and W
            return out + self.lora.dora(x, out, self.base_layer)
        return out + self.lora(x)

    def __getattr__(self, name: str):
        # Code that reads e.g. `layer.weight` or `layer.in_features` keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)


class ParamLoraLayer(nn.Module):
    """A module run with LoRA added to parameters it uses in its own ops: ``base_layer`` is
    called with each adapted parameter ``W`` replaced by ``W + scale * B A`` (per expert
    ``W[e] + scale * B_e A_e`` for a fused [E, ...] expert weight), as PEFT's
    ``target_parameters`` LoRA does. For ops on a parameter that are no linear/conv module
    (an MoE router's ``F.linear``, fused experts behind a grouped matmul): the model keeps its
    class, and the weight is what changes, so the result is exact whatever the op.

    ``loras`` maps each parameter's path under ``base_layer`` to its adapters. Dropout
    cannot be applied to the input of a weight-space update: such adapters have none (the
    rewrite pass warns when dropout was asked for).
    """

    def __init__(self, base_layer: nn.Module, loras: dict[str, list[LoraAdapter]]) -> None:
        super().__init__()
        self.base_layer = base_layer
        # ModuleDict keys cannot hold dots or brackets: adapters keyed by position.
        self.lora = nn.ModuleList(a for adapters in loras.values() for a in adapters)
        self.params: dict[str, list[int]] = {}  # path -> positions of its adapters in lora
        start = 0
        for path, adapters in loras.items():
            self.params[path] = list(range(start, start + len(adapters)))
            start += len(adapters)

    def adapters(self, path: str) -> list[LoraAdapter]:
        """The adapters of the parameter at ``path`` under ``base_layer``."""
        return [self.lora[i] for i in self.params[path]]

    def forward(self, *args, **kwargs):
        swapped = {}
        for path in self.params:
            weight = self.base_layer.get_parameter(path)
            adapters = self.adapters(path)
            if adapters[0].expert is None:
                swapped[path] = weight + adapters[0].delta_weight(grad=True).to(weight.dtype)
            else:
                swapped[path] = _experts_plus_lora(weight, adapters)
        return torch.func.functional_call(self.base_layer, swapped, args, kwargs, strict=False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)


def _experts_plus_lora(weight: torch.Tensor, adapters: list[LoraAdapter]) -> torch.Tensor:
    """``W[e] + scale_e * B_e A_e`` for every expert of a fused weight, in one ``baddbmm``
    from the low-rank factors (ranks padded with zeros to the largest; experts without an
    adapter get zero factors): no second tensor the size of the expert stack is built, as
    PEFT's ParamWrapper avoids it too."""
    rank = max(a.rank for a in adapters)
    out_f, in_f = adapters[0].lora_B.weight.shape[0], adapters[0].lora_A.weight.shape[1]
    by_expert = {a.expert: a for a in adapters}
    zero_A, zero_B = weight.new_zeros(rank, in_f), weight.new_zeros(out_f, rank)
    # stacked factors (small: rank x width per expert) keep the autograd graph to each A and B
    factors = [
        (_pad(a.lora_A.weight, rank, 0).to(weight.dtype),
         _pad(a.lora_B.weight * a.scaling, rank, 1).to(weight.dtype))
        if a else (zero_A, zero_B)
        for a in map(by_expert.get, range(weight.shape[0]))
    ]  # fmt: skip
    A = torch.stack([a for a, _ in factors])
    B = torch.stack([b for _, b in factors])
    if adapters[0].weight_transposed:  # stored [E, in, out]: add (B A)^T = A^T B^T
        return torch.baddbmm(weight, A.transpose(1, 2), B.transpose(1, 2))
    return torch.baddbmm(weight, B, A)


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``size``."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, missing]
    return torch.nn.functional.pad(t, pad)


def _alias(p: nn.Parameter) -> nn.Parameter:
    # A Parameter object of its own over p's storage (as Parameter.__deepcopy__ builds one,
    # minus the clone): requires_grad, .grad and Module.to (which sets .data) stay per model.
    # A quantized weight is shared itself: its class's constructor cannot rebuild it from
    # its data (torchao's need their block size, bnb's their quantization state); it is
    # frozen, so no gradient or requires_grad of it differs between the models.
    if is_quantized_weight(p):
        return p
    alias = type(p)(p.detach(), p.requires_grad)
    alias.__dict__.update(vars(p))
    return alias


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that copies no weight: its tensors are the input's.

    Each parameter becomes a Parameter object of its own over the same storage (equal
    ``data_ptr``; tied weights stay tied), so freezing the copy's base weights, their
    gradients and ``.to()`` on the copy leave the input's parameters as they were. Their
    values are shared, so nothing may write into them in place: evagraph never does (``merge``
    makes new tensors) and training the adapters leaves the frozen base alone. Buffers and
    tensors held in module attributes, also nested in containers (caches, e.g. timm LeViT's
    attention biases after a forward with grad, which are no graph leaves, so deepcopy
    refuses them) are the input's own objects, except
    normalisation running statistics: a forward in train mode updates those in place, which
    would change the input's, so they are copied (they are small). Quantized weights are
    shared as they are (``_alias``), with the state their layers keep beside them
    (``quantized.shared_state``).
    """
    memo: dict[int, Any] = {}  # deepcopy returns what the memo holds instead of copying
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = _alias(p)
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            memo.update((id(b), b) for b in module._buffers.values() if b is not None)
        memo.update((id(t), t) for t in shared_state(module))
    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                memo.update((id(t), t) for t in _held_tensors(value) if id(t) not in memo)
    return copy.deepcopy(model, memo)


def unfreeze(model: nn.Module) -> None:
    """Make every parameter of ``model`` require grad (a plain model again), except quantized
    weights: integer ones cannot, and they are shared with the model they came from."""
    for p in model.parameters():
        if not is_quantized_weight(p):
            p.requires_grad_(True)


def _held_tensors(value: Any, depth: int = 4) -> list[torch.Tensor]:
    """Tensors in ``value`` and in the dicts, lists, tuples and sets it nests (caches such as
    ``{device: {shape: tensor}}``), to ``depth`` levels."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0 or not isinstance(value, (dict, list, tuple, set, frozenset)):
        return []
    items = value.values() if isinstance(value, dict) else value
    return [t for item in items for t in _held_tensors(item, depth - 1)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` keyed ``{layer}.lora_A.weight`` / ``{layer}.lora_B.weight``,
    and DoRA's ``{layer}.lora_magnitude_vector`` (PEFT's key) where there is one."""
    state = {}
    for module in model.modules():
        if isinstance(module, LoraAdapter):
            state[f"{module.layer_name}.lora_A.weight"] = module.lora_A.weight.detach()
            state[f"{module.layer_name}.lora_B.weight"] = module.lora_B.weight.detach()
            if module.use_dora:
                magnitude = module.lora_magnitude_vector.detach()
                state[f"{module.layer_name}.lora_magnitude_vector"] = magnitude
    return state


def refuse_adapted(model: nn.Module) -> None:
    """Raise ``ConfigError`` if ``model`` already carries LoRA adapters, evagraph's or PEFT's.

    Adapting such a model would put new adapters on the old ones' ``lora_A``/``lora_B``
    layers (they are linear/conv layers too) and calibrate through the old adapters. A
    ``.pt2`` exported from an adapted model keeps no adapter classes, only the parameter
    names, so those are checked too. A ``torch.compile`` wrapper is refused too: Dynamo
    skips hooks added after compilation, so probes would see nothing, and adapters spliced
    into the eager module would not be in the compiled code.
    """
    # Only if Dynamo is loaded (a compiled model implies it): importing it costs ~150 MB.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(dynamo, "OptimizedModule", None)
    peft_types: tuple[type, ...] = ()
    if "peft" in sys.modules:  # PEFT objects can only exist if peft was imported
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

        peft_types = (PeftModel, BaseTuner, BaseTunerLayer)
    for name, module in model.named_modules():
        where = f" (at {name})" if name else ""
        if compiled is not None and isinstance(module, compiled):
            inner = f"{name}._orig_mod" if name else "model._orig_mod"
            raise ConfigError(
                f"the model is compiled with torch.compile{where}: pass the eager module "
                f"({inner}), then compile the adapted model (hooks added to a compiled model "
                "are skipped, and adapters spliced into it would not be in its compiled code)"
            )
        if isinstance(module, (LoraLayer, LoraAdapter)):
            raise ConfigError(
                f"the model already carries evagraph LoRA adapters{where}: pass the base model, "
                "or fold the adapters in first with evagraph.merge"
            )
        if peft_types and isinstance(module, peft_types):
            raise ConfigError(
                f"the model already carries PEFT adapters{where}: pass the base model, "
                "or fold the adapters in first with PEFT's merge_and_unload()"
            )
    for name, _ in model.named_parameters():
        if {"lora_A", "lora_B"} & set(name.split(".")):
            raise ConfigError(
                f"the model already carries LoRA weights ({name}): pass the base model, "
                "or export a merged one (evagraph.merge) instead"
            )
