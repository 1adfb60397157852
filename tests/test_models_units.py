"""Model choice and usage accounting without a server: what ``%tabbi models`` lists, what a
switch accepts, what OpenCode is configured with, and how tokens and cost add up and read."""

from __future__ import annotations

import json

import pytest

from tabbi_extension import model_config
from tabbi_extension.budgets import Spend, tokens_of
from tabbi_extension.model_config import ModelConfigError, ModelSettings
from tabbi_kernel import render
from tabbi_kernel.conversation import Conversation

SECRET = "sk-unit-SECRET-0123456789"


class FakeDemo:
    def upstream(self) -> model_config.Upstream:
        raise AssertionError("listing or choosing the demo model must not start it")


def custom(**kw) -> ModelSettings:
    return ModelSettings(model="scripted", llm_base_url="http://127.0.0.1:9/v1", llm_api_key=SECRET,
                         extra_models=("tabbi/large", "small"), demo=FakeDemo(), **kw)


def test_available_lists_default_extras_and_demo_without_secrets():
    choices = model_config.available(custom())
    assert [(c.id, c.default) for c in choices] == [
        ("tabbi/scripted", True), ("tabbi/large", False), ("tabbi/small", False), ("demo", False)]
    public = json.dumps([c.public() for c in choices])
    assert SECRET not in public and "127.0.0.1" not in public


def test_models_of_a_provider_without_its_key_are_left_out():
    settings = ModelSettings(model="openai/gpt-4.1", extra_models=("anthropic/claude-x", "mystery/m"),
                             provider_keys={"OPENAI_API_KEY": SECRET})
    assert [c.id for c in model_config.available(settings)] == ["openai/gpt-4.1"]


def test_choose_accepts_both_spellings_and_refuses_the_rest_with_the_list():
    settings = custom()
    assert model_config.choose(settings, "large").id == "tabbi/large"
    assert model_config.choose(settings, "tabbi/large").id == "tabbi/large"
    assert model_config.choose(settings, "demo").id == "demo"
    for wrong in ("tabbi/nope", "openai/gpt-4.1", "tabbi/demo"):  # tabbi/demo: the endpoint's, not ours
        with pytest.raises(ModelConfigError) as refused:
            model_config.choose(settings, wrong)
        assert "available: tabbi/scripted, tabbi/large, tabbi/small, demo" in str(refused.value)


def test_a_sandbox_knows_every_model_of_its_endpoint():
    """Switching within one endpoint needs no new sandbox: OpenCode is told of all its models."""
    config = model_config.build(custom(pricing={"input": 1.0}), "tabbi/large").config
    assert config["model"] == "tabbi/large"
    assert list(config["provider"]["tabbi"]["models"]) == ["large", "scripted", "small"]
    assert all(m["cost"] == {"input": 1.0} for m in config["provider"]["tabbi"]["models"].values())


def test_spend_adds_tokens_and_cost_per_turn_and_session():
    spend = Spend()
    spend.record("m1", {"cost": 0.01, "tokens": {"input": 10, "output": 5, "reasoning": 2,
                                                  "cache": {"read": 3, "write": 1}}})
    spend.record("m1", {"cost": 0.02, "tokens": {"input": 20, "output": 5}})  # updated in place
    spend.record("m2", {"cost": "nan", "tokens": {"input": -4, "output": True, "cache": "x"}})
    spend.record("m3", {"cost": 0.005, "tokens": {"input": 1, "output": 1}})
    assert spend.usage(["m1", "m2", "gone"]) == {
        "tokens": {"input": 20, "output": 5, "reasoning": 0, "cache": {"read": 0, "write": 0}},
        "cost": 0.02}
    assert spend.usage()["cost"] == pytest.approx(0.025)
    assert spend.usage()["tokens"]["input"] == 21
    assert tokens_of(None) == {"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}}


def test_usage_line_and_the_panels_turn():
    tokens = {"input": 1234, "output": 567, "reasoning": 0, "cache": {"read": 1000, "write": 0}}
    assert render.usage(tokens, 0.01234, {"cost": 0.0456}) == (
        "1,234 in / 567 out tokens (1,000 cache read) · $0.0123 · session total $0.0456")
    assert render.usage(None, None) == "0 in / 0 out tokens · $0.0000"
    finished = {"prompt_id": "p", "outcome": "completed", "tokens": tokens, "cost": 0.01,
                "session": {"tokens": tokens, "cost": 0.02}}
    conversation = Conversation().apply_all([
        {"seq": 1, "type": "turn.started", "data": {"prompt_id": "p", "text": "hi"}, "ts": 1.0},
        {"seq": 2, "type": "turn.finished", "data": finished, "ts": 2.0}])
    assert conversation.turns[0].to_dict()["usage"] == {"tokens": tokens, "cost": 0.01,
                                                        "session": {"tokens": tokens, "cost": 0.02}}
