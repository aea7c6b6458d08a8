"""LLM API gateway: a mitmproxy addon (see addon/gateway.py) over pure provider translators."""
