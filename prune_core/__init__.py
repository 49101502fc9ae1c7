"""The vocabulary every stage of prune-export shares: the ground floor of the house.

* :mod:`prune_core.ops`: groups, modules, operations and the pruning rules.
* :mod:`prune_core.spec`: the architecture read from ``config.json``; token groups of a prompt.
* :mod:`prune_core.cost`: the FLOPs cost model (prefill, and the LM head's logits row).
* :mod:`prune_core.plan`: the plan document (operations ladder, token sections).
* :mod:`prune_core.autoprune`: AutoPrune's arithmetic (MI, steepness, curve, schedule table, recycling).
* :mod:`prune_core.tokens`: token sections resolved from a plan and options.
* :mod:`prune_core.manifest`: a build directory's manifest and the names of the files it holds.
* :mod:`prune_core.prompt`: the LLaVA-1.5 prompt rules.
* :mod:`prune_core.errors`, :mod:`prune_core.io`, :mod:`prune_core.device`, and :mod:`prune_core.precision`:
  user errors, atomic writes, devices and precisions.

It imports no stage (calib, exporter, graph_passes, engines) and nothing of the tool's package
(``prune_export``: the CLI and the workflows); every stage may import it.
"""
