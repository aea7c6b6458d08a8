"""HTTP on the wire: header and body helpers, SSE framing, stream wrapping, error bodies and pages, timeouts."""
