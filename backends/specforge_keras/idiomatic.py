"""`specforge build --backend keras --style idiomatic`: the script a Keras user would write.

``keras.Sequential`` (the functional API where the graph branches) of ``keras.layers``,
Keras's augmentation layers, ``model.compile(...)`` and ``model.fit(...)``: for the seed
spec it reads almost line for line like the seed document's code. Where the IR's meaning is
not Keras's (Adam's and RMSprop's epsilon, SGD momentum under a schedule, coupled weight
decay, batch norm's moving variance, explicit or non-zero padding), the script carries a
small subclass or specforge's own layer with a comment; see docs/semantics.md. Building
imports no keras.
"""

from __future__ import annotations

import ast
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
from specforge.ir.graph import Node, identifier_names
from specforge.ir.ops import pad_value, pool_options, same_pads
from specforge.ir.program import Program
from specforge.scriptgen import copied, used
from specforge_keras.recipes import MERGE_OPS

HERE = Path(__file__).parent
LAYERS = HERE / "layers.py"
#: activations Keras names by a string with specforge's meaning (gelu: exact in both)
NAMED = {"relu", "relu6", "selu", "gelu", "silu", "sigmoid", "hard_sigmoid", "tanh",
         "softplus", "softsign", "softmax"}
STRING = {"hard_swish": "hard_swish", "linear": "linear", **{n: n for n in NAMED}}






def _padding(node: Node, in_shape: tuple[int, ...], kernel: Any, strides: Any,
             dilation: Any = (1, 1)) -> str | None:
    """"valid" or "same" when Keras's word means the node's pads; None when it does not."""
    pads = tuple(node.attrs["pads"])
    if not any(pads):
        return "valid"
    same = (*same_pads(in_shape[0], kernel[0], strides[0], dilation[0]),
            *same_pads(in_shape[1], kernel[1], strides[1], dilation[1]))
    return "same" if pads == same else None


def activation_arg(node: Node | None) -> str | None:
    """The ``activation=`` string for an activation node Keras can name, else None."""
    if node is None or node.op != "activation":
        return None
    fn, a = node.attrs["fn"], node.attrs
    if fn == "hard_sigmoid" and (a["alpha"], a["beta"]) != (1 / 6, 0.5):
        return None  # Keras's "hard_sigmoid" is alpha 1/6, beta 0.5 only
    if (fn == "elu" and a.get("alpha") == 1.0) or fn in STRING:
        return STRING.get(fn, fn)
    return None


