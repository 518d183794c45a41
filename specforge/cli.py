"""The `specforge` command line.

User errors (a bad spec, an unknown backend, a bad option) print a located message and exit
with code 2, never a traceback. Commands other than `run` import neither torch nor
tensorflow: their start-up cost is the interpreter, pydantic and this package.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from specforge.errors import SpecError, UsageError

if TYPE_CHECKING:
    from specforge.ir.program import Program

app = typer.Typer(
    name="specforge",
    help="Compile a declarative CNN spec (YAML) into training runs and standalone scripts.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SpecPath = Annotated[Path, typer.Argument(help="The spec file (YAML).", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - typer needs Optional
    "--set", "-s", help="Override a field: --set optimizer.learning_rate=0.01 (repeatable).",
    show_default=False)]
#: Kept in step with specforge.ir.lower.DEFAULT_MAX_PARAMS (a test checks), without importing
#: the compiler before a command needs it.
DEFAULT_MAX_PARAMS = 2_000_000_000
MaxParams = Annotated[int, typer.Option(help="Refuse models with more parameters than this.")]


def _compile(spec: Path, overrides: list[str] | None, max_params: int) -> Program:
    from specforge.compiler import compile_spec

    return compile_spec(spec, overrides or (), max_params=max_params)


@app.command()
def validate(spec: SpecPath, set_: SetOption = None,
             max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Check a spec: schema, graph and shapes. Prints every problem at once."""
    program = _compile(spec, set_, max_params)
    g = program.graph
    print(f"ok: {spec} ({len(g.nodes)} IR nodes, {g.trainable_params:,} trainable "
          f"parameters, output {g[g.output].shape})")


@app.command()
def summary(spec: SpecPath, set_: SetOption = None,
            max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Print a table of layers, output shapes, parameters and FLOPs, with totals."""
    from specforge.summary import print_summary

    print_summary(_compile(spec, set_, max_params))


@app.command()
def ir(spec: SpecPath, set_: SetOption = None,
       max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Dump the compiled IR (graph, loss, optimizer, metrics) as JSON."""
    print(json.dumps(_compile(spec, set_, max_params).to_json(), indent=2))


@app.command()
def resolve(spec: SpecPath, set_: SetOption = None) -> None:
    """Print the fully resolved spec: `extends:` merged, `--set` applied, defaults filled."""
    import yaml

    from specforge.compiler import load_spec

    _, model = load_spec(spec, set_ or ())
    data = _type_first(model.model_dump(mode="json", exclude_none=True))
    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100), end="")


def _type_first(value: Any) -> Any:
    """Put each mapping's `type` first, as people write it."""
    if isinstance(value, dict):
        ordered = {"type": value["type"]} if "type" in value else {}
        ordered.update({k: _type_first(v) for k, v in value.items() if k != "type"})
        return ordered
    if isinstance(value, list):
        return [_type_first(v) for v in value]
    return value


@app.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editor completion and validation)."""
    from specforge.docs import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command()
def data(spec: SpecPath, set_: SetOption = None,
         preview: Annotated[Optional[Path], typer.Option(  # noqa: UP045
             help="Write a PNG grid of the first augmented training batch here.")] = None,
         ) -> None:
    """Load the spec's data: sizes of the splits, classes, batches; optional preview."""
    import numpy as np

    from specforge.data import build_pipeline

    program = _compile(spec, set_, DEFAULT_MAX_PARAMS)
    pipeline = build_pipeline(program, spec.parent)
    parts = {"train": pipeline.train, "validation": pipeline.validation, "test": pipeline.test}
    for name, part in parts.items():
        size = len(part) if part is not None else 0
        counts = np.bincount(part.labels) if part is not None and size else []
        print(f"{name:<11}{size:>8,} images  per class: {list(map(int, counts))}")
    steps = pipeline.steps_per_epoch(program.spec.training.steps_per_epoch)
    print(f"batch size {pipeline.batch_size}, {pipeline.batches_per_pass} batches per pass, "
          f"{steps} steps per epoch, image shape {list(program.graph.input.shape)}")
    if preview is not None:
        from specforge.data.preview import write_grid

        write_grid(pipeline, preview)
        print(f"wrote {preview}", file=sys.stderr)


