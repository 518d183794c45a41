"""`specforge build --style idiomatic`: the parts every backend's idiomatic script shares.

An idiomatic script is the one a person would write with the framework's own building
blocks: its layers, optimizers, loss functions and data loader or ``fit()``. It keeps the
spec's model and update rule (its weights load specforge's neutral ``.npz`` and then compute
what `specforge run` computes, within the conformance tolerance), but its randomness is the
framework's own: initial weights, shuffling, augmentation and dropout.

What is shared lives here, framework-free: the settings, the data loading, split and
normalisation (numpy; the split holds out the very images specforge's does, so that both
are tested on one test set), and the learning-rate schedule as a plain function of the step
(the formulas of :func:`specforge.ir.program.lr_at`, written out for the spec's schedule
only).
Every value from a spec reaches a script as a ``repr`` literal or a validated identifier.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import jinja2

from specforge import __version__
from specforge.data import sources
from specforge.ir.graph import Graph, identifier_names
from specforge.ir.program import OptimizerIR, Program
from specforge.scriptgen import CONSTANTS, LOADERS, constants, copied

CORE_TEMPLATES = Path(__file__).parent / "templates"


def settings(program: Program) -> dict[str, Any]:
    """The spec's training settings, written into a script as literals where they are used."""
    training, data = program.spec.training, program.spec.data
    batch = None if data is None or data.batch_size == "full" else data.batch_size
    return {"seed": program.seed, "epochs": training.epochs, "batch_size": batch,
            "steps_per_epoch": training.steps_per_epoch, "name": program.name}


#: How each framework takes a split: NHWC numpy arrays (Keras) or NCHW tensors (torch).
LAYOUTS = {
    "numpy": ("np.ndarray", "({images}, {labels})"),
    "torch": ("torch.Tensor",
              "(torch.from_numpy({images}).permute(0, 3, 1, 2), torch.from_numpy({labels}))"),
}


def data_code(program: Program, layout: str = "numpy", labels: str = "y") -> str:
    """``load_data(data_dir)`` for the spec's data: each split's normalised float32 images
    and labels (integers, or the expression ``labels`` of ``y``) in ``layout``."""
    data = program.spec.data
    kind, pair = LAYOUTS[layout]
    head = f"def load_data(data_dir: Path) -> dict[str, tuple[{kind}, {kind}]]:"
    if data is None:
        return (f"{head}\n"
                '    raise SystemExit("the spec has no `data:` section: add one and build '
                'again")')
    read, has_test = _source_lines(program)
    norm = _normalised(data.normalize, "x")
    lines = [*read, f"x = {_float32(norm)}", *_split_lines(program, has_test)]
    entry = pair.format(images="x", labels=labels)
    comprehension = f"{{name: {entry} for name, (x, y) in parts.items()}}"
    if entry == "(x, y)":
        lines.append("return parts")
    elif len(comprehension) <= 89:
        lines.append(f"return {comprehension}")
    else:
        lines += ["return {", f"    name: {entry}", "    for name, (x, y) in parts.items()", "}"]
    helper = ""
    if data.source.type == "cifar10":
        helper = "\n\n\n".join([
            'class DataError(Exception):\n    """Bad or missing data."""',
            constants(CONSTANTS["cifar10"]),
            copied([(sources, ["Dataset", "SourceData"]), *LOADERS["cifar10"]])])
    return _function(head, lines, helper)


def _function(head: str, lines: list[str], helper: str) -> str:
    doc = '    """Each split: normalised float32 images and integer labels."""'
    body = "\n".join([head, doc] + ["\n".join(f"    {part}" for part in line.split("\n"))
                                     for line in lines])
    return f"{helper}\n\n\n{body}" if helper else body


def _float32(expression: str) -> str:
    simple = re.fullmatch(r"[\w\[\]]+", expression)
    return f"{expression}.astype(np.float32)" if simple else f"({expression}).astype(np.float32)"


