"""Cleanup: constant folding plus removal of unused nodes, initializers, functions and opsets.

Built on the maintained passes of onnxscript (constant folding) and onnx-ir (dead code removal)
rather than hand-written equivalents; this module only orders them, repeats them to a fixed point
and reports a truthful ``modified`` flag (the library flags under-report some edits, such as
shape annotations added during folding or optional outputs dropped during dead-code removal).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants_ir

from graph_passes.base import GraphPass, structural_fingerprint

__all__ = ["CleanupPass"]

#: Same limits as onnxscript's optimizer defaults (elements, not bytes).
FOLD_INPUT_SIZE_LIMIT = 8192
FOLD_OUTPUT_SIZE_LIMIT = 512 * 512


class CleanupPass(GraphPass):
    """Fold constants and drop everything the graph outputs do not need.

    Rewrites:

    * ``Op(c1, c2)`` with all inputs constant ``-> initializer`` (constant folding, including
      ``Shape(x)`` of a statically shaped ``x``; ops larger than the size limits, random ops and
      ``ConstantOfShape`` are kept);
    * a node none of whose outputs is used or a graph output ``-> (removed)``; likewise unused
      initializers, model functions and opset imports (the default domain is always kept);
    * ``value_info`` of values that no longer exist disappears with them (onnx-ir already drops
      entries naming no value when a proto is loaded).

    Must not fire (returns ``modified=False``) on a graph that is already folded and free of dead
    code. It never changes the model signature: graph inputs stay, even when unused.

    Args:
        shape_inference: run per-node ONNX shape inference while folding (fills value types and
            shapes, lets ``Shape`` of static dims fold).
        input_size_limit: do not fold nodes with a constant input larger than this (elements).
        output_size_limit: do not materialize folded tensors larger than this (elements).
        max_rounds: fold/remove rounds at most; stops early once a round changes nothing.
    """

    def __init__(
        self,
        *,
        shape_inference: bool = True,
        input_size_limit: int = FOLD_INPUT_SIZE_LIMIT,
        output_size_limit: int = FOLD_OUTPUT_SIZE_LIMIT,
        max_rounds: int = 3,
    ) -> None:
        super().__init__()
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.shape_inference = shape_inference
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.max_rounds = max_rounds

    def apply(self, model: ir.Model) -> bool | None:
        for _ in range(self.max_rounds):
            before = structural_fingerprint(model)
            fold_constants_ir(
                model,
                onnx_shape_inference=self.shape_inference,
                input_size_limit=self.input_size_limit,
                output_size_limit=self.output_size_limit,
            )
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.RemoveUnusedFunctionsPass()(model)
            common_passes.RemoveUnusedOpsetsPass()(model)
            if structural_fingerprint(model) == before:
                break
        # The library flags are not reliable enough to claim anything; let the fingerprint decide.
        return None

    def ensures(self, model: ir.Model) -> None:
        """Postcondition: no node is left whose outputs are all unused."""
        outputs = set(model.graph.outputs)
        for node in model.graph:
            if not any(out.uses() or out in outputs for out in node.outputs):
                raise ir.passes.PostconditionError(f"dead node left after cleanup: {node}")
