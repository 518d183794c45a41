"""Lowering the spec's model to an IR graph: names, edges, explicit attrs and shapes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from specforge.errors import Problem, SpecError, valid_choices_hint
from specforge.ir.expand import Expansion, Placed, canonical_type, expand
from specforge.ir.graph import Graph, Node, Shape, freeze
from specforge.ir.ops import OPS, ShapeError, same_pads
from specforge.spec import layers as L
from specforge.spec.schema import Spec
from specforge.spec.source import LoadedSpec

#: Default upper bound on a model's parameters (`--max-params` changes it).
DEFAULT_MAX_PARAMS = 2_000_000_000


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def resolve_pads(padding: Any, in_shape: Shape, kernel: tuple[int, int],
                 strides: tuple[int, int], dilation: tuple[int, int] = (1, 1)
                 ) -> tuple[int, int, int, int]:
    """Explicit (top, bottom, left, right) pads for any padding a spec may write."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding in ("same", "same_lower"):
        if len(in_shape) != 3:
            return (0, 0, 0, 0)  # the op's own shape check reports the real problem
        lower = padding == "same_lower"
        top, bottom = same_pads(in_shape[0], kernel[0], strides[0], dilation[0], lower)
        left, right = same_pads(in_shape[1], kernel[1], strides[1], dilation[1], lower)
        return (top, bottom, left, right)
    if isinstance(padding, int):
        return (padding,) * 4
    if isinstance(padding, tuple):
        return (padding[0], padding[0], padding[1], padding[1])
    return (padding.top, padding.bottom, padding.left, padding.right)


def activation_attrs(config: L.ActivationConfig | str) -> dict[str, Any]:
    """An activation's attrs with every parameter of its function explicit."""
    if isinstance(config, str):
        config = L.ActivationConfig(fn=config)
    attrs: dict[str, Any] = {"fn": config.fn}
    if config.fn == "leaky_relu":
        attrs["negative_slope"] = 0.01 if config.negative_slope is None else config.negative_slope
    if config.fn == "elu":
        attrs["alpha"] = 1.0 if config.alpha is None else config.alpha
    if config.fn == "hard_sigmoid":
        attrs["alpha"] = 1 / 6 if config.alpha is None else config.alpha
        attrs["beta"] = 0.5 if config.beta is None else config.beta
    return attrs


def pad_attrs(mode_key: str, mode: str, pad_value: float | None) -> dict[str, Any]:
    """The padding mode, and the constant mode's value (0 when the spec gives none)."""
    if mode != "constant":
        return {mode_key: mode}
    return {mode_key: mode, "pad_value": 0.0 if pad_value is None else float(pad_value)}


def pool_attrs(layer: L.Pool2D, in_shape: Shape) -> dict[str, Any]:
    """A pooling layer's attrs, every option explicit."""
    pool, dilation = pair(layer.pool), pair(layer.dilation)
    strides = pair(layer.strides) if layer.strides is not None else pool
    attrs: dict[str, Any] = {
        "pool": pool, "strides": strides, "dilation": dilation,
        "pads": resolve_pads(layer.padding, in_shape, pool, strides, dilation),
        "ceil_mode": layer.ceil_mode}
    if isinstance(layer, L.AvgPool2D):
        attrs["count_include_pad"] = bool(layer.count_include_pad or
                                          layer.pad_value is not None)
    if layer.pad_value is not None:
        attrs["pad_value"] = float(layer.pad_value)
    return attrs


