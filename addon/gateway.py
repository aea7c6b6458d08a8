"""The gateway as mitmproxy loads it (`mitmdump -s addon/gateway.py`): the list of its parts, in
the order their hooks run.

Run with mitmdump/mitmweb in reverse mode against an unreachable placeholder target and
connection_strategy=lazy (run.sh does this), so that nothing is ever forwarded that the gateway
did not route on purpose. The data path itself reads top to bottom in addon/hooks/gateway.py;
docs/architecture.md has the layers.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, "") or not __package__.startswith("addon"):
    # loaded by mitmproxy as a script: make the `addon` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from addon.hooks.accesslog import ACCESS
from addon.hooks.accounting import UsageAccounting
from addon.hooks.answers import answer
from addon.hooks.chain import AddonChain
from addon.hooks.drain import Drain
from addon.hooks.failover import Failover
from addon.hooks.gate import HeadersGate
from addon.hooks.gateway import Gateway
from addon.hooks.guardrails import Guardrails
from addon.hooks.largebodies import LargeBodies
from addon.hooks.live import Live
from addon.hooks.logredact import LogRedaction
from addon.hooks.metrics import Metrics
from addon.hooks.optionguard import OptionGuard
from addon.hooks.owners import ResponseOwners
from addon.hooks.patches.attempts import Attempts
from addon.hooks.patches.connectreset import ConnectReset
from addon.hooks.patches.errorpages import JsonErrorPages
from addon.hooks.patches.limits import RequestLimits
from addon.hooks.patches.wirekeys import WireKeys
from addon.hooks.reload import KeysReloader
from addon.hooks.stores import StoreChoice
from addon.hooks.streamends import StreamEnds
from addon.hooks.timeouts import StreamIdleTimeout, UpstreamTimeout
from addon.recording.recorder import Recorder, Snapshot
from addon.web.contentview import WebViews
from addon.web.listing import WebListing

_live = Live()  # the keys in force, the usage store, the flows in flight: what the parts share
_failover = Failover(_live)  # a key's targets: the first one, pinning, another after a failed attempt
# the data path; its headers' early refusals, and the worker thread of large bodies, are its own
_gateway = Gateway(_live, _failover, HeadersGate(_live), LargeBodies())
_guardrails = Guardrails(_live)  # a key's guardrail set, from the keys in force
_accounting = UsageAccounting(_live)
_redaction = LogRedaction(_live)
ACCESS.redact = lambda text: _redaction.filter.secrets().redact(text)  # its lines skip logging's filters

# One addon for mitmproxy (hooks/chain.py says why); its parts' hooks run in this order.
addons = [AddonChain(
    OptionGuard(),  # first: refuses a change to a guarded option before any part applies it
    _redaction,  # before anything logs: every log record passes its filter
    JsonErrorPages(),  # mitmproxy's own error pages in the client's API's shape
    RequestLimits(answer),  # header and body bounds, enforced below the flow hooks
    WireKeys(),  # the real key only in the bytes sent to the routed host
    Attempts(),  # retries an upstream attempt before the first byte reached the client
    ConnectReset(),  # a reset at connect is a failed attempt, not a crash
    StoreChoice(_live, _accounting),  # may put RedisStore in _live before the accounting loads the ledger into it
    _guardrails.requests,  # before the Snapshot and the Gateway: what is kept, shown and forwarded is masked
    Snapshot(_live),  # before the Gateway: keeps the client's request and the provider's answer as they came
    _gateway,  # the data path: routes the request, makes the answer the client's
    _failover,  # after the Gateway: another target for a failed attempt, until the flow ends
    ResponseOwners(_live),  # after the Gateway, whose responseheaders chose the stream it watches
    _guardrails.answers,  # after the Gateway's stream and translation, before the accounting and recording
    KeysReloader(_live),  # no flow hook: swaps the keys in force when the file changes
    Drain(_live),  # no flow hook: lets forwarded requests finish at a stop
    UpstreamTimeout(),  # before the accounting, whose error hook counts what the timeouts made of a flow
    StreamIdleTimeout(),  # likewise
    StreamEnds(),  # ends a broken stream for the client before the accounting counts it
    _accounting,  # counts usage once every part that changes the answer has run
    Recorder(),  # after the Gateway: taps the stream it chose and writes the final flow
    ACCESS,  # the access line, once the flow is counted
    WebViews(),  # mitmweb's view of a flow (no flow hook)
    WebListing(),  # mitmweb's list: the path the client called, room for the comment (no flow hook)
    Metrics(_live, _accounting),  # last: its clock sees every part
)]
