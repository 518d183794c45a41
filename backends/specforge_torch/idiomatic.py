"""`specforge build --backend torch --style idiomatic`: the script a PyTorch user would write.

torch's own modules (``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.BatchNorm2d``, ...) in an
``nn.Sequential`` (or an ``nn.Module`` whose ``forward`` follows the graph where it
branches), ``torch.optim``, ``torch.nn.functional`` losses and a ``DataLoader``. Where the
IR's meaning is not a torch default (asymmetric `same` padding, flatten order, padded
average pools, batch norm momentum, Adam's epsilon), the explicit equivalent is written with
a comment; see docs/semantics.md. Building imports no torch.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specforge.data.augment import is_identity
from specforge.errors import UsageError
from specforge.idiomatic import (
    Code,
    call,
    common_context,
    data_code,
    environment,
    is_chain,
    literal,
    pair,
    split_presence,
    with_imports,
)
from specforge.ir.graph import Graph, Node, identifier_names
from specforge.ir.ops import pool_options
from specforge.ir.program import Program
from specforge.scriptgen import copied, used

HERE = Path(__file__).parent
LAYERS = HERE / "layers.py"
#: specforge's own modules an idiomatic script may need, where torch's cannot say the IR's
HELPERS = ("MaxPool2d", "AvgPool2d", "HardSigmoid", "Rescaling", "Cropping2d",
           "ChannelSlice")
PAD_MODULES = {"zeros": "nn.ZeroPad2d", "reflect": "nn.ReflectionPad2d",
               "replicate": "nn.ReplicationPad2d"}
#: activation -> torch module (the functional form is the same call on ``x``)
ACTIVATIONS = {"relu": "nn.ReLU()", "relu6": "nn.ReLU6()", "selu": "nn.SELU()",
               "gelu": "nn.GELU()", "gelu_tanh": 'nn.GELU(approximate="tanh")',
               "silu": "nn.SiLU()", "sigmoid": "nn.Sigmoid()", "hard_sigmoid": "nn.Hardsigmoid()",
               "hard_swish": "nn.Hardswish()", "tanh": "nn.Tanh()", "softplus": "nn.Softplus()",
               "softsign": "nn.Softsign()", "softmax": "nn.Softmax(dim=1)",
               "linear": "nn.Identity()"}






def _torch_pads(pads: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    top, bottom, left, right = pads
    return left, right, top, bottom


def _pad_module(pads: tuple[int, int, int, int], mode: str, value: float = 0.0) -> str:
    if mode == "constant":
        return call("nn.ConstantPad2d", _torch_pads(pads), value)
    return call(PAD_MODULES[mode], _torch_pads(pads))


def node_modules(node: Node, in_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """The torch modules (constructor, comment) that compute ``node``, in order."""
    a, op = node.attrs, node.op
    pads = a.get("pads", (0, 0, 0, 0))
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    if op == "conv2d":
        options: dict[str, Any] = {}
        before = []
        if any(pads) and symmetric and a["pad_mode"] != "constant":
            options["padding"] = pair((pads[0], pads[2]))
            if a["pad_mode"] != "zeros":
                options["padding_mode"] = a["pad_mode"]
        elif any(pads):  # torch pads both sides alike; specforge's `same` puts the odd one after
            before = [(_pad_module(pads, a["pad_mode"], a.get("pad_value", 0.0)),
                       "constant padding" if symmetric else
                       "uneven padding: the odd pixel after, as specforge's `same`")]
        for key, name, default in (("strides", "stride", 1), ("dilation", "dilation", 1)):
            if pair(a[key]) != default:
                options[name] = pair(a[key])
        if a["groups"] != 1:
            options["groups"] = a["groups"]
        if not a["bias"]:
            options["bias"] = False
        return [*before, (call("nn.Conv2d", in_shape[-1], a["filters"], pair(a["kernel"]),
                                **options), "")]
    if op == "dense":
        return [(call("nn.Linear", in_shape[-1], a["units"],
                       **({} if a["bias"] else {"bias": False})), "")]
    if op in ("max_pool2d", "avg_pool2d"):
        return _pool(op, a, in_shape)
    if op == "pad2d":
        return [(_pad_module(pads, a["mode"], a.get("pad_value", 0.0)), "")]
    if op == "cropping2d":
        return [(call("Cropping2d", a["crops"]), "a slice of x; torch has no such module")]
    if op == "channel_slice":
        return [(call("ChannelSlice", a["start"], a["stop"]), "x[:, start:stop]")]
    if op == "channel_shuffle":
        return [(call("nn.ChannelShuffle", a["groups"]), "")]
    if op == "rescaling":
        return [(call("Rescaling", a["scale"], a["offset"], len(in_shape) == 3),
                 "x * scale + offset; torch has no such module")]
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        pool = "nn.AdaptiveAvgPool2d(1)" if op == "global_avg_pool2d" else "nn.AdaptiveMaxPool2d(1)"
        return [(pool, ""), ("nn.Flatten()", "")]
    if op == "flatten":
        if len(in_shape) == 3 and in_shape[0] * in_shape[1] > 1:
            return [("FlattenHWC()", "")]
        return [("nn.Flatten()", "")]
    if op == "batch_norm":
        return [(_batch_norm(a, in_shape), "")]
    if op == "layer_norm":
        epsilon = {} if a["epsilon"] == 1e-5 else {"eps": a["epsilon"]}
        if len(in_shape) == 3:
            return [(call("LayerNorm2d", in_shape[-1], **epsilon),
                     "each pixel's channels (torchvision's ConvNeXt)")]
        return [(call("nn.LayerNorm", in_shape[-1], **epsilon), "")]
    if op == "group_norm":
        epsilon = {} if a["epsilon"] == 1e-5 else {"eps": a["epsilon"]}
        return [(call("nn.GroupNorm", a["groups"], in_shape[-1], **epsilon), "")]
    if op == "prelu":  # one slope per channel (dim 1) of an image or a vector
        init = {} if a["alpha_init"] == 0.25 else {"init": a["alpha_init"]}
        return [(call("nn.PReLU", in_shape[-1], **init), "")]
    if op == "dropout":
        cls = "SampleDropout" if a["per_sample"] else \
            "nn.Dropout2d" if a["spatial"] else "nn.Dropout"
        return [(call(cls, a["rate"]), "")]
    if op == "activation":
        fn = a["fn"]
        if fn == "leaky_relu":
            return [(call("nn.LeakyReLU", a["negative_slope"]), "")]
        if fn == "elu":
            return [(call("nn.ELU", a["alpha"]), "")]
        if fn == "hard_sigmoid" and (a["alpha"], a["beta"]) != (1 / 6, 0.5):
            return [(call("HardSigmoid", a["alpha"], a["beta"]),
                     "nn.Hardsigmoid has alpha 1/6 and beta 0.5 only")]
        return [(ACTIVATIONS[fn], "")]
    raise ValueError(f"no torch module for op {op!r}")


def _pool(op: str, a: Any, in_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """torch's pooling module, after a pad module where torch's own padding cannot say the
    IR's pads; specforge's own module where torch's cannot say the rest either."""
    pool, pads, value = a["pool"], a["pads"], a.get("pad_value")
    top, bottom, left, right = pads
    cls = "nn.MaxPool2d" if op == "max_pool2d" else "nn.AvgPool2d"
    options: dict[str, Any] = {} if tuple(a["strides"]) == tuple(pool) else {
        "stride": pair(a["strides"])}
    if pair(a["dilation"]) != 1:
        if op == "avg_pool2d":
            return [(call("AvgPool2d", **pool_options(a, in_shape)),
                     "torch's AvgPool2d has no dilation")]
        options["dilation"] = pair(a["dilation"])
    if a["ceil_mode"]:
        options["ceil_mode"] = True
    if not any(pads):
        return [(call(cls, pair(pool), **options), "")]
    fits = top == bottom and left == right and top <= pool[0] // 2 and left <= pool[1] // 2
    if fits and (value is None if op == "max_pool2d" else value in (None, 0.0)):
        if op == "avg_pool2d" and not a["count_include_pad"]:
            options["count_include_pad"] = False
        return [(call(cls, pair(pool), **options, padding=pair((top, left))), "")]
    if a["ceil_mode"] or (op == "avg_pool2d" and not a["count_include_pad"]):
        # after a pad module torch could start a last window in the right padding, or
        # count the padded cells: specforge's module
        return [(call(cls.removeprefix("nn."), **pool_options(a, in_shape)),
                 "uneven pads with ceil_mode" if a["ceil_mode"] else
                 "padded cells left out of the divisor")]
    if op == "max_pool2d" and value is None:  # torch pads symmetrically, at most half the window
        return [(f"nn.ConstantPad2d({_torch_pads(pads)!r}, float('-inf'))",
                 "padded cells never win"), (call(cls, pair(pool), **options), "")]
    return [(_pad_module(pads, "constant", value or 0.0), "padded cells hold pad_value"),
            (call(cls, pair(pool), **options), "")]


