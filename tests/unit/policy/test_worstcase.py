"""policy/worstcase.py: a request's worst case is a true bound (n, images, documents, stored
input, the model's own maximum output) and no larger than it must be; the refusal says what it is
made of. In-process, on parsed keys files."""

import base64
import json

import pytest

from addon.apis.anthropic_messages import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES
from addon.apis.openai_chat import OPENAI_CHAT
from addon.apis.openai_embeddings import OPENAI_EMBEDDINGS
from addon.apis.openai_responses import OPENAI_RESPONSES
from addon.policy import rules
from addon.policy.keys_parse import KeysError, parse_keys
from addon.policy.memory_store import MemoryStore
from addon.policy.store import NO_DEMAND
from addon.policy.worstcase import made_of, worst_case
from addon.providers.catalog import model_limits
from addon.wire.errors import GatewayError

PRICES = {"gpt-4o": {"input": 2.5, "output": 10.0}, "gpt-4o-mini*": {"input": 0.15, "output": 0.6},
          "gpt-5*": {"input": 1.25, "output": 10.0}, "claude-*": {"input": 3, "output": 15}}


def key(provider="openai", **fields):
    store = parse_keys(
        {"prices": PRICES, "virtual_keys": {"vk_w": {"provider": provider, "api_key": "sk-test-123456", **fields}}}
    )
    return store, store.lookup("vk_w")


def hold(body: dict, api=OPENAI_CHAT, provider="openai", price_of=None, **fields):
    store, vk = key(provider, **fields)
    raw = json.dumps(body).encode()
    model = body.get("model", "gpt-4o")
    return worst_case(vk.policy, store.price(price_of or model), body, raw, api, vk.bound(model), model), len(raw)


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


# --- output -----------------------------------------------------------------------------------

def test_n_multiplies_the_output_held():
    demand, size = hold({**CHAT, "max_tokens": 19, "n": 100}, budget_tokens=2000)
    assert demand.tokens == size + 19 * 100
    demand, size = hold({**CHAT, "model": "gpt-4o-mini", "max_tokens": 1000, "n": 128}, budget_usd=0.01)
    assert demand.usd == pytest.approx((size * 0.15 + 128_000 * 0.6) / 1e6)  # $0.0768: more than the $0.01 budget
    assert (
        hold({**CHAT, "max_tokens": 10, "n": 2.5}, budget_tokens=10**6)[0].hold.answers == 3
    )  # a provider may round up


