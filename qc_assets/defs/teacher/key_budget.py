"""One concurrency budget per teacher endpoint and API key, shared by every run on this machine.

Each run is its own process, and two runs (two `qc run`s, a backfill's parallel runs, the schedule firing during a
manual run) would otherwise each put QC_TEACHER_CONCURRENCY requests in flight on the same key and trip the
provider's limit. The budget is a file under QC_DATA_DIR/teacher/keys/ with one byte per slot: a request in flight
holds a POSIX record lock on its byte. The kernel drops a process's locks when it dies, so a killed run never
leaks a slot, and nothing needs cleaning up. A Retry-After pause is shared the same way, as a timestamp in a
second file, so a 429 seen by one run pauses them all.

The file's name is a hash of the endpoint and key, never the key itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import time
from pathlib import Path

# How long a request waits before looking for a free slot again when every slot is held by some run.
POLL_S = 0.01


def budget_name(base_url: str, api_key: str | None) -> str:
    return hashlib.sha256(f"{base_url}\0{api_key or ''}".encode()).hexdigest()[:24]


class KeyBudget:
    """`slots` requests in flight at most across processes; within a process, `acquire` never hands out a held
    slot twice (record locks do not exclude their own process)."""

    def __init__(self, directory: Path, name: str, slots: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.path = directory / f"{name}.slots"
        self._pause_path = directory / f"{name}.paused-until"
        # One descriptor for the process's lifetime: closing any descriptor of the file would drop all its locks.
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._held: set[int] = set()
        self._pause_seen: tuple[tuple[int, int], float] | None = None

    def try_acquire(self) -> int | None:
        start = random.randrange(self.slots)
        for offset in range(self.slots):
            slot = (start + offset) % self.slots
            if slot in self._held:
                continue
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot, os.SEEK_SET)
            except OSError:
                continue
            self._held.add(slot)
            return slot
        return None

    async def acquire(self) -> int:
        while True:
            pause = self.paused_for()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            slot = self.try_acquire()
            if slot is not None:
                return slot
            await asyncio.sleep(POLL_S)

    def release(self, slot: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot, os.SEEK_SET)
        self._held.discard(slot)

    def held_elsewhere(self) -> int:
        """Slots other processes hold now (a diagnostic: it takes and drops each free slot's lock)."""
        busy = 0
        for slot in range(self.slots):
            if slot in self._held:
                continue
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot, os.SEEK_SET)
            except OSError:
                busy += 1
                continue
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot, os.SEEK_SET)
        return busy

    def pause(self, seconds: float) -> None:
        """Every run on this key waits `seconds` before its next request (the later of two pauses wins)."""
        until = time.time() + seconds
        if until <= self._read_pause():
            return
        staging = self._pause_path.with_name(f"{self._pause_path.name}.{os.getpid()}")
        staging.write_text(repr(until), encoding="ascii")
        os.replace(staging, self._pause_path)

    def paused_for(self) -> float:
        return max(0.0, self._read_pause() - time.time())

    def _read_pause(self) -> float:
        try:
            stat = self._pause_path.stat()
        except FileNotFoundError:
            return 0.0
        # Read again only when the file was replaced: this runs before every request.
        version = (stat.st_mtime_ns, stat.st_ino)
        if self._pause_seen is None or self._pause_seen[0] != version:
            try:
                until = float(self._pause_path.read_text(encoding="ascii") or 0)
            except (OSError, ValueError):
                until = 0.0
            self._pause_seen = (version, until)
        return self._pause_seen[1]

    def close(self) -> None:
        os.close(self._fd)
