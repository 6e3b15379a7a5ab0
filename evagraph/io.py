"""Model files in and compile outputs out: loading safely, writing nothing half-way."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from .errors import EvagraphWarning, ModelLoadError, OutputError, first_line
from .pt2 import load_exported_program


def load_model(
    spec: str | Path,
    *,
    allow_pickle: bool = False,
    checkpoint: str | Path | None = None,
    trust_remote_code: bool = False,
    lazy: bool = False,
) -> tuple[nn.Module, str]:
    """Load MODEL; return (module, kind) with kind "pt2", "pickle", "hf" or "timm".

    MODEL is a torch.export archive (told by its content, whatever its suffix: a graph of
    ATen ops, read by :func:`evagraph.pt2.load_exported_program`: no code from the file
    runs), a local Hugging Face model directory (``save_pretrained``; safetensors weights), a
    timm model name (random init, or ``checkpoint``: a local state dict), or a whole-module
    pickle, which executes code while loading and so is refused unless ``allow_pickle``
    (which also lets a ``.pt2`` hold pickles the safe unpickler refuses). A TorchScript
    archive is refused with the way to re-export it: torch's TorchScript-to-export converter
    would run its code, and needs example inputs.
    HF directories that ship their own modelling code (``auto_map``) need
    ``trust_remote_code``, and ``.bin`` (pickle) weights need ``allow_pickle``. With ``lazy``,
    a Hugging Face directory gives its model with every weight on the meta device (nothing
    read): block-by-block calibration reads them from the directory one block at a time.
    """
    check_checkpoint(spec, checkpoint)
    path = Path(spec)
    if path.is_dir():
        return _load_hf(path, allow_pickle, trust_remote_code, lazy), "hf"
    if not path.exists():
        import timm

        if timm.is_model(str(spec)):
            return _load_timm(str(spec), checkpoint), "timm"
        raise ModelLoadError(
            f"model not found: {spec} is neither a file, a directory, nor a timm model name"
        )
    kind = _zip_kind(path)  # by content: a torch.export archive may be named model.pt
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


def _zip_kind(path: Path) -> str | None:
    """What the zip archive ``path`` holds, told by its entries (all under one top folder):
    ``"pt2"`` (torch.export.save: ``archive_format``, or the old format's
    ``serialized_exported_program.json``), ``"torchscript"`` (torch.jit.save: ``code/``,
    ``constants.pkl``), ``"pickle"`` (torch.save: ``data.pkl``); None for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:  # reads only the zip's directory
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):  # damaged
        return None
    prefix = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
    if f"{prefix}archive_format" in names or any(
        n.endswith("serialized_exported_program.json") for n in names
    ):
        return "pt2"
    if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
        return "torchscript"
    return "pickle" if f"{prefix}data.pkl" in names else None


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