def test_without_a_maximum_the_model_own_maximum_output_is_held_not_a_fixed_32768():
    assert hold({**CHAT, "model": "gpt-5"}, budget_tokens=10**6)[0].hold.output == 128_000
    assert hold({**CHAT, "model": "gpt-5-2025-08-07"}, budget_tokens=10**6)[0].hold.output == 128_000
    assert hold({**CHAT, "model": "o3"}, budget_tokens=10**6)[0].hold.output == 100_000
    assert hold({**CHAT, "model": "gpt-4o"}, budget_tokens=10**6)[0].hold.output == 16_384
    assert hold({**CHAT, "model": "ft:gpt-4o-mini:acme::x1"}, budget_tokens=10**6)[0].hold.output == 16_384
    claude = {"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "hi"}]}
    assert hold(claude, ANTHROPIC_MESSAGES, "anthropic", budget_tokens=10**6)[0].hold.output == 64_000
    assert (
        hold({**claude, "model": "claude-3-5-haiku-latest"}, ANTHROPIC_MESSAGES, "anthropic", budget_tokens=10**6)[
            0
        ].hold.output
        == 8_192
    )
    # a model the table does not know: the largest its provider documents, never less
    assert hold({**CHAT, "model": "gpt-7-preview"}, budget_tokens=10**6)[0].hold.output >= 128_000
    assert hold({**CHAT, "model": "deepseek-chat"}, provider="deepseek", budget_tokens=10**6)[0].hold.output == 8_192


def test_each_api_names_its_own_maximum_field():
    body = {"model": "gpt-4o", "input": "hi", "max_output_tokens": 50}
    assert hold(body, OPENAI_RESPONSES, budget_tokens=10**6)[0].hold.output == 50
    # max_tokens means nothing to Responses: the model's maximum
    assert (
        hold({"model": "gpt-4o", "input": "hi", "max_tokens": 50}, OPENAI_RESPONSES, budget_tokens=10**6)[0].hold.output
        == 16_384
    )
    assert hold({**CHAT, "max_completion_tokens": 7, "max_tokens": 100}, budget_tokens=10**6)[0].hold.output == 7
    assert hold({**CHAT, "max_tokens": "9"}, budget_tokens=10**6)[0].hold.output == 16_384  # not a count
    demand, size = hold({"model": "text-embedding-3-small", "input": "hi"}, OPENAI_EMBEDDINGS, budget_tokens=10**6)
    assert demand.tokens == size
    demand, size = hold(
        {"model": "claude-sonnet-4-6", "messages": []}, ANTHROPIC_COUNT_TOKENS, "anthropic", budget_tokens=10**6
    )
    assert demand.tokens == size


def test_a_keys_max_output_tokens_bounds_the_hold_and_lowers_a_larger_maximum():
    assert hold({**CHAT, "model": "gpt-5"}, budget_tokens=10**6, max_output_tokens=4096)[0].hold.output == 4096
    demand = hold({**CHAT, "model": "gpt-5", "max_tokens": 50_000}, budget_tokens=10**6, max_output_tokens=4096)[0]
    assert (demand.hold.output, demand.hold.lowered) == (4096, True)
    assert (
        hold({**CHAT, "model": "gpt-5", "max_tokens": 100}, budget_tokens=10**6, max_output_tokens=4096)[0].hold.output
        == 100
    )
    # above the model's own maximum, the model's is what is sent (a provider refuses more)
    assert hold({**CHAT, "model": "gpt-4o"}, budget_tokens=10**6, max_output_tokens=100_000)[0].hold.output == 16_384


def test_with_several_targets_the_bound_is_the_largest_any_target_may_answer():
    store = parse_keys({"virtual_keys": {"vk_t": {"budget_tokens": 10**6, "targets": [
        {"provider": "openai", "api_key": "sk-a-123456", "max_output_tokens": 1000},
        {"provider": "openai", "api_key": "sk-b-123456", "fallback": True, "model": "gpt-5"}]}}})
    vk = store.lookup("vk_t")
    bound = vk.bound("gpt-4o")
    assert (bound.output, bound.cap) == (128_000, None)  # the fallback has no cap and serves gpt-5
    assert vk.output_cap(vk.targets[0], "gpt-4o") == 1000 and vk.output_cap(vk.targets[1], "gpt-4o") is None
    store = parse_keys({"virtual_keys": {"vk_t": {"budget_tokens": 10**6, "max_output_tokens": 2000, "targets": [
        {"provider": "openai", "api_key": "sk-a-123456", "max_output_tokens": 1000},
        {"provider": "anthropic", "api_key": "sk-b-123456", "fallback": True, "model": "claude-sonnet-4-6"}]}}})
    assert store.lookup("vk_t").bound("gpt-4o")[:2] == (2000, 2000)  # the fallback takes the key's


def test_max_output_tokens_is_validated_on_keys_and_targets():
    for bad in (0, -5, 1.5, "100", True):
        with pytest.raises(KeysError, match="max_output_tokens must be a positive whole number"):
            key(max_output_tokens=bad)
        with pytest.raises(KeysError, match="max_output_tokens must be a positive whole number"):
            parse_keys(
                {
                    "virtual_keys": {
                        "vk_t": {
                            "targets": [{"provider": "openai", "api_key": "sk-a-123456", "max_output_tokens": bad}]
                        }
                    }
                }
            )
    assert "max_output_tokens 4096" in key(max_output_tokens=4096)[1].policy.describe()


# --- input ------------------------------------------------------------------------------------

def image_urls(count: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": f"https://x.example/{i}.png"}} for i in range(count)]
    return {
        "model": "gpt-4o",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, *parts]}],
    }


