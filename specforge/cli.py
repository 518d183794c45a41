"""The `specforge` command line.

User errors (a bad spec, an unknown backend, a bad option) print a located message and exit
with code 2, never a traceback. Commands other than `run` and `sweep` import neither torch nor
tensorflow: their start-up cost is the interpreter, pydantic and this package.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
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
    # click's own help layout: rich's cuts option names to fit a narrow terminal
    # (`--nproc-per-no…`); click wraps the help text and keeps every name whole.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SpecPath = Annotated[Path, typer.Argument(help="The spec file (YAML).", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - typer needs Optional
    "--set", "-s", help="Override a field: --set optimizer.learning_rate=0.01 (repeatable).",
    show_default=False)]
TrackOption = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "--track", help="Also log the run to this tracker: mlflow (as training.track in the spec; "
                    "TensorBoard event files are always written).", show_default=False)]
#: Kept in step with specforge.ir.lower.DEFAULT_MAX_PARAMS (a test checks), without importing
#: the compiler before a command needs it.
DEFAULT_MAX_PARAMS = 2_000_000_000
MaxParams = Annotated[int, typer.Option(help="Refuse models with more parameters than this.")]
#: Kept in step with specforge.ir.memory.DEFAULT_MAX_MEMORY (a test checks).
DEFAULT_MAX_MEMORY = "128GiB"
MaxMemory = Annotated[str, typer.Option(
    help="Refuse specs whose training needs more memory than this, estimated from the IR "
         "(layer outputs for a batch, weights, gradients, optimizer state, data), e.g. 1TiB.")]


def _compile(spec: Path, overrides: list[str] | None, max_params: int,
             max_memory: str = DEFAULT_MAX_MEMORY) -> Program:
    from specforge.compiler import compile_spec
    from specforge.ir.memory import parse_size

    try:
        memory_limit = parse_size(max_memory)
    except ValueError as exc:
        raise UsageError(f"--max-memory {exc}") from None
    return compile_spec(spec, overrides or (), max_params=max_params, max_memory=memory_limit)


@app.command()
def validate(spec: SpecPath, set_: SetOption = None,
             max_params: MaxParams = DEFAULT_MAX_PARAMS,
             max_memory: MaxMemory = DEFAULT_MAX_MEMORY) -> None:
    """Check a spec: schema, graph and shapes. Prints every problem at once."""
    program = _compile(spec, set_, max_params, max_memory)
    g = program.graph
    print(f"ok: {spec} ({len(g.nodes)} IR nodes, {g.trainable_params:,} trainable "
          f"parameters, output {g[g.output].shape})")


@app.command()
def summary(spec: SpecPath, set_: SetOption = None,
            max_params: MaxParams = DEFAULT_MAX_PARAMS,
            as_json: Annotated[bool, typer.Option(
                "--json", help="Print the numbers as JSON instead of a table.")] = False,
            max_memory: MaxMemory = DEFAULT_MAX_MEMORY) -> None:
    """Print a table of layers, output shapes, parameters and FLOPs, with totals."""
    from specforge.summary import print_summary, summary_json

    program = _compile(spec, set_, max_params, max_memory)
    if as_json:
        print(json.dumps(summary_json(program), indent=2))
    else:
        print_summary(program)


@app.command()
def ir(spec: SpecPath, set_: SetOption = None,
       max_params: MaxParams = DEFAULT_MAX_PARAMS,
       max_memory: MaxMemory = DEFAULT_MAX_MEMORY) -> None:
    """Dump the compiled IR (graph, loss, optimizer, metrics) as JSON."""
    print(json.dumps(_compile(spec, set_, max_params, max_memory).to_json(), indent=2))


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
          set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS,
          max_memory: MaxMemory = DEFAULT_MAX_MEMORY) -> None:
    """Emit a standalone training script for a backend."""
    from specforge.backends import load_backend

    program = _compile(spec, set_, max_params, max_memory)
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
        init_weights: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            help="Start from these neutral weights (.npz: a run folder's weights.npz, "
                 "an imported model's) instead of specforge's initial weights.",
            show_default=False)] = None,
        track: TrackOption = None,
        set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS,
        max_memory: MaxMemory = DEFAULT_MAX_MEMORY) -> None:
    """Train and evaluate a spec with a backend, writing a run folder."""
    from specforge.backends import RunOptions, check_data_parallel, check_device, load_backend
    from specforge.runner import Interrupted

    program = _compile(spec, set_, max_params, max_memory)
    if init_weights is not None:
        if resume is not None:
            raise UsageError("--init-weights starts a new run; --resume continues one from "
                             "its checkpoint: use one of them")
        from specforge.weights import read_weights_for

        read_weights_for(program.graph, init_weights, "--init-weights")  # before any launch
    trackers = _check_trackers(track, program)
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
                         data_parallel=data_parallel, init_weights=init_weights,
                         track=trackers)
    try:
        result = impl.run(program, options)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        raise typer.Exit(130) from None
    if result.main_process:  # one line, from the first of several processes
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"test: {shown or 'no test set'}; run folder {result.run_dir}", file=sys.stderr)


def _check_trackers(names: list[str] | None, program: Program) -> tuple[str, ...]:
    """`--track` names, checked, and the tracker packages installed (before any training)."""
    from specforge.errors import valid_choices_hint
    from specforge.tracking import TRACKERS, require_mlflow

    for name in names or ():
        if name not in TRACKERS:
            raise UsageError(f"--track {name!r}: {valid_choices_hint(name, TRACKERS, 'valid')}")
    if "mlflow" in (names or ()) or program.spec.training.track == "mlflow":
        require_mlflow()
    return tuple(dict.fromkeys(names or ()))


@app.command()
def sweep(spec: SpecPath,
          backend: Annotated[str, typer.Option("--backend", "-b", help="Backend name.")],
          param: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
              "--param", "-p", help="A field and its search space: "
              "--param optimizer.learning_rate='loguniform(1e-4,1e-1)'; also uniform(A,B), "
              "int(A,B), choice(A,B,...) (repeatable; adds to the spec's sweep.params).",
              show_default=False)] = None,
          trials: Annotated[Optional[int], typer.Option(  # noqa: UP045
              min=1, help="Trials in all, shared by every process on the study (default: "
                          "sweep.trials, else 20; grid: every combination).",
              show_default=False)] = None,
          metric: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="Epoch metric to optimise, e.g. val_accuracy, val_loss.",
              show_default=False)] = None,
          direction: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="maximize or minimize (default: minimize for a loss).",
              show_default=False)] = None,
          sampler: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="tpe (default), random or grid.", show_default=False)] = None,
          pruner: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="median (default) or none.", show_default=False)] = None,
          storage: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="Optuna storage URL (default: SQLite in the sweep folder); several "
                   "processes or machines on one URL share the study's trials.",
              show_default=False)] = None,
          study_name: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="Study name in the storage (default: the spec file's name).",
              show_default=False)] = None,
          sweep_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
              help="Sweep folder (default: sweeps/<spec file name>).",
              show_default=False)] = None,
          resume: Annotated[bool, typer.Option(
              help="Also continue this machine's interrupted trials from their checkpoints."
          )] = False,
          device: Annotated[Optional[str], typer.Option(  # noqa: UP045
              help="As for `specforge run`.", show_default=False)] = None,
          track: TrackOption = None,
          set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Search hyperparameters with Optuna: each trial is a run folder under the sweep folder.

    Ends with a table of the trials and writes results.json, best.yaml (the best trial's
    resolved spec) and plot.png into the sweep folder.
    """
    from rich.console import Console

    from specforge.backends import RunOptions, check_device, load_backend
    from specforge.runner import Interrupted
    from specforge.sweep import Sweeper, make_plan, open_study, write_results

    _check_choice("--direction", direction, ("maximize", "minimize"))
    _check_choice("--sampler", sampler, ("tpe", "random", "grid"))
    _check_choice("--pruner", pruner, ("median", "none"))
    _require_optuna()
    plan, program = make_plan(spec, set_ or [], param or [], {
        "trials": trials, "metric": metric, "direction": direction, "sampler": sampler,
        "pruner": pruner, "storage": storage, "study_name": study_name,
        "sweep_dir": sweep_dir}, max_params)
    trackers = _check_trackers(track, program)
    impl = load_backend(backend)
    check_device(impl, device or program.spec.training.device,
                 "--device" if device else "training.device")
    log = Console(stderr=True)
    plan.folder.mkdir(parents=True, exist_ok=True)
    study = open_study(plan, program.spec.seed)
    options = RunOptions(run_dir=plan.folder, spec_dir=spec.parent.resolve(), device=device,
                         quiet=True, track=trackers)
    sweeper = Sweeper(plan, impl, options, max_params, log=lambda m: log.print(m, highlight=False))

    def between_trials(signum: int, frame: Any) -> None:  # a trial's run has its own
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, between_trials)
    try:
        sweeper.run(study, resume)
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"interrupted: {exc}; continue the sweep with the same command and --resume",
              file=sys.stderr)
        raise typer.Exit(130) from None
    console = Console(width=None if sys.stdout.isatty() else 150)
    written = write_results(plan, study, max_params, console)
    log.print(f"wrote {', '.join(map(str, written))}", highlight=False)


