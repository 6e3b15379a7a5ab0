"""Where a model's weights come from during block-by-block calibration, and onloading them.

``Onloader(model, device, checkpoint)`` swaps every parameter and buffer of ``model`` for a
placeholder on ``device`` that holds no memory (a zero-stride view of one element), so that
the model can be captured without its weights resident. Calibration then ``load``s the
weights one block reads (placeholder ``.data`` set to the real tensor on ``device``) and
``release``s them after. Nothing is copied unless it has to move: a weight already on
``device`` in the dtype the graph uses is used as it is.

A weight's value comes from, in order: a ``ShardedCheckpoint`` (a Hugging Face directory's
safetensors files, read one tensor at a time), the model's own tensor when it is not on the
meta device, or the ``weights_map`` of the accelerate hook that offloaded it
(``cpu_offload``, ``disk_offload``, ``dispatch_model`` / ``device_map`` with offload).
accelerate's hooks are switched off while the graph is used, and everything (parameters,
buffers, hooks) is restored on exit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, first_line


class ShardedCheckpoint:
    """The safetensors weights of a Hugging Face model directory, read lazily by name.

    Only files inside the directory are read: an index entry naming another place (``..``,
    an absolute path, a symbolic link leading out) is refused, as is an index that is not
    one. The Hugging Face hub cache's own links are followed: a snapshot's files link to the
    ``blobs`` of the same repository (``models--org--name/snapshots/REV/f -> ../../blobs/H``).
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
            checked: dict[str, Path] = {}  # each file once
            for name, f in weight_map.items():
                if f not in checked:
                    checked[f] = _inside(directory, f, f"{index}: weight_map entry {name!r}")
            self.files = {name: checked[f] for name, f in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            single = _inside(directory, "model.safetensors", str(directory / "model.safetensors"))
            try:
                with safe_open(single, "pt") as f:
                    self.files = dict.fromkeys(f.keys(), single)
            except Exception as err:
                raise ModelLoadError(f"cannot read {single}: {first_line(err)}") from err
        else:
            raise ModelLoadError(
                f"{directory} has no safetensors weights (model.safetensors or its index): "
                "block-by-block loading reads them lazily"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each file opened once and closed after."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(path, "pt") as f:
                    for n in group:
                        out[n] = f.get_tensor(n)
            except Exception as err:  # a missing file, not safetensors, a name it lacks
                raise ModelLoadError(f"cannot read {path}: {first_line(err)}") from err
        return out


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> file."""
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:  # not JSON, or not an object
        reason = first_line(err) if not isinstance(err, AttributeError) else "not an object"
        raise ModelLoadError(f"cannot read {index}: {reason}") from err
    if not isinstance(weight_map, dict):
        raise ModelLoadError(
            f"{index} has no weight_map (an object of tensor name -> safetensors file)"
        )
    for name, f in weight_map.items():
        if not isinstance(f, str) or not f:
            raise ModelLoadError(
                f"{index}: weight_map entry {name!r} is {f!r}, not the name of a file"
            )
    return weight_map


def _inside(directory: Path, name: str, entry: str) -> Path:
    """``directory / name``, if that is a file inside ``directory`` (symbolic links followed;
    the hub cache's links to its blobs allowed); else a ``ModelLoadError`` naming ``entry``."""
    path = directory / name
    try:
        root, target = directory.resolve(), path.resolve()
    except (OSError, RuntimeError) as err:  # a loop of symbolic links
        raise ModelLoadError(f"{entry} -> {name!r}: {first_line(err)}") from err
    # The hub cache: REPO/snapshots/REV holds links to REPO/blobs/HASH.
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    inside = target.is_relative_to(root) or (blobs is not None and target.parent == blobs)
    if Path(name).is_absolute() or not inside:
        raise ModelLoadError(
            f"{entry} -> {name!r} leads outside {directory} ({target}): only files inside "
            "the model directory are read"
        )
    if not target.is_file():
        raise ModelLoadError(f"{entry} -> {name!r}: no such file in {directory}")
    return path


def _placeholder(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)


def _offload_source(module: nn.Module, local: str) -> torch.Tensor | None:
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    for h in hooks:
        weights = getattr(h, "weights_map", None)
        if weights is not None and getattr(h, "offload", False) and local in weights:
            return weights[local]
    return None


def has_offloaded_weights(model: nn.Module) -> bool:
    """Whether some weight of ``model`` is not resident (meta device, e.g. accelerate
    offload) or accelerate hooks move weights: then only block-by-block calibration runs."""
    return any(t.is_meta for t in _tensors(model)) or any(
        hasattr(m, "_hf_hook") for m in model.modules()
    )


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def execution_device(model: nn.Module) -> torch.device | None:
    """The device accelerate runs ``model`` on, if it dispatched it."""
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return None


class Onloader:
    """Placeholders in ``model`` while active; ``load`` / ``release`` a block's weights."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        checkpoint: ShardedCheckpoint | None = None,
    ) -> None:
        self.model, self.device, self.checkpoint = model, device, checkpoint
        # name -> (owning module, attribute, original tensor); every alias of a tied tensor
        self._slots: dict[str, tuple[nn.Module, str, torch.Tensor, bool]] = {}
        self._placeholders: dict[int, torch.Tensor] = {}  # id(original) -> placeholder
        self.names: dict[str, list[str]] = {}  # qualified name -> all names of that tensor
        self._resident: set[int] = set()  # ids of placeholders holding their real value

    @contextmanager
    def installed(self) -> Iterator[Onloader]:
        """Placeholders in, accelerate hooks off; all restored on exit."""
        with ExitStack() as stack:
            stack.enter_context(_hooks_off(self.model))
            self._install()
            stack.callback(self._restore)
            yield self

    def _install(self) -> None:
        aliases: dict[int, list[str]] = {}
        for path, m in self.model.named_modules(remove_duplicate=False):
            for attr, is_param in [(n, True) for n in m._parameters] + [
                (n, False) for n in m._buffers
            ]:
                t = (m._parameters if is_param else m._buffers)[attr]
                if t is None:
                    continue
                name = f"{path}.{attr}" if path else attr
                self._slots[name] = (m, attr, t, is_param)
                aliases.setdefault(id(t), []).append(name)
        for name, (m, attr, t, is_param) in self._slots.items():
            self.names[name] = aliases[id(t)]
            ph = self._placeholders.get(id(t))
            if ph is None:
                ph = _placeholder(t, self.device)
                if is_param:
                    ph = nn.Parameter(ph, requires_grad=False)
                self._placeholders[id(t)] = ph
            (m._parameters if is_param else m._buffers)[attr] = ph

    def _restore(self) -> None:
        for m, attr, t, is_param in self._slots.values():
            (m._parameters if is_param else m._buffers)[attr] = t

    def _placeholder_of(self, name: str) -> torch.Tensor:
        return self._placeholders[id(self._slots[name][2])]

    def _source(self, name: str) -> torch.Tensor | None:
        """The value of ``name`` from the model or its offload hook (None: neither has it)."""
        t = self._slots[name][2]
        if not t.is_meta:
            return t.detach()
        for alias in self.names[name]:
            owner_path, _, local = alias.rpartition(".")
            value = _offload_source(self.model.get_submodule(owner_path), local)
            if value is not None:
                return value
        return None

    def load(self, names: Iterable[str]) -> None:
        """Give the placeholders of ``names`` their real values on the device."""
        todo: dict[int, str] = {}  # one name per tensor not yet resident
        for name in names:
            ph = self._placeholder_of(name)
            if id(ph) not in self._resident:
                todo.setdefault(id(ph), name)
        stored: dict[str, str] = {}  # name -> its key in the checkpoint
        if self.checkpoint is not None:
            for name in todo.values():
                key = next((a for a in self.names[name] if a in self.checkpoint), None)
                if key is not None:
                    stored[name] = key
        read = self.checkpoint.read(stored.values()) if stored else {}  # each file once
        for name in todo.values():
            ph = self._placeholder_of(name)
            value = read[stored[name]] if name in stored else self._source(name)
            if value is None:
                raise ModelLoadError(
                    f"weight {name} is on the meta device and neither a checkpoint nor an "
                    "accelerate offload hook holds its value"
                )
            if tuple(value.shape) != tuple(ph.shape):
                raise ModelLoadError(
                    f"weight {name}: the checkpoint holds shape {tuple(value.shape)}, the "
                    f"model expects {tuple(ph.shape)}"
                )
            ph.data = value.to(device=self.device, dtype=ph.dtype)
            self._resident.add(id(ph))

    def release(self, names: Iterable[str]) -> None:
        """Back to placeholders: the block's weights are freed (or left with their owner)."""
        for name in names:
            ph = self._placeholder_of(name)
            if id(ph) in self._resident:
                self._resident.discard(id(ph))
                ph.data = _placeholder(ph, self.device)


@contextmanager
def _hooks_off(model: nn.Module) -> Iterator[None]:
    # accelerate wraps forward to move weights in and out; the graph calls the weights itself.
    wrapped = {
        m: m.__dict__["forward"]
        for m in model.modules()
        if hasattr(m, "_hf_hook") and "forward" in m.__dict__ and hasattr(m, "_old_forward")
    }
    for m in wrapped:
        m.forward = m._old_forward
    try:
        yield
    finally:
        for m, forward in wrapped.items():
            m.forward = forward
