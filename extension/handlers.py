"""HTTP and WebSocket handlers under ``/tabbi/api/``: authenticate, check ownership, validate, delegate.

Every handler requires a Jupyter-authenticated user and the ``tabbi`` resource permission; every
session route looks the session up through ``SessionManager.get(owner, id)``, which answers 404 for
sessions of other users. Errors are JSON ``{"message": ...}`` with the right status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from tornado import web, websocket

from . import cells, logs, model_config, notebook_files, socket_prompts
from .agent import AgentError, SessionAgent
from .github.accounts import GitHubError
from .limits import LimitExceeded
from .manager import SessionManager, SessionNotFound
from .pool import PoolBusy, WarmPool
from .push import PushRequest, parse_author, validate_message
from .states import LIVE
from .store import Event
from .validation import (
    LocalRepoPolicy,
    ValidationError,
    check_json_text,
    parse_repo,
    validate_attachments,
    validate_branch,
    validate_flag,
    validate_model,
    validate_prompt,
    validate_seq,
    validate_wait,
)
from .workspace import check_relative_path

log = logging.getLogger(__name__)

AUTH_RESOURCE = "tabbi"
MAX_BODY_BYTES = 512 * 1024
SESSION_ID = r"(?P<session_id>ses-[0-9a-f]{12})"
PERMISSION_ID = r"(?P<permission_id>[A-Za-z0-9_-]{1,100})"
MAX_WAIT_SECONDS = 60.0


def owner_of(handler: JupyterHandler, user: Any) -> str:
    """The owner name sessions are filed under.

    Jupyter's own token/password identity gives every token-authenticated request a fresh random
    name: on such a single-user server everyone holding the token is the server's one owner, so
    sessions are filed under one fixed name. Identity providers with real user names (JupyterHub)
    keep theirs.
    """
    single = is_single_user(handler.settings["tabbi_single_user"], handler.identity_provider)
    return handler.settings["tabbi_local_owner"] if single else user.username


def is_single_user(configured: bool | None, identity_provider: IdentityProvider) -> bool:
    """``configured`` when set, else whether Jupyter's own token/password identity is in use."""
    if configured is not None:
        return configured
    return type(identity_provider) in (IdentityProvider, PasswordIdentityProvider)


class TabbiHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        await self.settings["tabbi_ready"]()

    @property
    def manager(self) -> SessionManager:
        return self.settings["tabbi_manager"]

    @property
    def username(self) -> str:
        return owner_of(self, self.current_user)

    def body(self) -> dict[str, Any]:
        if len(self.request.body) > MAX_BODY_BYTES:
            raise web.HTTPError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except (ValueError, RecursionError):  # bad UTF-8 and too-deep nesting included
            raise ValidationError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValidationError("the request body must be a JSON object")
        check_json_text(data)
        return data

    async def session(self, session_id: str) -> SessionAgent:
        try:
            return await self.manager.get(self.username, session_id)
        except SessionNotFound:
            raise web.HTTPError(404, f"no session {session_id}") from None

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def log_exception(self, typ, value, tb):
        if isinstance(value, (ValidationError, AgentError, GitHubError, LimitExceeded)):
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Our error types map to statuses here, once, for every handler."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if status_code in (401, 403) and not isinstance(exc, (AgentError, GitHubError)):
            # Jupyter's authentication or authorizer said no (not: "sign in to GitHub first")
            user = getattr(getattr(self, "_current_user", None), "username", None)
            logs.event(log, logging.WARNING, "auth.refused",
                       "request refused", status=status_code, method=self.request.method,
                       path=self.request.path, user=user)
        if isinstance(exc, ValidationError):
            self.set_status(400)
            self.finish(json.dumps({"message": str(exc)}))
            return
        if isinstance(exc, (AgentError, GitHubError)):
            self.set_status(exc.status)
            self.finish(json.dumps({"message": str(exc), "reason": getattr(exc, "reason", None)}))
            return
        if isinstance(exc, LimitExceeded):
            self.set_status(exc.status)
            if exc.retry_after is not None:
                self.set_header("Retry-After", str(exc.retry_after))
            self.finish(json.dumps(exc.public()))
            return
        super().write_error(status_code, **kwargs)


class HealthHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await self.settings["tabbi_health"]())


class WhoAmIHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        user = self.current_user
        self.write_json({"owner": self.username, "name": user.name, "display_name": user.display_name})


class WarmHandler(TabbiHandler):
    """``POST /tabbi/api/warm``: the person is about to start a session (a kernel loaded tabbi,
    a panel opened): fill the warm pool. Nothing of the person goes into it; a no-op when full;
    429 when asked again within ``c.WarmPool.warm_interval``."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        pool: WarmPool | None = self.settings.get("tabbi_pool")
        if pool is None:
            self.write_json({"size": 0, "ready": 0, "starting": False}, 202)
            return
        try:
            self.write_json(pool.warm(self.username), 202)
        except PoolBusy as exc:
            self.set_header("Retry-After", str(max(1, round(exc.retry_after))))
            self.write_json({"message": str(exc)}, 429)


class SessionsHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json({"sessions": await self.manager.list(self.username)})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.body()
        local = await self._local_repo_policy()
        repo = await asyncio.to_thread(parse_repo, body.get("repo"), self.settings["tabbi_github_url"], local)
        model = validate_model(body.get("model"))
        if model is not None:  # one the server offers (GET /tabbi/api/models), as for a switch
            try:
                model_config.choose(self.manager.settings.model, model)
            except model_config.ModelConfigError as exc:
                raise ValidationError(str(exc)) from None
        branch = validate_branch(body.get("branch"))
        fresh = validate_flag(body.get("fresh"), "fresh")
        user = self.current_user
        profile = {"name": user.name, "display_name": user.display_name}
        async with self.settings["tabbi_limits"].starting(self.username, new_session=True):
            agent = await self.manager.create(self.username, repo, model, branch, profile, fresh=fresh)
        self.write_json(agent.describe(), 201)

    async def _local_repo_policy(self) -> LocalRepoPolicy:
        """The folders this person may name as a local ``repo``: their Jupyter root(s), never
        tabbi's data dir, and none at all for someone Jupyter does not let read files."""
        roots = self.settings["tabbi_local_repo_roots"]
        may_read = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "read", "contents")
        )
        return LocalRepoPolicy.for_person(
            roots if may_read else [], [self.settings["tabbi_data_dir"]], self.username
        )


class SessionHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        self.write_json(await (await self.session(session_id)).info())

    @web.authenticated
    @authorized
    async def patch(self, session_id: str) -> None:
        """``{"model": "provider/model"}``: the model of the session's next turns (one the
        server offers: ``GET /tabbi/api/models``; 400 with the list otherwise)."""
        agent = await self.session(session_id)
        body = self.body()
        if set(body) != {"model"} or validate_model(body["model"]) is None:
            raise ValidationError("the body must be {\"model\": \"provider/model\"} "
                                  "(GET /tabbi/api/models lists them)")
        await agent.set_model(body["model"])
        self.write_json(await agent.info())

    @web.authenticated
    @authorized
    async def delete(self, session_id: str) -> None:
        await self.session(session_id)
        await self.manager.delete(self.username, session_id)
        self.set_status(204)
        self.finish()


class PromptHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def post(self, session_id: str) -> None:
        agent = await self.session(session_id)
        body = self.body()
        text = validate_prompt(body.get("text"), self.settings["tabbi_max_prompt_chars"])
        attachments = validate_attachments(body.get("attachments"))
        prompt = await self.settings["tabbi_limits"].prompt(self.username, agent, text, attachments)
        self.write_json({"prompt_id": prompt.id, "position": prompt.position}, 202)


class AbortHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def post(self, session_id: str) -> None:
        await (await self.session(session_id)).abort()
        self.write_json({"aborted": True})


class LifecycleHandler(TabbiHandler):
    """``POST .../pause`` (snapshot, then stop; 200) and ``POST .../resume`` (starts; 202)."""

    @web.authenticated
    @authorized
    async def post(self, session_id: str, action: str) -> None:
        agent = await self.session(session_id)
        if action == "resume" and agent.state not in LIVE:  # a resume starts a sandbox
            async with self.settings["tabbi_limits"].starting(self.username):
                await agent.resume()
        else:
            await getattr(agent, action)()
        self.write_json(agent.describe(), 202 if action == "resume" else 200)


class PermissionHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def post(self, session_id: str, permission_id: str) -> None:
        agent = await self.session(session_id)
        reply = self.body().get("reply")
        if not isinstance(reply, str):
            raise ValidationError("'reply' must be one of once, always, reject")
        await agent.reply_permission(permission_id, reply)
        self.write_json({"ok": True})


class MessagesHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        agent = await self.session(session_id)
        self.write_json({"messages": await agent.store.list_messages(agent.id)})


class DiffHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        # ``?outputs=1``: notebooks' cell diffs show their outputs' changes too (notebook_files).
        agent = await self.session(session_id)
        outputs = self.get_argument("outputs", "0")
        if outputs not in ("0", "1"):
            raise ValidationError("'outputs' must be 0 or 1")
        data = await agent.diff()
        base = agent.record.base_commit or "HEAD"
        sandbox = agent.running_sandbox()
        self.write_json(await notebook_files.annotate_diff(sandbox, base, data, outputs == "1"))


class FileHandler(TabbiHandler):
    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        agent = await self.session(session_id)
        path = check_relative_path(self.get_argument("path", ""))
        self.write_json({"path": path, "content": await agent.read_file(path)})


class EventsHandler(TabbiHandler):
    """Events after a seq, for clients without WebSockets. ``wait=S`` long-polls up to S seconds
    when nothing newer exists yet."""

    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        agent = await self.session(session_id)
        after = validate_seq(self.get_argument("after", "0"))
        limit = min(validate_seq(self.get_argument("limit", "1000"), "limit") or 1000, 1000)
        wait = validate_wait(self.get_argument("wait", "0"), MAX_WAIT_SECONDS)
        queue = agent.subscribe()
        try:
            events = await agent.store.list_events(agent.id, after, limit)
            if not events and wait > 0:
                deadline = asyncio.get_running_loop().time() + wait
                while not events:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        event = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                    if event.seq > after:
                        events = await agent.store.list_events(agent.id, after, limit)
        finally:
            agent.unsubscribe(queue)
        self.write_json(
            {
                "events": [e.public() for e in events],
                "last_seq": events[-1].seq if events else after,
                "state": agent.state,
                "busy": agent.busy,
            }
        )


class EventsSocket(JupyterHandler, websocket.WebSocketHandler):
    """``/tabbi/api/sessions/<id>/stream?after=N``: persisted events after N, then live ones, with
    no gap and no duplicate.

    The order matters: subscribe first, then replay from the store, then forward the live queue
    skipping what the replay already sent. An event is persisted before it is queued, so anything
    the replay missed is in the queue. Clients may also send prompts on it (socket_prompts.py).

    Keep-alive: the server pings every ``websocket_ping_interval`` seconds (proxies drop quiet
    connections; a turn can be quiet for minutes) and closes a connection whose client stopped
    answering. A failure while forwarding closes the socket with 1011 rather than leaving it
    open and silent.
    """

    auth_resource = AUTH_RESOURCE

    @property
    def ping_interval(self) -> float | None:
        return self.settings.get("tabbi_websocket_ping_interval") or None

    async def pre_get(self) -> None:
        await self.settings["tabbi_ready"]()
        user = self.current_user
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, user, "read", AUTH_RESOURCE)
        )
        if not allowed:
            raise web.HTTPError(403)
        self.owner = owner_of(self, user)
        try:
            self.agent = await self.settings["tabbi_manager"].get(self.owner, self.session_id)
        except SessionNotFound:
            raise web.HTTPError(404, f"no session {self.session_id}") from None
        except AgentError as exc:  # run by another live server, say
            raise web.HTTPError(exc.status, str(exc)) from None
        try:
            self.after = validate_seq(self.get_argument("after", "0"))
        except ValidationError as exc:
            raise web.HTTPError(400, str(exc)) from None

    @ws_authenticated
    async def get(self, session_id: str) -> None:  # type: ignore[override]
        self.session_id = session_id
        await self.pre_get()
        result = super().get(session_id)
        if result is not None:
            await result

    def open(self, session_id: str) -> None:  # type: ignore[override]
        self._queue = self.agent.subscribe()
        self._forwarder = asyncio.ensure_future(self._forward())

    async def _forward(self) -> None:
        last = self.after
        try:
            while True:
                batch = await self.agent.store.list_events(self.agent.id, last, 1000)
                for event in batch:
                    await self._send(event)
                    last = event.seq
                if len(batch) < 1000:
                    break
            while True:
                event = await self._queue.get()
                if event.seq <= last:
                    continue
                # A jump: this client fell behind and its oldest queued events gave way (see
                # eventlog.py); the store has them.
                missed = await self.agent.store.list_events(self.agent.id, last, event.seq - last - 1) \
                    if event.seq > last + 1 else []
                for each in [*missed, event]:
                    await self._send(each)
                    last = each.seq
        except (websocket.WebSocketClosedError, asyncio.CancelledError):
            pass
        except Exception:  # a store failure must not leave the client waiting forever
            self.log.warning("tabbi: event stream of %s failed", self.agent.id, exc_info=True)
            self.close(1011, "the event stream failed; reconnect with the last seq you saw")

    async def _send(self, event: Event) -> None:
        await self.write_message(json.dumps(event.public()))

    async def on_message(self, message: str | bytes) -> None:
        """A prompt (see socket_prompts.py); anything else is answered with a refusal."""
        await socket_prompts.receive(self, message)

    def on_close(self) -> None:
        self.agent.unsubscribe(self._queue)
        self._forwarder.cancel()