def _ops_for(layer: Any, in_shape: Shape) -> list[tuple[str, dict[str, Any]]]:
    """The (op, attrs) sequence one spec layer lowers to; activations become their own node."""
    if isinstance(layer, L.Conv2D | L.DepthwiseConv2D):
        kernel, strides, dilation = pair(layer.kernel), pair(layer.strides), pair(layer.dilation)
        if isinstance(layer, L.Conv2D):
            filters, groups = layer.filters, layer.groups
        else:
            channels = in_shape[-1]
            filters, groups = channels * layer.depth_multiplier, channels
        main = ("conv2d", {
            "filters": filters, "kernel": kernel, "strides": strides, "dilation": dilation,
            "groups": groups, "pads": resolve_pads(layer.padding, in_shape, kernel, strides,
                                                   dilation),
            **pad_attrs("pad_mode", layer.padding_mode, layer.pad_value), "bias": layer.bias})
    elif isinstance(layer, L.Dense):
        main = ("dense", {"units": layer.units, "bias": layer.bias})
    elif isinstance(layer, L.Pool2D):
        main = (canonical_type(layer), pool_attrs(layer, in_shape))
    elif isinstance(layer, L.Pad2D):
        main = ("pad2d", {"pads": resolve_pads(layer.padding, in_shape, (1, 1), (1, 1)),
                          **pad_attrs("mode", layer.mode, layer.pad_value)})
    elif isinstance(layer, L.Cropping2D):  # written as padding is: the same four sides
        return [("cropping2d", {"crops": resolve_pads(layer.cropping, in_shape, (1, 1),
                                                      (1, 1))})]
    elif isinstance(layer, L.ChannelSlice):  # stop made explicit: the input's channels
        stop = in_shape[-1] if layer.stop is None else layer.stop
        return [("channel_slice", {"start": layer.start, "stop": stop})]
    elif isinstance(layer, L.ChannelShuffle):
        return [("channel_shuffle", {"groups": layer.groups})]
    elif isinstance(layer, L.BatchNorm):
        main = ("batch_norm", {"decay": layer.running_decay, "epsilon": layer.epsilon,
                               "scale": layer.scale, "center": layer.center})
    elif isinstance(layer, L.LayerNorm):
        return [("layer_norm", {"epsilon": layer.epsilon})]
    elif isinstance(layer, L.GroupNorm):
        return [("group_norm", {"groups": layer.groups, "epsilon": layer.epsilon})]
    elif isinstance(layer, L.PReLU):
        return [("prelu", {"alpha_init": layer.alpha_init})]
    elif isinstance(layer, L.Dropout):
        main = ("dropout", {"rate": layer.rate, "spatial": layer.spatial,
                            "per_sample": layer.per_sample})
    elif isinstance(layer, L.ActivationLayer):
        return [("activation", activation_attrs(layer.config()))]
    elif isinstance(layer, L.Rescaling):
        # a list (one number per channel) as a tuple: attrs are immutable
        return [("rescaling", {k: tuple(v) if isinstance(v, list) else v for k, v in
                               (("scale", layer.scale), ("offset", layer.offset))})]
    else:  # flatten, global pooling, add, multiply, concat: the op is the type, with no attrs
        return [(canonical_type(layer), {})]
    extra = getattr(layer, "activation", None)
    return [main] if extra is None else [main, ("activation", activation_attrs(extra))]


def lower_model(spec: Spec, loaded: LoadedSpec, *,
                max_params: int = DEFAULT_MAX_PARAMS) -> Graph:
    """Build the IR graph of ``spec.model``; raises SpecError with every problem found."""
    expansion = expand(spec, loaded, _ShapeProbe(spec))
    problems = list(expansion.problems)
    placed = _index(expansion.layers, problems)
    if problems:
        # Expansion or naming failed: wiring and shapes would be checked on a wrong graph.
        raise SpecError(problems)
    resolve = {**{n: n for n in placed}, **expansion.aliases, "input": "input"}
    output_ref = spec.model.output or expansion.output
    _check_references(placed, resolve, problems, loaded)
    if spec.model.output is not None and spec.model.output not in resolve:
        problems.append(Problem(f"unknown output layer '{spec.model.output}'",
                                loaded.sources.locate(("model", "output")), ("model", "output"),
                                valid_choices_hint(spec.model.output, list(placed))))
    order = _topological(placed, resolve, problems)
    input_node = _node("input", "input", (), {"shape": tuple(spec.model.input)}, [], None, "")
    nodes = [input_node]
    output_of: dict[str, Node] = {"input": input_node}
    for item in order:
        sources = [output_of.get(resolve.get(r, "")) for r in item.inputs]
        if any(s is None for s in sources):
            continue  # an input failed; its own problem is already reported
        try:
            chain = _lower_placed(item, [s for s in sources if s is not None])
        except ShapeError as exc:
            problems.append(Problem(f"layer '{item.name}': {exc}", item.location, item.path,
                                    exc.hint, item.via))
            continue
        nodes.extend(chain)
        output_of[item.name] = chain[-1]
    if problems:
        raise SpecError(problems)
    output = output_of[resolve[output_ref]].name
    graph = Graph(tuple(_reachable(nodes, output)), output)
    _check_unused(nodes, graph, placed, problems)
    _check_size(graph, max_params, loaded, problems)
    if problems:
        raise SpecError(problems)
    return graph


class _ShapeProbe:
    """Shapes of the layers placed so far, for the expressions that read a block input's
    shape. Layers are lowered as soon as their inputs are known; for a layer that fails,
    the probe gives the reason instead."""

    def __init__(self, spec: Spec) -> None:
        self.shapes: dict[str, Shape | str] = {"input": tuple(spec.model.input)}
        self.seen = 0
        self.waiting: list[Placed] = []

    def __call__(self, ref: str, expansion: Expansion) -> Shape | str:
        self.waiting.extend(expansion.layers[self.seen:])
        self.seen = len(expansion.layers)
        progress = True
        while progress and self.waiting:
            progress = False
            for item in list(self.waiting):
                names = [_final(r, expansion.aliases) for r in item.inputs]
                if all(n in self.shapes for n in names):
                    self.waiting.remove(item)
                    self.shapes[item.name] = self._lower(item, [self.shapes[n] for n in names])
                    progress = True
        name = _final(ref, expansion.aliases)
        return self.shapes.get(name, f"'{name}' comes later in the model")

    @staticmethod
    def _lower(item: Placed, in_shapes: list[Shape | str]) -> Shape | str:
        failed = [s for s in in_shapes if isinstance(s, str)]
        if failed:
            return failed[0]
        sources = [Node(f"in{i}", "input", (), freeze({}), s)
                   for i, s in enumerate(in_shapes) if not isinstance(s, str)]
        try:
            return _lower_placed(item, sources)[-1].shape
        except ShapeError as exc:
            return f"layer '{item.name}': {exc}"


