"""Interoperability with HF PEFT: write evagraph's adapters as a PEFT LoRA adapter.

``save_peft(adapted, directory)`` writes what ``peft.PeftModel.from_pretrained(base, directory)``
loads (``adapter_config.json`` with ``target_modules``, ``rank_pattern``, ``alpha_pattern``,
``use_dora``, ``use_rslora``; ``adapter_model.safetensors`` with PEFT's key names) and which
then computes what evagraph's model computes. The files are produced by PEFT itself
(``get_peft_model`` on the base model, evagraph's A, B and DoRA magnitudes copied in,
``save_pretrained``), so the format is PEFT's own. Needs the ``peft`` extra.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AdapterSettings, scale_divisor
from ..errors import ConfigError, first_line
from ..layers import kind_of, layer_of_module
from ..lora import (
    LoraAdapter,
    LoraLayer,
    ParamLoraLayer,
    adapter_dtype,
    refuse_adapted,
    share_weights_copy,
    unfreeze,
)
from ..passes.layer_graph import forward_mismatch
from ..passes.rewrite import rewrite
from ..runtime import call_model
from ..validate import check_tensor


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ConfigError(
            "PEFT export needs the peft package: pip install 'evagraph[peft]'"
        ) from err
    return peft


def unwrap(adapted: nn.Module) -> nn.Module:
    """``adapted`` with each LoraLayer / ParamLoraLayer replaced by its base layer (no
    merging), as a new module tree over the same base weights (``share_weights_copy``)."""
    base = share_weights_copy(adapted)
    # Innermost first: a LoraLayer inside a ParamLoraLayer's module keeps its path until then.
    for name, module in reversed(list(base.named_modules())):
        if isinstance(module, (LoraLayer, ParamLoraLayer)):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.base_layer)
    unfreeze(base)
    return base


def _by_parameter(adapted: nn.Module) -> dict[str, list[LoraAdapter]]:
    """Weight-space adapters (``ParamLoraLayer``: routers, fused experts) by base weight."""
    found: dict[str, list[LoraAdapter]] = {}
    for m in adapted.modules():
        if isinstance(m, ParamLoraLayer):
            for a in m.lora:
                found.setdefault(a.base_weight, []).append(a)
    return found


def _check_parameter(adapted: nn.Module, weight: str, adapters: list[LoraAdapter]) -> None:
    """PEFT's ``target_parameters`` LoRA reads a 2-D weight as (out, in) and a 3-D one as
    (experts, out, in), or (experts, in, out) when its module says ``is_transposed``."""
    first = adapters[0]
    owner_path = weight.rpartition(".")[0]
    if owner_path != first.host:
        raise ConfigError(
            f"layer {first.layer_name}: PEFT's parameter LoRA changes {weight} only while its "
            f"own module {owner_path or '(the model)'} runs, but the op using it runs in "
            f"{first.host}, so this adapter cannot be expressed in PEFT's format"
        )
    owner = adapted.get_submodule(first.host).base_layer
    transposed = kind_of(first).peft_reads_transposed(owner)
    if first.weight_transposed != transposed:
        raise ConfigError(
            f"layer {first.layer_name}: PEFT's parameter LoRA would read {weight} in the other "
            "orientation than the op that uses it, so this adapter cannot be expressed in "
            "PEFT's format"
        )


def peft_config_for(adapted: nn.Module, **extra) -> object:
    """The ``peft.LoraConfig`` that describes ``adapted``'s adapters (ranks, alphas, dropout).

    Module adapters are ``target_modules``; weight-space adapters ``target_parameters``
    (PEFT's ParamWrapper), one rank per parameter: the experts of a fused weight share the
    largest of their ranks, the others padded with zero directions, and their scales are
    folded into B (``to_peft``), so PEFT computes exactly what evagraph does.
    """
    peft = _peft()
    adapters = {m.layer_name: m for m in adapted.modules() if isinstance(m, LoraAdapter)}
    params = _by_parameter(adapted)
    in_params = {a.layer_name for group in params.values() for a in group}
    wrapped = {n for n in adapters if n not in in_params}
    if not adapters or not all(isinstance(adapted.get_submodule(n), LoraLayer) for n in wrapped):
        raise ConfigError(
            "PEFT export needs a model whose adapters wrap modules (an nn.Module such as an "
            "HF model), not adapters spliced into a graph"
        )
    for name in wrapped:
        kind_of(adapters[name]).check_peft(name, adapters[name])
    for weight, group in params.items():
        _check_parameter(adapted, weight, group)
    # A PEFT config has one use_dora and one use_rslora for all its layers.
    for flag in ("use_dora", "use_rslora"):
        values = {n: getattr(a, flag) for n, a in adapters.items()}
        if len(set(values.values())) > 1:
            on, off = (next(n for n, v in values.items() if v is b) for b in (True, False))
            raise ConfigError(
                f"layers {on} and {off}: one has {flag} and the other not, and a PEFT config "
                f"holds one {flag} for all layers, so these adapters cannot be expressed in "
                "PEFT's format"
            )
    rslora = any(a.use_rslora for a in adapters.values())
    ranks = {n: adapters[n].rank for n in wrapped}
    alphas = {n: adapters[n].alpha for n in wrapped}
    for weight, group in params.items():
        if group[0].expert is None:
            ranks[weight], alphas[weight] = group[0].rank, group[0].alpha
        else:  # scale 1: each expert's own scale goes into its B
            ranks[weight] = max(a.rank for a in group)
            alphas[weight] = scale_divisor(ranks[weight], rslora)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(round(alphas[n], 9) for n in ranks if ranks[n] == r).most_common(1)[0][0]
    dropouts = {getattr(adapters[n].lora_dropout, "p", 0.0) for n in wrapped} | {0.0}
    if params and max(dropouts) > 0:
        raise ConfigError(
            f"PEFT's parameter LoRA (for {next(iter(params))}) has no dropout, and a PEFT "
            "config holds one dropout for all layers: adapt with dropout=0 to export to PEFT"
        )
    # PEFT matches a name to every module whose name ends in "." + name: a layer named as the
    # tail of another module's name ("conv1" and "layer1.0.conv1") is named anchored instead.
    inner = unwrap(adapted)
    modules = [n for n, _ in inner.named_modules()] + [n for n, _ in inner.named_parameters()]
    key = _anchored_names(ranks, modules)
    targets = sorted(wrapped)
    if any(key[n] != n for n in targets):  # a regex, which PEFT matches to whole names
        targets = "^(?:" + "|".join(re.escape(n) for n in targets) + ")$"
    return peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        target_parameters=sorted(params) or None,
        rank_pattern={key[n]: k for n, k in ranks.items() if k != r},
        alpha_pattern={key[n]: a for n, a in alphas.items() if abs(a - alpha) > 1e-9},
        lora_dropout=max(dropouts),
        use_dora=any(a.use_dora for a in adapters.values()),
        use_rslora=rslora,
        **extra,
    )


def _anchored_names(names: Iterable[str], others: Iterable[str]) -> dict[str, str]:
    """Each name as PEFT's key for that module alone: itself, or ``^`` + the escaped name
    (PEFT reads pattern keys as regexes) where another name ends in ``"." + name``."""
    tails = {o.split(".", i)[-1] for o in others for i in range(1, o.count(".") + 1)}
    return {n: "^" + re.escape(n) if n in tails else n for n in names}


def _param_wrapper(inner: nn.Module, weight: str) -> nn.Module:
    """PEFT's ParamWrapper of ``weight`` (nested when a module has several)."""
    module_name, _, param = weight.rpartition(".")
    module = inner.get_submodule(module_name)
    while getattr(module, "parameter_name", param) != param:
        module = module.base_layer
    return module


def _copy_parameter_lora(target: nn.Module, group: list[LoraAdapter]) -> None:
    """evagraph's adapters of one weight into PEFT's ParamWrapper: A rows ``e * r + j``,
    B columns ``j * E + e`` (PEFT's layout), zero where an expert's rank is below r."""
    A, B = target.lora_A["default"].weight, target.lora_B["default"].weight
    if group[0].expert is None:
        A.copy_(group[0].lora_A.weight)
        B.copy_(group[0].lora_B.weight)
        return
    experts, r = target.num_experts, A.shape[0] // target.num_experts
    A.zero_()
    B.zero_()
    for a in group:
        k, e = a.rank, a.expert
        A[e * r : e * r + k] = a.lora_A.weight
        B[:, torch.arange(k) * experts + e] = a.lora_B.weight * a.scaling


@torch.no_grad()
def to_peft(adapted: nn.Module) -> nn.Module:
    """A ``peft.PeftModel`` carrying ``adapted``'s adapters over its base weights (shared)."""
    peft = _peft()
    config = peft_config_for(adapted)
    with warnings.catch_warnings():
        # PEFT checks pattern keys against module names; a parameter's key (its own rank)
        # is applied all the same, which to_peft's copy below relies on and the tests check.
        warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not")
        try:
            peft_model = peft.get_peft_model(unwrap(adapted), config)
        except ValueError as err:  # PEFT's own rules (e.g. layers it refuses in Mamba models)
            raise ConfigError(f"PEFT refused these adapters: {first_line(err)}") from err
    inner = peft_model.base_model.model
    _refuse_transformed_factors(adapted, inner)
    params = _by_parameter(adapted)
    for weight, group in params.items():
        _copy_parameter_lora(_param_wrapper(inner, weight), group)
    in_params = {a.layer_name for group in params.values() for a in group}
    for module in adapted.modules():
        if isinstance(module, LoraAdapter) and module.layer_name not in in_params:
            target = inner.get_submodule(module.layer_name)
            if "default" not in getattr(target, "lora_A", {}):
                raise ConfigError(
                    f"layer {module.layer_name}: PEFT left this {type(target).__name__} "
                    "unwrapped (its own rules for this model type), so the adapter cannot be "
                    "expressed in PEFT's format; exclude the layer to export to PEFT"
                )
            if target.lora_A["default"].weight.shape != module.lora_A.weight.shape:
                raise ConfigError(
                    f"layer {module.layer_name}: PEFT gave it rank "
                    f"{target.lora_A['default'].weight.shape[0]}, not {module.rank}: this "
                    "peft does not read anchored (^) rank_pattern keys; upgrade peft"
                )
            target.lora_A["default"].weight.copy_(module.lora_A.weight)
            target.lora_B["default"].weight.copy_(module.lora_B.weight)
            if module.use_dora:  # PEFT's is (out,), or (1, out, 1, ...) for a conv
                magnitude = target.lora_magnitude_vector["default"].weight
                magnitude.copy_(module.lora_magnitude_vector.reshape(magnitude.shape))
            if abs(target.scaling["default"] - module.scaling) > 1e-6 * abs(module.scaling):
                raise ConfigError(f"layer {module.layer_name}: PEFT scaling does not match")
    return peft_model


_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _refuse_transformed_factors(adapted: nn.Module, inner: nn.Module) -> None:
    """A ``ConfigError`` naming the layers whose LoRA A PEFT built as their base layer's own
    class (it does for convolutions) where that class's forward is not the plain op: timm's
    ``ScaledStdConv2d`` standardises A's weight, so PEFT would compute another adapter."""
    modules = dict(inner.named_modules())
    odd = {}
    for m in adapted.modules():
        if not isinstance(m, LoraAdapter) or m.layer_name not in modules:
            continue
        factors = getattr(modules[m.layer_name], "lora_A", None)
        factor = factors["default"] if factors is not None and "default" in factors else None
        if factor is not None and not any(type(factor).forward is c.forward for c in _PLAIN):
            odd[m.layer_name] = type(factor).__name__
    if odd:
        shown = ", ".join(f"{n} ({c})" for n, c in list(odd.items())[:4])
        raise ConfigError(
            f"PEFT builds the LoRA factors of {len(odd)} layer(s) as their base layer's class, "
            f"whose forward transforms the factors' weights: {shown}"
            f"{' ...' if len(odd) > 4 else ''}; PEFT would compute another adapter than "
            "evagraph's, so exclude those layers to export to PEFT"
        )


def save_peft(adapted: nn.Module, directory: str | Path, example: Any = None) -> None:
    """Write ``adapted``'s adapters as a PEFT LoRA adapter directory (adapter_config.json,
    adapter_model.safetensors).

    ``example``: a batch the model takes. PEFT's wrappers then run it first, and a model they
    break (one that reads an attribute of a layer which PEFT's wrapper does not have, as timm's
    DaViT reads its convs' ``kernel_size``) is a ``ConfigError`` naming the layers, not a file
    that fails in the user's training script.
    """
    card = Path(directory) / "README.md"
    had_card = card.exists()
    peft_model = to_peft(adapted)
    if example is not None:
        _check_runs(peft_model, adapted, example)
    peft_model.save_pretrained(str(directory))
    if not had_card:  # PEFT's empty model-card template: not the user's, not ours
        card.unlink(missing_ok=True)


def write(adapted: nn.Module, outdir: Path, example: Any) -> list[str]:
    """``--format peft``: ``save_peft`` into ``outdir``. ``example`` (None: not checked) runs
    through PEFT's wrappers first; there is none under ``--state`` without data, nor for a
    model whose weights were never loaded whole."""
    save_peft(adapted, outdir, example=example)
    return ["adapter_config.json", "adapter_model.safetensors"]


def _check_runs(peft_model: nn.Module, adapted: nn.Module, example: Any) -> None:
    """Run ``example`` through ``peft_model``; a failure is a ``ConfigError`` that names the
    layers whose PEFT wrapper lacks the attribute the model asked for, if that was it."""
    try:
        with torch.no_grad():
            call_model(peft_model, example)
    except Exception as err:
        reason = first_line(err)
        found = re.search(r"has no attribute '(\w+)'", reason)
        attr = found.group(1) if found else None
        inner = peft_model.base_model.model
        hidden = [
            name
            for name, m in adapted.named_modules()
            if attr and isinstance(m, LoraLayer) and hasattr(m.base_layer, attr)
            and not hasattr(inner.get_submodule(name), attr)
        ]  # fmt: skip
        where = ""
        if hidden:
            shown = ", ".join(hidden[:4]) + (" ..." if len(hidden) > 4 else "")
            where = f" (PEFT's wrapper of {shown} has no {attr!r}, which the model reads)"
        raise ConfigError(
            f"PEFT cannot run this model with the adapters{where}: {type(err).__name__}: "
            f"{reason}; exclude those layers to export to PEFT"
        ) from err


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

    Every entry is checked first (``ConfigError`` naming it): a linear layer of ``model``,
    a finite float tensor of shape (rank, the layer's input width), rank at most that width.
    Rank 0 entries (PEFT writes them for layers whose variance did not make the cut, and
    then removes their LoRA) give no adapter, as in PEFT.
    """
    refuse_adapted(model)
    settings = AdapterSettings(
        budget=budget, alpha=alpha, adjust_scaling_factors=adjust_scaling_factors, dropout=dropout
    )
    work = share_weights_copy(model)
    adapters = {}
    source = "the PEFT state dict"
    if not isinstance(eva_state_dict, Mapping):
        raise ConfigError(f"{source} must be a dict, got {type(eva_state_dict).__name__}")
    for key, A in eva_state_dict.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r:.40} is not a module name")
        name = key[len(prefix) :] if key.startswith(prefix) else key
        where = f"entry {name}"
        try:
            module = work.get_submodule(name)
        except AttributeError as err:
            raise ConfigError(f"{source} names {name}, which the model does not have") from err
        layer = layer_of_module(name, module)
        if layer is None or layer.kind != "linear":
            raise ConfigError(f"{source}: {where} is not a linear layer of the model")
        check_tensor(A, where, source, error=ConfigError)
        width = layer.in_features
        if A.dim() != 2 or A.shape[1] != width:
            raise ConfigError(
                f"{source}: {where} has shape {tuple(A.shape)}, expected (rank, {width}): the "
                f"layer's input width is {width}"
            )
        # PEFT's A rows are principal directions of the layer's d-wide input: at most d.
        # Ranks above out_features are allowed: allocation can give a narrow head as much.
        if A.shape[0] > width:
            raise ConfigError(
                f"{source}: {where} has rank {A.shape[0]}, more than the layer's input width "
                f"{width}"
            )
        if A.shape[0] == 0:
            continue
        reason = forward_mismatch(module)
        if reason is not None:
            raise ConfigError(f"{source}: {where}: {reason}: not adapted")
        weight = module.weight
        _, scale = settings.layer_scaling(A.shape[0])
        adapters[name] = LoraAdapter.build(
            A.detach().to(device=weight.device, dtype=adapter_dtype(weight)),
            layer.out_features,
            None,
            scale,
            dropout,
            layer_name=name,
            base_weight=f"{name}.weight",
            weight_transposed=layer.weight_transposed,
        )
    return rewrite(work, adapters)