def layercall(node: Node, in_shape: tuple[int, ...], name: str,
               activation: str | None) -> tuple[list[str], str]:
    """(layers before it, the node's layer) as constructor expressions."""
    a, op = node.attrs, node.op
    named: dict[str, Any] = {"activation": activation} if activation else {}
    named["name"] = name
    if op == "conv2d" and max(a["strides"]) > 1 and max(a["dilation"]) > 1:
        # Keras refuses strides with dilation: specforge's Conv2D runs it at stride 1 and
        # keeps every stride-th output
        keys = ("filters", "kernel", "strides", "dilation", "groups", "pads", "pad_mode", "bias")
        return [], call("Conv2D", **{k: a[k] for k in keys}, **pad_value(a), **named)
    if op == "conv2d":
        padding = _padding(node, in_shape, a["kernel"], a["strides"], a["dilation"])
        before = []
        if padding is None or (padding == "same" and a["pad_mode"] != "zeros"):
            before = [_pad_layer(a["pads"], a["pad_mode"], name, a.get("pad_value", 0.0))]
            padding = "valid"
        options: dict[str, Any] = {}
        if pair(a["strides"]) != 1:
            options["strides"] = pair(a["strides"])
        if padding == "same":
            options["padding"] = "same"
        if pair(a["dilation"]) != 1:
            options["dilation_rate"] = pair(a["dilation"])
        if a["groups"] != 1:
            options["groups"] = a["groups"]
        if not a["bias"]:
            options["use_bias"] = False
        return before, call("layers.Conv2D", a["filters"], pair(a["kernel"]), **options,
                             **named)
    if op == "dense":
        return [], call("layers.Dense", a["units"], **({} if a["bias"] else
                                                       {"use_bias": False}), **named)
    if op in ("max_pool2d", "avg_pool2d"):
        padding = _padding(node, in_shape, a["pool"], a["strides"])
        options = pool_options(a, in_shape)
        if padding is None or len(options) > 3:
            # pads or options Keras's pooling cannot say: specforge's own pooling layer
            cls = "MaxPool2D" if op == "max_pool2d" else "AvgPool2D"
            window = [tuple(options.pop(k)) for k in ("pool", "strides", "pads")]
            return [], call(cls, *window, **options, name=name)
        cls = "layers.MaxPooling2D" if op == "max_pool2d" else "layers.AveragePooling2D"
        options = {} if tuple(a["strides"]) == tuple(a["pool"]) else {"strides": pair(
            a["strides"])}
        if padding == "same":
            options["padding"] = "same"
        return [], call(cls, pair(a["pool"]), **options, name=name)
    if op == "pad2d":
        return [], _pad_layer(a["pads"], a["mode"], name, a.get("pad_value", 0.0), suffix="")
    if op == "cropping2d":  # the same on both sides of each axis: Keras's short forms
        top, bottom, left, right = a["crops"]
        even = top == bottom and left == right
        cropping = pair((top, left)) if even else ((top, bottom), (left, right))
        return [], call("layers.Cropping2D", cropping, name=name)
    if op == "channel_slice":  # Keras has no layer that slices channels
        return [], call("ChannelSlice", a["start"], a["stop"], name=name)
    if op == "channel_shuffle":
        return [], call("ChannelShuffle", a["groups"], name=name)
    if op == "rescaling":  # x * scale + offset; Keras's offset defaults to 0
        offset = {} if a["offset"] == 0.0 else {"offset": _listed(a["offset"])}
        return [], call("layers.Rescaling", _listed(a["scale"]), **offset, name=name)
    if op in ("global_avg_pool2d", "global_max_pool2d"):
        cls = "GlobalAveragePooling2D" if op == "global_avg_pool2d" else "GlobalMaxPooling2D"
        return [], f"layers.{cls}(name={literal(name)})"
    if op == "flatten":  # NHWC: height, width, channel order, as the IR's
        return [], f"layers.Flatten(name={literal(name)})"
    if op == "batch_norm":
        options = {"momentum": a["decay"], "epsilon": a["epsilon"]}
        if not a["center"]:
            options["center"] = False
        if not a["scale"]:
            options["scale"] = False
        return [], call("BatchNorm", **options, name=name)
    if op == "layer_norm":  # over the last axis, Keras's default
        epsilon = {} if a["epsilon"] == 1e-3 else {"epsilon": a["epsilon"]}
        return [], call("layers.LayerNormalization", **epsilon, name=name)
    if op == "group_norm":  # over the last axis, Keras's default; its groups default is 32
        epsilon = {} if a["epsilon"] == 1e-3 else {"epsilon": a["epsilon"]}
        return [], call("layers.GroupNormalization", a["groups"], **epsilon, name=name)
    if op == "prelu":  # one slope per channel: shared by an image's height and width
        init = {} if a["alpha_init"] == 0.0 else {
            "alpha_initializer": Code(f"keras.initializers.Constant({a['alpha_init']!r})")}
        shared = {"shared_axes": [1, 2]} if len(in_shape) == 3 else {}
        return [], call("layers.PReLU", **init, **shared, name=name)
    if op == "dropout":
        if a["per_sample"]:  # drop-connect, as keras.applications' EfficientNet writes it
            noise_shape = (None, *[1] * len(in_shape))
            return [], call("layers.Dropout", a["rate"], noise_shape=noise_shape, name=name)
        cls = "layers.SpatialDropout2D" if a["spatial"] else "layers.Dropout"
        return [], call(cls, a["rate"], name=name)
    if op == "activation":
        fn = a["fn"]
        if fn == "leaky_relu":
            return [], call("layers.LeakyReLU", negative_slope=a["negative_slope"], name=name)
        if fn == "elu" and a["alpha"] != 1.0:
            return [], call("layers.ELU", alpha=a["alpha"], name=name)
        if fn == "gelu_tanh":
            return [], f"layers.Activation(gelu_tanh, name={literal(name)})"
        if fn == "hard_sigmoid" and (a["alpha"], a["beta"]) != (1 / 6, 0.5):
            slope = f"lambda x: ops.clip({a['alpha']!r} * x + {a['beta']!r}, 0.0, 1.0)"
            return [], f"layers.Activation({slope}, name={literal(name)})"
        return [], call("layers.Activation", STRING.get(fn, fn), name=name)
    if op == "add":
        return [], f"layers.Add(name={literal(name)})"
    if op == "multiply":  # a (C,) gate is reshaped to (1, 1, C) where it is read
        return [], f"layers.Multiply(name={literal(name)})"
    if op == "concat":
        return [], f"layers.Concatenate(name={literal(name)})"
    raise ValueError(f"no Keras layer for op {op!r}")