def _batch_norm(a: Any, in_shape: tuple[int, ...]) -> str:
    if a["scale"] != a["center"]:
        raise UsageError("the idiomatic torch script cannot express a batch_norm with only "
                         "one of scale and center (torch's `affine` sets both); build with "
                         "--style exact")
    cls = "nn.BatchNorm2d" if len(in_shape) == 3 else "nn.BatchNorm1d"
    options: dict[str, Any] = {"eps": a["epsilon"], "momentum": round(1 - a["decay"], 12)}
    if not a["scale"]:
        options["affine"] = False
    return call(cls, in_shape[-1], **options)




def named_modules(graph: Graph) -> Iterator[tuple[Node, str, str, str]]:
    """(node, attribute, constructor, comment) of every module, in graph order. A node's
    main module is named as the node (dots become underscores), so that neutral weight
    names map onto torch's by rule; helpers before it get a suffix."""
    names = identifier_names(graph)
    shapes = {n.name: n.shape for n in graph}
    for node in graph:
        if node.op in ("input", "add", "multiply", "concat"):
            continue
        modules = node_modules(node, shapes[node.inputs[0]])
        suffixes = {"global_avg_pool2d": ["", "_flatten"], "global_max_pool2d": ["", "_flatten"],
                    "max_pool2d": ["_pad", ""]}.get(node.op, ["_pad", ""])
        for (module, why), suffix in zip(modules, suffixes[-len(modules):], strict=True):
            yield node, names[node.name] + suffix, module, why


