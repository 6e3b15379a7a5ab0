"""``evagraph`` command line: ``evagraph compile MODEL --data CALIB -o OUTDIR``."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import random
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import click
from click.core import ParameterSource

from .errors import ConfigError, ConvergenceWarning, DataError, EvagraphError


def _split_patterns(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip()) or None


def _rgb(ctx: click.Context, param: click.Parameter, value: str | None):
    """``R,G,B`` -> three finite floats (a standard deviation: positive ones)."""
    if value is None:
        return None
    try:
        rgb = tuple(float(v) for v in value.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(math.isfinite(v) for v in rgb):
        raise click.BadParameter(f"expected three numbers R,G,B, got {value!r}")
    if param.name == "std" and min(rgb) <= 0:
        raise click.BadParameter(f"must be positive for every channel, got {value!r}")
    return rgb


def _setting_fields() -> list:
    """The settings on the command line: the fields of both settings dataclasses (budget and
    rho, fields of both, once), where each setting's name, type, default and help live."""
    from dataclasses import fields

    from .config import AdapterSettings, CalibrationSettings

    found: dict[str, object] = {}
    for cls in (CalibrationSettings, AdapterSettings):
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name not in found and f.metadata.get("cli") is not False:
                f = copy.copy(f)  # the dataclass's own field keeps its annotation
                f.type = hints[f.name]  # resolved, for the option's type
                found[f.name] = f
    return list(found.values())


def _settings_options(command):
    """Add one option per setting (see ``_setting_fields``)."""
    for f in reversed(_setting_fields()):
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        text = f.metadata["help"]
        optional = get_origin(f.type) in (Union, UnionType)
        kind = next(t for t in get_args(f.type) if t is not type(None)) if optional else f.type
        if kind is bool:
            option = click.option(
                flag, f.name, is_flag=True, flag_value=not f.default, default=f.default, help=text
            )
        elif get_origin(kind) is tuple:
            option = click.option(
                flag, f.name, multiple=True, callback=_split_patterns, metavar="PATTERN", help=text
            )
        else:
            choices = f.metadata.get("choices")
            option = click.option(
                flag, f.name, type=click.Choice(choices) if choices else kind, default=f.default,
                show_default=f.default is not None, help=text,
            )  # fmt: skip
        command = option(command)
    return command


