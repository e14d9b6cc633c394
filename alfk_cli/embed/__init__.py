"""The embed job: options, plan, reuse of earlier stores, the single-process and sharded writes.
Floor 5 of the house (docs/design.md, "Module map"): it may import util, data, store, search,
models, features, train and errors; never a room on its own floor or above
(tests/unit/test_imports.py). Empty on purpose: importing the package imports nothing (a warm
select must not pull in torch or faiss).
"""