def _normalised(norm: Any, images: str) -> str:
    """``(pixel * scale - mean) / std`` of ``images``, leaving out what changes nothing."""
    expression = images if norm.scale == 1 else f"{images} * {norm.scale!r}"
    if norm.mean != 0.0:
        expression += f" - np.array({norm.mean!r})" if isinstance(norm.mean, list) else \
            f" - {norm.mean!r}"
    if norm.std != 1.0:
        std = f"np.array({norm.std!r})" if isinstance(norm.std, list) else repr(norm.std)
        expression = f"({expression}) / {std}"
    return expression


def _source_lines(program: Program) -> tuple[list[str], str | bool]:
    """(lines that set ``x, y`` and maybe ``test``, whether there is a test set: "always",
    "maybe" or False)."""
    source = program.spec.data.source  # type: ignore[union-attr]
    shape = tuple(program.graph.input.shape)
    height, width, channels = shape
    if source.type == "digits":
        return ["x, y = load_digits(return_X_y=True)  # 8x8 pixels 0..16",
                "x = x.reshape(-1, 8, 8, 1)"], False
    if source.type == "synthetic":  # specforge's synthetic source: noisy class prototypes
        return [f"rng = np.random.default_rng([{program.seed!r}, 0x5E7])  # noisy prototypes",
                f"prototypes = rng.integers(0, 256, ({source.classes!r}, *{shape!r}))",
                f"y = rng.integers(0, {source.classes!r}, {source.samples!r})",
                f"noise = rng.normal(0, 40, ({source.samples!r}, *{shape!r}))",
                "x = np.clip(prototypes[y] + noise, 0, 255).astype(np.uint8)"], False
    if source.type == "npz":
        x_key, y_key = source.x_key, source.y_key
        return [f"with np.load(data_dir / {literal(source.path)}, allow_pickle=False) as arrays:",
                f"    x, y = arrays[{literal(x_key)}], arrays[{literal(y_key)}]",
                f"    test = arrays.get({literal(x_key + '_test')}), "
                f"arrays.get({literal(y_key + '_test')})",
                "test = None if test[0] is None else test"], "maybe"
    if source.type == "image_folder":
        folders = [("train", source.train)] + ([("test", source.test)] if source.test else [])
        mode = "L" if channels == 1 else "RGB"
        pairs = ", ".join(f"({literal(split)}, data_dir / {literal(folder)})"
                          for split, folder in folders)
        return ["read = {}  # PNG/JPEG images, one subfolder per class (sorted names)",
                f"for split, root in ({pairs}{',' if len(folders) == 1 else ''}):",
                '    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in '
                '{".png", ".jpg", ".jpeg"})',
                f'    images = [Image.open(p).convert("{mode}").resize(({width}, {height}), '
                "Image.BILINEAR) for p in found]",
                "    names = [p.relative_to(root).parts[0] for p in found]",
                f"    images = np.stack([np.asarray(i) for i in images]).reshape(-1, "
                f"{height}, {width}, {channels})",
                "    read[split] = images, np.unique(names, return_inverse=True)[1]",
                "(x, y), test = read[\"train\"], read[\"test\"]" if source.test else
                "x, y = read[\"train\"]"], \
            "always" if source.test else False
    fields = ", ".join(f"{k}={literal(getattr(source, k))}" for k in type(source).model_fields)
    return [f"source = load_cifar10(SimpleNamespace({fields}), data_dir)",
            "x, y = source.train.images, source.train.labels",
            "test = source.test.images, source.test.labels"], "always"


