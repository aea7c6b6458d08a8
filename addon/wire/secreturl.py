"""URLs that may carry a password (REDIS_URL, a PostgreSQL USAGE_DB): out of argv and out of logs.

`ps` and /proc/PID/cmdline show every process's arguments to every local user, and mitmweb shows
the options to whoever logs in. So run.sh and the fleet's supervisor start the gateway with
`--set redis_url=env:REDIS_URL --set usage_db=env:USAGE_DB`: the option holds only the name of
an environment variable (a process's environment is readable by its own user only), and the
part that uses the option reads the variable in configure() (`resolve`). Options, ps and mitmweb
show `env:REDIS_URL`; log lines name the URL with its password masked (`masked_url`).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

ENV_PREFIX = "env:"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def resolve(option: str, value: str) -> str:
    """An option's value, `env:NAME` replaced by the environment variable NAME (which may be empty).
    ValueError, naming the option and the variable (never a value), when it is not set."""
    if not value.startswith(ENV_PREFIX):
        return value
    name = value[len(ENV_PREFIX):]
    if not _NAME.fullmatch(name):
        raise ValueError(f"{option}={value}: env: takes the name of an environment variable, e.g. env:{option.upper()}")
    try:
        return os.environ[name]
    except KeyError:
        raise ValueError(f"{option}={value}: the environment variable {name} is not set") from None


def masked_url(url: str) -> str:
    """A URL fit for a log line: its password (`user:password@`, or a `password=` query parameter)
    replaced by ***. Anything else (a file path) is returned as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 bracket: nothing of it is worth the risk
        return "***"
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    if "password" in query.lower():
        query = "&".join(f"{name}=***" if name.strip().lower() == "password" else param
                         for param in query.split("&") for name in [param.partition("=")[0]])
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()
