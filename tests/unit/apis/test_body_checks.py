"""The request body parser (addon/apis/base.py) agrees with json.loads given the same hooks. Duplicate
keys and the message and part caps through a real gateway: tests/e2e/test_body_checks.py."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import examples


# json_object parses with one decoder built at import: what json.loads with the same hooks does
_JSONISH = st.sampled_from(['{', '}', '[', ']', ',', ':', '"a"', '"b"', '1', '-0.5e3', 'NaN', 'Infinity', '-Infinity',
                            'null', 'true', ' ', '"\\u00e9"', '"\\ud800"', '\ufeff', 'x', '"model"'])


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(_JSONISH, max_size=16).map("".join), st.sampled_from(["str", "utf-8", "utf-16", "utf-8-sig", "utf-32"]))
def test_json_object_parses_as_json_loads_with_its_hooks(text, encoding):
    from addon.apis import base
    from addon.wire.errors import GatewayError
    raw = text if encoding == "str" else text.encode(encoding, "surrogatepass")

    def outcome(parse):
        try:
            return "ok", parse(raw)
        except GatewayError as e:
            return "gateway", e.code
        except (ValueError, UnicodeDecodeError, base.DuplicateKey) as e:
            return "error", type(e).__name__
    expected = outcome(lambda r: json.loads(r, object_pairs_hook=base._unique_pairs, parse_constant=base._no_constant))
    assert outcome(base._loads) == expected