def _split_lines(program: Program, has_test: str | bool) -> list[str]:
    """specforge's split (:func:`specforge.data.pipeline.split_indices`): the same images in
    each part, from its seeded permutation; test, then validation, then train, of each class
    with ``stratify`` (the order within a part is specforge's business, not the script's)."""
    split, seed = program.spec.data.split, program.seed  # type: ignore[union-attr]
    test = 0.0 if has_test == "always" else (split.test or 0.0)
    if not test and not split.validation:
        lines = ["parts = {\"train\": (x, y)}"]
    else:
        sizes = f"[round(len(g) * {test!r}), round(len(g) * {split.validation!r})]"
        lines = [f"perm = np.random.default_rng([{seed!r}, 1]).permutation(len(y))  "
                 "# specforge's split"]
        if split.stratify:
            lines += ["index = {\"test\": [], \"validation\": [], \"train\": []}",
                      "for g in (perm[y[perm] == c] for c in np.unique(y)):  # class by class",
                      f"    cuts = np.cumsum({sizes})  # test, then validation",
                      "    for part, i in zip(index.values(), np.split(g, cuts), strict=True):",
                      "        part.append(i)",
                      "parts = {n: (x[np.hstack(i)], y[np.hstack(i)]) for n, i in index.items()}"]
        else:
            lines += [f"cuts = np.cumsum({sizes.replace('len(g)', 'len(y)')})  "
                      "# test, then validation",
                      "index = dict(zip((\"test\", \"validation\", \"train\"), "
                      "np.split(perm, cuts), strict=True))",
                      "parts = {n: (x[i], y[i]) for n, i in index.items()}"]
    test_norm = _float32(_normalised(program.spec.data.normalize,  # type: ignore[union-attr]
                                     "test[0]"))
    if has_test == "maybe":  # an .npz file may hold a test set of its own
        lines += ["if test is not None:", f"    parts[\"test\"] = {test_norm}, test[1]"]
    elif has_test:
        lines.append(f"parts[\"test\"] = {test_norm}, test[1]")
    return lines


def schedule_code(opt: OptimizerIR) -> str:
    """``learning_rate(step, steps_per_epoch)``: the spec's schedule as plain Python."""
    s = opt.schedule
    if s is None:
        return ""
    p, base = s.params, opt.learning_rate
    unit = "step // steps_per_epoch" if s.unit == "epoch" else "step"
    formula = {
        "constant": "lr",
        "step": f"lr * {p.get('gamma')!r} ** (t // {p.get('step_size')!r})",
        "multistep": f"lr * {p.get('gamma')!r} ** sum(1 for m in {p.get('milestones')!r} "
                     "if m <= t)",
        "exponential": f"lr * {p.get('gamma')!r}**t",  # ruff hugs simple operands
        "cosine": f"{p.get('min_lr')!r} + (lr - {p.get('min_lr')!r}) * (1 + math.cos("
                  f"math.pi * min(t, {p.get('t_max')!r}) / {p.get('t_max')!r})) / 2",
    }[s.kind]
    lines = [
        "def learning_rate(step: int, steps_per_epoch: int) -> float:",
        f'    """specforge\'s {s.kind} schedule, counted in {s.unit}s'
        + (f", after {s.warmup} of linear warmup" if s.warmup else "") + '."""',
        f"    lr, t = {base!r}, {unit}"]
    if s.warmup:
        start = s.warmup_start_factor
        lines += [f"    if t < {s.warmup!r}:",
                  f"        return lr * ({start!r} + (1 - {start!r}) * t / {s.warmup!r})",
                  f"    t -= {s.warmup!r}"]
    lines.append(f"    return {formula}")
    return "\n".join(lines)


def split_presence(program: Program) -> dict[str, str | bool]:
    """Whether each split exists: True, False, or "maybe" (an .npz file may hold a test set;
    a split of a small class may come out empty)."""
    data = program.spec.data
    if data is None:
        return {"validation": False, "test": False}
    own_test = data.source.type in ("cifar10",) or (data.source.type == "image_folder"
                                                     and data.source.test is not None)
    test: str | bool = True if own_test or data.split.test else (
        "maybe" if data.source.type == "npz" else False)
    return {"validation": bool(data.split.validation), "test": test}


def renamed(graph: Graph) -> dict[str, str]:
    """The nodes whose identifier is not their name with dots as underscores (a keyword or a
    reserved name: `class` -> `class_`), for a script's ``load_weights``."""
    return {n.name: ident for n, ident in zip(graph, identifier_names(graph).values(),
                                              strict=True)
            if ident != re.sub(r"\W", "_", n.name) and n.params}


def is_chain(graph: Graph) -> bool:
    """Whether every node takes the one before it, and nothing else does (a Sequential)."""
    nodes = list(graph)
    return all(n.inputs == (prev.name,) for prev, n in itertools.pairwise(nodes)) and \
        graph.output == nodes[-1].name


class Code(str):
    """Code, written into a call as it is (not as a string literal)."""

    def __repr__(self) -> str:
        return str(self)


