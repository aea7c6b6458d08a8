"""Outbound: one module per provider API (pure translation), the catalog of provider names and URLs, and the registry."""
