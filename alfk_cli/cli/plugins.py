"""Every extension point in one place: the registries by kind, for ``alfk list`` and docs."""

from __future__ import annotations

from alfk_cli.util.registry import Registry


def registries() -> dict[str, Registry]:
    """The registries by kind (importing them registers the built-ins)."""
    from alfk_cli.features.estimators import ESTIMATORS
    from alfk_cli.models.archs import ARCHITECTURES
    from alfk_cli.strategies.kernels import KERNELS
    from alfk_cli.strategies.registry import STRATEGIES

    return {
        "architectures": ARCHITECTURES,
        "strategies": STRATEGIES,
        "kernels": KERNELS,
        "estimators": ESTIMATORS,
    }