def sequential_lines(graph: Graph) -> list[str]:
    """The ``OrderedDict`` entries of an ``nn.Sequential`` model, one module a line."""
    lines = []
    for node, attribute, module, why in named_modules(graph):
        note = why or (f"-> {'x'.join(map(str, node.shape))}" if node.params
                       or node.op.endswith("pool2d") or node.op == "flatten" else "")
        line = f"{attribute}={module},"
        lines.append(f"{line}  # {note}" if note and len(line) + len(note) < 86 else line)
    return lines


def product(node: Node, args: list[str], in_shapes: list[tuple[int, ...]]) -> str:
    """``a * b`` of a multiply node's operands; a (N, C) gate is indexed to (N, C, 1, 1) so
    that it scales every pixel of an (N, C, H, W) operand."""
    factors = []
    for arg, shape in zip(args, in_shapes, strict=True):
        if " + " in arg or " * " in arg:  # an inlined sum or product binds less tightly
            arg = f"({arg})"
        factors.append(f"{arg}[:, :, None, None]" if len(shape) < len(node.shape) else arg)
    return " * ".join(factors)


def module_class_lines(graph: Graph) -> tuple[list[str], list[str]]:
    """(``__init__`` lines, ``forward`` lines) of a model whose graph branches."""
    names = identifier_names(graph)
    consumers: dict[str, int] = {}
    for node in graph:
        for i in node.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    calls: dict[str, list[str]] = {}
    init = []
    for node, attribute, module, why in named_modules(graph):
        calls.setdefault(node.name, []).append(attribute)
        line = f"self.{attribute} = {module}"
        if not why:
            init.append(line)
        elif 8 + len(line) + 4 + len(why) <= 100:
            init.append(f"{line}  # {why}")
        else:  # no room after it: the comment goes above
            init.extend([f"# {why}", line])
    forward: list[str] = []
    value = {graph.input.name: "x"}
    inlined: set[str] = set()

    def expression(node: Node) -> str:
        args = [value[i] for i in node.inputs]
        if node.op == "add":
            return " + ".join(args)
        if node.op == "multiply":
            return product(node, args, [graph[i].shape for i in node.inputs])
        if node.op == "concat":
            return f"torch.cat([{', '.join(args)}], dim=1)"
        expr = args[0]
        for attribute in calls[node.name]:
            expr = f"self.{attribute}({expr})"
        return expr

    for node in graph:
        if node.op == "input":
            continue
        expr = expression(node)
        if 8 + len(names[node.name]) + 3 + len(expr) > 100:  # too long: name its inputs
            for i in node.inputs:
                if i in inlined:
                    forward.append(f"{names[i]} = {value[i]}")
                    value[i] = names[i]
                    inlined.discard(i)
            expr = expression(node)
        if consumers.get(node.name, 0) == 1 and node.name != graph.output and len(expr) < 60:
            value[node.name] = expr
            inlined.add(node.name)
        else:  # ruff's wrapping where even the named inputs leave it too long
            forward.extend(wrapped(f"{names[node.name]} = ", expr, 8))
            value[node.name] = names[node.name]
    forward.append(f"return {value[graph.output]}")
    return init, forward