class PushHandler(TabbiHandler):
    """``POST {message?, author?, pr?, title?, keep_outputs?, cells?: {notebook, cells, select, to?,
    only?}}``:
    commit and push the session branch. The cells come from the kernel, which reads its saved
    notebook as its person: the server reads no notebook, so one path serves personal mode and
    the hub's service (another OS user, who cannot and must not read people's files)."""

    @web.authenticated
    @authorized
    async def post(self, session_id: str) -> None:
        agent = await self.session(session_id)
        body = self.body()
        files, only = None, False
        keep_outputs = validate_flag(body.get("keep_outputs"), "keep_outputs")
        cells_request = body.get("cells")
        if cells_request is not None:
            notebook_name, notebook = cells.from_request(cells_request)
            path, content = await asyncio.to_thread(
                cells.file_for, notebook, notebook_name, cells_request.get("select"), cells_request.get("to"),
                keep_outputs,
            )
            files, only = {path: content}, validate_flag(cells_request.get("only"), "cells.only")
        request = PushRequest(
            message=validate_message(body.get("message")),
            files=files,
            only_files=only,
            pull_request=validate_flag(body.get("pr"), "pr"),
            title=validate_message(body.get("title")),
            author=parse_author(body.get("author")),
            keep_outputs=keep_outputs,
        )
        self.write_json(await self.settings["tabbi_publisher"].push(agent, request))


def routes() -> list[tuple[str, type]]:
    """URL patterns relative to the server's base URL (the ExtensionApp prepends it)."""
    from . import bundle  # it builds on this module's handler class

    prefix = "/tabbi/api"
    return [
        (prefix + f"/sessions/{SESSION_ID}/push", PushHandler),
        (prefix + "/health", HealthHandler),
        (prefix + "/whoami", WhoAmIHandler),
        (prefix + "/warm", WarmHandler),
        (prefix + "/sessions", SessionsHandler),
        (prefix + f"/sessions/{SESSION_ID}", SessionHandler),
        (prefix + f"/sessions/{SESSION_ID}/prompt", PromptHandler),
        (prefix + f"/sessions/{SESSION_ID}/abort", AbortHandler),
        (prefix + f"/sessions/{SESSION_ID}/(?P<action>pause|resume)", LifecycleHandler),
        (prefix + f"/sessions/{SESSION_ID}/messages", MessagesHandler),
        (prefix + f"/sessions/{SESSION_ID}/diff", DiffHandler),
        (prefix + f"/sessions/{SESSION_ID}/file", FileHandler),
        (prefix + f"/sessions/{SESSION_ID}/events", EventsHandler),
        (prefix + f"/sessions/{SESSION_ID}/stream", EventsSocket),
        (prefix + f"/sessions/{SESSION_ID}/permissions/{PERMISSION_ID}", PermissionHandler),
        *bundle.routes(),  # %tabbi checkout's bundle of the workspace
    ]
