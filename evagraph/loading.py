"""Model files in: what MODEL names (a ``.pt2``, a Hugging Face directory, a GGUF file, a timm
name, a whole-module pickle), loaded without running code from it unless a flag says so."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .data.text import is_gguf
from .errors import ConfigError, EvagraphWarning, ModelLoadError, first_line
from .formats.pt2 import load_exported_program, zip_kind
from .quantized import load_config


def load_model(
    spec: str | Path,
    *,
    allow_pickle: bool = False,
    checkpoint: str | Path | None = None,
    trust_remote_code: bool = False,
    lazy: bool = False,
    quantize: str | None = None,
) -> tuple[nn.Module, str]:
    """Load MODEL; return (module, kind) with kind "pt2", "pickle", "hf", "gguf" or "timm".

    MODEL is a torch.export archive (told by its content, whatever its suffix: a graph of
    ATen ops, read by :func:`evagraph.formats.pt2.load_exported_program`: no code from the file
    runs), a local Hugging Face model directory (``save_pretrained``; safetensors weights), a
    GGUF file (llama.cpp's format, told by its magic bytes: transformers de-quantizes its
    weights to float32; needs the ``gguf`` package), a
    timm model name (random init, or ``checkpoint``: a local state dict), or a whole-module
    pickle, which executes code while loading and so is refused unless ``allow_pickle``
    (which also lets a ``.pt2`` hold pickles the safe unpickler refuses). A TorchScript
    archive is refused with the way to re-export it: torch's TorchScript-to-export converter
    would run its code, and needs example inputs.
    HF directories that ship their own modelling code (``auto_map``) need
    ``trust_remote_code``, and ``.bin`` (pickle) weights need ``allow_pickle``. With ``lazy``,
    a Hugging Face directory gives its model with every weight on the meta device (nothing
    read): block-by-block calibration reads them from the directory one block at a time.
    ``quantize`` ("nf4", "int8"): a Hugging Face directory is loaded with that bitsandbytes
    config (``quantized.load_config``).
    """
    check_checkpoint(spec, checkpoint)
    path = Path(spec)
    if path.is_dir():
        return _load_hf(path, allow_pickle, trust_remote_code, lazy, quantize), "hf"
    if not path.exists():
        import timm

        if timm.is_model(str(spec)):
            return _load_timm(str(spec), checkpoint), "timm"
        raise ModelLoadError(
            f"model not found: {spec} is neither a file, a directory, nor a timm model name"
        )
    if is_gguf(path):
        return _load_gguf(path), "gguf"
    kind = zip_kind(path)  # by content: a torch.export archive may be named model.pt
    if kind == "torchscript":
        raise ModelLoadError(
            f"{path} is a TorchScript archive (torch.jit.save), which evagraph does not load "
            "(its code would run): export the model instead, torch.export.save("
            "torch.export.export(model, (example,)), 'model.pt2')"
        )
    if kind == "pt2" or (kind is None and path.suffix == ".pt2"):
        program = load_exported_program(path, allow_pickle=allow_pickle)
        try:
            return program.module(), "pt2"
        except Exception as err:
            raise ModelLoadError(
                f"cannot load torch.export archive {path}: {first_line(err)}"
            ) from err
    return _load_pickle(path, allow_pickle), "pickle"


def check_checkpoint(spec: str | Path, checkpoint: str | Path | None) -> None:
    """Refuse ``checkpoint`` for a MODEL that is a file or directory (it has its own weights):
    silently ignoring it would adapt other weights than the user meant."""
    if checkpoint is not None and Path(spec).exists():
        kind = "directory" if Path(spec).is_dir() else "file"
        raise ModelLoadError(
            f"a checkpoint is for a timm model name, but {spec} is a {kind}: its weights are "
            "loaded from there"
        )


def _load_pickle(path: Path, allow_pickle: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe unpickler names the class it refused ("GLOBAL module.Class"); anything
        # else it fails on is a damaged file or not a torch.save file at all.
        if "GLOBAL" not in str(err):
            raise ModelLoadError(
                f"cannot read {path}: not a torch.save file, .pt2 archive, HF model directory "
                "or timm model name (or the file is damaged)"
            ) from err
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} holds pickled Python objects (e.g. a whole-module pickle from "
                "torch.save(model)): loading it runs code from the file. "
                "Pass --allow-pickle (allow_pickle=True) only if you trust it, or save the "
                "model with torch.export to a .pt2 archive."
            ) from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise ModelLoadError(f"cannot unpickle {path}: {_unpickle_hint(err2)}") from err2
    except Exception as err:
        reason = first_line(err)
        if path.stat().st_size == 0:
            reason = "it is an empty file (0 bytes)"
        raise ModelLoadError(f"cannot read {path}: {reason}") from err
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{path} holds a {type(obj).__name__}, not a model (a state_dict has no "
            "architecture): save it with torch.save(model) or torch.export"
        )
    return obj


def _unpickle_hint(err: Exception) -> str:
    """Why a whole-module pickle did not load, with what to do when its class is missing."""
    text = first_line(err)
    found = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", text)
    if found is None:
        return text
    cls, module = found.groups()
    # The error names this process's __main__ ("pytest.__main__" under python -m pytest).
    script = module.split(".")[-1] == "__main__"
    where = "the script that saved it (__main__)" if script else f"module {module}"
    return (
        f"its class {cls} was defined in {where}, which this process cannot import: put the "
        "class in a module on the Python path (import it when saving), or save the model with "
        "torch.export instead: torch.export.save(torch.export.export(model, (example,)), "
        "'model.pt2')"
    )


def _load_hf(
    path: Path,
    allow_pickle: bool,
    trust_remote_code: bool,
    lazy: bool = False,
    quantize: str | None = None,
) -> nn.Module:
    import transformers

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a directory without config.json: not a HF model")
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {err}") from err
    # Checked here, not left to transformers, which would prompt on stdin.
    if auto_map and not trust_remote_code:
        files = sorted({f"{str(v).split('.')[0]}.py" for v in auto_map.values()})
        raise ModelLoadError(
            f"{path} is a Hugging Face model with its own code ({', '.join(files)}, named by "
            "auto_map in config.json): loading it runs that code. Pass --trust-remote-code "
            "(trust_remote_code=True) only if you trust it"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        # Only a model class is called: config.json could name any of transformers' callables.
        if cls is not None and not (
            isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
        ):
            raise ModelLoadError(
                f"{path / 'config.json'} names architecture {arch!r}, which is not a "
                "transformers model class"
            )
        if auto_map:  # the model's own class, through the Auto class its code registered
            auto = next((k for k in auto_map if k.startswith("AutoModel")), "AutoModel")
            cls = getattr(transformers, auto)
        cls = cls or transformers.AutoModel
        if lazy:
            return _skeleton(cls, config).eval()
        # .bin weights are pickles: only with the same opt-in as whole-module pickles.
        model = cls.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            quantization_config=load_config(quantize) if quantize else None,
        )
    except (ModelLoadError, ConfigError):
        raise
    except Exception as err:
        raise ModelLoadError(
            f"cannot load HF model from {path}: {first_line(err)}"
            + ("" if allow_pickle else " (safetensors weights are required without --allow-pickle)")
        ) from err
    return model.eval()


def _load_gguf(path: Path) -> nn.Module:
    """The causal language model in the GGUF file ``path``, de-quantized to float32 by
    transformers (its architecture and config come from the file's metadata; no code runs)."""
    import transformers

    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError as err:
        raise ModelLoadError(
            f"{path} is a GGUF file: reading it needs the gguf package (pip install gguf)"
        ) from err
    try:
        # The folder as an absolute path: it becomes the model's name_or_path, which the PEFT
        # export writes as base_model_name_or_path ("." from a relative MODEL says nothing).
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.resolve().parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
    except Exception as err:
        raise ModelLoadError(f"cannot load GGUF model {path}: {first_line(err)}") from err
    return model.eval()


def _skeleton(cls: type, config) -> nn.Module:
    """The model of ``config`` with its weights on the meta device, in the config's dtype."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # buffers computed at init (rotary frequencies) stay real
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        for p in model.parameters():
            if p.is_meta and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


def _load_timm(name: str, checkpoint: str | Path | None) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False)
    if checkpoint is None:  # a name alone builds random weights: worth a line, not silence
        warnings.warn(
            f"{name} has no --checkpoint (checkpoint=): adapting timm's random initialisation, "
            "not trained weights",
            EvagraphWarning,
            stacklevel=3,
        )
    else:
        checkpoint = Path(checkpoint)
        try:
            if checkpoint.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(checkpoint))
            else:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            model.load_state_dict(state)
        except Exception as err:
            raise ModelLoadError(f"cannot load checkpoint {checkpoint} into {name}: {err}") from err
    return model.eval()
