from prune_core.ops import (
    Group,
    Module,
    Operation,
    all_operations,
    apply_depth_rule,
    apply_group_rule,
    close_under_rules,
)


def test_operation_parse_and_json_round_trip() -> None:
    op = Operation.parse([3, "img_key", "kv"])
    assert op == Operation(3, Group.IMG_KEY, Module.KV)
    assert Operation.parse(op.to_json()) == op
    assert str(op) == "L3:img_key.kv"


def test_llava7b_has_384_operations() -> None:
    assert len(all_operations(32)) == 384
    assert len(all_operations(32, (Group.IMG_KEY, Group.IMG_REST))) == 192


def test_group_rule_extends_key_ops_to_rest() -> None:
    out = apply_group_rule({Operation(2, Group.IMG_KEY, Module.Q)})
    assert out == {Operation(2, Group.IMG_KEY, Module.Q), Operation(2, Group.IMG_REST, Module.Q)}
    assert apply_group_rule({Operation(2, Group.IMG_REST, Module.Q)}) == {Operation(2, Group.IMG_REST, Module.Q)}


def test_depth_rule_adds_q_and_mlp_below_a_kv_suffix() -> None:
    kv = {Operation(layer, Group.IMG_REST, Module.KV) for layer in (2, 3)}
    out = apply_depth_rule(kv | {Operation(0, Group.IMG_REST, Module.KV)}, num_layers=4)
    added = out - kv - {Operation(0, Group.IMG_REST, Module.KV)}
    assert added == {Operation(layer, Group.IMG_REST, m) for layer in (2, 3) for m in (Module.Q, Module.MLP)}
    # A gap in the kv suffix means no free ops.
    assert apply_depth_rule({Operation(2, Group.IMG_REST, Module.KV)}, 4) == {Operation(2, Group.IMG_REST, Module.KV)}


def test_closure_applies_both_rules() -> None:
    out = close_under_rules({Operation(3, Group.IMG_KEY, Module.KV)}, num_layers=4)
    assert Operation(3, Group.IMG_REST, Module.KV) in out
    assert {Operation(3, g, m) for g in (Group.IMG_KEY, Group.IMG_REST) for m in Module} <= out
