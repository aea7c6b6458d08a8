"""Provider name -> provider. Adding a provider means adding a module and a line here."""

from __future__ import annotations

from addon.providers.anthropic import AnthropicProvider
from addon.providers.base import Provider
from addon.providers.openai import OpenAICompatible

PROVIDERS: dict[str, Provider] = {
    "openai": OpenAICompatible("openai", "https://api.openai.com/v1"),
    "deepseek": OpenAICompatible("deepseek", "https://api.deepseek.com"),
    "anthropic": AnthropicProvider(),
}
