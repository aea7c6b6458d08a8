"""Guardrails, pure: detectors of secrets and personal data (`detectors/`, one module each behind
`detector.Detector`), the named sets of the keys file (`config.py`), the text of each inbound
API's requests and answers (`places.py`), masking or blocking it (`scan.py`), and masking a
stream as it passes with a bounded hold-back (`stream.py`). No mitmproxy, no HTTP message: the
hooks (hooks/guardrails.py) apply it to flows."""
