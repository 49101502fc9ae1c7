"""IR-version and opset normalisation.

onnx 1.23 writes IR version 14 by default while onnxruntime 1.31 reads at most 13, and TensorRT's
parser lags further; exporters may also leave the default-domain opset implicit (``ai.onnx``
alias) or older than the ops the later passes rely on (e.g. ``LayerNormalization`` needs 17).
This pass pins both numbers so every artifact states what it needs.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from graph_passes.base import GraphPass, iter_all_nodes
from prune_core.errors import BuildError

__all__ = ["DEFAULT_IR_VERSION", "DEFAULT_MIN_OPSET", "NormalizeVersionsPass", "max_opset_for_ir"]

#: IR version written by default: readable by onnxruntime >= 1.16 and TensorRT 10's parser.
DEFAULT_IR_VERSION = 10
#: Lowest default-domain opset accepted after normalisation (``LayerNormalization`` exists).
DEFAULT_MIN_OPSET = 17


def max_opset_for_ir(ir_version: int) -> int:
    """Highest ``ai.onnx`` opset that a file of IR version ``ir_version`` may import.

    Read from onnx's own release table (``onnx.helper.VERSION_TABLE``), not typed in here.
    """
    opsets = [row[2] for row in onnx.helper.VERSION_TABLE if row[1] <= ir_version]
    if not opsets:
        raise ValueError(f"no ONNX release writes IR version <= {ir_version}")
    return max(opsets)


class NormalizeVersionsPass(GraphPass):
    """Pin the IR version and make the default-domain opset explicit and at least a minimum.

    Rewrites:

    * ``model.ir_version = N -> ir_version`` (the target, default 10);
    * opset import ``ai.onnx: v -> "": v`` (one spelling for the default domain);
    * no default-domain opset import and no default-domain node ``-> "": min_opset``;
    * ``"": v`` with ``v < min_opset`` ``-> "": min_opset`` by converting the ops with
      onnxscript's version converter (falling back to onnx's C++ converter below opset 18).

    Must not fire when the IR version already equals the target and the opset is explicit and
    ``>= min_opset``. Refuses (:class:`BuildError`) a model whose opset is newer than the target
    IR version allows (e.g. opset 23 needs IR 11), a model whose default-domain nodes have no
    opset import, and a conversion the converters cannot do. Opsets are never lowered.

    Args:
        ir_version: IR version to write (onnxruntime 1.31 reads at most 13).
        min_opset: lowest default-domain opset to leave in the model.
    """

    def __init__(self, ir_version: int = DEFAULT_IR_VERSION, min_opset: int = DEFAULT_MIN_OPSET) -> None:
        super().__init__()
        if not 3 <= ir_version <= onnx.IR_VERSION:
            raise ValueError(f"ir_version must be in [3, {onnx.IR_VERSION}], got {ir_version}")
        self.ir_version = ir_version
        self.min_opset = min_opset
        self.max_opset = max_opset_for_ir(ir_version)
        if min_opset > self.max_opset:
            raise ValueError(
                f"min_opset {min_opset} cannot be stored in IR version {ir_version} "
                f"(at most opset {self.max_opset})"
            )

    def __repr__(self) -> str:
        return f"{self.name}(ir_version={self.ir_version}, min_opset={self.min_opset})"

    def apply(self, model: ir.Model) -> bool | None:
        modified = self._unify_onnx_domain(model)
        opsets = model.graph.opset_imports
        if "" not in opsets:
            uses_onnx_ops = any(node.domain == "" for node in iter_all_nodes(model.graph))
            if uses_onnx_ops:
                raise BuildError(
                    "the model uses default-domain (ai.onnx) operators but imports no ai.onnx "
                    "opset; expected an opset_import entry for domain ''. Re-export the model "
                    "with an explicit opset (torch.onnx.export(..., opset_version=N))."
                )
            opsets[""] = self.min_opset
            modified = True
        opset = opsets[""]
        if opset > self.max_opset:
            raise BuildError(
                f"the model imports ai.onnx opset {opset}, but IR version {self.ir_version} allows "
                f"at most opset {self.max_opset}. Re-export with opset_version <= {self.max_opset}, "
                f"or normalise to a newer IR version (ir_version >= "
                f"{onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid('', opset)])})."
            )
        if opset < self.min_opset:
            try:
                ConvertVersionPass(target_version=self.min_opset, fallback=True)(model)
            except Exception as err:  # the converters raise their own, untyped errors
                raise BuildError(
                    f"could not convert the model from ai.onnx opset {opset} to {self.min_opset}: "
                    f"{err}. Re-export the model with opset_version >= {self.min_opset}."
                ) from err
            converted = model.graph.opset_imports.get("")
            if converted != self.min_opset:
                raise BuildError(
                    f"could not convert the model from ai.onnx opset {opset} to {self.min_opset} "
                    f"(the version converters left opset {converted}). Re-export the model with "
                    f"opset_version >= {self.min_opset}."
                )
            modified = True
        if model.ir_version != self.ir_version:
            model.ir_version = self.ir_version
            modified = True
        return modified

    @staticmethod
    def _unify_onnx_domain(model: ir.Model) -> bool:
        """Rename the ``ai.onnx`` alias to ``""`` in the opset imports.

        Node domains need no edit: onnx-ir already stores ``ai.onnx`` node domains as ``""``.
        """
        opsets = model.graph.opset_imports
        if "ai.onnx" not in opsets:
            return False
        alias = opsets.pop("ai.onnx")
        opsets[""] = max(alias, opsets.get("", alias))
        return True

    def ensures(self, model: ir.Model) -> None:
        """Postcondition: target IR version, explicit opset within [min_opset, max for IR]."""
        opset = model.graph.opset_imports.get("")
        if model.ir_version != self.ir_version or opset is None:
            raise ir.passes.PostconditionError(
                f"expected ir_version {self.ir_version} and an explicit ai.onnx opset, got "
                f"ir_version {model.ir_version}, opset {opset}"
            )
        if not self.min_opset <= opset <= self.max_opset:
            raise ir.passes.PostconditionError(f"opset {opset} outside [{self.min_opset}, {self.max_opset}]")
