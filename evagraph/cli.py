"""``evagraph`` command line: ``evagraph compile MODEL --data CALIB -o OUTDIR``."""

from __future__ import annotations

import random
import sys

import click

from .errors import EvagraphError


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
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "data",
    required=True,
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
    help="Directory for the adapted model, adapter.safetensors and report.json.",
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
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow MODEL to be a whole-module pickle (runs code from the file).",
)
@click.option("--force", is_flag=True, help="Replace an existing, non-empty output directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def compile_cmd(
    model,
    data,
    output,
    budget,
    rho,
    tau,
    alpha,
    no_adjust_scaling,
    whiten,
    dropout,
    batch_size,
    device,
    targets,
    exclude,
    max_steps,
    min_batches,
    seed,
    allow_pickle,
    force,
    quiet,
) -> None:
    """Add EVA-initialised LoRA adapters to MODEL (a .pt2 torch.export archive, or a
    torch.save'd module with --allow-pickle) and write OUTDIR/model.pt2 (or model.pt),
    OUTDIR/adapter.safetensors and OUTDIR/report.json.

    \b
    Example:
      evagraph compile model.pt2 --data calib.safetensors --budget 16 --rho 2 -o out/
    """
    if batch_size <= 0:
        raise click.BadParameter("must be positive", param_hint="--batch-size")
    try:
        _compile(
            model,
            data,
            output,
            budget,
            rho,
            tau,
            alpha,
            not no_adjust_scaling,
            whiten,
            dropout,
            batch_size,
            device,
            _patterns(targets) or None,
            _patterns(exclude),
            max_steps,
            min_batches,
            seed,
            allow_pickle,
            force,
            quiet,
        )
    except (EvagraphError, FileExistsError, PermissionError) as err:
        raise click.ClickException(str(err)) from err


def _compile(
    model_path,
    data,
    output,
    budget,
    rho,
    tau,
    alpha,
    adjust,
    whiten,
    dropout,
    batch_size,
    device,
    targets,
    exclude,
    max_steps,
    min_batches,
    seed,
    allow_pickle,
    force,
    quiet,
) -> None:
    # Heavy imports stay here so `--help` and flag errors answer at once.
    import torch
    from safetensors.torch import save_file

    from .api import transform
    from .config import EvaSettings
    from .data import load_calibration, to_device
    from .io import atomic_directory, load_model, save_model
    from .lora import adapter_state_dict

    # Validate settings before any slow loading.
    EvaSettings(
        budget=budget,
        rho=rho,
        tau=tau,
        alpha=alpha,
        dropout=dropout,
        max_steps=max_steps,
        min_batches=min_batches,
    )
    random.seed(seed)
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with atomic_directory(output, force=force) as tmp:  # refuses a non-empty OUTDIR first
        batches = load_calibration(data, batch_size)
        module, fmt = load_model(model_path, allow_pickle=allow_pickle)
        adapted, report = transform(
            module,
            batches,
            budget=budget,
            rho=rho,
            tau=tau,
            alpha=alpha,
            adjust_scaling_factors=adjust,
            whiten=whiten,
            dropout=dropout,
            targets=targets,
            exclude=exclude,
            device=device,
            max_steps=max_steps,
            min_batches=min_batches,
            progress=not quiet,
            inplace=True,
        )
        model_file = save_model(adapted, fmt, tmp, to_device(batches[0], device))
        save_file(
            {k: v.contiguous().cpu() for k, v in adapter_state_dict(adapted).items()},
            str(tmp / "adapter.safetensors"),
        )
        report.save(tmp / "report.json")
    n_adapted = sum(1 for layer in report.layers if layer.rank)
    click.echo(
        f"adapted {n_adapted} layer(s), total rank {sum(report.ranks.values())}, "
        f"{report.steps} minibatch(es){'' if report.converged else ', NOT all converged'}; "
        f"wrote {output}/{{{model_file.name}, adapter.safetensors, report.json}}",
    )


if __name__ == "__main__":
    sys.exit(main())
