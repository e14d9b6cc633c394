"""The plumbing: the registry pattern, atomic outputs, reproducible randomness and saves, devices,
torchrun processes, the progress interface. Floor 1 of the house (docs/design.md, "Module map"):
it may import errors only; never a room on its own floor or above (tests/unit/test_imports.py).
Empty on purpose: importing the package imports nothing (a warm select must not pull in torch or
faiss).
"""
