"""Writing an imported model: a spec a person would write, and its weights beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from specforge.atomic import write_atomically
from specforge.errors import SpecError, UsageError
from specforge.importers import ImportedModel, ImportRefused
from specforge.ir.graph import Graph
from specforge.ir.lower import lower_model
from specforge.spec.schema import validate_spec
from specforge.spec.source import LoadedSpec, parse_yaml
from specforge.weights import check_weights, save_weights


def weights_path(spec_path: Path) -> Path:
    """Where the weights of an imported spec go: beside it, `model.yaml` -> `model.npz`."""
    return spec_path.with_suffix(".npz")


def write_import(model: ImportedModel, spec_path: Path) -> tuple[Path, Path]:
    """Check ``model`` compiles with its weights, then write the spec and the weights.
    Nothing is written when a check fails."""
    if spec_path.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(f"-o {spec_path}: name a .yaml file")
    npz = weights_path(spec_path)
    graph = _graph_of(render(model, npz.name, {"type": "cross_entropy"}), spec_path)
    text = render(model, npz.name, _loss_for(graph, model))
    from specforge.compiler import compile_text

    try:
        compile_text(text, str(spec_path))
        check_weights(graph, model.weights)
    except (SpecError, ValueError) as exc:  # a bug of the importer, not of the user's model
        raise UsageError(f"the spec imported from {model.source} does not compile: {exc}"
                         ) from None
    save_weights(npz, model.weights)
    write_atomically(spec_path, text)
    return spec_path, npz


def _graph_of(text: str, name: Path) -> Graph:
    data, sources = parse_yaml(text, str(name))
    loaded = LoadedSpec(data, sources, str(name))
    return lower_model(validate_spec(loaded), loaded)


def _loss_for(graph: Graph, model: ImportedModel) -> dict[str, Any]:
    """A loss that fits the model's output, for `specforge run` to start from."""
    out = graph[graph.output]
    if len(out.shape) != 1:
        raise ImportRefused(model.source, [
            f"the model's output {graph.output!r} has shape {list(out.shape)}: specforge's "
            "losses need a flat output (end the model with a dense or global pooling layer)"])
    squash = out.attrs.get("fn") if out.op == "activation" else None
    if out.shape[0] == 1 and squash == "sigmoid":
        return {"type": "binary_cross_entropy"}
    if out.shape[0] >= 2 and squash in ("softmax", None):
        return {"type": "cross_entropy"}
    return {"type": "mse"}


def _flow(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000,
                          sort_keys=False)
    return text.removesuffix("\n...\n").strip()  # a lone scalar ends its document


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _top_level_items(flow: str) -> list[str]:
    """``{a: 1, b: [2, 3]}`` -> ``['{a: 1,', 'b: [2, 3]}']``: split after the mapping's own
    commas, never inside a nested list, mapping or quoted string."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(flow):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 1:
            items.append(flow[start:i + 1])
            start = i + 2
    return [*items, flow[start:]]


def _wrapped(prefix: str, flow: str, width: int = 100) -> list[str]:
    """A flow mapping in lines of at most ``width`` columns where its items allow, the
    continuation lines under its first key (as the shipped specs are written)."""
    lines = [prefix]
    indent = " " * (len(prefix) + 1)
    for item in _top_level_items(flow):
        if lines[-1].strip() not in ("", "-") and len(lines[-1]) + 1 + len(item) > width:
            lines.append(indent + item)
        else:
            lines[-1] += ("" if lines[-1] == prefix else " ") + item
    return lines


def _written_layers(model: ImportedModel) -> list[dict[str, Any]]:
    """The layers with `inputs` left out where it is the default (the previous layer)."""
    out, previous = [], "input"
    for item in model.layers:
        item = dict(item)
        inputs = item.get("inputs")
        if inputs is not None and len(inputs) == 1 and item["type"] not in ("add", "concat"):
            item["inputs"] = inputs[0]
            if inputs[0] == previous:
                del item["inputs"]
        out.append(item)
        previous = item["name"]
    return out


def render(model: ImportedModel, weights_name: str, loss: dict[str, Any]) -> str:
    """The spec's YAML text: one flow mapping per layer, as the shipped specs are written."""
    lines = [
        f"# Imported by `specforge import` from {model.source.name} ({model.description}).",
        f"# Weights: {weights_name} (specforge's neutral format), beside this file.",
        "# The loss and optimizer are a starting point for fine-tuning: edit them.",
        f"name: {_flow(model.source.stem)}",
        "model:",
        f"  input: {_flow(list(model.input_shape))}          # height, width, channels",
        "  layers:",
    ]
    for item in _written_layers(model):
        lines += _wrapped("    - ", _flow(item))
    if model.output is not None and model.output != model.layers[-1]["name"]:
        lines.append(f"  output: {model.output}")
    lines += [f"loss: {_flow(loss)}", "optimizer: {type: adam}", ""]
    return "\n".join(lines)
