"""Kernel side of tabbi: the ``%tabbi`` / ``%%tabbi`` magics, the chat panel and the Python API.

    %load_ext tabbi_kernel          # registers the magics
    client = tabbi_kernel.connect() # the same, from Python

Importing this package stays light (standard library and what IPython already loaded): no modal,
authlib, store or server imports, and anywidget only when a panel is shown.
"""

from __future__ import annotations

from typing import Any

from .client import Client, Session, TabbiError, TurnResult, connect
from .discovery import ServerInfo, ServerNotFound, find_server

__version__ = "0.1.0"
__all__ = [
    "Client",
    "ServerInfo",
    "ServerNotFound",
    "Session",
    "TabbiError",
    "TurnResult",
    "connect",
    "find_server",
    "load_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    from . import context
    from .magics import TabbiMagics

    ipython.register_magics(TabbiMagics(ipython))
    context.install(ipython)  # records the cell an error comes from, for @error and %tabbi fix


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to release: sessions live on the server and keep running."""
