"""Claude Code itself, a real client: `claude -p` in print mode through the gateway to fake
providers of each kind (anthropic: passthrough; openai and deepseek: translation).

The test installs Claude Code with npm into .cache/claude-code (once; version CLAUDE_CODE_VERSION)
and skips with the reason when npm is missing or the install fails (no registry access)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_anthropic_e2e import stream_events, text_block
from tests.fakeprovider import Received, Reply, openai_stream
from tests.npmclient import npm_client

pytestmark = [pytest.mark.e2e, pytest.mark.client]


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)

ROOT = Path(__file__).resolve().parent.parent.parent
PREFIX = ROOT / ".cache" / "claude-code"
VERSION = os.environ.get("CLAUDE_CODE_VERSION", "2.1.197")
KEYS = {"vk_cc_openai": {"provider": "openai", "api_key": "sk-cc-openai-real-0001", "name": "cc-openai"},
        "vk_cc_deepseek": {"provider": "deepseek", "api_key": "sk-cc-deepseek-real-0002", "name": "cc-deepseek"},
        "vk_cc_anthropic": {"provider": "anthropic", "api_key": "sk-ant-cc-real-0003", "name": "cc-anthropic"}}


@pytest.fixture(scope="module")
def claude() -> Path:
    return npm_client(PREFIX, "@anthropic-ai/claude-code", VERSION, "claude")


@pytest.fixture(scope="module")
def gateway(gateway_factory, provider_server):
    return gateway_factory({"providers": {"openai": {"base_url": provider_server.url + "/v1"},
                                          "deepseek": {"base_url": provider_server.url + "/ds"},
                                          "anthropic": {"base_url": provider_server.url + "/v1"}},
                            "virtual_keys": KEYS})


def run_claude(claude: Path, gateway, key: str, model: str, tmp_path: Path, prompt: str = "say hello") -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(HOME=str(tmp_path), ANTHROPIC_BASE_URL=gateway.url, ANTHROPIC_AUTH_TOKEN=key, ANTHROPIC_MODEL=model,
               ANTHROPIC_DEFAULT_HAIKU_MODEL=model, ANTHROPIC_SMALL_FAST_MODEL=model,
               CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
    proc = subprocess.run(
        [str(claude), "-p", prompt], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + gateway.log()[-3000:]
    return proc.stdout


def messages_requests(provider) -> list[Received]:
    return [r for r in provider.received if r.method == "POST"]


def assert_clean(received: Received, real_key: str) -> None:
    assert real_key in (received.headers.get("authorization", "") + received.headers.get("x-api-key", ""))
    assert not any(vk in json.dumps(received.headers) for vk in KEYS)


def test_claude_code_through_an_openai_key(claude, gateway, provider, tmp_path):
    provider.reset(lambda r: Reply.sse(openai_stream(r.json(), pieces=("Hello from ", "GPT"))))
    out = run_claude(claude, gateway, "vk_cc_openai", "gpt-4o", tmp_path)
    assert "Hello from GPT" in out
    sent = messages_requests(provider)
    assert sent and all(r.path == "/v1/chat/completions" for r in sent)
    body = sent[-1].json()
    assert body["messages"][0]["role"] == "system" and len(body["tools"]) >= 10
    assert "cache_control" not in sent[-1].body.decode() and "context_management" not in body
    assert_clean(sent[-1], "sk-cc-openai-real-0001")
    wait_for(lambda: "key=cc-openai provider=openai model=gpt-4o" in gateway.log())
    assert re.search(r"key=cc-openai provider=openai model=gpt-4o .*dropped=\S*cache_control", gateway.log())


def test_claude_code_through_a_deepseek_reasoner_key(claude, gateway, provider, tmp_path):
    def reply(r: Received) -> Reply:
        chunks = openai_stream(r.json(), pieces=("Hello from ", "DeepSeek"))
        think = json.loads(chunks[0][6:])
        think["choices"][0]["delta"] = {"reasoning_content": "The user wants a greeting."}
        return Reply.sse([chunks[0], b"data: " + json.dumps(think).encode() + b"\n\n", *chunks[1:]])
    provider.reset(reply)
    out = run_claude(claude, gateway, "vk_cc_deepseek", "deepseek-reasoner", tmp_path)
    assert "Hello from DeepSeek" in out and "The user wants" not in out
    sent = messages_requests(provider)
    assert sent and all(r.path == "/ds/chat/completions" for r in sent)
    assert_clean(sent[-1], "sk-cc-deepseek-real-0002")


def test_claude_code_through_an_anthropic_key_passes_through(claude, gateway, provider, tmp_path):
    provider.reset(
        lambda r: (
            Reply.sse(stream_events([text_block("Hello from ", "Claude")]))
            if r.json().get("stream")
            else Reply.json(
                {
                    "id": "msg_x",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-6",
                    "content": [{"type": "text", "text": "Hello from Claude"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 3, "output_tokens": 3},
                }
            )
        )
    )
    out = run_claude(claude, gateway, "vk_cc_anthropic", "claude-sonnet-4-6", tmp_path)
    assert "Hello from Claude" in out
    sent = messages_requests(provider)
    assert sent and all(r.path.startswith("/v1/messages") for r in sent)
    last = sent[-1]
    assert "claude-code" in last.headers["anthropic-beta"] and last.headers["x-claude-code-session-id"]
    assert "cache_control" in last.body.decode()  # unchanged: Anthropic caches
    assert_clean(last, "sk-ant-cc-real-0003")
    assert "authorization" not in last.headers


def test_claude_code_reads_a_file_with_a_key_and_the_provider_gets_it_masked(claude, gateway_factory, provider,
                                                                             tmp_path):
    """A key under the `default` guardrail set: the agent reads a file holding a fake AWS key (its
    Read tool, asked for by the fake provider) and the tool result reaches the provider masked."""
    aws_id, aws_secret = "AKIA" + "IOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    work = tmp_path / "project"
    work.mkdir()
    (work / "creds.env").write_text(f"AWS_ACCESS_KEY_ID={aws_id}\nAWS_SECRET_ACCESS_KEY={aws_secret}\nREGION=eu\n")
    guarded = gateway_factory({
        "providers": {"anthropic": {"base_url": provider.url + "/v1"}},
        "guardrails": {"default": {"detect": ["secrets", "private_keys", "credit_cards", "emails"]}},
        "virtual_keys": {"vk_cc_guarded": {"provider": "anthropic", "api_key": "sk-ant-cc-real-0004",
                                           "name": "cc-guarded", "guardrails": "default"}}})

    def reply(r: Received) -> Reply:
        body = r.json()
        results = [b for m in body.get("messages", []) if isinstance(m.get("content"), list)
                   for b in m["content"] if b.get("type") == "tool_result"]
        if body.get("tools") and not results:
            return Reply.sse(stream_events([({"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}},
                                             [{"type": "input_json_delta",
                                               "partial_json": json.dumps({"file_path": str(work / "creds.env")})}])],
                                           stop_reason="tool_use"))
        return Reply.sse(stream_events([text_block("I read ", "the file.")]))

    provider.reset(reply)
    out = run_claude(claude, guarded, "vk_cc_guarded", "claude-sonnet-4-6", work, prompt="read creds.env")
    assert "I read the file." in out
    sent = [r for r in messages_requests(provider) if b"tool_result" in r.body]
    assert sent, "the agent never sent the file's content back"
    body = sent[-1].body.decode()
    assert "REGION=eu" in body  # the file did reach the provider...
    assert "AWS_ACCESS_KEY_ID=[REDACTED:secrets]" in body and "[REDACTED:secrets]" in body.split("SECRET")[1]
    assert aws_id not in body and aws_secret not in body  # ...without the key
    for r in provider.received:
        assert aws_id.encode() not in r.body and aws_secret.encode() not in r.body