def _final(ref: str, aliases: dict[str, str]) -> str:
    """A reference to a block instance or repeated layer -> the name of its last output."""
    seen = set()
    while ref in aliases and ref not in seen:
        seen.add(ref)
        ref = aliases[ref]
    return ref


def _index(layers: list[Placed], problems: list[Problem]) -> dict[str, Placed]:
    """Placed layers by name (names are unique: expansion reports duplicates)."""
    placed: dict[str, Placed] = {}
    for item in layers:
        if item.name == "input":
            problems.append(Problem("`input` is reserved for the model's input", item.location,
                                    (*item.path, "name"), "choose another name", item.via))
        placed.setdefault(item.name, item)
    return placed


def _check_references(placed: dict[str, Placed], resolve: dict[str, str],
                      problems: list[Problem], loaded: LoadedSpec) -> None:
    for item in placed.values():
        for ref in item.inputs:
            if ref not in resolve:
                problems.append(Problem(
                    f"unknown layer '{ref}' in inputs",
                    loaded.sources.locate((*item.path, "inputs")), (*item.path, "inputs"),
                    valid_choices_hint(ref, [*placed, "input"], "layers"), item.via))


def _topological(placed: dict[str, Placed], resolve: dict[str, str],
                 problems: list[Problem]) -> list[Placed]:
    """Depth-first order; a cycle is reported with every layer on it."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    order: list[Placed] = []
    for start in placed:
        if state.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        state[start] = 1
        while stack:
            name, i = stack.pop()
            deps = [resolve[r] for r in placed[name].inputs
                    if resolve.get(r, "input") != "input"]
            if i < len(deps):
                stack.append((name, i + 1))
                dep = deps[i]
                if state.get(dep) == 1:
                    cycle = [n for n, _ in stack] + [dep]
                    cycle = cycle[cycle.index(dep):]
                    item = placed[dep]
                    problems.append(Problem("the layers form a cycle: " + " -> ".join(cycle),
                                            item.location, (*item.path, "inputs"),
                                            "a layer may only read layers that do not "
                                            "depend on it", item.via))
                    return []
                if not state.get(dep):
                    state[dep] = 1
                    stack.append((dep, 0))
            else:
                state[name] = 2
                order.append(placed[name])
    return order


def _lower_placed(item: Placed, sources: list[Node]) -> list[Node]:
    in_shapes = [s.shape for s in sources]
    if not isinstance(item.layer, L.Merge) and len(sources) != 1:
        raise ShapeError(f"{canonical_type(item.layer)} takes one input, got {len(sources)}",
                         "merge several inputs with {type: add} or {type: concat} first")
    chain: list[Node] = []
    inputs = tuple(s.name for s in sources)
    steps = _ops_for(item.layer, in_shapes[0])
    for i, (op_name, attrs) in enumerate(steps):
        name = item.name if i == 0 else f"{item.name}.{attrs.get('fn', op_name)}"
        node = _node(name, op_name, inputs, attrs, in_shapes, item, item.name)
        chain.append(node)
        inputs, in_shapes = (node.name,), [node.shape]
    return chain


def _node(name: str, op_name: str, inputs: tuple[str, ...], attrs: dict[str, Any],
          in_shapes: list[Shape], item: Placed | None, layer: str) -> Node:
    result = OPS[op_name].infer(attrs, in_shapes)
    return Node(name, op_name, inputs, freeze(attrs), result.shape, result.params, result.flops,
                layer, item.location if item else None,
                layer_type=canonical_type(item.layer) if item else op_name)


def _reachable(nodes: list[Node], output: str) -> Iterable[Node]:
    needed = {output}
    for node in reversed(nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return [n for n in nodes if n.name in needed]


def _check_unused(nodes: list[Node], graph: Graph, placed: dict[str, Placed],
                  problems: list[Problem]) -> None:
    kept = {n.name for n in graph}
    for node in nodes:
        if node.name not in kept and node.name in placed:
            item = placed[node.name]
            problems.append(Problem(
                f"layer '{node.name}' does not reach the output '{graph.output}'",
                item.location, item.path, "use it in a later layer's `inputs`, or remove it",
                item.via))


def _check_size(graph: Graph, max_params: int, loaded: LoadedSpec,
                problems: list[Problem]) -> None:
    total = graph.trainable_params + graph.non_trainable_params
    if total > max_params:
        biggest = max(graph, key=lambda n: n.param_count)
        problems.append(Problem(
            f"the model has {total:,} parameters, above the limit of {max_params:,} "
            f"(largest: '{biggest.name}' with {biggest.param_count:,})",
            biggest.location or loaded.sources.locate(("model",)), ("model",),
            "make the model smaller, or raise the limit with --max-params"))