def _check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    from specforge.errors import valid_choices_hint

    if value is not None and value not in choices:
        raise UsageError(f"{option} {value!r}: {valid_choices_hint(value, choices, 'valid')}")


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError("specforge sweep needs Optuna: pip install 'specforge[sweep]'"
                         ) from None


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


def _open_run(run_dir: Path, with_backend: bool = True
              ) -> tuple[Any, Program, Path, dict[str, Any]]:
    """The backend (None without ``with_backend``), program, data folder and run.json of an
    existing run."""
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
    backend_impl = load_backend(info["backend"]) if with_backend else None
    return backend_impl, program, Path(info.get("spec_dir", ".")), info


ModelTarget = Annotated[Path, typer.Argument(
    help="A run folder (its last checkpoint), or a spec file with --backend (its initial "
         "weights, or --weights).", show_default=False)]
WeightsOption = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--weights", help="Neutral weights (.npz: a run folder's weights.npz, an imported "
                      "model's) instead of the checkpoint or specforge's initial weights.",
    show_default=False)]
ModelBackend = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--backend", "-b", help="Backend name (with a spec file; a run folder names its own).",
    show_default=False)]


@dataclass(frozen=True)
class OpenedModel:
    """What evaluate and predict compute with: a run's or a spec's model and weights."""

    backend: Any
    program: Program
    spec_dir: Path
    #: the run folder whose checkpoint holds the weights (None: ``weights`` or initial ones)
    run_dir: Path | None
    weights: dict[str, Any] | None
    class_names: list[str]


