"""Interoperability with HF PEFT: write evagraph's adapters as a PEFT LoRA adapter.

``save_peft(adapted, directory)`` writes what ``peft.PeftModel.from_pretrained(base, directory)``
loads (``adapter_config.json`` with ``target_modules``, ``rank_pattern``, ``alpha_pattern``;
``adapter_model.safetensors`` with PEFT's key names) and which then computes what evagraph's
model computes. The files are produced by PEFT itself (``get_peft_model`` on the base model,
evagraph's A and B copied in, ``save_pretrained``), so the format is PEFT's own. Needs the
``peft`` extra.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .lora import LoraAdapter, LoraLayer, refuse_adapted, share_weights_copy
from .passes.layer_graph import _layer_of_module, _module_layer, forward_mismatch


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ConfigError(
            "PEFT export needs the peft package: pip install 'evagraph[peft]'"
        ) from err
    return peft


def unwrap(adapted: nn.Module) -> nn.Module:
    """``adapted`` with each LoraLayer replaced by its base layer (no merging), as a new module
    tree over the same base weights (``share_weights_copy``): nothing is copied."""
    base = share_weights_copy(adapted)
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.base_layer)
    base.requires_grad_(True)
    return base


def _check_representable(name: str, lora: LoraAdapter) -> None:
    found = _module_layer(lora.lora_A)
    conv = found[1] if found else None
    if conv is not None and (any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros"):
        raise ConfigError(
            f"layer {name}: PEFT's conv LoRA has no dilation or padding mode, so this adapter "
            "cannot be expressed in PEFT's format"
        )


def peft_config_for(adapted: nn.Module, **extra) -> object:
    """The ``peft.LoraConfig`` that describes ``adapted``'s adapters (ranks, alphas, dropout)."""
    peft = _peft()
    adapters = {m.layer_name: m for m in adapted.modules() if isinstance(m, LoraAdapter)}
    if not adapters or not all(isinstance(adapted.get_submodule(n), LoraLayer) for n in adapters):
        raise ConfigError(
            "PEFT export needs a model whose adapters wrap modules (an nn.Module such as an "
            "HF model), not adapters spliced into a graph"
        )
    for name, lora in adapters.items():
        _check_representable(name, lora)
    ranks = {n: a.rank for n, a in adapters.items()}
    alphas = {n: a.scaling * a.rank for n, a in adapters.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(round(alphas[n], 9) for n in ranks if ranks[n] == r).most_common(1)[0][0]
    dropouts = {getattr(a.lora_dropout, "p", 0.0) for a in adapters.values()}
    return peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(adapters),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: a for n, a in alphas.items() if abs(a - alpha) > 1e-9},
        lora_dropout=max(dropouts),
        **extra,
    )


@torch.no_grad()
def to_peft(adapted: nn.Module) -> nn.Module:
    """A ``peft.PeftModel`` carrying ``adapted``'s adapters over its base weights (shared)."""
    peft = _peft()
    config = peft_config_for(adapted)
    peft_model = peft.get_peft_model(unwrap(adapted), config)
    inner = peft_model.base_model.model
    for module in adapted.modules():
        if isinstance(module, LoraAdapter):
            target = inner.get_submodule(module.layer_name)
            target.lora_A["default"].weight.copy_(module.lora_A.weight)
            target.lora_B["default"].weight.copy_(module.lora_B.weight)
            if abs(target.scaling["default"] - module.scaling) > 1e-6 * abs(module.scaling):
                raise ConfigError(f"layer {module.layer_name}: PEFT scaling does not match")
    return peft_model


def save_peft(adapted: nn.Module, directory: str | Path) -> None:
    """Write ``adapted``'s adapters as a PEFT LoRA adapter directory (adapter_config.json,
    adapter_model.safetensors)."""
    card = Path(directory) / "README.md"
    had_card = card.exists()
    to_peft(adapted).save_pretrained(str(directory))
    if not had_card:  # PEFT's empty model-card template: not the user's, not ours
        card.unlink(missing_ok=True)


def from_peft_eva_state_dict(
    model: nn.Module,
    eva_state_dict: dict[str, torch.Tensor],
    *,
    budget: int,
    alpha: float = 8.0,
    adjust_scaling_factors: bool = True,
    dropout: float = 0.0,
    prefix: str = "base_model.model.",
) -> nn.Module:
    """Adapters from an ``eva_state_dict`` that PEFT produced (``peft.get_eva_state_dict``).

    Each entry is a layer's ``A`` (rank x d, already truncated to its rank); B starts at zero
    and the scale follows PEFT's (``budget`` is PEFT's ``r``). Returns ``model`` adapted, as a
    new module tree sharing its weights (PEFT's ``prefix`` is stripped from the names).
    """
    from .config import AdapterSettings
    from .passes.rewrite import _adapter_dtype, layer_scaling, rewrite

    refuse_adapted(model)
    settings = AdapterSettings(
        budget=budget, alpha=alpha, adjust_scaling_factors=adjust_scaling_factors, dropout=dropout
    )
    work = share_weights_copy(model)
    adapters = {}
    for key, A in eva_state_dict.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if A.shape[0] == 0:
            continue
        try:
            module = work.get_submodule(name)
        except AttributeError as err:
            raise ConfigError(
                f"eva_state_dict names {name}, which the model does not have"
            ) from err
        layer = _layer_of_module(name, module)
        if layer is None or layer.kind != "linear":
            raise ConfigError(f"eva_state_dict entry {name} is not a linear layer of the model")
        reason = forward_mismatch(module)
        if reason is not None:
            raise ConfigError(f"eva_state_dict entry {name}: {reason}: not adapted")
        weight = module.weight
        _, scale = layer_scaling(A.shape[0], settings)
        adapters[name] = LoraAdapter.build(
            A.detach().to(device=weight.device, dtype=_adapter_dtype(weight)),
            layer.out_features,
            None,
            scale,
            dropout,
            layer_name=name,
            base_weight=f"{name}.weight",
            weight_transposed=layer.weight_transposed,
        )
    return rewrite(work, adapters)
