"""Recording flows, replaying them offline, and starting gateway processes for replay and tests."""
