"""Packets from text, safely: `Ether()/IP(dst="198.18.0.2")/TCP(dport=22, flags="S")`.

The text is parsed with Python's `ast` and only a whitelist is accepted: calls of known scapy layer
classes with literal arguments (numbers, strings, bytes, and lists or tuples of them), joined with
`/`. Nothing is ever evaluated, so a packet spec cannot run code.
"""

from __future__ import annotations

import ast

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Padding, Raw

LAYERS: dict[str, type[Packet]] = {
    cls.__name__: cls for cls in (Ether, Dot1Q, IP, TCP, UDP, ICMP, Raw, Padding)
}
OPTIONS = {"IPOption": IPOption}


class SpecError(ValueError):
    """A packet spec that is not a whitelisted scapy expression; says where (1-based column)."""

    def __init__(self, message: str, column: int):
        self.column = column
        super().__init__(f"column {column}: {message}")


def parse_packet(text: str) -> Packet:
    """The scapy packet a spec describes."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise SpecError(f"not a packet expression: {error.msg}", error.offset or 1) from None
    return _layer_stack(tree.body)


def _layer_stack(node: ast.expr) -> Packet:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _layer_stack(node.left) / _layer_stack(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name not in LAYERS:
            known = ", ".join(sorted(LAYERS))
            raise SpecError(f"unknown layer {name!r} (known: {known})", node.col_offset + 1)
        args = [_literal(arg) for arg in node.args]
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise SpecError("** arguments are not allowed", keyword.value.col_offset + 1)
            kwargs[keyword.arg] = _literal(keyword.value)
        try:
            return LAYERS[name](*args, **kwargs)
        except Exception as error:  # scapy raises many kinds for bad field values
            raise SpecError(f"{name}(...): {error}", node.col_offset + 1) from None
    if isinstance(node, ast.Constant) and isinstance(node.value, bytes | str):
        return Raw(node.value)
    raise SpecError(
        "expected layers like IP(...)/TCP(...) joined with '/'", getattr(node, "col_offset", 0) + 1
    )


def _literal(node: ast.expr) -> object:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str | bytes):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        if isinstance(value, int | float):
            return -value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        # b"x" * 40, for payloads of a given size; both sides literal, the repeat bounded.
        left, right = _literal(node.left), _literal(node.right)
        if isinstance(left, int) and isinstance(right, bytes | str):
            left, right = right, left
        if isinstance(left, bytes | str) and isinstance(right, int) and 0 <= right <= 65535:
            return left * right
        raise SpecError("only bytes * count (up to 65535) can be multiplied", node.col_offset + 1)
    if isinstance(node, ast.List | ast.Tuple):
        values = [_literal(element) for element in node.elts]
        return values if isinstance(node, ast.List) else tuple(values)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in OPTIONS
        and not node.keywords
    ):
        return OPTIONS[node.func.id](*[_literal(arg) for arg in node.args])
    raise SpecError("arguments must be literal numbers, strings or bytes", node.col_offset + 1)
