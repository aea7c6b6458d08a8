"""Hot reload of the keys file: poll its mtime, swap the KeyStore in force (hooks/live.py) when it changes.

Polling (not inotify) so it works the same on every OS and with editors that replace the file.
A request looks its key up once, so requests in flight keep the key they started with. An edit
that does not load keeps the keys in force and logs one line (once per edit, not per poll).
The check (stat and read) runs off the event loop with a timeout, and only a regular file is
read: a FIFO or a stuck file system at the path cannot freeze the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os

from mitmproxy import ctx

from addon.policy.keys import KEYS_READ_TIMEOUT, load_keys_with_timeout
from addon.policy.keys_parse import KeysError
from addon.policy.virtual_keys import KeyStore

log = logging.getLogger("gateway")


def file_state(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeysReloader:
    def __init__(self, live) -> None:
        self.live = live  # its `keys`: the KeyStore in force, replaced whole here
        self._seen: tuple | None = None
        self._task: asyncio.Task | None = None
        self._reading: asyncio.Future | None = None  # the check running on a worker thread

    def load(self, loader) -> None:
        loader.add_option(  # mitmproxy options cannot be floats: milliseconds
            "keys_reload_ms", int, 2000,
            "Milliseconds between checks of the keys file for changes; 0 turns hot reload off.",
        )

    def configure(self, updated) -> None:
        if "keys_file" in updated:  # the Gateway (re)loaded it: that version is the one in force
            self._seen = file_state(ctx.options.keys_file)

    def running(self) -> None:
        if ctx.options.keys_reload_ms > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep((ctx.options.keys_reload_ms or 2000) / 1000)
            try:
                await self.check()
            except Exception:
                log.exception("gateway: keys file check failed")

    async def check(self) -> None:
        path = ctx.options.keys_file
        if self._reading is not None and not self._reading.done():
            return  # a check still stuck in the file system (logged once): do not pile threads up
        self._reading = asyncio.ensure_future(asyncio.to_thread(self.read_if_changed, path))
        try:
            state, loaded = await asyncio.wait_for(asyncio.shield(self._reading), KEYS_READ_TIMEOUT + 1)
        except TimeoutError:  # (a read gives up after KEYS_READ_TIMEOUT: here its stat hangs)
            log.error("gateway: keys file %s could not be checked within %gs; keeping the keys in force",
                      path, KEYS_READ_TIMEOUT)
            return
        if state == self._seen and loaded is None:
            return
        self._seen = state
        if isinstance(loaded, KeysError):
            kept = len(self.live.keys) if self.live.keys is not None else 0
            log.error("gateway: keys file changed but not reloaded, keeping the %d keys in force: %s", kept, loaded)
            return
        self.live.keys = loaded
        log.info("gateway: keys file reloaded: %d virtual keys from %s", len(loaded), path)

    def read_if_changed(self, path: str) -> tuple[tuple | None, KeyStore | KeysError | None]:
        """(file state, new keys or why not, or None if unchanged). Runs on a worker thread."""
        state = file_state(path)
        if state == self._seen:
            return state, None
        try:
            return state, load_keys_with_timeout(path)
        except KeysError as e:
            return state, e