def render_idiomatic(program: Program, distributed: bool = False) -> str:
    """The idiomatic PyTorch script for ``program``."""
    if distributed:
        raise UsageError("the idiomatic torch script trains in one process; for torchrun "
                         "and DDP build with --style exact --distributed")
    graph = program.graph
    constructors = {module.split("(")[0] for _, _, module, _ in named_modules(graph)}
    chain = is_chain(graph)
    init, forward = ([], []) if chain else module_class_lines(graph)
    wanted = [name for name in HELPERS if name in constructors]
    # what torch's modules cannot say (e.g. asymmetric pads left out of an average's
    # divisor): specforge's own module
    helpers = copied([(LAYERS, used(LAYERS, wanted))]) if wanted else ""
    context = common_context(program)
    context["load_data"] = data_code(program, "torch")
    spec = program.spec
    augment = spec.data.augment if spec.data and not is_identity(spec.data.augment) else None
    context.update(
        framework="PyTorch",
        chain=chain, sequential=sequential_lines(graph) if chain else [], init=init,
        forward=forward, flatten_hwc="FlattenHWC" in constructors,
        layer_norm_2d="LayerNorm2d" in constructors, helpers=helpers,
        sample_dropout="SampleDropout" in constructors,
        input_shape=tuple(graph.input.shape), augment=augment,
        dropout=any(n.op == "dropout" for n in graph),
        batch_norm=any(n.op == "batch_norm" for n in graph),
        prelu=any(n.op == "prelu" for n in graph),
        optimizer=wrapped("optimizer = ", _optimizer(program), 4),
        loss_lines=_loss_lines(program), loss_call=_losscall(program),
        metric_lines=_metric_lines(program), clip=program.optimizer,
        full_batch=spec.data is not None and spec.data.batch_size == "full",
        splits=split_presence(program))
    if augment is not None:
        context["augment_doc"], context["augment_lines"] = augment_code(
            augment, context["input_shape"])
    template = environment(HERE / "templates").get_template("idiomatic.py.j2")
    return with_imports(template.render(**context))


def wrapped(head: str, call: str, indent: int) -> list[str]:
    """``head + call`` as ruff formats it at 100 columns: one line, or the arguments on one
    line of their own, or one argument a line."""
    if indent + len(head) + len(call) <= 100:
        return [head + call]
    name, _, args = call.partition("(")
    args = args[:-1]
    if indent + 4 + len(args) <= 100:
        return [f"{head}{name}(", f"    {args}", ")"]
    parts = re.split(r",\s(?![^()]*\))", args)
    return [f"{head}{name}(", *(f"    {a}," for a in parts), ")"]


