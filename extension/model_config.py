"""OpenCode's configuration for a session: which model, through which provider, with what rights.

Two ways to reach a model:
- ``TABBI_LLM_BASE_URL`` (+ ``TABBI_LLM_API_KEY``): any OpenAI-compatible server. tabbi declares it
  as the provider ``tabbi`` and the model is the bare id on that server (``llama3.1``).
- otherwise OpenCode's built-in providers, with ``provider/model`` and the provider's usual key.

Keys never go into the config text: the config refers to them as ``{env:NAME}`` and the values
travel in the OpenCode process's environment only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
CUSTOM_PROVIDER = "tabbi"

DEFAULT_PERMISSIONS = {"edit": "allow", "bash": "allow", "webfetch": "deny", "websearch": "deny"}


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSettings:
    model: str | None = None
    llm_base_url: str | None = None
    llm_api_key: str | None = field(default=None, repr=False)
    provider_keys: dict[str, str] = field(default_factory=dict, repr=False)
    permissions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PERMISSIONS))


@dataclass(frozen=True)
class OpenCodeSetup:
    config: dict[str, Any]
    env: dict[str, str] = field(repr=False)
    model_ref: dict[str, str]  # {"providerID", "modelID"}, sent with every prompt


def build(settings: ModelSettings, model: str | None = None) -> OpenCodeSetup:
    """The config, secret environment and model reference for one session."""
    chosen = model or settings.model
    base: dict[str, Any] = {
        "autoupdate": False,
        "share": "disabled",
        "lsp": False,
        "formatter": False,
        "permission": dict(settings.permissions),
    }
    if settings.llm_base_url:
        if not chosen:
            raise ModelConfigError(
                "TABBI_LLM_BASE_URL is set but no model is: set TABBI_MODEL to the model id "
                "on that server (for example llama3.1)"
            )
        model_id = chosen.split("/", 1)[1] if chosen.startswith(CUSTOM_PROVIDER + "/") else chosen
        base["provider"] = {
            CUSTOM_PROVIDER: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "tabbi (OpenAI-compatible)",
                "options": {
                    "baseURL": settings.llm_base_url.rstrip("/"),
                    "apiKey": "{env:TABBI_LLM_API_KEY}",
                },
                "models": {
                    model_id: {
                        "name": model_id,
                        "tool_call": True,
                        "limit": {"context": 128000, "output": 8192},
                    }
                },
            }
        }
        ref = {"providerID": CUSTOM_PROVIDER, "modelID": model_id}
        base["enabled_providers"] = [CUSTOM_PROVIDER]
        env = {"TABBI_LLM_API_KEY": settings.llm_api_key or "none"}
    else:
        if not chosen or "/" not in chosen:
            raise ModelConfigError(
                "no model configured: set TABBI_MODEL=provider/model (for example "
                "anthropic/claude-sonnet-4-5), or TABBI_LLM_BASE_URL for an OpenAI-compatible server"
            )
        provider, model_id = chosen.split("/", 1)
        ref = {"providerID": provider, "modelID": model_id}
        env = {k: v for k, v in settings.provider_keys.items() if k in PROVIDER_KEYS and v}
    base["model"] = f"{ref['providerID']}/{ref['modelID']}"
    base["small_model"] = base["model"]
    return OpenCodeSetup(config=base, env=env, model_ref=ref)
