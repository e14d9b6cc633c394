"""The oracle simulation: options, initial models, folders, the folder round, results, learning-
curve plots. Floor 6 of the house (docs/design.md, "Module map"): it may import util, data,
store, search, models, features, train, strategies, embed and errors; never a room on its own
floor or above (tests/unit/test_imports.py). Empty on purpose: importing the package imports
nothing (a warm select must not pull in torch or faiss).
"""
