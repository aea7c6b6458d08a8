"""(inbound API, provider API) -> the translation pair that serves it. A pair that is missing
means the provider cannot serve that API: the gateway answers 400 and forwards nothing."""

from __future__ import annotations

from addon.apis.openai_chat import OPENAI_CHAT
from addon.translate.base import Pair
from addon.translate.openai_chat_anthropic import OpenAIChatToAnthropic
from addon.translate.passthrough import Passthrough

PAIRS: dict[tuple[str, str], Pair] = {
    ("openai_chat", "openai_chat"): Passthrough(OPENAI_CHAT),
    ("openai_chat", "anthropic_messages"): OpenAIChatToAnthropic(),
}
