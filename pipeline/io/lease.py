"""A lock object in a store, held while a run writes: who holds it, and a heartbeat that proves it alive.

Taking it is atomic (`Store.write_if_absent`: of concurrent takers exactly one wins). A holder that stopped
heartbeating for `stale_s`, or that is a dead process on this host (a crashed attempt being retried), is taken
over; a takeover re-reads the lock after a moment so that two processes taking over the same stale holder
cannot both go on. The nightly schedule (one lock per run prefix) and every generation run (one lock in its
run directory) use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io.store import Store, StoreError

logger = logging.getLogger("canvasflow")


class Refused(RuntimeError):
    """This run must not start now; the message says why and what to do."""


def read_holder(store: Store, key: str) -> dict | None:
    """The lock at `key`: None when there is none; {} for one that is not a lock's JSON (taken as stale).
    StoreError when it cannot be read: a read failure must not pass for a free lock (that would take over a
    live holder's)."""
    if not store.exists(key):
        return None
    try:
        text = store.read_text(key)
    except StoreError:
        if not store.exists(key):  # released between the two calls
            return None
        raise
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {}


def holder_age_s(store: Store, key: str, holder: dict) -> float:
    """Seconds since the holder's last heartbeat: the lock object's age by the store's clock when the store
    tells it (a holder whose clock runs minutes behind is not taken for dead), else by `heartbeat_at`."""
    age = store.age_s(key)
    return age if age is not None else time.time() - float(holder.get("heartbeat_at", 0))


def process_start(pid: int) -> str | None:
    """What tells process `pid` from a later one given the same pid (after a reboot, or pids wrapping around):
    on Linux the boot id and the process's start time in clock ticks since boot; None where /proc cannot
    tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{int(stat[stat.rindex(b')') + 2 :].split()[19])}"  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux: 'pid:[inode]'), in which a lock's pid names its holder; None where
    /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder_is_stale(store: Store, key: str, holder: dict, stale_s: float) -> bool:
    """Whether the lock at `key`, held by `holder`, may be taken over: not a lock this tool wrote, silent for
    `stale_s`, or held by a process we can see that has died (its pid gone, or now another process's). Its pid
    is looked up only on the same host in the same pid namespace: containers that share a hostname (host
    networking) each number their processes apart, so there it would name another process or none, and a
    restarted container's holder is judged by its heartbeat."""
    if holder == {}:  # not a lock this tool wrote (writes are atomic: no live holder's lock reads so)
        return True
    if holder_age_s(store, key, holder) > stale_s:
        return True
    if holder.get("host") == socket.gethostname() and holder.get("pid_namespace") == pid_namespace():
        try:
            pid = int(holder.get("pid", -1))
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except ValueError:
            return False
        except PermissionError:  # alive, another user's: still maybe not the holder's process
            pass
        started = holder.get("process_start")  # absent from locks written before it was recorded
        return started is not None and process_start(pid) not in (None, started)
    return False


@dataclass
class Lease:
    """`what` names the runs the lock serialises and `stale_hint` how the stale time is set, for messages."""

    store: Store
    key: str
    token: str
    run_id: str
    stale_s: float
    what: str = "runs"
    stale_hint: str = ""
    # A holder of the same run id (an earlier attempt of this run, e.g. one whose pod died a moment ago) is
    # waited for, up to this long, to release the lock or go stale, instead of refused at once.
    wait_same_run_s: float = 0.0
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None
    _acquired_at: float | None = None  # when this holder first wrote the lock (kept by the heartbeats)
    _lost: threading.Event = field(default_factory=threading.Event)  # taken over by another process

    def _payload(self) -> str:
        now = time.time()
        if self._acquired_at is None:
            self._acquired_at = now
        return json.dumps(
            {
                "token": self.token,
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_namespace": pid_namespace(),
                "process_start": process_start(os.getpid()),
                "acquired_at": self._acquired_at,
                "heartbeat_at": now,
            }
        )

    def _holder(self) -> dict | None:
        return read_holder(self.store, self.key)

    def _is_stale(self, holder: dict) -> bool:
        return holder_is_stale(self.store, self.key, holder, self.stale_s)

    def acquire(self) -> None:
        """Takes the lock or raises Refused naming its holder; StoreError if the store cannot be written."""
        try:
            if not self.store.write_if_absent(self.key, self._payload().encode("utf-8")):
                self._take_over()
        except BaseException:  # Refused, a store error, or a signal after our write: leave no lock of ours
            with contextlib.suppress(Exception):
                holder = self._holder()
                if holder and holder.get("token") == self.token:
                    self.store.delete([self.key])
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        holder = self._holder()
        if holder and holder.get("token") == self.token:  # our write landed though its answer was lost
            return
        deadline = time.monotonic() + self.wait_same_run_s
        if (
            self.wait_same_run_s > 0
            and holder
            and holder.get("run_id") == self.run_id
            and not self._is_stale(holder)
        ):
            logger.warning(
                "%s is held by an attempt of this run (%s on %s, pid %s): waiting up to %.0fs for it to end or go "
                "stale",
                self.store.describe(self.key),
                holder.get("run_id"),
                holder.get("host"),
                holder.get("pid"),
                self.wait_same_run_s,
            )
        while (
            holder
            and holder.get("run_id") == self.run_id
            and time.monotonic() < deadline
            and not self._is_stale(holder)
        ):
            time.sleep(min(2.0, max(0.2, self.stale_s / 10)))
            if self.store.write_if_absent(self.key, self._payload().encode("utf-8")):
                return  # released meanwhile: ours now
            holder = self._holder()
            if holder and holder.get("token") == self.token:  # our write landed though its answer was lost
                return
        if holder is not None and not self._is_stale(holder):
            age = holder_age_s(self.store, self.key, holder)
            hint = f" ({self.stale_hint})" if self.stale_hint else ""
            raise Refused(
                f"another run holds {self.store.describe(self.key)}: {holder.get('run_id')} on {holder.get('host')} "
                f"(pid {holder.get('pid')}, heartbeat {age:.0f}s ago). Overlapping {self.what} are refused: wait "
                "for it to end (the lock is released on exit) or stop it; a holder that died is taken over "
                f"once its heartbeat is older than {self.stale_s:g}s{hint}."
            )
        if holder == {}:
            logger.warning("replacing %s: it is not a lock this tool wrote", self.store.describe(self.key))
        elif holder is not None:
            logger.warning(
                "taking over the stale lock of %s (host %s, pid %s)",
                holder.get("run_id"),
                holder.get("host"),
                holder.get("pid"),
            )
        self.store.write_text(self.key, self._payload())
        time.sleep(0.5)  # a concurrent taker would have replaced our token by now: check we still hold it
        current = self._holder()
        if current is None or current.get("token") != self.token:
            raise Refused(
                f"lost the race for {self.store.describe(self.key)} to {current and current.get('run_id')}"
            )

    @property
    def lost(self) -> bool:
        """Whether another process took the lock over (this one was silent past `stale_s`, e.g. cut off from the
        store): the heartbeat stopped, and this process must not go on writing what the lock guards."""
        return self._lost.is_set()

    def held(self) -> bool:
        """Whether this process still holds the lock, read from the store now: the heartbeat notices a takeover
        only at its next beat, so a holder about to do what the lock guards (move a pointer, delete) asks here
        first. False, with `lost` set and logged, when another process holds it or none does; StoreError when
        the store cannot tell."""
        if self.lost:
            return False
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            return True
        self._mark_lost(holder)
        return False

    def _mark_lost(self, holder: dict | None) -> None:
        # Taken over (or released by its new holder): writing it back would make two holders.
        if self._lost.is_set():  # the heartbeat and held() both saw it
            return
        self._lost.set()
        logger.error(
            "lost %s to %s (this process went without a heartbeat for over %gs): it stops writing what the lock "
            "guards",
            self.store.describe(self.key),
            f"{holder.get('run_id')} on {holder.get('host')}, pid {holder.get('pid')}"
            if holder
            else "another process, which has released it since",
            self.stale_s,
        )

    def _heartbeat(self) -> None:
        interval = max(1.0, self.stale_s / 4)
        while not self._stop.wait(interval):
            try:
                holder = self._holder()
                if holder is None or holder.get("token") != self.token:
                    self._mark_lost(holder)
                    return
                self.store.write_text(self.key, self._payload())
            except StoreError as e:  # the next beat retries; a long outage makes the lock stale, as it should
                logger.warning("lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._acquired_at = None
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        if self.lost:  # another process's now
            return
        try:
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.store.delete([self.key])
        except StoreError as e:  # the lock stays: taken over once this process is gone (holder_is_stale)
            logger.warning(
                "could not release %s (%s); a next run on this host takes it over as soon as this process has "
                "exited, one on another host (or in another container) once its last heartbeat is %gs old",
                self.store.describe(self.key),
                e,
                self.stale_s,
            )