def test_each_image_url_is_held_at_the_providers_maximum_for_one_image_not_its_bytes():
    demand, size = hold(image_urls(10), budget_tokens=10**6)
    assert size < 1000 and demand.hold.input >= 10 * 1445  # gpt-4o: 85 + 170 x 8 tiles
    assert demand.hold.input <= size + 10 * 1445
    mini, _ = hold({**image_urls(2), "model": "gpt-4o-mini"}, budget_tokens=10**6)
    assert mini.hold.input >= 2 * 48_169  # gpt-4o-mini bills an image 33 times gpt-4o's tokens
    mini, _ = hold({**image_urls(10), "model": "gpt-4o-mini"}, budget_tokens=10**6)
    assert mini.hold.input == 128_000  # ten of them would pass its context window: that caps them


def test_an_inline_screenshot_is_held_at_one_images_maximum_not_its_bytes():
    data = base64.b64encode(b"\x89PNG" + b"\0" * 1_500_000).decode()  # ~2 MB of base64
    body = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]}
    demand, size = hold(body, budget_tokens=10**6)
    assert size > 2_000_000 and demand.hold.input < 2_000  # well under a budget of a million
    anthropic = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]}
    demand, size = hold(anthropic, ANTHROPIC_MESSAGES, "anthropic", budget_tokens=10**6)
    assert size > 2_000_000 and demand.hold.input < 1_600 + 400
    responses = {"model": "gpt-5", "max_output_tokens": 10, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": f"data:image/png;base64,{data}"}]}]}
    demand, size = hold(responses, OPENAI_RESPONSES, budget_tokens=10**6)
    assert demand.hold.input < 1_190 + 400


def test_images_inside_tool_results_count_too_and_a_json_escape_does_not_hide_one():
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x.example/a.png"}}]}]}]}
    assert hold(body, ANTHROPIC_MESSAGES, "anthropic", budget_tokens=10**6)[0].hold.images == 1
    _, vk = key(budget_tokens=10**6)
    escaped = json.dumps(image_urls(3)).replace('"image_url"', '"\\u0069mage_url"').encode()
    body = json.loads(escaped)
    demand = worst_case(vk.policy, None, body, escaped, OPENAI_CHAT, vk.bound("gpt-4o"), "gpt-4o")
    assert demand.hold.images == 3


def test_a_document_or_stored_input_is_held_at_the_models_context_window():
    pdf = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}]}
    demand, _ = hold(pdf, budget_tokens=10**7)
    assert (demand.hold.input, demand.hold.whole_context) == (128_000, True)
    demand, _ = hold({"model": "gpt-5", "input": "and then?", "previous_response_id": "resp_1", "max_output_tokens": 5},
                     OPENAI_RESPONSES, budget_tokens=10**7)
    assert demand.hold.input == 400_000
    text_doc = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "short"}}]}]}
    demand, size = hold(text_doc, ANTHROPIC_MESSAGES, "anthropic", budget_tokens=10**7)
    assert demand.hold.input == size  # a text document is its bytes