def call(cls: str, *args: Any, **kwargs: Any) -> str:
    """``cls(args, key=value)`` with every value a :func:`literal`."""
    parts = [literal(a) for a in args] + [f"{k}={literal(v)}" for k, v in kwargs.items()]
    return f"{cls}({', '.join(parts)})"


def pair(value: Any) -> Any:
    """A (height, width) pair, as one number where both are the same."""
    return value[0] if value[0] == value[1] else tuple(value)


def literal(value: Any) -> str:
    """``repr(value)`` with strings in double quotes, as ruff formats them (safe for any
    string: the result is a valid literal of the same value)."""
    if isinstance(value, Code):
        return str(value)
    if isinstance(value, str):
        text = repr(value)
        # repr quotes with ' unless the string holds one; ruff's style is " where that
        # needs no more escapes than '
        return f'"{text[1:-1]}"' if text.startswith("'") and '"' not in value else text
    if isinstance(value, tuple):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


#: (section, import statement, what in a script's text needs it); section 0 is the standard
#: library, 1 third-party packages
IMPORTS: list[tuple[int, str, str]] = [
    (0, "import argparse", r"\bargparse\."), (0, "import itertools", r"\bitertools\."),
    (0, "import math", r"\bmath\."), (0, "import re", r"\bre\.(sub|compile)"),
    (0, "import codecs", r"\bcodecs\."), (0, "import hashlib", r"\bhashlib\."),
    (0, "import io", r"\bio\."), (0, "import pickle", r"\bpickle\."),
    (0, "import sys", r"\bsys\."), (0, "import tarfile", r"\btarfile\."),
    (0, "import urllib.error", r"\burllib\.error\."),
    (0, "import urllib.request", r"\burllib\.request\."),
    (0, "from collections import OrderedDict", r"\bOrderedDict\("),
    (0, "from dataclasses import dataclass", r"@dataclass"),
    (0, "from dataclasses import field", r"\bfield\("),
    (0, "from pathlib import Path", r"\bPath\b"),
    (0, "from types import SimpleNamespace", r"\bSimpleNamespace\("),
    (1, "import keras", r"\bkeras\."), (1, "import numpy as np", r"\bnp\."),
    (1, "import torch", r"\btorch\."), (1, "import torch.nn.functional as F", r"\bF\."),
    (1, "from keras import layers", r"\blayers\."), (1, "from keras import ops", r"\bops\."),
    (1, "from PIL import Image", r"\bImage\."),
    (1, "from sklearn.datasets import load_digits", r"\bload_digits\("),
    (1, "from torch import nn", r"\bnn\."),
    (1, "from torch.optim.lr_scheduler import LambdaLR", r"\bLambdaLR\("),
    (1, "from torch.utils.data import DataLoader, TensorDataset", r"\bDataLoader\("),
]


def with_imports(body: str) -> str:
    """``body`` with its ``# {imports}`` line replaced by the imports its code uses, in
    ruff's (isort's) order: standard library, then third party; ``import`` before ``from``."""
    code = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))
    sections: list[list[str]] = [[], []]
    for section, statement, pattern in IMPORTS:
        if re.search(pattern, code):
            sections[section].append(statement)
    for section in sections:  # one `from M import a, b` per module
        froms: dict[str, list[str]] = {}
        for line in [line for line in section if line.startswith("from ")]:
            froms.setdefault(line.split()[1], []).extend(line.split(" import ")[1].split(", "))
            section.remove(line)
        section += [f"from {m} import {', '.join(sorted(names))}" for m, names in froms.items()]
    ordered = ["\n".join(sorted(s, key=lambda line: (line.startswith("from"),
                                                     line.split()[1].lower())))
               for s in sections if s]
    return body.replace("# {imports}\n", "\n\n".join(ordered) + "\n", 1)


def environment(template_folder: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([template_folder, CORE_TEMPLATES]),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["py"] = literal
    return env


def common_context(program: Program) -> dict[str, Any]:
    """What every backend's idiomatic template gets (``load_data`` is the backend's to ask
    for, in its layout: :func:`data_code`)."""
    data = program.spec.data
    return {"version": __version__, "program": program, "spec": program.spec,
            "renamed": renamed(program.graph),
            **settings(program), "schedule": schedule_code(program.optimizer),
            "source_kind": data.source.type if data else None}