def _pad_layer(pads: Any, mode: str, name: str, value: float = 0.0,
               suffix: str = "_pad") -> str:
    top, bottom, left, right = pads
    if mode == "zeros":
        return f"layers.ZeroPadding2D((({top}, {bottom}), ({left}, {right})), " \
               f"name={literal(name + suffix)})"
    if mode == "constant":  # ZeroPadding2D pads with zeros only
        return call("Pad2D", tuple(pads), mode, value, name=name + suffix)
    return call("Pad2D", tuple(pads), mode, name=name + suffix)


def model_layers(program: Program) -> list[tuple[Node, list[str], str, str]]:
    """(node, layers before, its layer, comment) per node, folding an activation into the
    layer before it where both come from one spec layer."""
    graph = program.graph
    names = identifier_names(graph)
    shapes = {n.name: n.shape for n in graph}
    consumers: dict[str, list[str]] = {}
    for node in graph:
        for i in node.inputs:
            consumers.setdefault(i, []).append(node.name)
    nodes = [n for n in graph if n.op != "input"]
    folded: set[str] = set()
    out = []
    for k, node in enumerate(nodes):
        if node.name in folded:
            continue
        after = nodes[k + 1] if k + 1 < len(nodes) else None
        activation = None
        if node.op in ("conv2d", "dense") and after is not None and \
                after.layer == node.layer and consumers.get(node.name) == [after.name] and \
                after.inputs == (node.name,):
            activation = activation_arg(after)
            if activation:
                folded.add(after.name)
        if node.name == graph.output and program.output_activation and \
                node.op in ("conv2d", "dense"):
            activation = program.output_activation  # folded into the loss by the IR
        before, call = layercall(node, shapes[node.inputs[0]], names[node.name], activation)
        last = after.name if activation and after and after.name in folded else node.name
        out.append((node, before, call, last))
    return out


