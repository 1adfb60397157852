"""A loopback stand-in of Modal's API that the real, pinned ``modal`` client talks to.

See docs/modal-standin.md. Entry points: ``ModalStandIn`` (start/stop or a ``with`` block) and
``modal_standin(...)``; ``ModalStandIn.env`` points the client at it.
"""

from .server import USERS_WORK, ModalStandIn, modal_standin

__all__ = ["USERS_WORK", "ModalStandIn", "modal_standin"]
