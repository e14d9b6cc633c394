"""Every extension point in one place: the registries by kind, for ``alfk list`` and docs."""

from __future__ import annotations

from alfk_cli.registry import Registry


def registries() -> dict[str, Registry]:
    """The registries by kind (importing them registers the built-ins)."""
    from alfk_cli.archs import ARCHITECTURES
    from alfk_cli.estimators import ESTIMATORS
    from alfk_cli.kernels import KERNELS
    from alfk_cli.strategies import STRATEGIES

    return {
        "architectures": ARCHITECTURES,
        "strategies": STRATEGIES,
        "kernels": KERNELS,
        "estimators": ESTIMATORS,
    }
