"""Kernel side of tabbi (the ``%tabbi`` magics and the chat panel).

Importing this package must stay light: no modal, authlib, store or server imports.
"""

__version__ = "0.1.0"
