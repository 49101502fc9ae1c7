"""prune-export: compile VLM pruning plans into deployable graphs.

This package is the tool's top floor: the click CLI (:mod:`prune_export.cli`, its commands in
:mod:`prune_export.commands`, shared options in :mod:`prune_export.options`, printing in
:mod:`prune_export.output`), the report plots (:mod:`prune_export.plots`) and the workflows
(:mod:`prune_export.workflows`), the only code that wires the stages together. The vocabulary the stages
share lives in :mod:`prune_core`.
"""

__version__ = "0.1.0"