def _open_model(target: Path, weights: Path | None, backend: str | None,
                overrides: list[str] | None) -> OpenedModel:
    from specforge.backends import load_backend
    from specforge.weights import read_weights_for

    if target.is_dir():
        if backend is not None or overrides:
            raise UsageError("a run folder names its own backend and spec: leave out "
                             "--backend and --set")
        impl, program, spec_dir, info = _open_run(target)
        run_dir, names = target, info.get("class_names") or []
    else:
        if backend is None:
            raise UsageError(f"{target} is a spec file: name the backend with --backend")
        program = _compile(target, overrides, DEFAULT_MAX_PARAMS)
        impl, spec_dir, run_dir, names = load_backend(backend), target.parent, None, []
    start = read_weights_for(program.graph, weights) if weights is not None else None
    return OpenedModel(impl, program, spec_dir, run_dir if start is None else None, start,
                       names)


@app.command()
def evaluate(target: ModelTarget, weights: WeightsOption = None, backend: ModelBackend = None,
             set_: SetOption = None) -> None:
    """Test metrics of a run's last checkpoint, or of a spec with given weights."""
    from specforge.runner import evaluate_run

    opened = _open_model(target, weights, backend, set_)
    metrics = evaluate_run(opened.backend, opened.program, opened.run_dir, opened.spec_dir,
                           opened.weights)
    print(json.dumps(metrics))


@app.command()
def predict(target: ModelTarget,
            images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.")],
            weights: WeightsOption = None, backend: ModelBackend = None,
            set_: SetOption = None) -> None:
    """Class and probabilities for each image, with a run's last checkpoint or a spec with
    given weights (classes are numbered unless a run folder names them)."""
    from specforge.runner import predict_images

    opened = _open_model(target, weights, backend, set_)
    results = predict_images(opened.backend, opened.program, opened.run_dir, images,
                             opened.weights, opened.class_names)
    for path, (label, probabilities) in zip(images, results, strict=True):
        print(json.dumps({"image": str(path), "class": label,
                          "probabilities": [round(float(p), 6) for p in probabilities]}))