def _optimizer(program: Program) -> str:
    opt, h = program.optimizer, program.optimizer.hyper
    params = Code("model.parameters()")
    if opt.kind == "sgd":
        return call("torch.optim.SGD", params, lr=opt.learning_rate, momentum=h["momentum"],
                     nesterov=h["nesterov"], weight_decay=opt.weight_decay)
    if opt.kind == "rmsprop":  # alpha is the spec's rho; eps outside the square root
        return call("torch.optim.RMSprop", params, lr=opt.learning_rate, alpha=h["rho"],
                     eps=h["epsilon"], weight_decay=opt.weight_decay)
    cls = "torch.optim.AdamW" if opt.kind == "adamw" else "torch.optim.Adam"
    return call(cls, params, lr=opt.learning_rate, betas=(h["beta1"], h["beta2"]),
                 eps=h["epsilon"], weight_decay=opt.weight_decay)




def _losscall(program: Program) -> str:
    """The loss of ``{output}`` and ``{labels}``: torch's function where one line says it."""
    loss = program.loss
    if loss.kind == "cross_entropy" and loss.from_logits:
        smooth = f", label_smoothing={loss.label_smoothing!r}" if loss.label_smoothing else ""
        return f"F.cross_entropy({{output}}, {{labels}}{smooth})"
    return "loss_fn({output}, {labels})"


def _loss_lines(program: Program) -> list[str]:
    """The body of ``loss_fn(output, labels)``: specforge's loss in torch's functions."""
    loss, e, classes = program.loss, program.loss.label_smoothing, program.loss.classes
    if loss.kind == "cross_entropy" and loss.from_logits:
        return []  # a call of F.cross_entropy (_loss_call)
    if loss.kind == "cross_entropy":
        return ["# the output is probabilities: clipped to [1e-7, 1 - 1e-7] before the log",
                f"target = F.one_hot(labels, {classes}).float() * (1 - {e!r}) + {e!r} / {classes}",
                "p = output.clamp(1e-7, 1 - 1e-7)",
                "return -(target * torch.log(p)).sum(dim=1).mean()"]
    if loss.kind == "binary_cross_entropy":
        lines = [f"target = labels.float() * (1 - {e!r}) + {e!r} / 2"]
        if loss.from_logits:
            return [*lines, "return F.binary_cross_entropy_with_logits(output[:, 0], target)"]
        return [*lines, "p = output[:, 0].clamp(1e-7, 1 - 1e-7)  # probabilities, clipped",
                "return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()"]
    fn = "F.mse_loss" if loss.kind == "mse" else "F.l1_loss"
    return [f"return {fn}(output, F.one_hot(labels, {classes}).float())  # one-hot targets"]


def _metric_lines(program: Program) -> list[str]:
    """The end of ``evaluate``: the loss and the spec's metrics over a split's ``output``."""
    binary = program.loss.kind == "binary_cross_entropy"
    lines = ["predicted = (output[:, 0] > 0).long()" if binary else "predicted = output.argmax(1)"]
    confusion = {m.kind for m in program.metrics if m.average != "micro"} & {"precision",
                                                                            "recall", "f1"}
    if confusion:
        c = 2 if binary else program.loss.classes
        lines += [f"confusion = torch.bincount(y * {c} + predicted, minlength={c * c})"
                  f".view({c}, {c})",
                  "hits, guessed, actual = confusion.diag(), confusion.sum(0), confusion.sum(1)",
                  "precision, recall = hits / guessed.clamp(min=1), hits / actual.clamp(min=1)",
                  "f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)",
                  "present = actual > 0  # macro averages over the classes present"]
    loss = _losscall(program).format(output="output", labels="y")
    lines += ["return {", f'    "loss": {loss}.item(),']
    for m in program.metrics:
        if m.kind == "top_k_accuracy":
            value = f"(output.topk({m.k!r}, 1).indices == y[:, None]).any(1).float().mean()"
        elif m.kind == "accuracy" or m.average == "micro":  # one label an image: micro = acc
            value = "(predicted == y).float().mean()"
        else:
            value = f"{m.kind}[present].mean()"
        lines.append(f"    {literal(m.label)}: {value}.item(),")
    if not binary and not confusion and sum("predicted" in line for line in lines) == 2:
        lines = [line.replace("(predicted", "(output.argmax(1)") for line in lines[1:]]
    return [*lines, "}"]


