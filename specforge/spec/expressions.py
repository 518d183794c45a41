"""Expressions inside `${...}` in a block's layers: a small, safe grammar, never `eval`.

Inside a block, `${...}` holds an expression over the block's parameters:

- numbers (`4`, `0.5`, `1e-3`), quoted strings (`'relu'`), `true` and `false`;
- the block's parameters by name, and the shape of the block's input: `input.height`,
  `input.width` and `input.channels` (a flat input has only `input.channels`, its length);
- arithmetic `+ - * / // %` and unary minus (`/` gives a float; `//` and `%` round towards
  minus infinity, as in Python), on numbers only;
- `min(a, b, ...)` and `max(a, b, ...)`;
- comparisons `== != < <= > >=` (chains such as `1 < strides <= 4` too), `and`, `or`, `not`
  (on true/false only), and parentheses.

A value that is one expression, `filters: "${4 * filters}"`, takes the expression's type
(a whole number stays whole); `${...}` inside a longer string, `"conv_${i}"`, is written into
the string. Nothing else is accepted: no attribute other than the input's three, no calls
but `min` and `max`, no indexing, no `**`. An error names the spec's file, line and column
of the offending character and its column inside the expression.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specforge.errors import valid_choices_hint

#: Longest expression accepted, in characters (they are short; this bounds the work).
MAX_LENGTH = 500
#: Largest magnitude of a whole number an expression may produce.
MAX_INT = 2**53
#: What the shape of a block's input offers, by attribute.
INPUT_AXES = ("height", "width", "channels")

GRAMMAR = ("numbers, 'strings', true/false, parameters, input.height/width/channels, "
           "+ - * / // %, min(...), max(...), == != < <= > >=, and/or/not, parentheses")

_ARITHMETIC: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul), ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv), ast.Mod: ("%", operator.mod),
}
_COMPARISONS: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt), ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
}
_CONSTANTS = {"true": True, "false": False}
_FUNCTIONS = {"min": min, "max": max}
#: Python's names for what a spec writer may have tried, and what to write instead.
_INSTEAD = {ast.Pow: "write the product out (a * a)", ast.IfExp: "use `when:` on two layers",
            ast.Subscript: "name the value as a block parameter"}


class ExpressionError(Exception):
    """A problem in one expression; ``column`` is 0-based within the expression's text."""

    def __init__(self, message: str, column: int, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.hint = hint


@dataclass(frozen=True)
class Scope:
    """What an expression may read: parameter values, and the input's shape on demand."""

    params: dict[str, Any]
    #: Returns the block input's shape, or raises ExpressionError(..., 0) saying why not.
    input_shape: Callable[[], tuple[int, ...]] | None = None


def evaluate(text: str, scope: Scope) -> Any:
    """The value of expression ``text``; raises :class:`ExpressionError` when it has none."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH)
    flat = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    if not flat.strip():
        raise ExpressionError("empty expression", 0, f"an expression may use: {GRAMMAR}")
    try:
        tree = ast.parse(flat.strip(), mode="eval")
    except SyntaxError as exc:
        indent = len(flat) - len(flat.lstrip())
        # Python gives offset 0 when the text ended too soon: point after its end.
        column = indent + (exc.offset - 1 if exc.offset else len(flat.strip()))
        raise ExpressionError(f"invalid expression: {exc.msg}", min(column, len(flat)),
                              f"an expression may use: {GRAMMAR}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ExpressionError("the expression nests too deeply", 0) from None
    return _Evaluator(flat, scope).value(tree.body)


class _Evaluator:
    def __init__(self, text: str, scope: Scope) -> None:
        self.text = text
        self.indent = len(text) - len(text.lstrip())
        self.scope = scope

    def column(self, node: ast.AST) -> int:
        """The node's 0-based column in the original text (ast counts UTF-8 bytes)."""
        stripped = self.text.lstrip().encode("utf-8")
        offset = getattr(node, "col_offset", 0)
        return self.indent + len(stripped[:offset].decode("utf-8", errors="ignore"))

    def fail(self, node: ast.AST, message: str, hint: str | None = None) -> ExpressionError:
        return ExpressionError(message, self.column(node), hint)

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Attribute):
            return self.input_axis(node)
        if isinstance(node, ast.BinOp):
            return self.arithmetic(node)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node)
        if isinstance(node, ast.BoolOp):
            return self.logic(node)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        what = type(node).__name__
        hint = _INSTEAD.get(type(node))
        raise self.fail(node, f"'{ast.get_source_segment(self.text.lstrip(), node) or what}' "
                              "is not allowed in an expression",
                        hint or f"an expression may use: {GRAMMAR}")

    def constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, bool) or not isinstance(node.value, int | float | str):
            raise self.fail(node, f"{node.value!r} is not allowed in an expression",
                            "write true or false in lower case" if isinstance(node.value, bool)
                            else f"an expression may use: {GRAMMAR}")
        return self.checked(node, node.value)

    def name(self, node: ast.Name) -> Any:
        if node.id in self.scope.params:
            return self.scope.params[node.id]
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if node.id == "input":
            raise self.fail(node, "'input' is a shape: use input.height, input.width or "
                                  "input.channels")
        known = [*self.scope.params, "input.height", "input.width", "input.channels"]
        raise self.fail(node, f"unknown name '{node.id}'",
                        valid_choices_hint(node.id, known, "names here"))

    def input_axis(self, node: ast.Attribute) -> int:
        if not (isinstance(node.value, ast.Name) and node.value.id == "input"):
            raise self.fail(node, "only the block input's shape has attributes "
                                  "(input.height, input.width, input.channels)")
        if node.attr not in INPUT_AXES:
            error = self.fail(node, f"the input has no '{node.attr}'",
                              valid_choices_hint(node.attr, list(INPUT_AXES), "it has"))
            end = self.text.lstrip().encode("utf-8")[:node.end_col_offset or 0]
            error.column = self.indent + len(end.decode("utf-8", errors="ignore")) - len(
                node.attr)  # at the attribute's name
            raise error
        if self.scope.input_shape is None:
            raise self.fail(node, "the input's shape is only available inside a block")
        try:
            shape = self.scope.input_shape()
        except ExpressionError as exc:  # keeps its class: the caller may treat it apart
            raise type(exc)(exc.message, self.column(node), exc.hint) from None
        if node.attr == "channels":
            return shape[-1]
        if len(shape) != 3:
            raise self.fail(node, f"the block's input is flat {tuple(shape)}: it has no "
                                  f"{node.attr}", "a flat input has only input.channels")
        return shape[INPUT_AXES.index(node.attr)]

    def number(self, node: ast.expr) -> int | float:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(node, f"expected a number, got {_kind(value)} {value!r}")
        return value

    def truth(self, node: ast.expr) -> bool:
        value = self.value(node)
        if not isinstance(value, bool):
            raise self.fail(node, f"expected true or false, got {_kind(value)} {value!r}",
                            "compare it, e.g. `strides > 1`")
        return value

    def checked(self, node: ast.expr, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(node, "the result is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise self.fail(node, f"the result is larger than {MAX_INT:,}")
        return value

    def arithmetic(self, node: ast.BinOp) -> Any:
        if type(node.op) not in _ARITHMETIC:
            raise self.fail(node, f"'{ast.get_source_segment(self.text.lstrip(), node)}' "
                                  "uses an operator expressions do not have",
                            _INSTEAD.get(type(node.op)) or f"an expression may use: {GRAMMAR}")
        symbol, apply = _ARITHMETIC[type(node.op)]
        left, right = self.number(node.left), self.number(node.right)
        if right == 0 and symbol in ("/", "//", "%"):
            raise self.fail(node.right, f"division by zero ({symbol} 0)")
        try:
            return self.checked(node, apply(left, right))
        except OverflowError:
            raise self.fail(node, "the result is not a finite number") from None

    def unary(self, node: ast.UnaryOp) -> Any:
        if isinstance(node.op, ast.Not):
            return not self.truth(node.operand)
        if isinstance(node.op, ast.USub):
            return -self.number(node.operand)
        if isinstance(node.op, ast.UAdd):
            return self.number(node.operand)
        raise self.fail(node, "'~' is not allowed in an expression")

    def logic(self, node: ast.BoolOp) -> bool:
        values = [self.truth(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)

    def compare(self, node: ast.Compare) -> bool:
        left_node, left = node.left, self.value(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if type(op) not in _COMPARISONS:
                raise self.fail(node, f"'{type(op).__name__}' comparisons are not allowed",
                                "compare with == != < <= > >=")
            symbol, apply = _COMPARISONS[type(op)]
            right = self.value(right_node)
            ordered = symbol not in ("==", "!=")
            if (_kind(left) != _kind(right)) or (ordered and _kind(left) != "number"):
                raise self.fail(left_node, f"cannot compare {_kind(left)} {left!r} "
                                           f"{symbol} {_kind(right)} {right!r}")
            if not apply(left, right):
                return False
            left_node, left = right_node, right
        return True

    def call(self, node: ast.Call) -> Any:
        if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
            raise self.fail(node, "only min(...) and max(...) may be called")
        if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, f"{node.func.id}(...) takes one or more numbers")
        return _FUNCTIONS[node.func.id](self.number(a) for a in node.args)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__
