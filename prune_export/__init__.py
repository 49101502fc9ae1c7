"""prune-export: compile VLM pruning plans into deployable graphs.

This core package holds what the stages share: the operation and token-group vocabulary
(:mod:`prune_export.ops`), the architecture description read from ``config.json``
(:mod:`prune_export.spec`), the FLOPs cost model (:mod:`prune_export.cost`), the plan document
(:mod:`prune_export.plan`), the errors (:mod:`prune_export.errors`) and the click CLI.
"""

__version__ = "0.1.0"
