"""``GET /tabbi/api/models``: the models this server can use, for ``%tabbi models`` and the panel.

The list comes from the server's configuration (``model_config.available``): the default model,
``c.TabbiExtension.extra_models`` and the demo model. That is exactly what a session's OpenCode is
configured with, so it is what OpenCode's ``GET /config/providers`` reports for the session's
provider; it needs no running session and costs nothing to compute (no cache needed), and it is
the very list a switch (``PATCH /tabbi/api/sessions/<id>`` ``{"model"}``) is checked against.
Each entry is names only: no upstream URL, no key.

``?session=<id>`` (one of the caller's sessions) marks the model that session uses now.
"""

from __future__ import annotations

import re
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from . import model_config
from .handlers import TabbiHandler
from .validation import ValidationError

_SESSION = re.compile(r"ses-[0-9a-f]{12}")


def listing(settings: model_config.ModelSettings, current: str | None = None) -> dict[str, Any]:
    """``{"models": [{id, provider, model, default, current}], "default", "current"}``."""
    choices = model_config.available(settings)
    default = next((c.id for c in choices if c.default), None)
    return {
        "models": [{**c.public(), "current": c.id == current} for c in choices],
        "default": default,
        "current": current,
    }


class ModelsHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        settings = self.manager.settings.model
        current = None
        session_id = self.get_argument("session", "")
        if session_id:
            if not _SESSION.fullmatch(session_id):
                raise ValidationError("'session' must be a session id (ses-...)")
            agent = await self.session(session_id)
            current = model_config.current(settings, agent.record.model)
        self.write_json(listing(settings, current))


def routes() -> list[tuple[str, type]]:
    return [("/tabbi/api/models", ModelsHandler)]