@app.command()
def backends() -> None:
    """List the installed backends and what each can do."""
    from specforge.backends import describe_data_parallel, installed_backends, load_backend

    found = installed_backends()
    if not found:
        print("no backends installed")
    for name, ep in sorted(found.items()):
        print(f"{name}\t{ep.value}")
        try:  # imports the backend's package only: frameworks load when a backend computes
            impl = load_backend(name)
        except UsageError as exc:
            print(f"  error: {exc}")
            continue
        caps = impl.capabilities
        if impl.description:
            print(f"  {impl.description}")
        print(f"  build styles: {', '.join(caps.build_styles)}; devices: auto, "
              f"{', '.join(caps.devices)}; {describe_data_parallel(caps.data_parallel)}")


@app.command()
def build(spec: SpecPath,
          backend: Annotated[str, typer.Option("--backend", "-b", help="Backend name.")],
          output: Annotated[Optional[Path], typer.Option(  # noqa: UP045
              "--output", "-o", help="Write the script here (default: stdout).")] = None,
          style: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="idiomatic (default): the framework's own layers, optimizers and loop; "
                   "exact: the same per-step losses as `specforge run`.",
              show_default=False)] = None,
          distributed: Annotated[bool, typer.Option(
              help="Include multi-process (data-parallel) training code.")] = False,
          set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Emit a standalone training script for a backend."""
    from specforge.backends import load_backend

    program = _compile(spec, set_, max_params)
    impl = load_backend(backend)
    styles = impl.capabilities.build_styles
    if style is not None and style not in styles:
        raise UsageError(f"--style {style!r}: the {backend} backend builds "
                         f"{' or '.join(styles)}")
    # Only what was asked for is passed: a backend written before styles builds as it did.
    options: dict[str, Any] = {"style": style} if style is not None else {}
    if distributed:
        options["distributed"] = True
    text = impl.build(program, **options)
    if output is None:
        sys.stdout.write(text)
        return
    from specforge.atomic import write_atomically

    write_atomically(output, text)
    print(f"wrote {output}", file=sys.stderr)


@app.command()
def run(spec: SpecPath,
        backend: Annotated[str, typer.Option("--backend", "-b", help="Backend name.")],
        run_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            help="Run folder (default: runs/<spec file name>).")] = None,
        device: Annotated[Optional[str], typer.Option(  # noqa: UP045
            help="auto, or one of the backend's devices (`specforge backends`), e.g. cpu or "
                 "cuda (default: the spec's training.device).")] = None,
        resume: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            help="Continue the run in this folder from its last checkpoint.",
            show_default=False)] = None,
        quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
        json_log: Annotated[bool, typer.Option(
            "--json", help="Print one JSON line per epoch (and the test result).")] = False,
        nproc_per_node: Annotated[Optional[int], typer.Option(  # noqa: UP045
            min=1, help="Data-parallel processes on this machine, launched through torchrun "
                        "(backends that train data-parallel that way, e.g. torch).",
            show_default=False)] = None,
        nnodes: Annotated[int, typer.Option(min=1, help="Machines (with torchrun).")] = 1,
        node_rank: Annotated[int, typer.Option(min=0, help="This machine's rank.")] = 0,
        rdzv_endpoint: Annotated[Optional[str], typer.Option(  # noqa: UP045
            help="HOST:PORT where the machines meet (several machines).",
            show_default=False)] = None,
        data_parallel: Annotated[bool, typer.Option(
            help="Train over every device of this one process (backends that train "
                 "data-parallel that way, e.g. keras: its distribution API, "
                 "KERAS_BACKEND=jax).")] = False,
        set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Train and evaluate a spec with a backend, writing a run folder."""
    from specforge.backends import RunOptions, check_data_parallel, check_device, load_backend
    from specforge.runner import Interrupted

    program = _compile(spec, set_, max_params)
    impl = load_backend(backend)
    if device is not None:
        check_device(impl, device)
    else:
        check_device(impl, program.spec.training.device, "training.device")
    if nproc_per_node is not None or nnodes > 1:
        check_data_parallel(impl, "torchrun", "--nproc-per-node/--nnodes")
        raise typer.Exit(_launch(nproc_per_node or 1, nnodes, node_rank, rdzv_endpoint))
    if resume is not None and run_dir is not None and resume != run_dir:
        raise UsageError("--resume names the run folder; leave out --run-dir")
    folder = resume or run_dir or Path("runs") / spec.stem
    if resume is not None:
        _check_same_spec(program, folder)
    if data_parallel:
        check_data_parallel(impl, "in-process", "--data-parallel")
    options = RunOptions(run_dir=folder, spec_dir=spec.parent.resolve(), device=device,
                         quiet=quiet, log_json=json_log, resume=resume is not None,
                         data_parallel=data_parallel)
    try:
        result = impl.run(program, options)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        raise typer.Exit(130) from None
    if result.main_process:  # one line, from the first of several processes
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"test: {shown or 'no test set'}; run folder {result.run_dir}", file=sys.stderr)


