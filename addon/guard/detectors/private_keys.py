"""`private_keys`: PEM and OpenSSH private key blocks, from BEGIN to END, or to the end of the
base64 when a block is cut off (a truncated paste still carries most of the key). PuTTY's .ppk
files and keys in other encodings (JWK, raw hex) are not found."""

from __future__ import annotations

import re

from addon.guard.detector import Pattern, PatternDetector

_LABEL = r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
_END = r"-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"

DETECTOR = PatternDetector(
    "private_keys",
    [
        Pattern(_LABEL + r"(?:.{0,16384}?" + _END + r"|[A-Za-z0-9+/=\s\\:,.\-]{0,16384})", re.DOTALL,
                anchors=("-----BEGIN",)),
    ],
    max_len=17000,
)
