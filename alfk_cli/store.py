"""The HDF5 feature store: one import for its format, reader and writer.

The store is split by job: ``storeformat`` (the schema, its constants and the fingerprints),
``storereader`` (``open_store``, ``FeatureStore``, ``check_compatible``) and ``storewriter``
(``StoreWriter``: atomic, resumable writing with free-space checks). This module re-exports
their public names, so ``from alfk_cli.store import open_store`` keeps working.
"""

from __future__ import annotations

from alfk_cli.storeformat import (
    COMPRESSION,
    SCHEMA_VERSION,
    config_fingerprint,
    content_fingerprint,
)
from alfk_cli.storereader import (
    FeatureStore,
    check_compatible,
    check_label_range,
    open_hdf5,
    open_store,
)
from alfk_cli.storewriter import RESERVE_BYTES, StoreHeader, StoreWriter

__all__ = [
    "COMPRESSION",
    "RESERVE_BYTES",
    "SCHEMA_VERSION",
    "FeatureStore",
    "StoreHeader",
    "StoreWriter",
    "check_compatible",
    "check_label_range",
    "config_fingerprint",
    "content_fingerprint",
    "open_hdf5",
    "open_store",
]
