"""Acquisition strategies: the protocol and registry, the built-ins, the Fisher-kernel acquisition
and its kernels, baselines, BADGE, SIMILAR, quotas. Floor 5 of the house (docs/design.md,
"Module map"): it may import util, data, store, search, models, features, train and errors;
never a room on its own floor or above (tests/unit/test_imports.py). Empty on purpose: importing
the package imports nothing (a warm select must not pull in torch or faiss).
"""