@app.command()
def export(target: Annotated[Path, typer.Argument(
               help="A spec file (its initial weights, or --weights) or a finished run folder "
                    "(its final weights.npz).", show_default=False)],
           output: Annotated[Path, typer.Option(
               "--output", "-o", help="The ONNX file to write.", show_default=False)],
           weights: WeightsOption = None,
           layout: Annotated[str, typer.Option(
               help="The input's layout: nhwc (the spec's) or nchw.")] = "nhwc",
           logits: Annotated[bool, typer.Option(
               help="Leave out the softmax (sigmoid) the loss folded: output logits.")] = False,
           set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS) -> None:
    """Write the model as ONNX (opset 17, any batch size); needs no framework."""
    from specforge.weights import initial_weights, read_weights_for

    program, class_names, run_weights = _export_target(target, set_, max_params)
    if weights is None and run_weights is not None and not run_weights.exists():
        raise UsageError(f"{target} has no weights.npz (the run has not finished): finish it "
                         f"with --resume {target}, or name weights with --weights")
    chosen = weights or run_weights
    if chosen is not None:
        start = read_weights_for(program.graph, chosen, "--weights" if weights else "run")
    else:
        start = initial_weights(program.graph, program.seed)
    try:
        from specforge.onnx_export import ExportError, to_onnx
    except ImportError as exc:  # the onnx package is an extra
        raise UsageError(f"specforge export needs the onnx package ({exc}): install "
                         "specforge's onnx extra (pip install -e '.[onnx]') or onnx") from None
    try:
        model = to_onnx(program, start, layout=layout, logits=logits, class_names=class_names)
    except ExportError as exc:
        raise UsageError(f"{target}: cannot export: {exc}") from None
    from specforge.atomic import write_atomically

    write_atomically(output, model.SerializeToString())
    shown = ", ".join(f"{p.key} {p.value}" for p in model.metadata_props)
    print(f"wrote {output} ({shown})", file=sys.stderr)


def _export_target(target: Path, overrides: list[str] | None, max_params: int
                   ) -> tuple[Program, list[str] | None, Path | None]:
    """The program, class names and final weights file of a spec file or run folder."""
    if not target.is_dir():
        return _compile(target, overrides, max_params), None, None
    if overrides:
        raise UsageError("--set changes a spec: a run folder's model is the one it trained")
    _, program, _, info = _open_run(target, with_backend=False)
    return program, info.get("class_names") or None, target / "weights.npz"


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
            set_: SetOption = None, max_params: MaxParams = DEFAULT_MAX_PARAMS,
            max_memory: MaxMemory = DEFAULT_MAX_MEMORY) -> None:
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
        passed = _conform_spec(spec, set_, (max_params, max_memory), names, steps, device,
                               reference, chaos_factor, out or Path("conformance") / spec.stem,
                               console, log)
    if not passed:
        raise typer.Exit(1)


def _conform_spec(spec: Path, overrides: list[str] | None, limits: tuple[int, str],
                  names: list[str], steps: int, device: str | None, reference: bool,
                  chaos_factor: float,
                  out: Path, console: Any, log: Any) -> bool:
    from specforge.conformance.check import conform as run_conformance
    from specforge.conformance.compare import Tolerance
    from specforge.conformance.report import print_report, write_report
    from specforge.data.pipeline import build_pipeline

    program = _compile(spec, overrides, *limits)
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


@app.command("import")
def import_(model: Annotated[Path, typer.Argument(
                help="A Keras (.keras, .h5) or ONNX (.onnx) model file.", show_default=False)],
            output: Annotated[Path, typer.Option(
                "--output", "-o", help="The spec to write (YAML); the weights go beside it "
                                       "(model.yaml -> model.npz).", show_default=False)],
            ) -> None:
    """Write a spec and its neutral weights from a Keras or ONNX model."""
    from specforge.importers import import_model
    from specforge.importers.write import write_import

    spec_path, weights_path = write_import(import_model(model), output)
    print(f"wrote {spec_path} and {weights_path}", file=sys.stderr)


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
