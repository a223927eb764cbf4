"""Connectors: vision tokens ``[B, N, Dv]`` → visual tokens ``[B, M, Dlm]`` for a language model,
one kind per module, chosen by name in a model's config and built by :func:`build_connector`."""

from __future__ import annotations

from vlkit.config import from_dict
from vlkit.connectors.base import Connector
from vlkit.connectors.linear import LinearConfig, LinearConnector
from vlkit.connectors.mlp import MLPConfig, MLPConnector
from vlkit.connectors.perceiver import PerceiverConfig, PerceiverConnector
from vlkit.connectors.pixel_shuffle import PixelShuffleConfig, PixelShuffleConnector
from vlkit.connectors.qformer import QFormerConfig
from vlkit.connectors.qformer_connector import QFormerConnector
from vlkit.errors import ConfigError

CONNECTORS: dict[str, tuple[type, type[Connector]]] = {
    "linear": (LinearConfig, LinearConnector),
    "mlp": (MLPConfig, MLPConnector),
    "perceiver": (PerceiverConfig, PerceiverConnector),
    "pixel_shuffle": (PixelShuffleConfig, PixelShuffleConnector),
    "qformer": (QFormerConfig, QFormerConnector),
}
"""Each kind's typed config and module; a module is built as ``cls(vision_dim, lm_dim, config)``."""


def build_connector(kind: str, vision_dim: int, lm_dim: int, **options) -> Connector:
    """The ``kind`` connector from ``vision_dim`` to ``lm_dim``; ``options`` are its config's
    fields, checked by type (a :class:`ConfigError` names an unknown kind or a bad option)."""
    if not isinstance(kind, str) or kind not in CONNECTORS:
        raise ConfigError(f"unknown connector {kind!r}; expected one of {sorted(CONNECTORS)}", ("connector",))
    config_cls, module_cls = CONNECTORS[kind]
    return module_cls(vision_dim, lm_dim, from_dict(config_cls, options, where=f"{kind} connector options"))


__all__ = [
    "CONNECTORS",
    "Connector",
    "build_connector",
    "LinearConfig",
    "LinearConnector",
    "MLPConfig",
    "MLPConnector",
    "PerceiverConfig",
    "PerceiverConnector",
    "PixelShuffleConfig",
    "PixelShuffleConnector",
    "QFormerConfig",
    "QFormerConnector",
]
