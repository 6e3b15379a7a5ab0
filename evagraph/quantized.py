"""Quantized linear layers (QLoRA bases): which modules they are, and their weights as floats.

Recognised: bitsandbytes ``Linear4bit`` (nf4, fp4, double quantization) and ``Linear8bitLt``
(its int8 weights quantized), and an ``nn.Linear`` whose weight is a torchao tensor subclass
(``quantize_(model, Int8WeightOnlyConfig())``). Neither library is imported here: a module of
theirs can only exist once its library is loaded, so ``sys.modules`` is asked.

``quantization(m)`` names the scheme of a module ("nf4", "fp4", "int8", "torchao int8", ...)
or gives None; ``is_quantized_weight(t)`` tells a packed weight, which evagraph shares but
never rebuilds; ``dequantize(m)`` gives the weight the layer computes with, float32; and
``requantize(m, w)`` a new weight Parameter quantizing ``w`` as ``m``'s is (what ``merge``
folds with: bitsandbytes' schemes and torchao's int8 weight-only per-row), or a
``ConfigError`` naming the scheme where that is not implemented. ``load_config(name)``: the
``BitsAndBytesConfig`` a name of ``LOAD_CONFIGS`` ("nf4", "int8") stands for.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

# What ``evagraph compile --quantize`` names: the bitsandbytes config transformers loads with.
LOAD_CONFIGS = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
                "int8": {"load_in_8bit": True}}  # fmt: skip


def load_config(name: str) -> Any:
    """The ``transformers.BitsAndBytesConfig`` that ``name`` (a key of ``LOAD_CONFIGS``)
    stands for; a ``ConfigError`` without bitsandbytes."""
    import transformers

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"--quantize {name} loads the model with bitsandbytes, which is not installed: "
            "pip install 'evagraph[quant]'"
        )
    return transformers.BitsAndBytesConfig(**LOAD_CONFIGS[name])


def _bnb() -> Any | None:
    return sys.modules.get("bitsandbytes")


def quantization(m: Any) -> str | None:
    """The quantization of a linear module's weight ("nf4", "fp4", "int8", "torchao
    <tensor type>"), or None for a module that is no quantized linear layer."""
    bnb = _bnb()
    if bnb is not None and isinstance(m, bnb.nn.Linear4bit):
        return getattr(m.weight, "quant_type", "fp4")
    if bnb is not None and isinstance(m, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(m, nn.Linear) and _is_torchao(m.weight):
        return f"torchao {type(m.weight).__name__}"
    return None


def _is_torchao(t: Any) -> bool:
    return type(t).__module__.startswith("torchao.")


def is_quantized_weight(t: Any) -> bool:
    """Whether ``t`` is a packed quantized weight (bnb ``Params4bit`` / ``Int8Params``, a
    torchao tensor subclass): a tensor whose class holds state its constructor cannot be
    given back from ``t`` alone, so it is shared as it is, never rebuilt."""
    bnb = _bnb()
    if bnb is not None and isinstance(t, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
        return True
    return _is_torchao(t)


def shared_state(m: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized module holds outside its parameters, which a copy of it must
    share, not copy: a bitsandbytes 8-bit layer's int8 weight and scales, which its first
    forward moves from its weight into ``m.state``. That move is done here, once, as that
    forward would: a copy that made it first would leave the original without them."""
    bnb = _bnb()
    if bnb is None or not isinstance(m, bnb.nn.Linear8bitLt):
        return []
    if getattr(m.weight, "CB", None) is not None:
        m.init_8bit_state()
    return [t for t in (m.state.CB, m.state.SCB) if t is not None]


@contextlib.contextmanager
def no_cpu_repacking(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from repacking ``model``'s 4-bit weights for its CPU kernel, which it
    does at a forward in eval mode without grad (calibration's): the weights are shared with
    the model calibrated, the repacked ones compute in bfloat16, and that kernel has no
    backward, so adapters trained afterwards would get no gradient through those layers."""
    bnb = _bnb()
    layers = [m for m in model.modules() if bnb and isinstance(m, bnb.nn.Linear4bit)]
    saved = [m.support_avx512bf16_for_cpu for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, support in zip(layers, saved):
            m.support_avx512bf16_for_cpu = support


def dequantize(m: nn.Module) -> torch.Tensor:
    """The weight (out, in) that the quantized linear ``m`` computes with, float32."""
    w = m.weight
    kind = quantization(m)
    if kind == "int8":  # row-wise absmax: W = CB * SCB / 127
        if w.dtype != torch.int8:  # not quantized yet (still on its way to a device)
            return w.detach().float()
        # the module moves the scales from its weight to its state at its first forward
        scales = w.SCB if getattr(w, "SCB", None) is not None else m.state.SCB
        return w.data.float() * (scales.float()[:, None] / 127.0)
    if kind in ("nf4", "fp4"):
        functional = _bnb().functional
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its CPU kernel at the first forward in eval
            # mode without grad; undone on a copy of the state, which the inverse rewrites.
            inverse = functional._convert_weight_packed_for_cpu_inverse
            data, state = inverse(data, copy.deepcopy(state))
        return functional.dequantize_4bit(data, state).float()
    return w.dequantize().float()  # torchao


def requantize(m: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new frozen weight for the quantized linear ``m``: ``weight`` (out, in) quantized as
    ``m``'s is (same scheme, block size, double quantization). ``m`` is left as it was."""
    w, kind, bnb = m.weight, quantization(m), _bnb()
    device = w.device
    if kind in ("nf4", "fp4"):
        state = w.quant_state  # its dtype is bfloat16 once repacked for the CPU kernel
        new = bnb.nn.Params4bit(
            weight.to(getattr(state, "original_dtype", state.dtype)).cpu(),
            requires_grad=False,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
            quant_type=w.quant_type,
            quant_storage=w.quant_storage,
            module=m,
        )
        return new.to(device)  # quantizes on the move, as bitsandbytes does on loading
    if kind == "int8":
        new = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        return new.to(device)
    if _is_int8_per_row(w):  # what Int8WeightOnlyConfig() makes
        from torchao.quantization.granularity import PerRow

        return nn.Parameter(type(w).from_hp(weight.to(w.dtype), PerRow()), requires_grad=False)
    raise ConfigError(
        f"re-quantizing a {kind} weight is not implemented: its quantization config is not "
        "recorded on the weight (torchao's int8 weight-only per-row weights are re-quantized)"
    )


def _is_int8_per_row(w: Any) -> bool:
    """A torchao ``Int8Tensor`` quantized weight-only, symmetric, one scale per output row."""
    zero = getattr(w, "zero_point", None)
    return (
        type(w).__name__ == "Int8Tensor"
        and list(getattr(w, "block_size", ())) == [1, w.shape[-1]]
        and getattr(w, "act_quant_kwargs", None) is None
        and (zero is None or not bool(zero.any()))
    )