GRID_PADDING = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}


def augment_code(aug: Any, shape: tuple[int, ...]) -> tuple[str, list[str]]:
    """(docstring, body) of ``augment(images)``: the spec's augmentation with torch's own
    random numbers, through ``affine_grid``/``grid_sample`` (torchvision is not needed)."""
    height, width, _ = shape
    done, lines = [], ["n, device = len(images), images.device"]
    if aug.rotation or aug.width_shift or aug.height_shift or aug.zoom:
        if aug.rotation:
            done.append(f"rotation (up to {aug.rotation:g} degrees)")
            lines.append(f"angle = torch.deg2rad({aug.rotation!r} * (2 * torch.rand(n, "
                         "device=device) - 1))")
        else:
            lines.append("angle = torch.zeros(n, device=device)")
        if aug.width_shift or aug.height_shift:
            done.append(f"shifts (up to {aug.width_shift:g} of the width, "
                        f"{aug.height_shift:g} of the height)")
            reach = f"[{2 * aug.width_shift!r}, {2 * aug.height_shift!r}]"
            lines += [f"reach = torch.tensor({reach}, device=device)  # a grid spans 2 a side",
                      "shift = (2 * torch.rand(n, 2, device=device) - 1) * reach"]
        else:
            lines.append("shift = torch.zeros(n, 2, device=device)")
        if aug.zoom:
            done.append(f"zoom (1 +- {aug.zoom:g})")
            lines += [f"zoom = 1 + {aug.zoom!r} * (2 * torch.rand(n, 2, device=device) - 1)",
                      "cos, sin = angle.cos()[:, None] / zoom, angle.sin()[:, None] / zoom",
                      "rows = [cos[:, 0], -sin[:, 0], shift[:, 0]], "
                      "[sin[:, 1], cos[:, 1], shift[:, 1]]"]
        else:
            lines.append("rows = [angle.cos(), -angle.sin(), shift[:, 0]], "
                         "[angle.sin(), angle.cos(), shift[:, 1]]")
        padding = literal(GRID_PADDING[aug.fill_mode])
        fill = aug.fill_value if aug.fill_mode == "constant" else 0.0
        lines += ["theta = torch.stack([torch.stack(row, 1) for row in rows], 1)",
                  "grid = F.affine_grid(theta, list(images.shape), align_corners=False)",
                  (f"images = F.grid_sample(images - {fill!r}, grid, padding_mode={padding}, "
                   f"align_corners=False) + {fill!r}") if fill else
                  (f"images = F.grid_sample(images, grid, padding_mode={padding}, "
                   "align_corners=False)")]
    for flag, axis, name in ((aug.horizontal_flip, 3, "horizontal"),
                             (aug.vertical_flip, 2, "vertical")):
        if flag:
            done.append(f"{name} flips")
            lines += ["flip = torch.rand(n, 1, 1, 1, device=device) < 0.5",
                      f"images = torch.where(flip, images.flip({axis}), images)"]
    if aug.crop_padding:
        p = aug.crop_padding
        done.append(f"random crops after padding by {p}")
        lines += [f"moved = torch.randint(-{p}, {p + 1}, (n, 2), device=device) * 2.0",
                  "theta = torch.eye(2, 3, device=device).repeat(n, 1, 1)",
                  f"theta[:, :, 2] = moved / torch.tensor([{width}, {height}], device=device)",
                  "grid = F.affine_grid(theta, list(images.shape), align_corners=False)",
                  "images = F.grid_sample(images, grid, mode=\"nearest\", align_corners=False)"]
    doc = "Random " + ", ".join(done) + f"; outside the image: {aug.fill_mode}."
    doc = "\n    ".join(textwrap.wrap(doc, 88))
    return doc, [*lines[:-1], lines[-1].replace("images = ", "return ", 1)]
