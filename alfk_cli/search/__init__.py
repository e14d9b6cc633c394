"""Exact inner-product top-k (FAISS or torch filters, canonical float64 rescoring), greedy
k-center, the search split by rank. Floor 2 of the house (docs/design.md, "Module map"): it may
import util and errors; never a room on its own floor or above (tests/unit/test_imports.py).
Empty on purpose: importing the package imports nothing (a warm select must not pull in torch or
faiss).
"""
