"""Provider name -> provider implementation. Adding a provider means a line in catalog.py, a
module, and a line here."""

from __future__ import annotations

from addon.providers.anthropic import AnthropicCompatible
from addon.providers.base import Provider
from addon.providers.openai import OpenAICompatible

PROVIDERS: dict[str, Provider] = {
    "openai": OpenAICompatible("openai"),
    "deepseek": OpenAICompatible("deepseek"),
    "anthropic": AnthropicCompatible("anthropic"),
    "deepseek-anthropic": AnthropicCompatible("deepseek-anthropic"),
}
