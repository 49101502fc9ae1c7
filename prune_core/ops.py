"""The vocabulary of GSOP: token groups, modules and atomic operations ``(layer, group, module)``.

An operation names one slice of prefill work: at decoder layer ``layer``, the tokens of ``group`` do
``module`` (``kv``: are projected to keys/values, can be attended to and are cached; ``q``: form
queries and receive the attention output; ``mlp``: pass through the MLP). Pruning an operation removes
exactly that work (see docs/methods.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum
from typing import NamedTuple


class Group(str, Enum):
    """Token groups of one prompt, in the order the exported graphs lay them out."""

    SYS = "sys"
    IMG_KEY = "img_key"
    IMG_REST = "img_rest"
    TXT = "txt"


class Module(str, Enum):
    """Sub-blocks of a decoder layer that a group of tokens can skip."""

    KV = "kv"
    Q = "q"
    MLP = "mlp"


GROUPS: tuple[Group, ...] = (Group.SYS, Group.IMG_KEY, Group.IMG_REST, Group.TXT)
MODULES: tuple[Module, ...] = (Module.KV, Module.Q, Module.MLP)
#: Only image groups are ever pruned: text and the system prefix carry the question and the answer.
PRUNABLE_GROUPS: tuple[Group, ...] = (Group.IMG_KEY, Group.IMG_REST)


class Operation(NamedTuple):
    """One atomic operation ``(layer, group, module)``; sorts by layer, then group, then module."""

    layer: int
    group: Group
    module: Module

    @classmethod
    def parse(cls, item: Iterable[object]) -> Operation:
        """Build from a ``[layer, group, module]`` list as found in plan files (raises ValueError)."""
        layer, group, module = list(item)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an integer, got {layer!r}")
        return cls(layer, Group(group), Module(module))

    @classmethod
    def from_str(cls, text: str) -> Operation:
        """The inverse of ``str(op)``: ``"L3:img_rest.kv"`` (as a build's manifest lists them; raises ValueError)."""
        match = re.fullmatch(r"L(\d+):(\w+)\.(\w+)", text.strip())
        if match is None:
            raise ValueError(f"not an operation: {text!r} (expected LAYER:GROUP.MODULE, e.g. L3:img_rest.kv)")
        return cls(int(match.group(1)), Group(match.group(2)), Module(match.group(3)))

    def to_json(self) -> list[object]:
        return [self.layer, self.group.value, self.module.value]

    def __str__(self) -> str:
        return f"L{self.layer}:{self.group.value}.{self.module.value}"


def all_operations(num_layers: int, groups: Iterable[Group] = GROUPS) -> list[Operation]:
    """Every operation of a model with ``num_layers`` decoder layers, in canonical order."""
    groups = tuple(groups)
    return [Operation(layer, g, m) for layer in range(num_layers) for g in groups for m in MODULES]


def apply_group_rule(ops: Iterable[Operation]) -> set[Operation]:
    """Group rule: pruning an op for ``img_key`` also prunes it for ``img_rest`` (key tokens go last)."""
    out = set(ops)
    for op in list(out):
        if op.group is Group.IMG_KEY:
            out.add(Operation(op.layer, Group.IMG_REST, op.module))
    return out


def apply_depth_rule(ops: Iterable[Operation], num_layers: int) -> set[Operation]:
    """Depth rule: if a group's ``kv`` is pruned at every layer from D on, its ``q`` and ``mlp`` from D on
    cannot affect any output, so they are pruned too (free FLOPs)."""
    out = set(ops)
    for group in PRUNABLE_GROUPS:
        depth = num_layers
        while depth > 0 and Operation(depth - 1, group, Module.KV) in out:
            depth -= 1
        for layer in range(depth, num_layers):
            out.add(Operation(layer, group, Module.Q))
            out.add(Operation(layer, group, Module.MLP))
    return out


def close_under_rules(ops: Iterable[Operation], num_layers: int) -> set[Operation]:
    """Apply the group rule, then the depth rule, until nothing changes."""
    current = set(ops)
    while True:
        nxt = apply_depth_rule(apply_group_rule(current), num_layers)
        if nxt == current:
            return current
        current = nxt


def pruned_by_layer(ops: Iterable[Operation], num_layers: int) -> list[dict[Module, frozenset[Group]]]:
    """Per layer, the set of groups whose module is pruned: ``result[layer][module] -> groups``."""
    table: list[dict[Module, set[Group]]] = [{m: set() for m in MODULES} for _ in range(num_layers)]
    for op in ops:
        table[op.layer][op.module].add(op.group)
    return [{m: frozenset(g) for m, g in row.items()} for row in table]
