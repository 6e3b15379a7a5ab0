"""``evagraph`` command line: ``evagraph compile MODEL --data CALIB -o OUTDIR``."""

from __future__ import annotations

import contextlib
import io
import pickle
import random
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from .errors import ConfigError, ConvergenceWarning, EvagraphError, OutputError


def _patterns(values: tuple[str, ...]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    type=click.Path(dir_okay=False),
    help="Calibration data: .pt or .safetensors with a tensor or a dict of tensors "
    "(first dimension = samples; several tensors are passed as keyword inputs).",
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the adapted model, adapter.safetensors and report.json/.html.",
)
@click.option(
    "--budget",
    default=8,
    show_default=True,
    type=int,
    help="Average LoRA rank per target layer (r); the global budget is r x layers.",
)
@click.option(
    "--rho",
    default=2.0,
    show_default=True,
    type=float,
    help="Rank redistribution: a layer may take up to round(r x rho); 1 = uniform.",
)
@click.option(
    "--tau",
    default=0.99,
    show_default=True,
    type=float,
    help="Cosine similarity at which components count as converged, in (0, 1].",
)
@click.option("--alpha", default=8.0, show_default=True, type=float, help="LoRA alpha.")
@click.option(
    "--no-adjust-scaling",
    is_flag=True,
    help="Scale adapters by alpha/rank instead of alpha/r (the authors' variant).",
)
@click.option(
    "--no-label-mask",
    "no_label_mask",
    is_flag=True,
    help="Keep rows whose labels are -100 (by default they are left out, as in PEFT).",
)
@click.option("--whiten", is_flag=True, help="Divide A's rows by sqrt of their singular values.")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="LoRA dropout.")
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=int,
    help="Samples per calibration minibatch.",
)
@click.option(
    "--device",
    default=None,
    help="Where calibration runs: cpu, cuda, cuda:1 ... [default: cuda if available, else cpu]",
)
@click.option(
    "--targets",
    multiple=True,
    help="Glob(s) of layer names to adapt, e.g. '*.q_proj' (repeatable or comma-separated).",
)
@click.option("--exclude", multiple=True, help="Glob(s) of layer names never to adapt.")
@click.option(
    "--max-steps",
    default=None,
    type=int,
    help="Bound on calibration minibatches; unconverged layers are reported.",
)
@click.option(
    "--min-batches",
    default=1,
    show_default=True,
    type=int,
    help="Minibatches a layer must see before it may count as converged.",
)
@click.option(
    "--fail-unconverged",
    is_flag=True,
    help="Exit with an error (writing nothing) if calibration ends before every adapted "
    "layer converged; by default that is a warning naming the layers.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow MODEL to be a whole-module pickle (runs code from the file).",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow a Hugging Face MODEL directory that ships its own modelling code (auto_map "
    "in config.json) to run it.",
)
@click.option("--force", is_flag=True, help="Replace an existing, non-empty output directory.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pt2", "safetensors", "pickle", "peft"]),
    default=None,
    help="What to write besides the adapter files: pt2 (torch.export archive of the adapted "
    "model), pickle (torch.save), peft (a PEFT LoRA adapter: adapter_config.json + "
    "adapter_model.safetensors, for PeftModel.from_pretrained), or safetensors (nothing "
    "more). [default: pt2 for a .pt2 MODEL, pickle for a pickle, safetensors otherwise]",
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
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compile_cmd(**opts) -> None:
    """Add EVA-initialised LoRA adapters to MODEL and write them to OUTDIR.

    MODEL is a .pt2 torch.export archive, a local Hugging Face model directory
    (save_pretrained, safetensors weights), a timm model name (random init, or --checkpoint),
    or a torch.save'd module (only with --allow-pickle: unpickling runs code from the file).

    OUTDIR gets adapter.safetensors + adapter.json (re-apply with evagraph.apply_adapter),
    report.json with its picture report.html (+ report.png if matplotlib is installed; see
    `evagraph report`), and per --format the adapted model (model.pt2, model.pt) or a PEFT
    adapter.

    \b
    Examples:
      evagraph compile model.pt2 --data calib.safetensors --budget 16 --rho 2 -o out/
      evagraph compile ./llama-dir --data tokens.safetensors --format pt2 -o out/
      evagraph compile resnet18 --checkpoint rn18.safetensors --data images.pt -o out/
    """
    if opts["batch_size"] <= 0:
        raise click.BadParameter("must be positive", param_hint="--batch-size")
    if opts["data"] is None and opts["state"] is None:
        raise click.UsageError("give calibration data (--data) or saved statistics (--state)")
    opts["targets"] = _patterns(opts["targets"]) or None
    opts["exclude"] = _patterns(opts["exclude"])
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so the temporary output is
    # removed; the default action would leave it behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _compile(**opts)
    except (EvagraphError, ConvergenceWarning, FileExistsError, PermissionError) as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        click.echo("evagraph: interrupted; nothing was written", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("evagraph: terminated; nothing was written", err=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler (a BaseException, so no ``except Exception`` eats it)."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _compile(
    *, model, data, state, output, fmt, checkpoint, batch_size, device, seed, allow_pickle,
    force, quiet, no_adjust_scaling, no_label_mask, fail_unconverged, trust_remote_code,
    **settings
) -> None:  # fmt: skip
    # Heavy imports stay here so `--help` and flag errors answer at once.
    import torch

    from .api import adapt, transform
    from .artifacts import save_adapter
    from .config import EvaSettings
    from .data import load_calibration, resolve_device, to_device
    from .io import atomic_directory, load_model
    from .passes.capture import _first_line, export_program
    from .render import render_report
    from .state import EvaState

    settings["adjust_scaling_factors"] = not no_adjust_scaling
    settings["use_label_mask"] = not no_label_mask
    # Validate settings, device and flags before any slow loading.
    EvaSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    device = resolve_device(device)
    if checkpoint is not None and Path(model).exists():
        kind = "directory" if Path(model).is_dir() else "file"
        raise ConfigError(
            f"--checkpoint is for a timm model name, but {model} is a {kind}: "
            "its weights are loaded from there"
        )
    random.seed(seed)
    torch.manual_seed(seed)
    with atomic_directory(output, force=force) as tmp:  # refuses a non-empty OUTDIR first
        batches = load_calibration(data, batch_size) if data is not None else None
        module, kind = load_model(
            model, allow_pickle=allow_pickle, checkpoint=checkpoint,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        fmt = fmt or {"pt2": "pt2", "pickle": "pickle"}.get(kind, "safetensors")
        if fmt == "pt2" and batches is None:
            raise ConfigError("--format pt2 needs --data: the export traces one example batch")
        written = ["adapter.safetensors", "adapter.json", "report.json"]
        if state is None:
            with warnings.catch_warnings():
                if fail_unconverged:  # the warning becomes the error, raised before writing
                    warnings.simplefilter("error", ConvergenceWarning)
                adapted, report, eva_state = transform(
                    module, batches, device=device, progress=not quiet, inplace=True,
                    return_state=True, **settings,
                )  # fmt: skip
        else:
            keys = ("budget", "rho", "alpha", "whiten", "dropout", "adjust_scaling_factors")
            module.to(device)
            example = to_device(batches[0], device) if batches else None
            adapted, report = adapt(
                module, EvaState.load(state), example=example, inplace=True,
                **{k: settings[k] for k in keys},
            )  # fmt: skip
            eva_state = None
        # Traced before writing, so a disk error below is only ever about the disk.
        program = export_program(adapted, to_device(batches[0], device)) if fmt == "pt2" else None
        with _disk_errors(output):
            if eva_state is not None:
                eva_state.save(tmp / "eva_state.safetensors")
                written.append("eva_state.safetensors")
            save_adapter(adapted, tmp, report.settings)
            report.save(tmp / "report.json")
            written += [path.name for path in render_report(report, tmp)]
            if program is not None:
                with _zip_target(tmp / "model.pt2") as f:
                    torch.export.save(program, f)
                written.append("model.pt2")
            elif fmt == "pickle":
                with _zip_target(tmp / "model.pt") as f:
                    try:
                        torch.save(adapted, f)
                    except (pickle.PicklingError, AttributeError, TypeError) as err:
                        raise ConfigError(  # e.g. a model loaded from a .pt2 (local lambdas)
                            f"--format pickle cannot save this model: {_first_line(err)}"
                        ) from err
                written.append("model.pt")
            elif fmt == "peft":
                from .peft import save_peft

                save_peft(adapted, tmp)
                written += ["adapter_config.json", "adapter_model.safetensors"]
    n_adapted = sum(1 for layer in report.layers if layer.rank)
    click.echo(
        f"adapted {n_adapted} layer(s), total rank {sum(report.ranks.values())}, "
        f"{report.steps} minibatch(es){'' if report.converged else ', NOT all converged'}; "
        f"wrote {output}/{{{', '.join(written)}}}"
    )


@contextlib.contextmanager
def _disk_errors(output: str) -> Iterator[None]:
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
    ``_zip_target`` raises the real error once torch is done.
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
def _zip_target(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for torch's zip writer; raise the first ``OSError`` any write hit."""
    with open(path, "wb") as file:
        guarded = _FirstWriteError(file)
        yield guarded  # type: ignore[misc]
        if guarded.error is None:
            file.flush()  # a full disk may show only here
    if guarded.error is not None:
        raise guarded.error


@main.command("report")
@click.argument("outdir", type=click.Path(file_okay=False))
def report_cmd(outdir: str) -> None:
    """Show what a compile did: a table of OUTDIR/report.json, and its pictures re-drawn.

    Prints one row per target layer in depth order (kind, in->out features, rank, the
    minibatch at which it converged, and the share of its input variance that its rank
    captures), then the skipped layers with their reasons. Rewrites OUTDIR/report.html
    (charts of rank, cumulative explained variance and convergence per layer; opens in
    any browser, no network needed) and OUTDIR/report.png if matplotlib is installed.

    \b
    Example:
      evagraph compile model.pt2 --data calib.safetensors -o out/
      evagraph report out/
    """
    from pathlib import Path

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
    try:
        written = render_report(report, outdir)
    except OSError as err:
        raise click.ClickException(f"cannot write the report pictures: {err}") from err
    click.echo(f"\nwrote {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    sys.exit(main())