#: `specforge run` options that torchrun takes; the rest is passed to every process.
LAUNCH_OPTIONS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint")


def _launch(nproc: int, nnodes: int, node_rank: int, endpoint: str | None) -> int:
    """Run this same command once per process through torchrun; its exit code. The caller
    checked that the backend trains data-parallel that way."""
    import subprocess

    if nnodes > 1 and endpoint is None:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every "
                         "machine)")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                f"--nnodes={nnodes}", f"--node-rank={node_rank}"]
    launcher += [f"--rdzv-endpoint={endpoint}", "--rdzv-backend=c10d"] if endpoint else \
        ["--standalone"]
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            args.append(arg)
    child = subprocess.Popen([*launcher, "-m", "specforge", *args])
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:  # torchrun passes it on to every process
        forwarded.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # the processes checkpoint and stop; torchrun reports their exit as a failure
    return 130 if forwarded else code


def _check_same_spec(program: Program, folder: Path) -> None:
    from specforge.runfolder import read_run_info, read_saved_spec

    current = program.spec.model_dump(mode="json", exclude_none=True)
    if read_saved_spec(folder) != current:
        raise UsageError(f"the spec differs from the one {folder} was started with "
                         f"({folder / 'spec.yaml'}); resume with the same spec and --set "
                         "options")
    read_run_info(folder)  # a resumed run reads its class names from there


def _open_run(run_dir: Path) -> tuple[Any, Program, Path]:
    """The backend, program and data folder of an existing run."""
    from specforge.backends import load_backend
    from specforge.compiler import compile_spec
    from specforge.runfolder import DamagedFile, read_run_info, read_saved_spec

    info = read_run_info(run_dir)
    spec = run_dir / "spec.yaml"
    read_saved_spec(run_dir)  # plain YAML, as specforge wrote it
    try:
        program = compile_spec(spec)
    except SpecError as exc:  # specforge wrote a valid spec there: it was changed since
        raise DamagedFile(spec, f"it is no longer a valid spec:\n{exc.render()}") from None
    return load_backend(info["backend"]), program, Path(info.get("spec_dir", "."))


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Test metrics of a run's last checkpoint."""
    from specforge.runner import evaluate_run

    backend_impl, program, spec_dir = _open_run(run_dir)
    metrics = evaluate_run(backend_impl, program, run_dir, spec_dir)
    print(json.dumps(metrics))


