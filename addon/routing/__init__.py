"""Pure routing: where a request goes and what it becomes on the way, as plain functions over
dicts and bytes (no mitmproxy: the hooks apply what these decide to the flow)."""
