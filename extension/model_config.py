"""OpenCode's configuration for a session: which model, through which provider, with what rights.

Three ways to reach a model:
- ``TABBI_LLM_BASE_URL`` (+ ``TABBI_LLM_API_KEY``): any OpenAI-compatible server. tabbi declares it
  as the provider ``tabbi`` and the model is the bare id on that server (``llama3.1``).
- ``openai/<model>`` with ``OPENAI_API_KEY``, ``anthropic/<model>`` with ``ANTHROPIC_API_KEY``:
  OpenCode's built-in providers.
- ``demo``: tabbi's demo model (``demo_model.py``), canned answers, no key; an OpenAI-compatible
  server the Jupyter server runs itself, reached through the gateway like any other.

No key ever reaches the sandbox. OpenCode is pointed at tabbi's model gateway in the Jupyter
server (``gateway.py``) with a per-sandbox gateway token in place of the key; the gateway swaps
the token for the real key and forwards to the upstream. Without a gateway (benchmarks driving
OpenCode directly) the config names the upstream itself and carries no key at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
CUSTOM_PROVIDER = "tabbi"
#: The model name that always means tabbi's demo model, whatever else is configured.
DEMO_MODEL = "demo"

DEFAULT_PERMISSIONS = {"edit": "allow", "bash": "allow", "webfetch": "deny", "websearch": "deny"}

#: What OpenCode is given as its API key when it talks to an upstream without the gateway.
NO_KEY = "none"


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Upstream:
    """Where a provider's model API lives and how it takes its key: the gateway's side."""

    #: ``openai-compatible`` (llm_base_url), ``openai`` or ``anthropic``.
    kind: str
    base_url: str
    key: str | None = field(default=None, repr=False)

    def auth_headers(self) -> dict[str, str]:
        if not self.key:
            return {}
        if self.kind == "anthropic":
            return {"x-api-key": self.key}
        return {"Authorization": f"Bearer {self.key}"}


#: Stands for the demo model's server in ``Choice`` (the real one starts on first use).
DEMO_UPSTREAM = Upstream("openai-compatible", "tabbi:demo")

#: The providers whose model API the gateway speaks: public base URL and the key's variable.
PUBLIC_APIS = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "anthropic": ("https://api.anthropic.com/v1", "ANTHROPIC_API_KEY"),
}


@dataclass(frozen=True)
class GatewayAccess:
    """What a sandbox's OpenCode gets instead of a key: the gateway's base URL for its session
    and a token that is good only there."""

    base_url: str
    token: str = field(repr=False)


class Gateway(Protocol):
    def issue(self, session_id: str, password: str, model: str | None) -> GatewayAccess: ...


class Demo(Protocol):
    def upstream(self) -> Upstream: ...


@dataclass(frozen=True)
class ModelSettings:
    model: str | None = None
    llm_base_url: str | None = None
    llm_api_key: str | None = field(default=None, repr=False)
    provider_keys: dict[str, str] = field(default_factory=dict, repr=False)
    permissions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PERMISSIONS))
    #: The server's model gateway (None: OpenCode talks to the upstream directly, keyless).
    gateway: Gateway | None = field(default=None, compare=False)
    #: The demo model, started on first use (None: ``demo`` is not offered).
    demo: Demo | None = field(default=None, compare=False, repr=False)
    #: Prices of the llm_base_url model (dollars per million tokens; OpenCode's ``cost``).
    pricing: dict[str, float] = field(default_factory=dict)
    #: More models people may switch to (``%tabbi model``), beside ``model`` and ``demo``.
    extra_models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Choice:
    """One model a session may use: ``id`` is how people name it (``%tabbi model ID``)."""

    id: str
    ref: dict[str, str] = field(compare=False)
    upstream: Upstream = field(compare=False, repr=False)
    default: bool = False

    def public(self) -> dict[str, Any]:
        """What clients see: names only, never where the upstream is or its key."""
        return {"id": self.id, "provider": self.ref["providerID"], "model": self.ref["modelID"],
                "default": self.default}


@dataclass(frozen=True)
class OpenCodeSetup:
    config: dict[str, Any]
    model_ref: dict[str, str]  # {"providerID", "modelID"}, sent with every prompt


def resolve(settings: ModelSettings, model: str | None = None) -> tuple[dict[str, str], Upstream]:
    """The model reference OpenCode uses, and the upstream the gateway forwards it to."""
    chosen = model or settings.model
    if chosen == DEMO_MODEL:
        if settings.demo is None:
            raise ModelConfigError("the demo model is not offered here")
        return {"providerID": CUSTOM_PROVIDER, "modelID": DEMO_MODEL}, settings.demo.upstream()
    if settings.llm_base_url:
        if not chosen:
            raise ModelConfigError(
                "TABBI_LLM_BASE_URL is set but no model is: set TABBI_MODEL to the model id "
                "on that server (for example llama3.1)"
            )
        model_id = chosen.split("/", 1)[1] if chosen.startswith(CUSTOM_PROVIDER + "/") else chosen
        upstream = Upstream("openai-compatible", settings.llm_base_url.rstrip("/"), settings.llm_api_key)
        return {"providerID": CUSTOM_PROVIDER, "modelID": model_id}, upstream
    if not chosen or "/" not in chosen:
        raise ModelConfigError(
            "no model configured: set TABBI_MODEL=provider/model (for example "
            "anthropic/claude-sonnet-4-5) with its key, TABBI_LLM_BASE_URL (+ TABBI_LLM_API_KEY) "
            "for an OpenAI-compatible server, or TABBI_MODEL=demo to try tabbi with its demo "
            "model (canned answers, no key)"
        )
    provider, model_id = chosen.split("/", 1)
    if provider not in PUBLIC_APIS:
        raise ModelConfigError(
            f"provider {provider!r} is not supported: use openai/... (OPENAI_API_KEY), "
            "anthropic/... (ANTHROPIC_API_KEY) or TABBI_LLM_BASE_URL for an OpenAI-compatible server"
        )
    base_url, key_name = PUBLIC_APIS[provider]
    upstream = Upstream(provider, base_url, settings.provider_keys.get(key_name))
    return {"providerID": provider, "modelID": model_id}, upstream


def _choice(settings: ModelSettings, name: str, default: bool = False) -> Choice | None:
    """``name`` as a choice, or None when it cannot be used here (no such provider, no key).
    The demo model is named without being started (its server starts on first use)."""
    if name == DEMO_MODEL:
        return Choice(DEMO_MODEL, {"providerID": CUSTOM_PROVIDER, "modelID": DEMO_MODEL},
                      DEMO_UPSTREAM, default) if settings.demo is not None else None
    try:
        ref, upstream = resolve(settings, name)
    except ModelConfigError:
        return None
    if upstream.kind in PUBLIC_APIS and not upstream.key:
        return None
    spelled = DEMO_MODEL if name == DEMO_MODEL else f"{ref['providerID']}/{ref['modelID']}"
    return Choice(spelled, ref, upstream, default)


def available(settings: ModelSettings) -> list[Choice]:
    """The models this server can use, from its configuration: the default (``TABBI_MODEL``),
    the ``extra_models`` an administrator offers, and the demo model. Configuration, not a
    running OpenCode, is the source: it is what a session's OpenCode is configured with (its
    ``GET /config/providers`` reports the same models), it needs no sandbox, and it is also
    where a choice is checked. Models that cannot work (a provider whose key is not set) are
    left out."""
    out: list[Choice] = []
    names = [(settings.model, True), *((m, False) for m in settings.extra_models), (DEMO_MODEL, False)]
    for name, default in names:
        if not name:
            continue
        choice = _choice(settings, name, default)
        if choice is not None and all(c.id != choice.id for c in out):
            out.append(choice)
    return out


def choose(settings: ModelSettings, name: str) -> Choice:
    """The available model ``name`` names (``tabbi/llama3.1``, ``llama3.1`` on a custom
    endpoint, ``demo``, ``openai/gpt-4.1``), or ``ModelConfigError`` listing the ones there are."""
    offered = available(settings)
    wanted = _choice(settings, name)
    for choice in offered:
        if wanted is not None and choice.id == wanted.id and choice.upstream == wanted.upstream:
            return choice
    names = ", ".join(c.id for c in offered) or "none"
    raise ModelConfigError(f"model {name!r} is not available on this server; available: {names} "
                           "(%tabbi models)")


def current(settings: ModelSettings, name: str | None) -> str | None:
    """The id of the model a session recorded (``name``; None: the server's default)."""
    choice = _choice(settings, name or settings.model or "")
    return choice.id if choice is not None else name


def problem(settings: ModelSettings) -> str | None:
    """What keeps the default model from working, said the way a person fixes it (None: nothing
    tabbi can see). Logged at start-up, so that nobody finds out from a failed first session."""
    try:
        _, upstream = resolve(settings)
    except ModelConfigError as exc:
        return str(exc)
    if upstream.kind in PUBLIC_APIS and not upstream.key:
        return f"TABBI_MODEL is {settings.model} but {PUBLIC_APIS[upstream.kind][1]} is not set"
    return None


def build(settings: ModelSettings, model: str | None = None,
          access: GatewayAccess | None = None) -> OpenCodeSetup:
    """The config and model reference for one session. ``access``: the gateway's URL and token
    for this sandbox (the config then carries those and nothing else about the upstream)."""
    ref, upstream = resolve(settings, model)
    base: dict[str, Any] = {
        "autoupdate": False,
        "share": "disabled",
        "lsp": False,
        "formatter": False,
        "permission": dict(settings.permissions),
    }
    options = (
        {"baseURL": access.base_url, "apiKey": access.token}
        if access else {"baseURL": upstream.base_url, "apiKey": NO_KEY}
    )
    provider: dict[str, Any] = {"options": options}
    if upstream.kind == "openai-compatible":
        # Every model of this endpoint that is offered, so that a session can switch among them
        # without a new sandbox (``SessionAgent.set_model``); the chosen one first.
        same = [c.ref["modelID"] for c in available(settings)
                if c.upstream == upstream and c.ref["providerID"] == ref["providerID"]]
        provider.update({
            "npm": "@ai-sdk/openai-compatible",
            "name": "tabbi (OpenAI-compatible)",
            "models": {
                model_id: {
                    "name": model_id,
                    "tool_call": True,
                    "limit": {"context": 128000, "output": 8192},
                    **({"cost": dict(settings.pricing)} if settings.pricing else {}),
                }
                for model_id in dict.fromkeys([ref["modelID"], *same])
            },
        })
    base["provider"] = {ref["providerID"]: provider}
    base["enabled_providers"] = [ref["providerID"]]
    base["model"] = f"{ref['providerID']}/{ref['modelID']}"
    base["small_model"] = base["model"]
    return OpenCodeSetup(config=base, model_ref=ref)


def for_sandbox(settings: ModelSettings, session_id: str, password: str,
                model: str | None = None) -> OpenCodeSetup:
    """The setup of a new sandbox of ``session_id`` whose OpenCode password is ``password``:
    through the gateway, with a token that replaces the session's previous one."""
    resolve(settings, model)  # a configuration error surfaces before any token is issued
    access = settings.gateway.issue(session_id, password, model) if settings.gateway else None
    return build(settings, model, access)
