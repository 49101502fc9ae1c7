"""The ``prune-export`` commands, one module per job; :mod:`prune_export.cli` gathers them under one group."""
