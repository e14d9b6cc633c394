"""Architectures (the torch-free registry, `--arch auto`, `timm:` names), the networks with named
taps (alfk's and timm's), checkpoints and their torch-free reader, torchvision starting points.
Floor 3 of the house (docs/design.md, "Module map"): it may import util, data, store, search and
errors; never a room on its own floor or above (tests/unit/test_imports.py). Empty on purpose:
importing the package imports nothing (a warm select must not pull in torch or faiss).
"""
