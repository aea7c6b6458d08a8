"""The mapping tables between the APIs, each written once and read in both directions.

Each is a `Mapping` (wire/tables.py): rows read forward and in reverse. Anthropic is always the
left column. Anthropic's error type <-> HTTP status table belongs to its API (apis/anthropic_messages.py).
"""

from __future__ import annotations

from addon.wire.tables import Mapping


# Anthropic stop_reason <-> OpenAI finish_reason
FINISH_REASONS: Mapping[str, str] = Mapping([
    ("end_turn", "stop"),
    ("max_tokens", "length"),
    ("tool_use", "tool_calls"),
    ("refusal", "content_filter"),
    ("stop_sequence", "stop"),
    ("pause_turn", "stop"),
    ("model_context_window_exceeded", "length"),
    ("tool_use", "function_call"),  # legacy OpenAI function calling
], default_forward="stop", default_reverse="end_turn")

# Anthropic error type <-> OpenAI error type
ERROR_TYPES: Mapping[str, str] = Mapping([
    ("invalid_request_error", "invalid_request_error"),
    ("authentication_error", "authentication_error"),
    ("billing_error", "billing_error"),
    ("permission_error", "permission_error"),
    ("not_found_error", "not_found_error"),
    ("rate_limit_error", "rate_limit_exceeded"),
    ("api_error", "server_error"),
    ("timeout_error", "timeout"),
    ("overloaded_error", "overloaded_error"),
    ("request_too_large", "invalid_request_error"),
    ("rate_limit_error", "rate_limit_error"),
    ("timeout_error", "timeout_error"),
    ("api_error", "bad_gateway"),
    ("overloaded_error", "service_unavailable"),
], default_forward="server_error", default_reverse="api_error")


# Anthropic thinking budget (tokens) <-> OpenAI reasoning_effort. OpenAI -> Anthropic takes the
# row's budget; Anthropic -> OpenAI the effort of the largest budget not above the one asked for.
REASONING_BUDGETS: Mapping[int, str] = Mapping([
    (1024, "low"),
    (4096, "medium"),
    (16384, "high"),
    (1024, "minimal"),
], default_forward="low", default_reverse=0)


def effort_for_budget(budget: int) -> str:
    best = REASONING_BUDGETS.rows[0]
    for row in REASONING_BUDGETS.rows:
        if best[0] < row[0] <= budget:
            best = row
    return best[1]


# Anthropic message role <-> OpenAI message role. OpenAI tool results are user turns in
# Anthropic; system and developer messages have no Anthropic role (the `system` parameter, or a
# system message kept in place: see the translation modules).
ROLES: Mapping[str, str] = Mapping([
    ("user", "user"),
    ("assistant", "assistant"),
    ("user", "tool"),
], default_forward="user", default_reverse="")

# Anthropic tool_choice type <-> OpenAI tool_choice string ("tool" <-> a named function)
TOOL_CHOICES: Mapping[str, str] = Mapping([
    ("auto", "auto"),
    ("any", "required"),
    ("none", "none"),
], default_forward="", default_reverse="")