class _UsageError(click.UsageError):
    """A usage mistake in one line (click prints the usage and a hint on lines above it)."""

    def show(self, file: Any = None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{where}", file=file, err=file is None)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if isinstance(err, _UsageError):
                raise
            raise _UsageError(err.format_message(), err.ctx) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evagraph")
def main() -> None:
    """evagraph: add EVA-initialised LoRA adapters to a PyTorch model.

    EVA (Explained Variance Adaptation) starts each LoRA adapter on the directions that carry
    the most activation variance of your calibration data, and moves rank to the layers
    where that variance is.
    """


@main.command("compile")
@click.argument("model")
@click.option(
    "--data",
    "data",
    default=None,
    type=click.Path(),
    help="Calibration data: .pt or .safetensors with a tensor or a dict of tensors "
    "(first dimension = samples; several tensors are passed as keyword inputs); text for a "
    "language model, tokenized with --tokenizer: .txt (documents separated by blank lines, "
    "or --one-per-line), .jsonl/.json/.csv/.parquet (the --text-column, or a 'messages' "
    "column of chat turns rendered with the tokenizer's chat template), or a directory "
    "written by datasets' save_to_disk; or a folder of images (class sub-folders fine; any "
    "format PIL reads), preprocessed as MODEL expects: a timm model's data config, a Hugging "
    "Face directory's image processor, else --image-size/--mean/--std.",
)
@click.option(
    "-o",
    "--output",
    "output",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for the adapted model, adapter.safetensors and report.json/.html. "
    "[default: MODEL.eva next to a model file or directory (model.pt2 -> model.eva), "
    "./NAME.eva for a timm name; model.eva-2, -3 ... if that one is taken]",
)
@_settings_options
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=int,
    help="Samples per calibration minibatch (under torchrun: the global minibatch, which "
    "each process runs a slice of).",
)
@click.option(
    "--tokenizer",
    default=None,
    type=click.Path(file_okay=False),
    help="Tokenizer directory for text --data (AutoTokenizer). [default: MODEL, when it is a "
    "Hugging Face model directory]",
)
@click.option(
    "--max-length",
    default=512,
    show_default=True,
    type=int,
    help="Text data: tokens per sample (longer documents are truncated; a batch is padded to "
    "its longest, and padding is left out of the statistics).",
)
@click.option(
    "--text-column",
    default="text",
    show_default=True,
    help="Text data: the column holding the documents (.jsonl/.json/.csv/.parquet/dataset).",
)
@click.option("--one-per-line", is_flag=True, help="Text data: a .txt holds one document per line.")
@click.option(
    "--pack",
    is_flag=True,
    help="Text data: join the documents (eos between them) and cut them into full "
    "--max-length samples, without padding.",
)
@click.option(
    "--num-samples",
    default=None,
    type=int,
    help="Text or image data: use at most this many samples (sequences, images; the first, "
    "or after --shuffle). [default: all]",
)
@click.option(
    "--shuffle",
    is_flag=True,
    help="Text or image data: take the documents or images in a random order drawn from --seed.",
)
@click.option(
    "--device",
    default=None,
    help="Where calibration runs: cpu, cuda, cuda:1 ... [default: cuda if available, else cpu]",
)
@click.option(
    "--fail-unconverged",
    is_flag=True,
    help="Exit with an error (writing nothing) if calibration ends before every adapted "
    "layer converged; by default that is a warning naming the layers.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Image folder: resize the shorter side to N and centre-crop N x N (for a timm model, "
    "overrides its input size).",
)
@click.option(
    "--mean",
    callback=_rgb,
    default=None,
    metavar="R,G,B",
    help="Image folder: per-channel mean to normalise with (e.g. 0.485,0.456,0.406).",
)
@click.option(
    "--std",
    callback=_rgb,
    default=None,
    metavar="R,G,B",
    help="Image folder: per-channel standard deviation (e.g. 0.229,0.224,0.225).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow MODEL to be a whole-module pickle, or a .pt2 archive with pickled, custom or "
    "opaque objects (loading them runs code from the file).",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow a Hugging Face MODEL directory, --tokenizer directory or image processor that "
    "ships its own code (auto_map in its config) to run it. Without it such code never runs "
    "and nothing asks on stdin.",
)
@click.option("--force", is_flag=True, help="Replace an existing, non-empty output directory.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pt2", "safetensors", "pickle", "peft"]),
    default=None,
    help="What to write besides the adapter files: pt2 (torch.export archive of the adapted "
    "model), pickle (torch.save), peft (a PEFT LoRA adapter: adapter_config.json + "
    "adapter_model.safetensors, for PeftModel.from_pretrained; the same A and B as "
    "adapter.safetensors, in PEFT's names and layout, which evagraph.apply_adapter does not "
    "read), or safetensors (nothing more). [default: pt2 for a .pt2 MODEL, pickle for a "
    "pickle, safetensors otherwise]",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Adapt from saved statistics (an eva_state.safetensors from an earlier compile) "
    "instead of calibrating: only allocation and initialisation run, so --data is not needed "
    "(except for --format pt2, which needs an example batch).",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Weights for a timm MODEL name (.safetensors or a torch state dict).",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Bound on the memory the model's weights may take at once (e.g. 600MB, 40GB). A "
    "model over it is calibrated block by block (one transformer layer or CNN stage at a "
    "time), a Hugging Face directory read from its safetensors one block at a time.",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Calibrate block by block whatever the model's size (see --max-memory).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted block-by-block calibration into the same OUTDIR from its "
    "last finished block (its progress is kept next to OUTDIR, in .OUTDIR.evagraph-work, "
    "each file checked against the digest recorded when it was written; one run at a time).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bars (evagraph's, transformers' and datasets'); warnings still show.",
)
@click.pass_context
def compile_cmd(ctx: click.Context, **opts) -> None:
    """Add EVA-initialised LoRA adapters to MODEL and write them to OUTDIR (-o; by default
    MODEL.eva next to MODEL, e.g. model.pt2 -> model.eva, or model.eva-2 ... if taken).

    MODEL is a torch.export archive (.pt2; recognised by content, whatever the suffix; not
    TorchScript), a local Hugging Face model directory
    (save_pretrained, safetensors weights), a timm model name (random init, or --checkpoint),
    or a torch.save'd module (only with --allow-pickle: unpickling runs code from the file).

    OUTDIR gets adapter.safetensors + adapter.json (re-apply with evagraph.apply_adapter),
    report.json with its picture report.html (+ report.png if matplotlib is installed; see
    `evagraph report`), and per --format the adapted model (model.pt2, model.pt) or a PEFT
    adapter.

    \b
    Under torchrun the calibration is data parallel (each process runs its slice of every
    minibatch; process 0 writes OUTDIR).

    \b
    Examples:
      evagraph compile model.pt2 --data calib.pt --budget 16 --rho 2   # -> model.eva/
      evagraph compile ./llama-dir --data tokens.safetensors --format pt2 -o out/
      evagraph compile ./llama-dir --data corpus.jsonl --max-length 512 -o out/
      evagraph compile resnet50 --checkpoint rn50.safetensors --data ./images --budget 8 -o out/
      torchrun --standalone --nproc_per_node 8 -m evagraph compile ./llama-dir \\
          --data tokens.safetensors --batch-size 64 --device cuda -o out/
    """
    for name in ("batch_size", "max_length", "num_samples"):
        if opts[name] is not None and opts[name] <= 0:
            raise click.BadParameter("must be positive", param_hint=f"--{name.replace('_', '-')}")
    if opts["data"] is None and opts["state"] is None:
        raise click.UsageError(
            "give calibration data (--data) or saved statistics (--state); for this model, "
            f"e.g.: {_data_example(opts['model'])}"
        )
    # A chosen OUTDIR is told once the model and data have loaded (most mistakes show there,
    # and a "writing to" line above an error would say something that did not happen).
    opts["announce"] = opts["output"] is None and os.environ.get("RANK", "0") == "0"
    if opts["output"] is None:
        opts["output"] = str(default_output(opts["model"], force=opts["force"]))
    # Settings the user gave: the others keep their defaults, or the saved state's (--state).
    opts["settings"] = {}
    for f in _setting_fields():
        value = opts.pop(f.name)
        if ctx.get_parameter_source(f.name) != ParameterSource.DEFAULT:
            opts["settings"][f.name] = value
    # Data options the user gave (refused for data they do not fit), as the readers' keywords.
    opts["data_options"] = {}
    for name in DATA_OPTIONS:
        value = opts.pop(name)
        if ctx.get_parameter_source(name) != ParameterSource.DEFAULT:
            opts["data_options"][name] = value
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so the temporary output is
    # removed; the default action would leave it behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    # evagraph reads nothing from stdin; a library that asks there (transformers asks whether
    # to run a directory's code) gets end-of-file, never an answer piped in.
    stdin, sys.stdin = sys.stdin, open(os.devnull)  # noqa: SIM115 (closed in finally)
    # Warnings as one line each, without the Python source line Python prints under them.
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        _compile(**opts)
    except (EvagraphError, ConvergenceWarning, FileExistsError, PermissionError) as err:
        if not _shown_here(err):
            sys.exit(1)
        where = _process_of(err)
        raise click.ClickException(f"{where}{err}") from err
    except KeyboardInterrupt:
        if _shown_here(None):
            click.echo(f"evagraph: interrupted; nothing was written{_resumable(opts)}", err=True)
        sys.exit(130)
    except _Terminated:
        if _shown_here(None):
            click.echo(f"evagraph: terminated; nothing was written{_resumable(opts)}", err=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdin.close()
        sys.stdin = stdin
        warnings.formatwarning = formatwarning
        _leave_process_group()


def _data_example(model: str) -> str:
    """The shortest working ``compile`` of ``model`` with data, as far as its files tell."""
    from .pt2 import input_shapes

    path = Path(model)
    run = f"evagraph compile {shlex.quote(model)}"
    if (path / "config.json").is_file():
        if (path / "preprocessor_config.json").is_file():
            return f"{run} --data ./images (a folder of images, preprocessed as {model} says)"
        return f"{run} --data corpus.txt (text documents, tokenized by {model}'s tokenizer)"
    shapes = input_shapes(path) if path.is_file() else {}
    if len(shapes) == 1:
        ((name, shape),) = shapes.items()
        dims = ", ".join("N" if i == 0 else str(d or 8) for i, d in enumerate(shape))
        return (
            f'python -c "import torch; torch.save(torch.randn({dims.replace("N", "64")}), '
            f"'calib.pt')\" && {run} --data calib.pt (your own samples of input {name}, "
            f"shape ({dims}), calibrate better than random ones)"
        )
    if not path.exists():  # a timm name
        return f"{run} --checkpoint weights.safetensors --data ./images (a folder of images)"
    return f"{run} --data calib.pt (a tensor of model inputs, first dimension = samples)"


# Options of the data readers (evagraph.data): text, images, and both.
DATA_OPTIONS = ("max_length", "text_column", "one_per_line", "pack", "image_size", "mean", "std")
DATA_OPTIONS += ("num_samples", "shuffle")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning on one line, labelled by whose it is: evagraph's own (``EvagraphWarning``)
    as ``evagraph: warning:``, another library's under that library's name."""
    from .errors import EvagraphWarning

    text = " ".join(str(message).split())
    if issubclass(category, EvagraphWarning):
        return f"evagraph: warning: {text}\n"
    parts = Path(filename).parts
    where = next(
        (parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("site-packages", "dist-packages")),
        Path(filename).stem,
    )
    return f"{where.removesuffix('.py')}: {category.__name__}: {text}\n"


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


def _shown_here(err: BaseException | None) -> bool:
    """Whether this process shows ``err``: under torchrun, process 0 shows what all processes
    share (settings, model, data errors), a process whose own slice failed shows that error
    (``distributed.Sync.settle`` marks it), and the others stay quiet."""
    from . import distributed

    sync = distributed.current() if "torch" in sys.modules else None
    if sync is None:
        return True
    if getattr(err, "evagraph_own_failure", False):
        return True
    return sync.main and not isinstance(err, distributed.PeerFailed)


def _quiet_libraries() -> None:
    """Progress bars and informational logs of the libraries evagraph calls, off (--quiet,
    and on every process but the first under torchrun)."""
    import logging

    for name in ("torch._export", "torch.export"):  # e.g. "dimension ... specialized"
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging

        logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported (text data)
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


def _process_of(err: BaseException) -> str:
    """``"process N: "`` for an error only process N met (its slice of the data), else ``""``."""
    if getattr(err, "evagraph_own_failure", False):
        return f"process {os.environ.get('RANK', '?')}: "
    return ""


def _leave_process_group() -> None:
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _work_dir(output: str) -> Path:
    """Where a block-by-block calibration into ``output`` keeps its activations and progress."""
    out = Path(output).absolute()
    return out.parent / f".{out.name}.evagraph-work"


def _progress_file(output: str) -> Path:
    """The file that makes a block-by-block calibration into ``output`` resumable (this
    process's, under torchrun: each keeps its own slices' activations). The sequential pass
    owns the layout of the work directory."""
    from .passes.sequential import resume_point

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return resume_point(_work_dir(output), int(os.environ.get("RANK", "0")) if world > 1 else None)


def _resumable(opts: dict) -> str:
    # Before the sequential pass is imported no calibration ran: nothing to look for (and an
    # interrupt during start-up should not wait for torch to import).
    if "evagraph.passes.sequential" in sys.modules and _progress_file(opts["output"]).is_file():
        return "; the finished blocks are saved: run the same command with --resume to go on"
    return ""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler (a BaseException, so no ``except Exception`` eats it)."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _compile(
    *, model, data, state, output, fmt, checkpoint, batch_size, device, seed, allow_pickle,
    force, quiet, fail_unconverged, trust_remote_code, settings, max_memory, sequential,
    resume, tokenizer, data_options, announce,
) -> None:  # fmt: skip
    # Heavy imports stay here so `--help` and flag errors answer at once.
    from dataclasses import fields

    import torch

    from . import distributed
    from .api import adapt, transform
    from .artifacts import save_adapter
    from .config import AdapterSettings, CalibrationSettings, parse_size, settings_from
    from .data import check_options
    from .errors import first_line
    from .io import (
        atomic_directory,
        check_checkpoint,
        disk_errors,
        hf_weight_bytes,
        load_model,
        zip_target,
    )
    from .passes.capture import export_program
    from .render import render_report
    from .runtime import resolve_device, to_device
    from .state import EvaState

    # Validate settings, device and flags before any slow loading.
    if state is not None:  # from saved statistics, only the adapter's settings apply
        fixed = sorted(set(settings) - {f.name for f in fields(AdapterSettings)})
        if fixed:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in fixed)
            raise ConfigError(
                f"{flags}: calibration setting(s), fixed by the saved statistics (--state); "
                "calibrate again (--data) to change them"
            )
        settings_from(settings, AdapterSettings)
    else:
        settings_from(settings, CalibrationSettings, AdapterSettings)
    device = resolve_device(device)
    sync = None
    if distributed.launched():  # under torchrun: data parallel, process 0 writes
        device = distributed.init_from_env(device)
        sync = distributed.current()
    main = sync is None or sync.main
    if not main:  # process 0 shows the progress
        _quiet_libraries()
    max_bytes = parse_size(max_memory, "--max-memory")
    if state is not None and (max_bytes or sequential or resume):
        raise ConfigError(
            "--max-memory, --sequential and --resume are for calibration, not --state"
        )
    # A Hugging Face directory over the bound is never loaded whole: a skeleton on the meta
    # device, its weights read from the directory one block at a time.
    on_disk = hf_weight_bytes(model)
    lazy = on_disk is not None and (sequential or resume or (max_bytes or on_disk) < on_disk)
    if lazy and fmt in ("pt2", "pickle"):
        raise ConfigError(
            f"--format {fmt} writes the whole model, which block-by-block calibration of a "
            "model directory never loads: use --format safetensors or peft (adapter files), "
            "then apply them to the model where it fits"
        )
    from .passes.sequential import check_unused, remove_work_dir

    work = _work_dir(output)
    if state is None and main:  # another run calibrating into OUTDIR: refused before loading
        check_unused(work)
    if resume and not _progress_file(output).is_file():
        raise ConfigError(
            f"--resume: no interrupted block-by-block calibration into {output} was found "
            f"({work} holds no finished block)"
        )
    check_checkpoint(model, checkpoint)
    _check_apart(
        output, MODEL=model, **{"--data": data, "--state": state, "--tokenizer": tokenizer,
        "--checkpoint": checkpoint},
    )  # fmt: skip
    if data is not None:  # options that do not fit the data, before any loading
        check_options(data, tokenizer, **data_options)
    elif data_options or tokenizer is not None:
        given = [f"--{k.replace('_', '-')}" for k in data_options]
        given += ["--tokenizer"] if tokenizer is not None else []
        raise ConfigError(f"{', '.join(given)}: options of --data, which was not given")
    if quiet:  # before loading: transformers draws a bar while it reads the weights
        _quiet_libraries()
    random.seed(seed)
    torch.manual_seed(seed)
    # Refuses a non-empty OUTDIR first. Under torchrun only process 0 writes.
    with atomic_directory(output, force=force) if main else contextlib.nullcontext() as tmp:
        module, kind = load_model(
            model, allow_pickle=allow_pickle, checkpoint=checkpoint,
            trust_remote_code=trust_remote_code, lazy=lazy,
        )  # fmt: skip
        # After the model: images are preprocessed as it expects (a Hugging Face directory's
        # image processor, a timm model's data config).
        batches = None
        if data is not None:
            with warnings.catch_warnings():
                if not main:  # process 0 shows them (skipped images)
                    warnings.simplefilter("ignore")
                batches = _calibration(
                    model, data, batch_size, model=module, tokenizer=tokenizer, seed=seed,
                    processor=_image_processor(model) if kind == "hf" else None,
                    default_tokenizer=model if (Path(model) / "config.json").is_file() else None,
                    trust_remote_code=trust_remote_code, **data_options,
                )  # fmt: skip
        # The first batch, for the export trace and --state's example (text and images are
        # read lazily).
        first = next(iter(batches)) if batches is not None else None
        if announce:
            click.echo(f"evagraph: writing to {output}", err=True)
        block = {
            "sequential": True if (sequential or resume) else None,
            "max_memory": max_bytes,
            "weights": model if lazy else None,
            "work_dir": work,
            "resume": resume,
        }
        fmt = fmt or {"pt2": "pt2", "pickle": "pickle"}.get(kind, "safetensors")
        if fmt == "pt2" and batches is None:
            raise ConfigError("--format pt2 needs --data: the export traces one example batch")
        written = ["adapter.safetensors", "adapter.json", "report.json"]
        if state is None:
            with warnings.catch_warnings():
                if not main:  # process 0 shows them
                    warnings.simplefilter("ignore")
                if fail_unconverged:  # the warning becomes the error, raised before writing
                    warnings.simplefilter("error", ConvergenceWarning)
                adapted, report, eva_state = transform(
                    module, batches, device=device, progress=not quiet, inplace=True,
                    return_state=True, **block, **settings,
                    fingerprint=_fingerprint(
                        model, data, batch_size, seed, tokenizer=tokenizer, **data_options
                    ),
                )  # fmt: skip
        else:
            module.to(device)
            example = to_device(first, device) if first is not None else None
            adapted, report = adapt(
                module, EvaState.load(state), example=example, inplace=True, **settings
            )
            eva_state = None
        if not main:
            return
        report.run.update(model=model, data=data)
        # Traced before writing, so a disk error below is only ever about the disk.
        program = export_program(adapted, to_device(first, device)) if fmt == "pt2" else None
        with disk_errors(output):
            if eva_state is not None:
                eva_state.save(tmp / "eva_state.safetensors")
                written.append("eva_state.safetensors")
            save_adapter(adapted, tmp, report.settings)
            report.save(tmp / "report.json")
            written += [path.name for path in render_report(report, tmp)]
            if program is not None:
                with zip_target(tmp / "model.pt2") as f:
                    torch.export.save(program, f)
                written.append("model.pt2")
            elif fmt == "pickle":
                with zip_target(tmp / "model.pt") as f:
                    try:
                        torch.save(adapted, f)
                    except (pickle.PicklingError, AttributeError, TypeError) as err:
                        raise ConfigError(  # e.g. a model loaded from a .pt2 (local lambdas)
                            f"--format pickle cannot save this model: {first_line(err, typed=True)}"
                        ) from err
                written.append("model.pt")
            elif fmt == "peft":
                from .peft import save_peft

                # the example batch: PEFT's wrappers must run the model (not under --state
                # without data, nor for a model whose weights were never loaded whole)
                save_peft(adapted, tmp, example=None if lazy else to_device(first, device))
                written += ["adapter_config.json", "adapter_model.safetensors"]
    remove_work_dir(work)  # the output is whole: nothing to resume (unless a run took it over)
    n_adapted = sum(1 for layer in report.layers if layer.rank)
    click.echo(
        f"adapted {n_adapted} layer(s), total rank {sum(report.ranks.values())}, "
        f"{report.steps} minibatch(es){'' if report.converged else ', NOT all converged'}; "
        f"wrote {Path(output)}/{{{', '.join(written)}}}"
    )


def _check_apart(output: str, **inputs: str | None) -> None:
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


def _calibration(model_path: str, data: str, batch_size: int, **reader: Any) -> Iterable:
    """``data`` in minibatches of ``batch_size`` (``evagraph.data.open_data``; ``reader``: its
    options), tensor data checked against a ``.pt2`` MODEL's input shapes. A program exported
    with a static batch dimension only runs batches of that size: they are used instead (told
    on stderr), and a smaller last batch is dropped."""
    from .data import open_data
    from .pt2 import check_batches, input_shapes, static_batch_size

    shapes = input_shapes(model_path) if Path(model_path).is_file() else {}
    static = static_batch_size(shapes)
    name = Path(model_path).name
    tell = os.environ.get("RANK", "0") == "0"  # under torchrun, process 0 tells
    if static is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # --batch-size is the global batch
        if batch_size != static * world:
            batch_size = static * world
            each = f" ({static} per process)" if world > 1 else ""
            if tell:
                click.echo(
                    f"evagraph: {name} was exported for batches of {static}: using "
                    f"--batch-size {batch_size}{each}",
                    err=True,
                )
    batches = open_data(data, batch_size, **reader)
    if not isinstance(batches, list):  # text, read lazily: not a .pt2's usual input
        return batches
    if static is not None:
        last = batches[-1]
        rows = (next(iter(last.values())) if isinstance(last, dict) else last).shape[0]
        if rows < batch_size and len(batches) == 1:
            raise DataError(
                f"{data} holds {rows} sample(s), fewer than one batch of {batch_size}, the "
                f"batch size {name} was exported for"
            )
        if rows < batch_size:
            batches.pop()
            if tell:
                click.echo(
                    f"evagraph: dropping the last {rows} sample(s): {name} takes batches of "
                    f"exactly {batch_size}",
                    err=True,
                )
    check_batches(model_path, shapes, batches)
    return batches


def _image_processor(model: str) -> str | None:
    """The Hugging Face MODEL directory, if it holds an image processor to load."""
    return model if (Path(model) / "preprocessor_config.json").is_file() else None


def _fingerprint(model: str, data: str, batch_size: int, seed: int, **data_options) -> dict:
    """What a resumed calibration must share with the interrupted one, besides settings."""

    def stamp(path: str) -> list:
        p = Path(path)
        return [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [path]

    found = {"model": stamp(model), "data": stamp(data), "batch_size": batch_size, "seed": seed}
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in data_options.items() if v}
    return {**found, **given}  # only the options given: earlier progress files still match


@main.command("report")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option(
    "--redraw",
    is_flag=True,
    help="Also write OUTDIR/report.html (and report.png with matplotlib) anew from "
    "report.json; without it nothing in OUTDIR is changed.",
)
def report_cmd(outdir: str, redraw: bool) -> None:
    """Show what a compile did: a table of OUTDIR/report.json.

    Prints one row per target layer in depth order (kind, in->out features, rank, the
    minibatch at which it converged, and the share of its input variance that its rank
    captures), then the skipped layers with their reasons. Reads only; --redraw rewrites
    OUTDIR/report.html (charts of rank, cumulative explained variance and convergence per
    layer; opens in any browser, no network needed) and OUTDIR/report.png if matplotlib is
    installed.

    \b
    Example:
      evagraph compile model.pt2 --data calib.safetensors -o out/
      evagraph report out/
    """

    from .render import render_report, report_table
    from .report import Report

    path = Path(outdir) / "report.json"
    if not path.is_file():
        raise click.ClickException(f"no report.json in {outdir} (evagraph compile writes one)")
    try:
        report = Report.load(path)
    except EvagraphError as err:
        raise click.ClickException(str(err)) from err
    click.echo(report_table(report))
    if not redraw:
        return
    try:
        written = render_report(report, outdir)
    except OSError as err:
        raise click.ClickException(f"cannot write the report pictures: {err}") from err
    click.echo(f"\nwrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    sys.exit(main())