@app.command()
def predict(run_dir: Annotated[Path, typer.Argument(help="A run folder.")],
            images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.")]) -> None:
    """Class and probabilities for each image, with a run's last checkpoint."""
    from specforge.runner import predict_images

    backend_impl, program, _ = _open_run(run_dir)
    for path, (label, probabilities) in zip(
            images, predict_images(backend_impl, program, run_dir, images), strict=True):
        print(json.dumps({"image": str(path), "class": label,
                          "probabilities": [round(float(p), 6) for p in probabilities]}))


@app.command()
def conform(spec: Annotated[Optional[Path], typer.Argument(  # noqa: UP045
                help="The spec file (YAML); leave out with --suite.", show_default=False)] = None,
            steps: Annotated[int, typer.Option(min=0, help="Training steps to compare.")] = 20,
            backends: Annotated[str, typer.Option(
                help="Comma-separated backends; the first is the baseline.")] = "torch,keras",
            device: Annotated[Optional[str], typer.Option(  # noqa: UP045
                help="auto, or a device every compared backend has (`specforge backends`), "
                     "e.g. cpu or cuda (default: each backend's own choice).")] = None,
            out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
                help="Report folder (default: conformance/<spec file name>, or "
                     "conformance/suite).")] = None,
            reference: Annotated[bool, typer.Option(
                help="Also run the float64 numpy reference, which says which backend is "
                     "wrong when they disagree.")] = True,
            chaos_factor: Annotated[float, typer.Option(
                help="The N-step tolerance as a multiple of the chaos floor.")] = 10.0,
            suite: Annotated[bool, typer.Option(
                help="Run the shipped conformance suite instead of one spec.")] = False,
            case: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
                help="With --suite: only cases matching this glob (repeatable).",
                show_default=False)] = None,
            set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Check that backends compute the same forward pass, gradients and N training steps.

    Writes report.json and losses.png (with --suite, suite.json); exits 1 when any quantity
    is out of tolerance.
    """
    from rich.console import Console

    names = [b.strip() for b in backends.split(",") if b.strip()]
    if not names or len(set(names)) != len(names):
        raise UsageError(f"--backends {backends!r}: name each backend once, e.g. torch,keras")
    if len(names) == 1 and not reference:
        raise UsageError("one backend without --reference compares nothing: add a backend "
                         "or leave out --no-reference")
    if device is not None:
        from specforge.backends import check_device, load_backend

        for name in names:
            check_device(load_backend(name), device)
    # a pipe gets the whole table rather than rich's 80 columns
    console = Console(width=None if sys.stdout.isatty() else 150)
    log = Console(stderr=True)
    if suite:
        if spec is not None or set_:
            raise UsageError("--suite runs the shipped cases: leave out the spec and --set")
        passed = _conform_suite(names, case or [], device, reference,
                                out or Path("conformance") / "suite", console, log)
    elif spec is None:
        raise UsageError("name a spec file, or use --suite")
    else:
        passed = _conform_spec(spec, set_, max_params, names, steps, device, reference,
                               chaos_factor, out or Path("conformance") / spec.stem,
                               console, log)
    if not passed:
        raise typer.Exit(1)


def _conform_spec(spec: Path, overrides: list[str] | None, max_params: int, names: list[str],
                  steps: int, device: str | None, reference: bool, chaos_factor: float,
                  out: Path, console: Any, log: Any) -> bool:
    from specforge.conformance.check import conform as run_conformance
    from specforge.conformance.compare import Tolerance
    from specforge.conformance.report import print_report, write_report
    from specforge.data.pipeline import build_pipeline

    program = _compile(spec, overrides, max_params)
    if program.spec.data is None:
        raise UsageError(f"{spec}: conform needs training batches; add a `data:` section "
                         "or --set 'data={source: {type: synthetic}}'")
    pipeline = build_pipeline(program, spec.parent)
    report = run_conformance(program, pipeline, names, steps, device,
                             Tolerance(chaos_factor=chaos_factor), reference, spec.name,
                             log=lambda message: log.print(f"[dim]{message}[/]"))
    print_report(report, console)
    written = write_report(report, out)
    log.print(f"wrote {', '.join(map(str, written))}")
    return report.passed


def _conform_suite(names: list[str], patterns: list[str], device: str | None,
                   reference: bool, out: Path, console: Any, log: Any) -> bool:
    from specforge.backends import load_backend
    from specforge.conformance.report import print_suite, write_suite
    from specforge.conformance.suite import run_suite, select

    cases = select(patterns)
    if not cases:
        raise UsageError(f"no conformance case matches {', '.join(patterns)}")
    impls = {n: load_backend(n) for n in names}
    results = run_suite(cases, impls, device, reference,
                        log=lambda message: log.print(f"[dim]{message}[/]"))
    print_suite(results, console)
    log.print(f"wrote {write_suite(results, out)}")
    return all(r.passed for r in results)


@app.command()
def docs(check: Annotated[bool, typer.Option(help="Fail if docs/ is stale.")] = False,
         out: Annotated[Path, typer.Option(help="Docs folder.")] = Path("docs")) -> None:
    """Regenerate the spec reference in docs/ from the models."""
    from specforge.docs import write_reference

    stale = write_reference(out, check=check)
    if check and stale:
        raise UsageError(f"{', '.join(map(str, stale))} out of date: run `specforge docs`")


def main() -> None:
    """Entry point of the `specforge` script and `python -m specforge`."""
    try:
        app()
    except SpecError as exc:
        sys.stderr.write(exc.render() + "\n")
        sys.exit(2)
    except UsageError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
