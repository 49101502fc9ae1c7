"""calib: calibration-driven search of pruning plans (GSOP search, its resumable journal).

Modules are imported by name (``calib.search``, ``calib.journal``); this file stays empty of imports so
that loading one stage never pulls in the heavy ones (the model evaluator, datasets).
"""
