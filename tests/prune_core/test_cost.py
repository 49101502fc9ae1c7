from prune_core.cost import attention_flops, layer_counts, mlp_flops, prefill_flops
from prune_core.ops import Group, Module, Operation
from prune_core.spec import GroupSizes, ModelSpec

LLAVA7B = ModelSpec("llava", 32, 4096, 11008, 32, 32, 128, 32064, 576, 336, 14, 24, 1024)


def test_dense_llava7b_matches_methods_figure() -> None:
    sizes = GroupSizes.for_prompt(LLAVA7B, 35, 100)
    assert sizes.as_dict() == {"sys": 35, "img_key": 144, "img_rest": 432, "txt": 100}
    assert round(prefill_flops(LLAVA7B, sizes) / 1e12, 2) == 9.47


def test_paper_formula_for_multi_head_attention() -> None:
    d, nq, nkv = 4096, 300, 500
    assert attention_flops(LLAVA7B, nq, nkv) == 2 * d * d * (2 * nkv + 2 * nq) + 4 * nq * nkv * d
    assert mlp_flops(LLAVA7B, 7) == 3 * 2 * 7 * d * 11008


def test_gqa_counts_real_kv_width() -> None:
    gqa = ModelSpec("llava", 2, 64, 128, 4, 2, 16, 100, 16, 56, 14, 3, 32)
    # Q and O: 64x64 each; K and V: 64x32 each.
    assert attention_flops(gqa, 1, 0) == 2 * 64 * 64 * 2
    assert attention_flops(gqa, 0, 1) == 2 * 2 * 64 * 32


def test_pruned_ops_reduce_counts_per_layer() -> None:
    sizes = GroupSizes(sys=3, img_key=4, img_rest=12, txt=5)
    spec = ModelSpec("llava", 3, 64, 128, 4, 4, 16, 100, 16, 56, 14, 3, 32)
    ops = {Operation(1, Group.IMG_REST, Module.KV), Operation(2, Group.IMG_KEY, Module.MLP),
           Operation(2, Group.IMG_REST, Module.MLP), Operation(2, Group.IMG_REST, Module.Q)}
    counts = layer_counts(spec, sizes, ops)
    assert [(c.n_q, c.n_kv, c.n_mlp) for c in counts] == [(24, 24, 24), (24, 12, 24), (12, 24, 8)]
