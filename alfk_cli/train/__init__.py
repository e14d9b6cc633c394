"""Training and rotation pretraining: the loops, the jobs, the batches they read, class balance.
Floor 4 of the house (docs/design.md, "Module map"): it may import util, data, store, search,
models and errors; never a room on its own floor or above (tests/unit/test_imports.py). Empty on
purpose: importing the package imports nothing (a warm select must not pull in torch or faiss).
"""