def render_idiomatic(program: Program, distributed: bool = False) -> str:
    """The idiomatic Keras 3 script for ``program``."""
    if distributed:
        raise UsageError("the idiomatic keras script trains in one process; build with "
                         "--style exact for specforge's data-parallel training")
    graph = program.graph
    layers_ = model_layers(program)
    calls = [c for _, before, call, _ in layers_ for c in [*before, call]]
    chain = is_chain(graph)
    output_layer = layers_[-1][0]
    extra_softmax = bool(program.output_activation) and output_layer.op not in ("conv2d",
                                                                                   "dense")
    context = common_context(program)
    context["load_data"] = data_code(program, "numpy", label_code(program))
    spec = program.spec
    augment = spec.data.augment if spec.data and not is_identity(spec.data.augment) else None
    context.update(
        framework="Keras 3", chain=chain, input_shape=tuple(graph.input.shape),
        augment_layers=augment_layers(augment, tuple(graph.input.shape)) if augment else [],
        augment=augment, dropout=any(n.op == "dropout" for n in graph),
        prelu=any(n.op == "prelu" for n in graph),
        sequential=[line for c in calls for line in _added(c)],
        functional=[] if chain else functional_lines(
            program, layers_),
        final_activation=program.output_activation if extra_softmax else None,
        helpers=_helpers(calls), batch_norm="BatchNorm(" in " ".join(calls),
        gelu_tanh=any("gelu_tanh" in c for c in calls),
        optimizer_class=optimizer_class(program), compile_lines=compile_lines(program),
        metric_classes=metric_classes(program), labels=label_code(program),
        splits=split_presence(program), fit_lines=fit_lines(program),
        output=identifier_names(graph)[layers_[-1][3]])
    template = environment(HERE / "templates").get_template("idiomatic.py.j2")
    return with_imports(template.render(**context))




def functional_lines(program: Program, layers_: list[tuple[Node, list[str], str, str]]
                     ) -> list[str]:
    """``x = Layer(...)(x)`` per node of a branching graph; a value that is needed again
    later keeps its node's name."""
    names = identifier_names(program.graph)
    readers: dict[str, list[str]] = {}
    for node, _, _, _ in layers_:
        for i in node.inputs:
            readers.setdefault(i, []).append(node.name)
    # `x` carries a value to the next layer only: an input read by several layers stays
    # `inputs`, or a branch passing its value on in `x` would overwrite it
    source = program.graph.input.name
    value = {source: "x" if len(readers.get(source, [])) <= 1 else "inputs"}
    lines: list[str] = []
    for k, (node, before, layer_text, last) in enumerate(layers_):
        args = [value[i] for i in node.inputs]
        if node.op == "multiply":
            args = [_as_image(arg, program.graph[i].shape, node.shape)
                    for arg, i in zip(args, node.inputs, strict=True)]
        operand = f"[{', '.join(args)}]" if node.op in MERGE_OPS else args[0]
        following = layers_[k + 1][0].name if k + 1 < len(layers_) else None
        passed_on = readers.get(last, []) == [following] and last != program.graph.output
        target = "x" if passed_on else names[last]
        for layer in before:
            lines += _assigned(target, layer, operand)
            operand = target
        lines += _assigned(target, layer_text, operand)
        value[node.name] = value[last] = target
    return lines


