"""A small PromQL parser and label checker for the observability tests (tests/docker/).

:func:`parse` reads the PromQL the shipped alert rules and Grafana dashboard use (selectors
with label matchers, range/offset/``@`` modifiers, subqueries, aggregations with ``by`` /
``without``, function calls, binary operators with ``bool``, ``on`` / ``ignoring`` and
``group_left`` / ``group_right``) into a small tree, and records every label name written in
the expression and every label matcher, with their positions (the negative tests rename
each one in turn).

:func:`check` walks the tree and computes the label set of every sub-expression from the
label sets the service exports (a :class:`Schema` built from a real ``/metrics``), reporting:

* a matcher on a label the selected metric does not have;
* a literal matcher value (or an alternative of an ``a|b`` regex) that the service never
  produces, for labels with a known value set (``outcome``, ``requested``, ``provider``,
  ``job``...); a Grafana variable (``$model``, ``${model}``) is accepted as a value when the
  schema allows it;
* ``by (...)`` / ``without (...)`` labels the aggregated series do not carry;
* ``on (...)`` labels missing on either side of a binary operation, ``ignoring (...)`` labels
  on neither side, ``group_left (...)`` / ``group_right (...)`` labels missing on the "one"
  side, and vector-vector operations without ``on`` whose sides differ in labels (they
  never match);
* ``histogram_quantile`` over series without ``le``; ``label_replace`` / ``label_join``
  source labels the series do not carry.

It is not a complete PromQL implementation: it knows what the shipped queries use and
raises :class:`PromQLSyntaxError` on anything else (``promtool`` checks the real syntax).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

__all__ = [
    "Label",
    "Matcher",
    "Parsed",
    "PromQLSyntaxError",
    "Schema",
    "check",
    "parse",
]

AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
_KEEP_LABELS = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})
_SCALAR_FUNCTIONS = frozenset({"scalar", "time", "pi"})
_SET_OPS = frozenset({"and", "or", "unless"})
# Binary operators, lowest precedence first.
_PRECEDENCE: tuple[frozenset[str], ...] = (
    frozenset({"or"}),
    frozenset({"and", "unless"}),
    frozenset({"==", "!=", "<=", "<", ">=", ">"}),
    frozenset({"+", "-"}),
    frozenset({"*", "/", "%", "atan2"}),
    frozenset({"^"}),
)
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<var>\$\{\w+(?::\w+)?\}|\$\w+)
    |(?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?:[a-zA-Z]\w*)?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=(){}\[\],@:])
    """,
    re.VERBOSE,
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_SIMPLE_ALTERNATION = re.compile(r"[\w.:-]+(?:\|[\w.:-]+)*")


class PromQLSyntaxError(ValueError):
    """The expression is not PromQL this parser understands."""