def hf_weight_bytes(path: str | Path) -> int | None:
    """Bytes of a Hugging Face directory's safetensors weights (None: not such a directory)."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _load_hf(
    path: Path, allow_pickle: bool, trust_remote_code: bool, lazy: bool = False
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
        )
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"cannot load HF model from {path}: {first_line(err)}"
            + ("" if allow_pickle else " (safetensors weights are required without --allow-pickle)")
        ) from err
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


# Temporary and replaced output directories are named after the process that made them, so a
# later compile can remove those a killed process left (.OUT.tmp-HOST-PID-xxxxxxxx).
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"
_LEFTOVER = r"\.{name}\.(?:tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+"


@contextmanager
def atomic_directory(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` only if the block succeeds.

    Refuses a ``target`` that exists and is not empty unless ``force`` (``FileExistsError``),
    and with an ``OutputError``: the current directory or one above it (``.``, ``..``), a
    mount point, and a ``target`` that another process filled while the block ran (without
    ``force``; its output is left as it was). The final move is one ``rename``, which only
    succeeds onto a missing or empty directory. A symlinked ``target`` is written where it
    points. On any error (or KeyboardInterrupt) the temporary directory is removed and
    ``target`` is left as it was; leftovers of killed processes are removed on the next run.
    Files and directories get the permissions the user's umask gives.
    """
    shown = Path(target)
    try:  # through symlinks, "." and ".."; a symlink loop can never be written
        target = Path(os.path.realpath(shown, strict=os.path.islink(shown)))
    except FileNotFoundError:  # a symlink to a directory that does not exist yet
        target = Path(os.path.realpath(shown))
    except OSError as err:
        raise OutputError(
            f"cannot write output directory {shown}: {err.strerror or err} (a symlink loop?)"
        ) from err
    if target == Path(os.getcwd()) or target in Path(os.getcwd()).parents:
        raise OutputError(
            f"output directory {shown} is the current directory or contains it: "
            "give a new directory"
        )
    if os.path.ismount(target):
        raise OutputError(
            f"output directory {shown} is a mount point, which cannot be replaced: "
            "give a directory inside it"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"output {shown} exists and is not an empty directory (use --force)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=_owned_name(target, "tmp"), dir=target.parent))
    except OSError as err:
        blocker = next((p for p in shown.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else f"{err.strerror or err} ({err.filename})"
        raise OutputError(f"cannot write output directory {shown}: {reason}") from err
    try:
        yield tmp
        try:
            _apply_umask(tmp)
        except OSError as err:
            raise OutputError(f"cannot set permissions in {tmp}: {err.strerror or err}") from err
        _move_into_place(tmp, target, shown, force)
    finally:
        _remove(tmp)


def _move_into_place(tmp: Path, target: Path, shown: Path, force: bool) -> None:
    """rename(tmp, target); with ``force`` whatever is at ``target`` is moved aside first."""
    backups: list[Path] = []
    placed = False
    try:
        for _ in range(3):  # with force, another run may put its output back in between
            if force and os.path.lexists(target):
                backup = target.with_name(f"{_owned_name(target, 'old')}{secrets.token_hex(4)}")
                try:
                    os.rename(target, backup)
                    backups.append(backup)
                except FileNotFoundError:  # moved away by another run meanwhile
                    pass
            try:
                os.rename(tmp, target)  # atomic; fails unless target is missing or empty
                placed = True
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) or not force:
                    raise
        raise OutputError(f"cannot replace output {shown}: other processes keep writing it")
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise OutputError(
                f"output {shown} was written by another process meanwhile; left it as it is "
                "(use --force to replace it)"
            ) from err
        if err.errno in (errno.EBUSY, errno.EXDEV):
            reason = "it is a mount point or on another file system"
        else:
            reason = err.strerror or str(err)
        raise OutputError(f"cannot move the output into {shown}: {reason}") from err
    finally:
        if not placed and backups and not os.path.lexists(target):
            # Failed or interrupted between the two renames: put the previous output back.
            with contextlib.suppress(OSError):
                os.rename(backups.pop(), target)
        for backup in backups:
            _remove(backup)


def _owned_name(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{_HOST}-{os.getpid()}-"


def _remove_leftovers(target: Path) -> None:
    """Remove the temporary/replaced directories of ``target`` that dead processes left."""
    pattern = re.compile(_LEFTOVER.format(name=re.escape(target.name)))
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            _remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; an absurd PID
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _umask() -> int:
    # /proc avoids setting the umask to read it, which would race with other threads.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the permissions the user's umask gives new files.

    Writers differ (mkdtemp makes 0700, safetensors writes 0600): without this, some outputs
    would be private and others not.
    """
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


# -- writing: torch's zip writer and safetensors on a full disk ------------------------


@contextlib.contextmanager
def disk_errors(output: str) -> Iterator[None]:
    """A write that fails (disk full, quota, read-only) -> one-line ``OutputError``."""
    from safetensors import SafetensorError

    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        name = f" ({Path(err.filename).name})" if err.filename else ""
        raise OutputError(f"cannot write output {output}{name}: {err.strerror or err}") from err
    except SafetensorError as err:
        # safetensors reports the OS error as text: "...: I/O error: No space left on device"
        _, io_error, reason = str(err).partition("I/O error: ")
        if not io_error:
            raise
        raise OutputError(f"cannot write output {output}: {reason}") from err


class _FirstWriteError(io.RawIOBase):
    """A file for torch's zip writer (``torch.save``, ``torch.export.save``) that never raises.

    Given a path, that C++ writer turns a failed write (ENOSPC) into a meaningless
    "unexpected pos" error, then writes again from its destructor, where the error aborts the
    process (exit 134). Here the first ``OSError`` is kept, later writes are dropped, and
    ``zip_target`` raises the real error once torch is done.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as err:
                self.error = err
        return memoryview(data).nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.error is None:
            try:
                return self.file.seek(offset, whence)
            except OSError as err:
                self.error = err
        return 0

    def tell(self) -> int:
        return self.file.tell()


@contextlib.contextmanager
def zip_target(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for torch's zip writer; raise the first ``OSError`` any write hit."""
    with open(path, "wb") as file:
        guarded = _FirstWriteError(file)
        yield guarded  # type: ignore[misc]
        if guarded.error is None:
            file.flush()  # a full disk may show only here
    if guarded.error is not None:
        raise guarded.error
