"""Patches of mitmproxy internals, each installed and taken out one way (wire/patching.py `Patches`)."""