def _as_image(value: str, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """A multiply's operand: a (C,) channel gate of an image as (1, 1, C), which Multiply
    broadcasts over height and width."""
    if len(shape) == len(out_shape):
        return value
    return f"layers.Reshape((1, 1, {shape[-1]}))({value})"


def _assigned(target: str, layer: str, operand: str) -> list[str]:
    """``target = layer(operand)`` as ruff formats it at 100 columns (4 spaces in)."""
    line = f"{target} = {layer}({operand})"
    if 4 + len(line) <= 100:
        return [line]
    if 4 + len(f"{target} = {layer}(") <= 100:
        return [f"{target} = {layer}(", f"    {operand}", ")"]
    head = layer.partition("(")[0]
    return [f"{target} = {head}(", *_arguments(layer, 4), f")({operand})"]


def _added(layer: str) -> list[str]:
    """``model.add(layer)`` as ruff formats it at 100 columns (4 spaces in)."""
    if 4 + len(f"model.add({layer})") <= 100:
        return [f"model.add({layer})"]
    if 8 + len(layer) <= 100:
        return ["model.add(", f"    {layer}", ")"]
    head = layer.partition("(")[0]
    return ["model.add(", f"    {head}(", *_arguments(layer, 8), "    )", ")"]


def _arguments(call: str, indent: int) -> list[str]:
    """The arguments of ``call`` (a layer's constructor) as ruff writes them inside its
    parentheses, ``indent`` columns in from the body's 4: on one line if they fit, else
    one a line, each with its comma."""
    args = call.partition("(")[2][:-1]
    if 4 + indent + len(args) <= 100:
        return [" " * indent + args]
    parsed = ast.parse(call, mode="eval").body
    assert isinstance(parsed, ast.Call)
    return [f"{' ' * indent}{ast.get_source_segment(call, part)},"
            for part in [*parsed.args, *parsed.keywords]]


def _listed(value: float | tuple[float, ...]) -> float | list[float]:
    """A number, or per-channel values as the list a person writes."""
    return list(value) if isinstance(value, tuple) else value


def _helpers(calls: list[str]) -> str:
    """specforge's own Keras layers that the model uses (padding Keras's words cannot say)."""
    wanted = [cls for cls in ("Pad2D", "MaxPool2D", "AvgPool2D", "Conv2D", "ChannelSlice",
                              "ChannelShuffle")
              if any(c.startswith(f"{cls}(") for c in calls)]
    return copied([(LAYERS, used(LAYERS, wanted))]) if wanted else ""


def augment_layers(aug: Any, shape: tuple[int, ...]) -> list[str]:
    """Keras's preprocessing layers for the spec's augmentation (active in training only)."""
    fill = {"fill_mode": aug.fill_mode}
    if aug.fill_mode == "constant":
        fill["fill_value"] = aug.fill_value
    out = []
    if aug.rotation:  # Keras's factor is a fraction of a full turn
        out.append(call("layers.RandomRotation", Code(f"{aug.rotation!r} / 360"), **fill))
    if aug.width_shift or aug.height_shift:
        out.append(call("layers.RandomTranslation", aug.height_shift, aug.width_shift, **fill))
    if aug.zoom:
        out.append(call("layers.RandomZoom", aug.zoom, aug.zoom, **fill))
    flips = [d for d, on in (("horizontal", aug.horizontal_flip), ("vertical",
                                                                   aug.vertical_flip)) if on]
    if flips:
        out.append(call("layers.RandomFlip", "_and_".join(flips)))
    if aug.crop_padding:  # pad, then crop back at random (a centre crop in inference)
        out += [f"layers.ZeroPadding2D({aug.crop_padding})",
                f"layers.RandomCrop({shape[0]}, {shape[1]})"]
    return out




def optimizer_class(program: Program) -> list[str]:
    """A subclass of Keras's optimizer where its update differs from specforge's, else []."""
    opt, h = program.optimizer, program.optimizer.hyper
    decay = ([f"gradient = gradient + {opt.weight_decay!r} * variable  # L2 decay, "
              "coupled as torch's"] if opt.weight_decay and opt.kind != "adamw" else [])
    if opt.kind == "sgd":
        if opt.schedule is None and not opt.weight_decay:
            return []
        lines = ["class SGD(keras.optimizers.SGD):  # torch's: b = momentum * b + g, p -= lr * b",
                 "    def update_step(self, gradient, variable, learning_rate):",
                 *(f"        {d}" for d in decay)]
        if h["momentum"]:
            step = "gradient + self.momentum * b" if h["nesterov"] else "b"
            lines += ["        b = self.momentums[self._get_variable_index(variable)]",
                      "        self.assign(b, self.momentum * b + gradient)",
                      f"        self.assign_sub(variable, learning_rate * ({step}))"]
        else:
            lines.append("        self.assign_sub(variable, learning_rate * gradient)")
        return lines
    if opt.kind == "rmsprop":
        return ["class RMSprop(keras.optimizers.RMSprop):  # epsilon outside the root, as torch",
                "    def update_step(self, gradient, variable, learning_rate):",
                *(f"        {d}" for d in decay),
                "        v = self._velocities[self._get_variable_index(variable)]",
                "        self.assign(v, self.rho * v + (1 - self.rho) * ops.square(gradient))",
                "        self.assign_sub(variable, learning_rate * gradient / (ops.sqrt(v) + "
                "self.epsilon))"]
    return ["class Adam(keras.optimizers.Adam):  # as the paper and torch: epsilon outside v_hat",
            "    def update_step(self, gradient, variable, learning_rate):",
            *(f"        {d}" for d in decay),
            "        m, v = (s[self._get_variable_index(variable)] for s in (self._momentums, "
            "self._velocities))",
            "        self.assign_add(m, (gradient - m) * (1 - self.beta_1))",
            "        self.assign_add(v, (ops.square(gradient) - v) * (1 - self.beta_2))",
            "        t = ops.cast(self.iterations + 1, variable.dtype)  # 1 - beta^t, exactly:",
            "        c1, c2 = (-ops.expm1(t * math.log(b)) for b in (self.beta_1, self.beta_2))",
            "        self.assign_sub(variable, learning_rate * m / c1 / (ops.sqrt(v / c2) + "
            "self.epsilon))"]


def _optimizercall(program: Program) -> str:
    opt, h = program.optimizer, program.optimizer.hyper
    clip: dict[str, Any] = {}
    if opt.clip_norm is not None and opt.clip_value is not None:
        raise UsageError("the idiomatic keras script cannot clip by value and by norm (Keras "
                         "takes one of them); build with --style exact")
    if opt.clip_norm is not None:
        clip["global_clipnorm"] = opt.clip_norm
    if opt.clip_value is not None:
        clip["clipvalue"] = opt.clip_value
    lr = opt.learning_rate
    if opt.kind == "sgd":
        cls = "SGD" if optimizer_class(program) else "keras.optimizers.SGD"
        return call(cls, learning_rate=lr, momentum=h["momentum"], nesterov=h["nesterov"],
                     **clip)
    if opt.kind == "rmsprop":
        return call("RMSprop", learning_rate=lr, rho=h["rho"], epsilon=h["epsilon"], **clip)
    decay = {"weight_decay": opt.weight_decay} if opt.kind == "adamw" else {}
    return call("Adam", learning_rate=lr, beta_1=h["beta1"], beta_2=h["beta2"],
                 epsilon=h["epsilon"], **decay, **clip)


def _losscall(program: Program) -> str:
    loss, e = program.loss, program.loss.label_smoothing
    smooth = {"label_smoothing": e} if e else {}
    # a folded softmax/sigmoid is back on the model's last layer: Keras takes probabilities
    logits = loss.from_logits and not program.output_activation
    if loss.kind == "cross_entropy":
        if not logits and not smooth:
            return '"categorical_crossentropy"'
        return call("keras.losses.CategoricalCrossentropy", **({"from_logits": True}
                                                                 if logits else {}), **smooth)
    if loss.kind == "binary_cross_entropy":
        return call("keras.losses.BinaryCrossentropy", **({"from_logits": True}
                                                            if logits else {}), **smooth)
    return '"mean_squared_error"' if loss.kind == "mse" else '"mean_absolute_error"'


def _metrics(program: Program) -> list[str]:
    binary = program.loss.kind == "binary_cross_entropy"
    logits = program.loss.from_logits and not program.output_activation
    out = []
    for m in program.metrics:
        name = literal(m.label)
        if m.kind == "accuracy":
            out.append(f"keras.metrics.BinaryAccuracy(threshold=0.0, name={name})"
                       if binary and logits else '"accuracy"')
        elif m.kind == "top_k_accuracy":
            out.append(f"keras.metrics.TopKCategoricalAccuracy({m.k}, name={name})")
        elif m.kind == "f1":
            out.append(f"keras.metrics.F1Score({literal(m.average)}, name={name})")
        else:
            out.append(f"{m.kind.capitalize()}({literal(m.average)}, name={name})")
    return out


def compile_lines(program: Program) -> list[str]:
    """``model.compile(...)``, formatted as ruff formats it."""
    metrics = _metrics(program)
    listed = f"metrics=[{', '.join(metrics)}]"
    parts = [f"optimizer={_optimizercall(program)}", f"loss={_losscall(program)}", listed]
    one = f"model.compile({', '.join(parts)})"
    if len(one) <= 96:
        return [one]
    named = f"model.compile({', '.join(['optimizer=optimizer', *parts[1:]])})"
    if len(named) <= 96 and len(parts[0]) <= 96:  # the optimizer on a line of its own
        return [f"optimizer = {parts[0][len('optimizer='):]}", named]
    if 8 + len(", ".join(parts)) <= 100:
        return ["model.compile(", f"    {', '.join(parts)}", ")"]
    lines = ["model.compile(", *(f"    {p}," for p in parts), ")"]
    if 8 + len(listed) + 1 > 100:
        lines[-2:-1] = ["    metrics=[", *(f"        {m}," for m in metrics), "    ],"]
    return lines


def metric_classes(program: Program) -> list[str]:
    """Precision and recall over classes (Keras's own are binary), from F1Score's counts."""
    lines = []
    for kind, other in (("precision", "false_positives"), ("recall", "false_negatives")):
        if any(m.kind == kind for m in program.metrics):
            lines += [f"class {kind.capitalize()}(keras.metrics.F1Score):  # {kind} over "
                      "classes, by argmax", "    def result(self):",
                      "        hits = self.true_positives",
                      f"        return ops.mean(hits / (hits + self.{other} + 1e-7))", "", ""]
    return lines[:-2]


def fit_lines(program: Program) -> list[str]:
    """``model.fit(...)`` with the spec's batch size, steps, validation and schedule. With
    `steps_per_epoch`, batches come from a generator that reshuffles pass after pass (Keras
    stops arrays that run out before steps_per_epoch * epochs)."""
    settings = program.spec.training
    data = program.spec.data
    batch = "len(y)" if data is None or data.batch_size == "full" else str(data.batch_size)
    validation = split_presence(program)["validation"]
    lines = ["(x, y), val = splits[\"train\"], splits[\"validation\"]" if validation else
             "x, y = splits[\"train\"]"]
    if settings.steps_per_epoch:
        lines += ["passes = (np.random.permutation(len(y)) for _ in itertools.count())",
                  f"batches = ((x[b], y[b]) for p in passes for b in np.array_split(p, "
                  f"range({batch}, len(y), {batch})))"]
        parts = ["batches", f"steps_per_epoch={settings.steps_per_epoch}"]
    else:
        parts = ["x", "y", f"batch_size={batch}"]
    parts.append("epochs=args.epochs")
    if validation:
        parts.append("validation_data=val")
    if program.optimizer.schedule is not None:
        steps = str(settings.steps_per_epoch) if settings.steps_per_epoch else \
            f"math.ceil(len(y) / {batch})"
        lines.append(f"steps = {steps}")
        parts.append("callbacks=[Schedule(steps)]")
    parts.append("verbose=2")  # a line an epoch
    # a loss that is not finite ends the script with exit code 2, as `specforge run`
    loss = 'model.history.history["loss"][-1]'
    stop = [f"if not np.isfinite({loss}):  # the loss diverged",
            f'    print("error: the loss became", {loss})', "    raise SystemExit(2)"]
    one = f"model.fit({', '.join(parts)})"
    if len(one) <= 96:
        return [*lines, one, *stop]
    if 8 + len(", ".join(parts)) <= 100:
        return [*lines, "model.fit(", f"    {', '.join(parts)}", ")", *stop]
    return [*lines, "model.fit(", *(f"    {p}," for p in parts), ")", *stop]


def label_code(program: Program) -> str:
    """How the integer labels become Keras's targets."""
    if program.loss.kind == "binary_cross_entropy":
        return 'y[:, None].astype("float32")'
    return f"keras.utils.to_categorical(y, {program.loss.classes})"

