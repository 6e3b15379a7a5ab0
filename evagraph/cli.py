"""``evagraph`` command line: ``evagraph compile MODEL --data CALIB -o OUTDIR``."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shlex
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import click
import torch
from click.core import ParameterSource

from . import distributed
from .api import adapt, transform
from .config import AdapterSettings, CalibrationSettings, cli_fields, parse_size, settings_from
from .data import check_options
from .data.text import is_gguf
from .errors import ConfigError, ConvergenceWarning, EvagraphError, EvagraphWarning
from .formats import WRITERS, default_format, write_outputs
from .formats.outdir import atomic_directory, check_apart, default_output
from .formats.pt2 import calibration_batches, input_shapes
from .loading import check_checkpoint, load_model
from .pipelines import blockwise, choose, read_lazily
from .render import render_report, report_table
from .report import Report
from .runtime import resolve_device, to_device
from .state import EvaState


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


def _settings_options(command):
    """Add one option per setting (``config.cli_fields``: name, type, default and help)."""
    for f in reversed(cli_fields()):
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
    # torchao (which transformers imports whenever it is installed) registers enums with
    # torch's pytree, which logs a deprecation per enum: noise the user can do nothing about,
    # between evagraph's own messages.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


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
    type=click.Path(),
    help="Tokenizer directory for text --data (AutoTokenizer), or a GGUF file holding one. "
    "[default: MODEL, when it is a Hugging Face model directory or a GGUF file]",
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
    type=click.Choice(list(WRITERS)),
    default=None,
    help="What to write besides the adapter files: pt2 (torch.export archive of the adapted "
    "model), pickle (torch.save), peft (a PEFT LoRA adapter: adapter_config.json + "
    "adapter_model.safetensors, for PeftModel.from_pretrained; the same A and B as "
    "adapter.safetensors, in PEFT's names and layout, which evagraph.apply_adapter does not "
    "read), or safetensors (nothing more). [default: pt2 for a .pt2 MODEL, pickle for a "
    "pickle, safetensors otherwise]",
)
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "int8"]),
    default=None,
    help="The adapters are for MODEL (a Hugging Face directory) loaded with this bitsandbytes "
    "quantization (nf4: 4-bit NormalFloat; int8: LLM.int8): calibrated in full precision, "
    "they are put on MODEL loaded quantized (on the CPU), which --format peft's check runs "
    "through PEFT's own bnb layers. Needs evagraph[quant].",
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
    (save_pretrained, safetensors weights), a GGUF file (llama.cpp's format, de-quantized to
    float32 by transformers; its tokenizer tokenizes text --data), a timm model name (random
    init, or --checkpoint),
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
    # Settings and data options the user gave: the others keep their defaults, or the saved
    # state's (--state); data options are refused for data they do not fit.
    opts["settings"] = _given(ctx, opts, [f.name for f in cli_fields()])
    opts["data_options"] = _given(ctx, opts, DATA_OPTIONS)
    job = _Job(**opts)
    with _as_command(job):
        _compile(job)


def _given(ctx: click.Context, opts: dict, names: Iterable[str]) -> dict:
    """The options ``names``, taken out of ``opts``, that the user gave (not defaults)."""
    values = {name: opts.pop(name) for name in names}
    return {
        k: v for k, v in values.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT
    }


@dataclass
class _Job:
    """One ``compile``: its options as parsed, then what is worked out from them."""

    model: str
    data: str | None
    state: str | None
    output: str
    fmt: str | None
    quantize: str | None
    checkpoint: str | None
    batch_size: int
    device: Any
    seed: int
    allow_pickle: bool
    force: bool
    quiet: bool
    fail_unconverged: bool
    trust_remote_code: bool
    settings: dict
    max_memory: str | int | None
    sequential: bool
    resume: bool
    tokenizer: str | None
    data_options: dict
    announce: bool
    main: bool = True  # this process writes (process 0 under torchrun)
    lazy: bool = False  # a model directory read block by block, never loaded whole

    @property
    def work_dir(self) -> Path:
        return blockwise.work_dir_for(self.output)


@contextlib.contextmanager
def _as_command(job: _Job) -> Iterator[None]:
    """Run a compile as a command: errors as one line and an exit code, SIGTERM as Ctrl-C,
    no stdin, warnings on one line; everything put back after."""
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so the temporary output is
    # removed; the default action would leave it behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    # evagraph reads nothing from stdin; a library that asks there (transformers asks whether
    # to run a directory's code) gets end-of-file, never an answer piped in.
    stdin, sys.stdin = sys.stdin, open(os.devnull)  # noqa: SIM115 (closed in finally)
    # Warnings as one line each, without the Python source line Python prints under them.
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        yield
    except (EvagraphError, ConvergenceWarning, FileExistsError, PermissionError) as err:
        if not distributed.shows(err):
            sys.exit(1)
        raise click.ClickException(f"{distributed.whose(err)}{err}") from err
    except KeyboardInterrupt:
        if distributed.shows(None):
            click.echo(f"evagraph: interrupted; nothing was written{_resumable(job)}", err=True)
        sys.exit(130)
    except _Terminated:
        if distributed.shows(None):
            click.echo(f"evagraph: terminated; nothing was written{_resumable(job)}", err=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdin.close()
        sys.stdin = stdin
        warnings.formatwarning = formatwarning
        distributed.leave()


def _resumable(job: _Job) -> str:
    if blockwise.resumable(job.work_dir):
        return "; the finished blocks are saved: run the same command with --resume to go on"
    return ""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler (a BaseException, so no ``except Exception`` eats it)."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _compile(job: _Job) -> None:
    """Check everything that can be checked before loading, load, calibrate (or adapt from
    --state), write OUTDIR whole, and say what was written."""
    device = _check_settings_and_device(job)
    _check_flags(job)
    random.seed(job.seed)
    torch.manual_seed(job.seed)
    # Refuses a non-empty OUTDIR first. Under torchrun only process 0 writes.
    outdir = atomic_directory(job.output, force=job.force) if job.main else contextlib.nullcontext()
    with outdir as tmp:
        module, kind, batches = _load(job)
        # The first batch, for the export trace and --state's example (text and images are
        # read lazily).
        first = next(iter(batches)) if batches is not None else None
        if job.announce:
            click.echo(f"evagraph: writing to {job.output}", err=True)
        fmt = job.fmt or default_format(kind)
        if WRITERS[fmt].needs_example and batches is None:
            raise ConfigError(f"--format {fmt} needs --data: the export traces one example batch")
        adapted, report, eva_state = _adapt(job, module, batches, first, device)
        if not job.main:
            return
        if job.quantize:
            del module, adapted  # the float model, freed before the quantized one loads
            adapted = _on_quantized(job, eva_state, report)
            device = torch.device("cpu")  # where it was loaded
        report.run.update(model=job.model, data=job.data)
        if kind == "gguf":  # the adapters are for the de-quantized weights, not the file's
            report.run["model_format"] = "GGUF, de-quantized to float32 by transformers"
        # the example batch: a format may run the model on it (not under --state without
        # data, nor for a model whose weights were never loaded whole)
        example = None if job.lazy else to_device(first, device)
        written = write_outputs(
            adapted, report, eva_state, tmp, fmt, example=example, shown=job.output
        )
    blockwise.remove_work_dir(job.work_dir)  # the output is whole: nothing to resume
    n_adapted = sum(1 for layer in report.layers if layer.rank)
    click.echo(
        f"adapted {n_adapted} layer(s), total rank {sum(report.ranks.values())}, "
        f"{report.steps} minibatch(es){'' if report.converged else ', NOT all converged'}; "
        f"wrote {Path(job.output)}/{{{', '.join(written)}}}"
    )


def _check_settings_and_device(job: _Job) -> torch.device:
    """The settings checked (from saved statistics only the adapter's apply), and the device
    this process computes on (joining the process group under torchrun)."""
    if job.state is not None:
        fixed = sorted(set(job.settings) - {f.name for f in fields(AdapterSettings)})
        if fixed:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in fixed)
            raise ConfigError(
                f"{flags}: calibration setting(s), fixed by the saved statistics (--state); "
                "calibrate again (--data) to change them"
            )
        settings_from(job.settings, AdapterSettings)
    else:
        settings_from(job.settings, CalibrationSettings, AdapterSettings)
    device = resolve_device(job.device)
    if distributed.launched():  # under torchrun: data parallel, process 0 writes
        device = distributed.init_from_env(device)
        job.main = distributed.current().main
    if not job.main:  # process 0 shows the progress
        _quiet_libraries()
    return device


def _check_flags(job: _Job) -> None:
    """Flags that contradict each other, the model, the data or OUTDIR: refused before any
    slow loading."""
    job.max_memory = parse_size(job.max_memory, "--max-memory")
    if job.state is not None and (job.max_memory or job.sequential or job.resume):
        raise ConfigError(
            "--max-memory, --sequential and --resume are for calibration, not --state"
        )
    # A Hugging Face directory over the bound is never loaded whole: a skeleton on the meta
    # device, its weights read from the directory one block at a time.
    job.lazy = read_lazily(
        job.model, sequential=job.sequential or job.resume, max_memory=job.max_memory
    )
    if job.lazy and job.settings.get("use_dora"):
        raise ConfigError(
            "--dora: DoRA's magnitudes are the norms of the base weights, which block-by-block "
            "calibration of a model directory never loads whole: adapt without --dora, or "
            "without --sequential / --max-memory where the model fits"
        )
    if job.lazy and job.fmt is not None and WRITERS[job.fmt].whole_model:
        raise ConfigError(
            f"--format {job.fmt} writes the whole model, which block-by-block calibration of a "
            "model directory never loads: use --format safetensors or peft (adapter files), "
            "then apply them to the model where it fits"
        )
    if job.quantize and not (Path(job.model).is_dir() and job.fmt in (None, "peft", "safetensors")):
        raise ConfigError(
            f"--quantize {job.quantize}: for a Hugging Face MODEL directory, with --format peft "
            "or safetensors (adapter files; a quantized model is not exported whole)"
        )
    if job.state is None and job.main:  # another run calibrating into OUTDIR: refused now
        blockwise.check_unused(job.work_dir)
    if job.resume and not blockwise.resumable(job.work_dir):
        raise ConfigError(
            f"--resume: no interrupted block-by-block calibration into {job.output} was found "
            f"({job.work_dir} holds no finished block)"
        )
    check_checkpoint(job.model, job.checkpoint)
    check_apart(
        job.output, MODEL=job.model, **{"--data": job.data, "--state": job.state,
        "--tokenizer": job.tokenizer, "--checkpoint": job.checkpoint},
    )  # fmt: skip
    if job.data is not None:  # options that do not fit the data, before any loading
        check_options(job.data, job.tokenizer, **job.data_options)
    elif job.data_options or job.tokenizer is not None:
        given = [f"--{k.replace('_', '-')}" for k in job.data_options]
        given += ["--tokenizer"] if job.tokenizer is not None else []
        raise ConfigError(f"{', '.join(given)}: options of --data, which was not given")
    if job.quiet:  # before loading: transformers draws a bar while it reads the weights
        _quiet_libraries()


def _load(job: _Job) -> tuple[torch.nn.Module, str, Any]:
    """The model (its kind: ``load_model``'s) and the calibration batches (None: --state
    without --data). Images are preprocessed as the model expects (a Hugging Face
    directory's image processor, a timm model's data config), so the model comes first."""
    module, kind = load_model(
        job.model, allow_pickle=job.allow_pickle, checkpoint=job.checkpoint,
        trust_remote_code=job.trust_remote_code, lazy=job.lazy,
    )  # fmt: skip
    if job.data is None:
        return module, kind, None
    tell = os.environ.get("RANK", "0") == "0"  # under torchrun, process 0 tells
    with warnings.catch_warnings():
        if not job.main:  # process 0 shows them (skipped images)
            warnings.simplefilter("ignore")
        batches = calibration_batches(
            job.model, job.data, job.batch_size, model=module, tokenizer=job.tokenizer,
            seed=job.seed, processor=_image_processor(job.model) if kind == "hf" else None,
            default_tokenizer=job.model if kind in ("hf", "gguf") else None,
            trust_remote_code=job.trust_remote_code,
            world=int(os.environ.get("WORLD_SIZE", "1")),  # --batch-size is the global batch
            tell=(lambda text: click.echo(text, err=True)) if tell else None,
            **job.data_options,
        )  # fmt: skip
    return module, kind, batches


def _adapt(
    job: _Job, module: torch.nn.Module, batches: Any, first: Any, device: torch.device
) -> tuple[torch.nn.Module, Report, EvaState | None]:
    """Calibrate and adapt ``module`` in place (``transform``), or adapt it from --state."""
    if job.state is not None:
        module.to(device)
        example = to_device(first, device) if first is not None else None
        state = EvaState.load(job.state)
        adapted, report = adapt(module, state, example=example, inplace=True, **job.settings)
        return adapted, report, None
    with warnings.catch_warnings():
        if not job.main:  # process 0 shows them
            warnings.simplefilter("ignore")
        if job.fail_unconverged:  # the warning becomes the error, raised before writing
            warnings.simplefilter("error", ConvergenceWarning)
        pipeline = choose(
            module, sequential=True if (job.sequential or job.resume) else None,
            max_memory=job.max_memory, weights=job.model if job.lazy else None,
            work_dir=job.work_dir, resume=job.resume,
            fingerprint=_fingerprint(job.model, job.data, job.batch_size, job.seed,
                                     tokenizer=job.tokenizer, **job.data_options),
        )  # fmt: skip
        return transform(
            module, batches, device=device, progress=not job.quiet, inplace=True,
            return_state=True, pipeline=pipeline, **job.settings,
        )  # fmt: skip


def _on_quantized(job: _Job, state: EvaState | None, report: Report) -> torch.nn.Module:
    """--quantize: MODEL loaded quantized, on the CPU, with the adapters that ``state`` (the
    float model's statistics; --state's without it) gives: the float model's own A, B and
    ranks, since an adapter fits a quantized base as it does the float one."""
    base, _ = load_model(
        job.model, allow_pickle=job.allow_pickle, trust_remote_code=job.trust_remote_code,
        quantize=job.quantize,
    )  # fmt: skip
    state = state if state is not None else EvaState.load(job.state)
    names = {f.name for f in fields(AdapterSettings)}
    settings = {k: v for k, v in job.settings.items() if k in names}
    adapted, _ = adapt(base, state, inplace=True, **settings)
    report.run["quantize"] = job.quantize
    return adapted


def _data_example(model: str) -> str:
    """The shortest working ``compile`` of ``model`` with data, as far as its files tell."""
    path = Path(model)
    run = f"evagraph compile {shlex.quote(model)}"
    if is_gguf(path):
        return f"{run} --data corpus.txt (text documents, tokenized by the file's tokenizer)"
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
    text = " ".join(str(message).split())
    if issubclass(category, EvagraphWarning):
        return f"evagraph: warning: {text}\n"
    parts = Path(filename).parts
    where = next(
        (parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("site-packages", "dist-packages")),
        Path(filename).stem,
    )
    return f"{where.removesuffix('.py')}: {category.__name__}: {text}\n"


def _quiet_libraries() -> None:
    """Progress bars and informational logs of the libraries evagraph calls, off (--quiet,
    and on every process but the first under torchrun)."""
    for name in ("torch._export", "torch.export"):  # e.g. "dimension ... specialized"
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported (text data)
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


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