@dataclass(frozen=True)
class Label:
    """A label name written in the expression; ``start:end`` is its span in the text."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Matcher:
    """``label op "value"``; ``start:end`` is the span of the value without its quotes."""

    metric: str | None
    label: Label
    op: str
    value: str
    start: int
    end: int


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int


class _Node:
    pass


@dataclass
class _Number(_Node):
    text: str


@dataclass
class _String(_Node):
    value: str
    start: int
    end: int


@dataclass
class _Selector(_Node):
    name: str | None
    matchers: list[Matcher]


@dataclass
class _Aggregation(_Node):
    op: str
    grouping: list[Label]
    without: bool
    param: _Node | None
    expr: _Node


@dataclass
class _Call(_Node):
    func: str
    args: list[_Node]


@dataclass
class _Binary(_Node):
    op: str
    lhs: _Node
    rhs: _Node
    on: list[Label] | None = None
    ignoring: list[Label] | None = None
    group: str | None = None  # "left" / "right"
    include: list[Label] = field(default_factory=list)


@dataclass
class _Unary(_Node):
    expr: _Node


@dataclass(frozen=True)
class Parsed:
    """A parsed expression: its tree, every label name written in it (matchers, grouping
    and matching clauses, ``label_replace`` sources) and every label matcher."""

    text: str
    tree: _Node
    labels: tuple[Label, ...]
    matchers: tuple[Matcher, ...]


def _tokens(text: str) -> list[_Token]:
    out = []
    pos = 0
    while pos < len(text):
        found = _TOKEN.match(text, pos)
        if found is None:
            raise PromQLSyntaxError(f"unexpected {text[pos : pos + 10]!r} at {pos} in {text!r}")
        kind = found.lastgroup
        assert kind is not None
        if kind != "ws":
            out.append(_Token(kind, found.group(), found.start(), found.end()))
        pos = found.end()
    return out


def _unquote(token: _Token) -> str:
    if token.text.startswith("`"):
        return token.text[1:-1]
    value = ast.literal_eval(token.text)
    assert isinstance(value, str)
    return value


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0
        self.labels: list[Label] = []
        self.matchers: list[Matcher] = []

    # -- tokens ------------------------------------------------------------------------

    def peek(self, ahead: int = 0) -> _Token | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def at(self, *texts: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        if token is None or token.kind == "string":
            return False
        text = token.text.lower() if token.kind == "ident" else token.text
        return text in texts

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise PromQLSyntaxError(f"unexpected end of {self.text!r}")
        self.i += 1
        return token

    def expect(self, text: str) -> _Token:
        if not self.at(text):
            token = self.peek()
            got = "the end" if token is None else f"{token.text!r} at {token.start}"
            raise PromQLSyntaxError(f"expected {text!r} (got {got}) in {self.text!r}")
        return self.take()

    def fail(self, what: str) -> PromQLSyntaxError:
        token = self.peek()
        got = "the end" if token is None else f"{token.text!r} at {token.start}"
        return PromQLSyntaxError(f"expected {what} (got {got}) in {self.text!r}")

    # -- grammar -----------------------------------------------------------------------

    def parse(self) -> Parsed:
        tree = self.expr(0)
        if self.peek() is not None:
            raise self.fail("an operator or the end")
        return Parsed(self.text, tree, tuple(self.labels), tuple(self.matchers))

    def expr(self, level: int) -> _Node:
        if level == len(_PRECEDENCE):
            return self.unary()
        lhs = self.expr(level + 1)
        while self.at(*_PRECEDENCE[level]):
            op = self.take().text.lower()
            binary = _Binary(op, lhs, _Number("0"))
            if self.at("bool"):
                self.take()
            if self.at("on", "ignoring"):
                keyword = self.take().text.lower()
                labels = self.label_list()
                if keyword == "on":
                    binary.on = labels
                else:
                    binary.ignoring = labels
            if self.at("group_left", "group_right"):
                binary.group = self.take().text.lower().removeprefix("group_")
                if self.at("("):
                    binary.include = self.label_list()
            # "^" is right-associative, the others left-associative.
            binary.rhs = self.expr(level if op == "^" else level + 1)
            lhs = binary
        return lhs

    def unary(self) -> _Node:
        if self.at("-", "+"):
            self.take()
            return _Unary(self.unary())
        return self.postfix()

    def postfix(self) -> _Node:
        node = self.primary()
        while True:
            if self.at("["):  # range or subquery: the labels are the inner expression's
                self.take()
                while not self.at("]"):
                    self.take()
                self.take()
            elif self.at("offset"):
                self.take()
                if self.at("-"):
                    self.take()
                token = self.take()
                if token.kind not in ("number", "var"):
                    raise PromQLSyntaxError(f"expected a duration after offset in {self.text!r}")
            elif self.at("@"):
                self.take()
                if self.at("start", "end"):
                    self.take()
                    self.expect("(")
                    self.expect(")")
                elif self.take().kind != "number":
                    raise PromQLSyntaxError(f"expected a time after @ in {self.text!r}")
            else:
                return node

    def primary(self) -> _Node:
        token = self.peek()
        if token is None:
            raise self.fail("an expression")
        if token.text == "(":
            self.take()
            node = self.expr(0)
            self.expect(")")
            return node
        if token.kind == "number":
            self.take()
            return _Number(token.text)
        if token.kind == "string":
            self.take()
            return _String(_unquote(token), token.start + 1, token.end - 1)
        if token.text == "{":
            return self.selector(None)
        if token.kind != "ident":
            raise self.fail("an expression")
        name = token.text
        if name.lower() in ("inf", "nan"):
            self.take()
            return _Number(name)
        if name.lower() in AGGREGATIONS and (
            self.at("(", ahead=1) or self.at("by", "without", ahead=1)
        ):
            return self.aggregation()
        if self.at("(", ahead=1):
            return self.call()
        self.take()
        return self.selector(name)

    def label_list(self) -> list[Label]:
        self.expect("(")
        labels = []
        while not self.at(")"):
            token = self.take()
            if token.kind != "ident":
                raise PromQLSyntaxError(f"expected a label name (got {token.text!r})")
            labels.append(Label(token.text, token.start, token.end))
            if not self.at(")"):
                self.expect(",")
        self.take()
        self.labels.extend(labels)
        return labels

    def args(self) -> list[_Node]:
        self.expect("(")
        args = []
        while not self.at(")"):
            args.append(self.expr(0))
            if not self.at(")"):
                self.expect(",")
        self.take()
        return args

    def aggregation(self) -> _Node:
        op = self.take().text.lower()
        grouping: list[Label] = []
        without = False
        modifier = self.at("by", "without")
        if modifier:
            without = self.take().text.lower() == "without"
            grouping = self.label_list()
        args = self.args()
        if not modifier and self.at("by", "without"):
            without = self.take().text.lower() == "without"
            grouping = self.label_list()
        if len(args) not in (1, 2):
            raise PromQLSyntaxError(f"expected 1 or 2 arguments to {op} in {self.text!r}")
        param = args[0] if len(args) == 2 else None
        return _Aggregation(op, grouping, without, param, args[-1])

    def call(self) -> _Node:
        func = self.take().text
        args = self.args()
        if func in ("label_replace", "label_join"):  # (v, dst, ..., src...)
            for arg in args[3:] if func == "label_join" else args[3:4]:
                if isinstance(arg, _String) and arg.value:
                    self.labels.append(Label(arg.value, arg.start, arg.end))
        return _Call(func, args)

    def selector(self, name: str | None) -> _Node:
        matchers: list[Matcher] = []
        if self.at("{"):
            self.take()
            while not self.at("}"):
                label = self.take()
                if label.kind != "ident":
                    raise PromQLSyntaxError(f"expected a label name (got {label.text!r})")
                op = self.take().text
                if op not in _MATCH_OPS:
                    raise PromQLSyntaxError(f"expected a label matcher (got {op!r})")
                value = self.take()
                if value.kind != "string":
                    raise PromQLSyntaxError(f"expected a quoted value (got {value.text!r})")
                written = Label(label.text, label.start, label.end)
                matcher = Matcher(
                    name, written, op, _unquote(value), value.start + 1, value.end - 1
                )
                matchers.append(matcher)
                self.labels.append(written)
                self.matchers.append(matcher)
                if not self.at("}"):
                    self.expect(",")
            self.take()
        if name is None:
            names = [m.value for m in matchers if m.label.name == "__name__" and m.op == "="]
            if len(names) != 1:
                raise PromQLSyntaxError(f"expected a metric name in a selector of {self.text!r}")
            name = names[0]
        return _Selector(name, matchers)


def parse(text: str) -> Parsed:
    """Parse PromQL ``text`` (Grafana variables allowed in strings and ranges)."""
    return _Parser(text).parse()


@dataclass(frozen=True)
class Schema:
    """What the service (and Prometheus) put on the series a query can select.

    Args:
        metrics: ``{sample name: label names}``, target labels included.
        values: ``{(sample name, label): values}`` for labels with a known set of values;
            the sample name ``"*"`` applies to every metric.
        variables: Grafana variables (names without ``$``) accepted as matcher values.
    """

    metrics: Mapping[str, Collection[str]]
    values: Mapping[tuple[str, str], Collection[str]] = field(default_factory=dict)
    variables: Collection[str] = ()

    def domain(self, metric: str, label: str) -> Collection[str] | None:
        found = self.values.get((metric, label))
        return found if found is not None else self.values.get(("*", label))


Labels = frozenset[str]


class _Checker:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def labels(self, node: _Node) -> Labels | None:
        """The label names of the series ``node`` returns (``None``: a scalar or string)."""
        if isinstance(node, (_Number, _String)):
            return None
        if isinstance(node, _Unary):
            return self.labels(node.expr)
        if isinstance(node, _Selector):
            return self.selector(node)
        if isinstance(node, _Aggregation):
            return self.aggregation(node)
        if isinstance(node, _Call):
            return self.call(node)
        if isinstance(node, _Binary):
            return self.binary(node)
        raise TypeError(node)

    def selector(self, node: _Selector) -> Labels:
        assert node.name is not None
        known = self.schema.metrics.get(node.name)
        if known is None:
            self.problem(f"metric {node.name} is not exported")
            return frozenset()
        labels = frozenset(known)
        for matcher in node.matchers:
            name = matcher.label.name
            if name == "__name__":
                continue
            if name not in labels:
                self.problem(
                    f"{node.name}{{{name}{matcher.op}...}}: {node.name} has no label {name!r} "
                    f"(it has {sorted(labels)})"
                )
                continue
            self.value(node.name, matcher)
        return labels

    def value(self, metric: str, matcher: Matcher) -> None:
        where = f'{metric}{{{matcher.label.name}{matcher.op}"{matcher.value}"}}'
        variables = [a or b for a, b in _VARIABLE.findall(matcher.value)]
        if variables:
            unknown = sorted(set(variables) - set(self.schema.variables))
            if unknown:
                self.problem(f"{where}: unknown variables {unknown}")
            return
        domain = self.schema.domain(metric, matcher.label.name)
        if domain is None:
            return  # any value (model, version, layer...)
        if matcher.op in ("=", "!="):
            wanted = [matcher.value]
        elif _SIMPLE_ALTERNATION.fullmatch(matcher.value):
            wanted = matcher.value.split("|")
        else:
            if not any(re.fullmatch(matcher.value, value) for value in domain):
                self.problem(f"{where}: the regex matches none of {sorted(domain)}")
            return
        for value in wanted:
            if value not in domain:
                self.problem(
                    f"{where}: the service never sets {matcher.label.name}={value!r} "
                    f"(it sets {sorted(domain)})"
                )

    def aggregation(self, node: _Aggregation) -> Labels:
        if node.param is not None:
            self.labels(node.param)
        inner = self.labels(node.expr)
        if inner is None:
            self.problem(f"{node.op}(...) aggregates a scalar")
            inner = frozenset()
        clause = "without" if node.without else "by"
        for label in node.grouping:
            if label.name not in inner:
                self.problem(
                    f"{node.op} {clause} ({label.name}): the aggregated series have no label "
                    f"{label.name!r} (they have {sorted(inner)})"
                )
        names = frozenset(label.name for label in node.grouping)
        if node.op in _KEEP_LABELS:
            return inner
        out = inner - names if node.without else names
        if node.op == "count_values" and isinstance(node.param, _String):
            out |= {node.param.value}
        return out

    def call(self, node: _Call) -> Labels | None:
        args = [self.labels(arg) for arg in node.args]
        if node.func in _SCALAR_FUNCTIONS:
            return None
        if node.func == "vector":
            return frozenset()
        if node.func == "histogram_quantile":
            series = args[1] if len(args) == 2 else None
            if series is None:
                self.problem("histogram_quantile(q, v): expected a vector v")
                return frozenset()
            if "le" not in series:
                self.problem(f"histogram_quantile over series without 'le' ({sorted(series)})")
            return series - {"le"}
        if node.func in ("label_replace", "label_join"):
            series = args[0] if args else None
            strings = [arg.value if isinstance(arg, _String) else None for arg in node.args]
            if series is None or len(strings) < 4 or None in strings[1:]:
                self.problem(f"{node.func}: expected a vector and string arguments")
                return series or frozenset()
            sources = strings[3:] if node.func == "label_join" else strings[3:4]
            for source in sources:
                if source and source not in series:
                    self.problem(
                        f"{node.func}(..., {source!r}): the series have no label {source!r} "
                        f"(they have {sorted(series)})"
                    )
            dst = strings[1]
            assert dst is not None
            return series | {dst}
        if node.func in ("absent", "absent_over_time"):
            return frozenset()
        vectors = [labels for labels in args if labels is not None]
        return vectors[0] if vectors else frozenset()

    def binary(self, node: _Binary) -> Labels | None:
        lhs, rhs = self.labels(node.lhs), self.labels(node.rhs)
        if lhs is None or rhs is None:
            if node.op in _SET_OPS:
                self.problem(f"'{node.op}' needs vectors on both sides")
            return lhs if rhs is None else rhs
        ignoring = frozenset(label.name for label in node.ignoring or ())
        for label in node.on or ():
            for side, labels in (("left", lhs), ("right", rhs)):
                if label.name not in labels:
                    self.problem(
                        f"'{node.op} on ({label.name})': the {side} side has no label "
                        f"{label.name!r} (it has {sorted(labels)})"
                    )
        for label in node.ignoring or ():
            if label.name not in lhs | rhs:
                self.problem(
                    f"'{node.op} ignoring ({label.name})': neither side has a label "
                    f"{label.name!r} ({sorted(lhs)} / {sorted(rhs)})"
                )
        one_side = rhs if node.group == "left" else lhs
        for label in node.include:
            if label.name not in one_side:
                self.problem(
                    f"'group_{node.group} ({label.name})': the one side has no label "
                    f"{label.name!r} (it has {sorted(one_side)})"
                )
        if node.on is None and node.op != "or" and lhs - ignoring != rhs - ignoring:
            self.problem(
                f"'{node.op}' matches on all labels but the sides differ "
                f"({sorted(lhs - ignoring)} / {sorted(rhs - ignoring)}): nothing matches"
            )
        include = frozenset(label.name for label in node.include)
        if node.group == "left":
            return lhs | include
        if node.group == "right":
            return rhs | include
        if node.op in ("and", "unless"):
            return lhs
        if node.op == "or":
            return lhs | rhs
        if node.on is not None:
            return frozenset(label.name for label in node.on)
        return lhs - ignoring


def check(expr: str | Parsed, schema: Schema) -> tuple[Labels | None, list[str]]:
    """``(labels of the result, problems)`` of a PromQL expression against ``schema``."""
    parsed = parse(expr) if isinstance(expr, str) else expr
    checker = _Checker(schema)
    labels = checker.labels(parsed.tree)
    return labels, checker.problems
