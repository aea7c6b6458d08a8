"""The tests start gateways the way the offline replay does: addon.process."""

from addon.recording.process import LISTENING, MITMDUMP, ROOT, GatewayProcess

__all__ = ["GatewayProcess", "LISTENING", "MITMDUMP", "ROOT"]
