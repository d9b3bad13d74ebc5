"""Issue 11's size rule, kept by CI: no class in ``service/`` is over 450 lines, and the
registry's state machine (``Registry``) stays under 300 (its reads are ``Catalog``'s, its
store publishing ``StorePublisher``'s). A class that outgrows it has taken a second job:
split it (see docs/design.md, "Service shape")."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
MAX_CLASS_LINES = 450
MAX_LINES = {"Registry": 300}


def _class_sizes() -> dict[str, int]:
    """``{"<path>:<class>": lines}`` of every class in ``service/`` (nested ones too),
    from its ``class`` line to its last line, decorators excluded."""
    sizes: dict[str, int] = {}
    for path in sorted(SERVICE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                where = f"{path.relative_to(SERVICE.parent)}:{node.name}"
                sizes[where] = node.end_lineno - node.lineno + 1
    return sizes


def test_the_size_rule_sees_the_service() -> None:
    sizes = _class_sizes()
    assert "service/registry.py:Registry" in sizes
    assert "service/runtime/runtime.py:ServingRuntime" in sizes


def test_no_class_in_service_exceeds_its_limit() -> None:
    too_big = {
        where: lines
        for where, lines in _class_sizes().items()
        if lines > MAX_LINES.get(where.rsplit(":", 1)[1], MAX_CLASS_LINES)
    }
    assert not too_big, (
        f"classes over the size rule (limit {MAX_CLASS_LINES} lines, {MAX_LINES} for the "
        f"named ones): {too_big}; split them by job"
    )