def test_no_input_is_held_beyond_the_context_window():
    audio = base64.b64encode(b"\0" * 600_000).decode()
    body = {"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}]}
    demand, size = hold(body, budget_tokens=10**7)
    assert size > 128_000 and demand.hold.input == 128_000


def test_a_key_without_a_budget_or_tpm_holds_nothing():
    assert hold(image_urls(3), rpm=5, max_parallel=2)[0] == NO_DEMAND


# --- the refusal says what the hold was made of --------------------------------------------------

def refused(body: dict, api=OPENAI_CHAT, provider="openai", used: int = 0, **fields) -> str:
    store, vk = key(provider, **fields)
    raw = json.dumps(body).encode()
    model = body["model"]
    demand = worst_case(vk.policy, store.price(model), body, raw, api, vk.bound(model), model)
    usage = MemoryStore()
    if used:
        usage.add_usage(vk.fingerprint, used, 0.0, when=0.0)
    with pytest.raises(GatewayError) as e:
        rules.admit(vk, model, store, usage, 1.0, demand)
    assert e.value.code in ("budget_exceeded", "rate_limit_exceeded")
    return e.value.message


def test_the_refusal_names_the_models_maximum_when_the_request_named_none():
    message = refused({**CHAT, "model": "gpt-5"}, budget_tokens=100_000)
    assert (
        "no max_tokens: 128,000 output tokens held for gpt-5; set max_tokens or the key's max_output_tokens" in message
    )
    assert "lower max_tokens" not in message


def test_the_refusal_names_n_and_the_images():
    message = refused({**CHAT, "max_tokens": 19, "n": 100}, budget_tokens=1000)
    assert "max_tokens 19 x n 100 = 1,900 output tokens; lower max_tokens or n to fit" in message
    message = refused(image_urls(10), budget_tokens=5000)
    assert "(10 images at 1,445 each)" in message
    message = refused({"model": "gpt-5", "input": "hi"}, OPENAI_RESPONSES, budget_usd=0.01)
    assert "no max_output_tokens: 128,000 output tokens held for gpt-5" in message
    message = refused({**CHAT, "model": "gpt-5"}, budget_tokens=1000, max_output_tokens=4096)
    assert (
        "no max_tokens: 4,096 output tokens held (the key's max_output_tokens); set a lower max_tokens to fit"
        in message
    )
    message = refused({**CHAT, "model": "gpt-5"}, used=10, tpm=1000)
    assert "no max_tokens: 128,000 output tokens held for gpt-5" in message


def test_made_of_nothing_says_nothing():
    assert made_of(None) == ""


def test_the_catalog_knows_each_families_longest_prefix():
    assert model_limits("openai", "gpt-4o-mini-2024-07-18").image == 2_833 + 5_667 * 8
    assert model_limits("openai", "gpt-4o-2024-08-06").image == 85 + 170 * 8
    assert model_limits("azure", "gpt-4.1-nano").image == 3_779
    assert model_limits("anthropic", "claude-opus-4-7").image > model_limits("anthropic", "claude-opus-4-6").image
    assert model_limits("groq", "llama-3.3-70b").max_output > 0  # a provider without a table: the defaults


# --- max_output_tokens is sent ---------------------------------------------------------------------

def test_the_cap_is_sent_in_each_apis_own_field_when_the_request_names_none():
    from addon.policy.worstcase import cap_output

    for api, provider, field in (
        (OPENAI_CHAT, "openai", "max_completion_tokens"),
        (OPENAI_CHAT, "azure", "max_completion_tokens"),
        (OPENAI_CHAT, "deepseek", "max_tokens"),
        (OPENAI_CHAT, "anthropic", "max_tokens"),
        (OPENAI_RESPONSES, "openai", "max_output_tokens"),
        (ANTHROPIC_MESSAGES, "anthropic", "max_tokens"),
    ):
        body = {"model": "m"}
        assert cap_output(body, api, provider, 500) is True and body == {"model": "m", field: 500}
    body = {"model": "m", "max_tokens": 9000, "max_completion_tokens": 100}
    assert (
        cap_output(body, OPENAI_CHAT, "openai", 500) is True
        and body["max_tokens"] == 500
        and body["max_completion_tokens"] == 100
    )
    body = {"model": "m", "max_tokens": 100}
    assert cap_output(body, OPENAI_CHAT, "openai", 500) is False and body == {"model": "m", "max_tokens": 100}
    body = {"model": "m", "input": "x"}
    assert cap_output(body, OPENAI_EMBEDDINGS, "openai", 500) is False and "max_tokens" not in body
    assert cap_output({"model": "m"}, OPENAI_CHAT, "openai", None) is False


def test_a_request_naming_no_model_is_held_to_rpm_and_max_parallel_not_to_a_used_up_budget():
    # a stored response's GET costs nothing: a spent budget must not keep a client from the
    # background response it was charged for
    store, vk = key(budget_tokens=100, tpm=50, rpm=2)
    usage = MemoryStore()
    usage.add_usage(vk.fingerprint, 100, 0.0, when=0.0)
    rules.admit(vk, None, store, usage, 1.0)
    rules.admit(vk, None, store, usage, 1.0)
    with pytest.raises(GatewayError) as e:
        rules.admit(vk, None, store, usage, 1.0)
    assert e.value.code == "rate_limit_exceeded" and "rpm 2" in e.value.message
    with pytest.raises(GatewayError) as e:
        rules.admit(key(budget_tokens=100)[1], "gpt-4o", store, usage, 1.0)
