"""Provider name -> provider implementation. Adding a provider means a line in catalog.py and a
line here (a new module only for a new way of sending the key or building the URL)."""

from __future__ import annotations

from addon.providers.anthropic import AnthropicCompatible
from addon.providers.azure import AzureProvider
from addon.providers.base import Provider
from addon.providers.catalog import CATALOG
from addon.providers.openai import OpenAICompatible

# by the API a catalog line speaks for chat; azure builds its URLs per key
_KINDS = {"openai_chat": OpenAICompatible, "anthropic_messages": AnthropicCompatible}
_SPECIAL: dict[str, Provider] = {"azure": AzureProvider()}
PROVIDERS: dict[str, Provider] = {name: _SPECIAL.get(name) or _KINDS[info.api](name) for name, info in CATALOG.items()}
