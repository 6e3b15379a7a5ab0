"""Model files in and compile outputs out: loading safely, writing nothing half-way."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, OutputError


def load_model(
    spec: str | Path,
    *,
    allow_pickle: bool = False,
    checkpoint: str | Path | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, str]:
    """Load MODEL; return (module, kind) with kind "pt2", "pickle", "hf" or "timm".

    MODEL is a ``.pt2`` torch.export archive (a graph of ATen ops: no code from the file
    runs), a local Hugging Face model directory (``save_pretrained``; safetensors weights), a
    timm model name (random init, or ``checkpoint``: a local state dict), or a whole-module
    pickle, which executes code while loading and so is refused unless ``allow_pickle``.
    HF directories that ship their own modelling code (``auto_map``) need
    ``trust_remote_code``, and ``.bin`` (pickle) weights need ``allow_pickle``.
    """
    path = Path(spec)
    if path.is_dir():
        return _load_hf(path, allow_pickle, trust_remote_code), "hf"
    if not path.exists():
        import timm

        if timm.is_model(str(spec)):
            return _load_timm(str(spec), checkpoint), "timm"
        raise ModelLoadError(
            f"model not found: {spec} is neither a file, a directory, nor a timm model name"
        )
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module(), "pt2"
        except Exception as err:
            raise ModelLoadError(f"cannot load torch.export archive {path}: {err}") from err
    return _load_pickle(path, allow_pickle), "pickle"


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
            raise ModelLoadError(f"cannot unpickle {path}: {err2}") from err2
    except Exception as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{path} holds a {type(obj).__name__}, not a model (a state_dict has no "
            "architecture): save it with torch.save(model) or torch.export"
        )
    return obj


def _load_hf(path: Path, allow_pickle: bool, trust_remote_code: bool) -> nn.Module:
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
        cls = getattr(transformers, arch, None) if arch else None
        if auto_map:  # the model's own class, through the Auto class its code registered
            auto = next((k for k in auto_map if k.startswith("AutoModel")), "AutoModel")
            cls = getattr(transformers, auto)
        cls = cls or transformers.AutoModel
        # .bin weights are pickles: only with the same opt-in as whole-module pickles.
        model = cls.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as err:
        raise ModelLoadError(
            f"cannot load HF model from {path}: {str(err).strip().splitlines()[0]}"
            + ("" if allow_pickle else " (safetensors weights are required without --allow-pickle)")
        ) from err
    return model.eval()


def _load_timm(name: str, checkpoint: str | Path | None) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False)
    if checkpoint is not None:
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


@contextmanager
def atomic_directory(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` only if the block succeeds.

    Refuses a ``target`` that exists and is not empty unless ``force``. On any error (or
    KeyboardInterrupt) the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"output {target} exists and is not an empty directory (use --force)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:
        blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else f"{err.strerror or err} ({err.filename})"
        raise OutputError(f"cannot write output directory {target}: {reason}") from err
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(tmp, target)
            if backup.is_dir():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink()
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
