"""tabbi's Jupyter server extension: sessions, their event logs, and the store behind them."""

from .app import TabbiExtension

__all__ = ["TabbiExtension"]


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "tabbi_extension", "app": TabbiExtension}]
