"""The HDF5 feature store: its format and fingerprints, reading, atomic resumable writing (rows
written in blocks on a background thread). Floor 2 of the house (docs/design.md, "Module map"):
it may import util and errors; never a room on its own floor or above
(tests/unit/test_imports.py). Empty on purpose: importing the package imports nothing (a warm
select must not pull in torch or faiss).
"""
