"""Where ``compile`` writes, and writing it: OUTDIR's default place, apart from the inputs,
written whole or not at all (``atomic_directory``), and a full disk as one line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, OutputError


def default_output(model: str, *, force: bool = False) -> Path:
    """Where ``compile MODEL`` writes without ``-o``: ``MODEL.eva`` beside a model file (its
    suffix replaced: ``model.pt2`` -> ``model.eva``) or directory (``./my-llama`` ->
    ``./my-llama.eva``), ``./NAME.eva`` in the current directory for a timm name.

    An existing output is never replaced by default: if that directory exists and is not
    empty, the first free one of ``model.eva-2``, ``model.eva-3`` ... is taken (so a rerun
    keeps the earlier result, and ``--resume`` finds the run it continues, which was writing
    to the first free one too). With ``force`` it is ``model.eva`` itself, replaced.
    """
    path = Path(model)
    if path.is_file():
        base = path.with_name(f"{path.stem}.eva")
    elif path.is_dir():
        path = path if path.name not in ("", ".", "..") else path.resolve()
        base = path.with_name(f"{path.name}.eva")
    else:  # a timm name ("resnet18", "hf-hub:org/model"): no path separators in the name
        base = Path(f"{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.eva")
    if force:
        return base
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_apart(output: str, **inputs: str | None) -> None:
    """Refuse an OUTDIR that is, contains or lies inside one of the ``inputs`` (by the flag
    that named it): ``--force`` replaces OUTDIR whole, so an input inside it would be deleted,
    and an output inside an input directory (an image folder, a model directory) changes it."""
    out = Path(os.path.realpath(output))
    for flag, given in inputs.items():
        if given is None or not os.path.lexists(given):
            continue  # a timm name, or a missing file reported where it is read
        path = Path(os.path.realpath(given))
        if path == out or out in path.parents:
            where = "is" if path == out else "contains"
            raise ConfigError(
                f"output directory {output} {where} {flag} {given}: --force would delete it; "
                "give another -o"
            )
        if path in out.parents:
            raise ConfigError(
                f"output directory {output} is inside {flag} {given}: give a -o outside it"
            )


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
