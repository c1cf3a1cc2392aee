"""The numbers a JSON schema describes, with their upper bounds: shared by the test of the configs'
bounds (a pydantic model's own schema) and the service's (its /openapi.json), so both read a schema
the same way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple


class Number(NamedTuple):
    path: str  # dotted, by alias; "[0]" for a tuple's position, "[]" for any item of an array
    kind: str  # "integer" or "number"
    maximum: float | None  # None: no upper bound
    exclusive: bool  # the bound itself is refused


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def numbers(schema: dict[str, Any], root: dict[str, Any] | None = None) -> list[Number]:
    """Every integer or number in `schema` (refs followed inside `root`, the schema itself by default),
    once per path and kind. A bound beside an anyOf holds for its members (pydantic puts a field's
    json_schema_extra there)."""
    root = root or schema
    seen: dict[tuple[str, str], Number] = {}
    for n in _walk(schema, "", None, root, 0):
        key = (n.path, n.kind)
        if key not in seen or seen[key].maximum is None:
            seen[key] = n
    return list(seen.values())


def _bound(node: dict[str, Any]) -> tuple[float, bool] | None:
    if "maximum" in node:
        return node["maximum"], False
    if "exclusiveMaximum" in node:
        return node["exclusiveMaximum"], True
    return None


def _walk(node: dict[str, Any], path: str, inherited: tuple[float, bool] | None, root: dict[str, Any],
          depth: int) -> Iterator[Number]:
    if depth > 50:
        raise ValueError(f"{path}: schema nested too deep (a recursive model?)")
    bound = _bound(node) or inherited
    if "$ref" in node:
        yield from _walk(_resolve(node["$ref"], root), path, bound, root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        for alt in node.get(key, ()):
            yield from _walk(alt, path, bound, root, depth + 1)
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name, None, root, depth + 1)
    for i, sub in enumerate(node.get("prefixItems", ())):
        yield from _walk(sub, f"{path}[{i}]", None, root, depth + 1)
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]", None, root, depth + 1)
    if node.get("type") in ("integer", "number"):
        yield Number(path, node["type"], *(bound or (None, False)))


def over(n: Number) -> int | float:
    """A value just past the bound of `n` (which must have one)."""
    assert n.maximum is not None, n
    if n.exclusive:
        return n.maximum
    return int(n.maximum) + 1 if n.kind == "integer" else n.maximum * 2 + 1
