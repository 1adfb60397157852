"""Admins: every person's sessions, their use of the service, and pausing or stopping any of them.

Who is an admin (``c.TabbiAdmins.*``):
- under JupyterHub, a hub admin (the ``admin`` flag of the hub's user model: ``c.Authenticator
  .admin_users`` or the hub's admin role), unless ``hub_admins`` is False; the flag comes with
  every request the hub authenticates (a browser's OAuth cookie and a kernel's API token alike),
  so an admin's own kernel can run ``%tabbi admin``;
- anyone named in ``admin_users`` (in either mode). In personal mode nobody is an admin unless
  named: the server's one person sees all of its sessions anyway, and a server shared by several
  people (a custom identity provider) must not make each of them an admin by default.

Everyone else gets a 404 on the admin routes, the very response of a route that does not exist,
so that a person cannot even learn they are there. Every admin action is logged (who, what,
whose session) in the server's log and in the session's own event log (an ``admin.action``
event), so the owner sees who paused or stopped their session.

Routes: ``GET /tabbi/api/admin/sessions`` (every session, with owner, state, age and use) and
``POST /tabbi/api/admin/sessions/<id>/pause|stop``: ``pause`` is the owner's pause (a snapshot,
then the sandbox stops; refused during a turn); ``stop`` is at once, mid-turn too: the turn ends
as an error saying who stopped it, the sandbox ends, the workspace and snapshots are kept, and
queued prompts wait until the owner resumes the session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import JupyterHandler
from tornado import web
from traitlets import Bool, Set, Unicode
from traitlets.config import LoggingConfigurable

from . import states
from .agent import SessionAgent
from .budgets import Budgets
from .handlers import SESSION_ID, TabbiHandler
from .manager import SessionManager, SessionNotFound
from .store import SessionRecord, Store

log = logging.getLogger(__name__)

#: Sessions whose use is read from the store at once (a remote store gets a few requests at a
#: time, not two per session of the whole service).
STORE_CALLS_AT_ONCE = 8


class TabbiAdmins(LoggingConfigurable):
    """Who may see and control every person's sessions (``c.TabbiAdmins.*``)."""

    admin_users = Set(
        Unicode(),
        help="Names of tabbi admins (hub user names under JupyterHub; in personal mode the "
        "server's owner name, TabbiExtension.local_owner). Empty by default: in personal mode "
        "nobody is an admin unless named here.",
    ).tag(config=True)
    hub_admins = Bool(
        True,
        help="Whether JupyterHub's admins (the 'admin' flag of the hub user model) are tabbi "
        "admins. False: only admin_users are.",
    ).tag(config=True)

    def is_admin(self, owner: str, user: Any) -> bool:
        """Whether the person ``owner`` (authenticated as ``user``) is an admin."""
        if owner in self.admin_users:
            return True
        hub_user = getattr(user, "hub_user", None)  # JupyterHub's identity provider's users
        return self.hub_admins and isinstance(hub_user, dict) and hub_user.get("admin") is True


async def usage(agent: SessionAgent | None, record: SessionRecord, store: Store,
                budgets: Budgets | None) -> dict[str, Any]:
    """What the service can honestly say a session uses: its age, how long its sandbox has been
    running (while this service runs it), whether a turn runs, prompts waiting, events logged,
    its snapshots, and its model tokens and cost as OpenCode reported them (the spend the budgets
    count)."""
    now = time.time()
    snapshots, pending = await asyncio.gather(store.list_snapshots(record.id),
                                              store.pending_prompts(record.id))
    model = (await budgets.model_usage_or_none(store, record.id) if budgets is not None else None) or {}
    running_since = agent.running_since if agent is not None else None
    return {
        "age_seconds": round(now - record.created_at, 1) if record.created_at else None,
        "running_seconds": round(now - running_since, 1) if running_since else None,
        "busy": agent.busy if agent is not None else False,
        "prompts_queued": sum(p.status == "queued" for p in pending),
        "events": agent.events.last_seq if agent is not None else None,
        "snapshots": len(snapshots),
        "snapshot_bytes": sum(s.size for s in snapshots),
        "tokens": model.get("tokens"),
        "cost": model.get("cost"),
    }


async def all_sessions(manager: SessionManager) -> list[dict[str, Any]]:
    """Every session in the store, newest first, each as its owner sees it plus its use."""
    held = {agent.id: agent for agent in manager.agents()}
    records = await manager.store.list_sessions()
    calls = asyncio.Semaphore(STORE_CALLS_AT_ONCE)

    async def one(record: SessionRecord) -> dict[str, Any]:
        agent = held.get(record.id)
        info = agent.describe() if agent is not None else record.public()
        async with calls:
            return {**info, "usage": await usage(agent, record, manager.store, manager.settings.budgets)}

    out = await asyncio.gather(*(one(r) for r in records))
    return sorted(out, key=lambda s: s.get("created_at") or 0, reverse=True)


async def act(manager: SessionManager, admin: str, session_id: str, action: str) -> SessionAgent:
    """Pause or stop anyone's session as ``admin``; logged in the server's log and the session's."""
    record = await manager.store.get_session(session_id)
    if record is None:
        raise SessionNotFound(session_id)
    agent = await manager.get(record.owner, session_id)
    was = agent.state
    if action == "pause":
        await agent.pause("admin")
    elif was in states.LIVE:
        await agent.stop(f"The session was stopped by an administrator ({admin}); "
                         "resume it (or send a prompt) to start it again: its workspace is kept.")
    log.warning("tabbi admin: %s %s session %s of %s (it was %s)", admin,
                "paused" if action == "pause" else "stopped", session_id, record.owner, was)
    await agent.announce("admin.action", {"action": action, "by": admin, "was": was})
    return agent


class AdminHandler(TabbiHandler):
    """An admin route: for a person who may use tabbi but is not an admin, the answer of a route
    that does not exist (Jupyter's own 404 page, not tabbi's JSON), so nobody can probe for it.
    (Callers Jupyter does not let in get its 403, as on every tabbi route.)"""

    _hidden = False

    def require_admin(self) -> None:
        """Called first by every method, after Jupyter's authentication and authorization."""
        if not self.settings["tabbi_admins"].is_admin(self.username, self.current_user):
            self._hidden = True
            raise web.HTTPError(404)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if self._hidden:
            JupyterHandler.write_error(self, status_code, **kwargs)
            return
        super().write_error(status_code, **kwargs)

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        if self._hidden:
            kwargs["set_content_type"] = "text/html"
        return super().finish(*args, **kwargs)


class AdminSessionsHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.require_admin()
        self.write_json({"sessions": await all_sessions(self.manager), "admin": self.username})


class AdminActionHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def post(self, session_id: str, action: str) -> None:
        self.require_admin()
        try:
            agent = await act(self.manager, self.username, session_id, action)
        except SessionNotFound:
            raise web.HTTPError(404, f"no session {session_id}") from None
        self.write_json(agent.describe())


def routes() -> list[tuple[str, type]]:
    prefix = "/tabbi/api/admin"
    return [
        (prefix + "/sessions", AdminSessionsHandler),
        (prefix + f"/sessions/{SESSION_ID}/(?P<action>pause|stop)", AdminActionHandler),
    ]
