"""Django's Redis cache as an accelerator only: while Redis is unreachable (down, restarting, hung,
out of memory), reads miss and writes are dropped, instead of failing the request that used the cache.

Everything this project keeps in the cache is also somewhere else or may be lost: head states (read
from the database and verified), API throttle and sign-in failure counters (no limit meanwhile), and
job-start replays (best effort, as README says). After a failure no request asks the cache again
until a background probe, made every RETRY_AFTER seconds, finds it answering: a hung Redis costs
the requests that were using it when it hung their socket timeout, and none after (every request
in flight as each back-off ended paid it again, 10 at a time under 10 engines). The outage is logged
at most once a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.redis import RedisCache
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)
LOG_EVERY = 60.0
RETRY_AFTER = 5.0

T = TypeVar("T")


PROBE_KEY = "cache-probe"


class FailSoftRedisCache(RedisCache):
    _down_until = 0.0  # per process, shared by every thread's instance: 0 while the cache answers
    _last_logged = 0.0
    _probing = threading.Lock()  # held by the one background probe of a process

    def _try(self, operation: str, call: Callable[[], T], fallback: T) -> T:
        if FailSoftRedisCache._down_until:
            if time.monotonic() >= FailSoftRedisCache._down_until and FailSoftRedisCache._probing.acquire(blocking=False):
                threading.Thread(target=self._probe, name="cache-probe", daemon=True).start()
            return fallback
        try:
            return call()
        except RedisError as exc:
            self._went_down(operation, exc)
            return fallback

    def _went_down(self, operation: str, exc: RedisError) -> None:
        now = time.monotonic()
        FailSoftRedisCache._down_until = now + RETRY_AFTER
        if now - FailSoftRedisCache._last_logged >= LOG_EVERY:
            FailSoftRedisCache._last_logged = now
            logger.warning("cache unavailable (%s: %s); serving without it", operation, exc)

    def _probe(self) -> None:
        """Whether the cache answers again, asked beside the requests (which do without it meanwhile)."""
        try:
            super().get(PROBE_KEY)
        except RedisError as exc:
            self._went_down("probe", exc)
        else:
            FailSoftRedisCache._down_until = 0.0
            logger.info("cache available again")
        finally:
            FailSoftRedisCache._probing.release()

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._try("get", lambda: super(FailSoftRedisCache, self).get(key, default, version), default)

    def get_many(self, keys: Any, version: int | None = None) -> dict[Any, Any]:
        return self._try("get_many", lambda: super(FailSoftRedisCache, self).get_many(keys, version), {})

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._try("has_key", lambda: super(FailSoftRedisCache, self).has_key(key, version), False)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        self._try("set", lambda: super(FailSoftRedisCache, self).set(key, value, timeout, version), None)

    def set_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> list[Any]:
        return self._try("set_many", lambda: super(FailSoftRedisCache, self).set_many(data, timeout, version),
                         list(data))

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """True when Redis is unreachable: callers use add() as a best-effort lock (see
        sessions_app.api.base.replayable), and must go on without one rather than wait forever."""
        return self._try("add", lambda: super(FailSoftRedisCache, self).add(key, value, timeout, version), True)

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        """`delta` when Redis is unreachable (a missing key is still ValueError; decr() comes here too):
        a counter (sign-in failures) counts nothing meanwhile rather than failing its request."""
        return self._try("incr", lambda: super(FailSoftRedisCache, self).incr(key, delta, version), delta)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._try("touch", lambda: super(FailSoftRedisCache, self).touch(key, timeout, version), False)

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._try("delete", lambda: super(FailSoftRedisCache, self).delete(key, version), False)

    def delete_many(self, keys: Any, version: int | None = None) -> None:
        self._try("delete_many", lambda: super(FailSoftRedisCache, self).delete_many(keys, version), None)
