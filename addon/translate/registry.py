"""(inbound API, provider API) -> the translation pair that serves it. A pair that is missing
means the provider cannot serve that API: the gateway answers 400 and forwards nothing."""

from __future__ import annotations

from addon.apis.anthropic_messages import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES
from addon.apis.openai_chat import OPENAI_CHAT
from addon.translate.anthropic_messages_openai_chat import AnthropicMessagesToOpenAIChat
from addon.apis.openai_embeddings import OPENAI_EMBEDDINGS
from addon.apis.openai_responses import OPENAI_RESPONSES
from addon.translate.base import Pair
from addon.translate.openai_chat_anthropic import OpenAIChatToAnthropic
from addon.translate.passthrough import Passthrough

PAIRS: dict[tuple[str, str], Pair] = {
    ("openai_chat", "openai_chat"): Passthrough(OPENAI_CHAT),
    ("openai_chat", "anthropic_messages"): OpenAIChatToAnthropic(),
    ("anthropic_messages", "anthropic_messages"): Passthrough(ANTHROPIC_MESSAGES),
    ("anthropic_messages", "openai_chat"): AnthropicMessagesToOpenAIChat(),
    # count_tokens: only where Anthropic's own API counts (no tokenizer guesses for the others)
    ("anthropic_count_tokens", "anthropic_messages"): Passthrough(ANTHROPIC_COUNT_TOKENS, "/count_tokens"),
    ("openai_embeddings", "openai_embeddings"): Passthrough(OPENAI_EMBEDDINGS),
    ("openai_responses", "openai_responses"): Passthrough(OPENAI_RESPONSES),
}
