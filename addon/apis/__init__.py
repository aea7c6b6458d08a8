"""Inbound APIs: what a client speaks to the gateway, one module each."""
