"""Images on disk: folder scans, pool lists, decoding, printable file names, the input spec a
network eats. Floor 2 of the house (docs/design.md, "Module map"): it may import util and
errors; never a room on its own floor or above (tests/unit/test_imports.py). Empty on purpose:
importing the package imports nothing (a warm select must not pull in torch or faiss).
"""
