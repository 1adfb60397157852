"""Sandbox side of tabbi: the provider interface, the local provider and the in-sandbox bootstrap."""

from .provider import Endpoint, ExecResult, Sandbox, SandboxError, SandboxProvider, SandboxSpec

__all__ = ["Endpoint", "ExecResult", "Sandbox", "SandboxError", "SandboxProvider", "SandboxSpec"]
