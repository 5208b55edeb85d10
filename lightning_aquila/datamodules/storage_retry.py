"""Reads that wait out an object-store outage: ``StorageRetry`` (the policy, the
DomainDataModule's ``storage_retry``) and ``StorageUnavailable`` (the one-line stop when an
outage outlasts it).

s3fs and botocore already retry inside each read (botocore: 5 attempts over about 10 s on a
refused connection or a ``503``; s3fs: ``SlowDown`` and dropped connections). What outlasts
them (a restarting endpoint, minutes of throttling) reaches us as an exception, and the store
used to call it corruption. Here every read of the shard store (its metadata when a process
opens it, each chunk) is retried with exponential backoff for at most ``max_wait_s``, in
each process on its own (a loader worker waits for its batch, the others for theirs).

A retried read is idempotent (a chunk is fetched again, nothing is cached until it arrives),
and a loader worker returns a batch only once all its windows are read, so an outage delays
batches and never drops or repeats one: the sequence stays that of a fault-free run.

Written here rather than with ``tenacity``: the policy is four lines of arithmetic, and what
matters is which errors count as an outage (the classification below) and the two lines a
person sees, which a library would not write for us.
"""

from __future__ import annotations

import errno
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from lightning_aquila.datamodules.shard_format import DataError

T = TypeVar("T")

#: HTTP statuses of an overloaded or restarting service (not 404 or 403: those are answers).
_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Error codes S3-like services send with them.
_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "ServiceUnavailable", "InternalError", "RequestLimitExceeded",
                    "TooManyRequestsException", "500", "502", "503", "504"})
#: errno values of a refused, dropped or unanswered connection, and those s3fs gives a
#: ``503``/``SlowDown`` (EBUSY) and a ``500`` (EREMOTEIO).
_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EBUSY", "EREMOTEIO", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ECONNABORTED",
    "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EPIPE", "EAGAIN") if hasattr(errno, name))
#: Connection and timeout errors of botocore, aiohttp, fsspec and Python (by class name, so
#: that none of those packages is imported here).
_NAMES = frozenset({"ConnectionError", "EndpointConnectionError", "ConnectionClosedError",
                    "ConnectTimeoutError", "ReadTimeoutError", "HTTPClientError",
                    "ResponseStreamingError", "IncompleteReadError", "ClientConnectionError",
                    "ServerDisconnectedError", "ClientPayloadError", "FSTimeoutError",
                    "TimeoutError", "IncompleteRead"})


class StorageUnavailable(DataError):
    """The store stayed unreachable past ``storage_retry.max_wait_s``. Its message is one
    line naming the store and the bound (from a loader worker it arrives inside the worker's
    traceback text, which ``cli.errors.one_line`` takes it out of, as for any error)."""


def transient(error: BaseException) -> bool:
    """Whether ``error`` says the store is unreachable or overloaded (worth waiting for),
    rather than that the data is missing, forbidden or damaged. The first link of its
    cause/context chain that tells either decides."""
    link: BaseException | None = error
    for _ in range(16):
        if link is None:
            return False
        if isinstance(link, (DataError, FileNotFoundError, PermissionError, IsADirectoryError,
                             NotADirectoryError)):
            return False
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True
        if isinstance(link, OSError) and link.errno in _ERRNOS:
            return True
        if any(cls.__name__ in _NAMES for cls in type(link).__mro__):
            return True
        response = getattr(link, "response", None)  # botocore's ClientError
        if isinstance(response, Mapping):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return status in _STATUSES or code in _CODES
        status = getattr(link, "status", getattr(link, "code", None))  # aiohttp, gcsfs
        if isinstance(status, int) and status in _STATUSES:
            return True
        link = link.__cause__ or link.__context__
    return False


def brief(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _reader() -> str:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover - torch is a dependency
        return f"process {os.getpid()}"
    info = get_worker_info()
    return f"loader worker {info.id}" if info is not None else f"process {os.getpid()}"


#: When a process last said it was waiting for a store: ``{(pid, url): time.monotonic()}``.
_ANNOUNCED: dict[tuple[int, str], float] = {}


@dataclass(frozen=True)
class StorageRetry:
    """How long a read waits for an unreachable store (``DomainDataModule(storage_retry=
    {...})``).

    Args:
        max_wait_s: the longest one read waits, from its first failure; then the reading
            process stops with one line (``StorageUnavailable``). 0: no waiting (a failure
            stops at once). Each attempt may take the client's own retries on top.
        first_delay_s: the pause before the first retry; each next pause doubles.
        max_delay_s: the longest pause between two retries (it also bounds how late a
            reader notices that the store is back).
    """

    max_wait_s: float = 300.0
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | None, name: str = "storage_retry"
              ) -> StorageRetry:
        """The policy from a mapping (``None``: the defaults); a bad key or value is a
        ``DataError`` naming it."""
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise DataError(f"{name} must be a mapping such as {{max_wait_s: 300}}, got "
                            f"{spec!r}")
        known = [f.name for f in fields(cls)]
        for key, value in spec.items():
            if key not in known:
                raise DataError(f"{name}: unknown key {key!r} (known: {', '.join(known)})")
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0):
                raise DataError(f"{name}.{key} must be a number of seconds >= 0, got {value!r}")
        policy = cls(**{k: float(v) for k, v in spec.items()})
        if policy.max_wait_s > 0 and policy.first_delay_s <= 0:
            raise DataError(f"{name}.first_delay_s must be > 0 when max_wait_s > 0, got "
                            f"{policy.first_delay_s!r}")
        if policy.max_delay_s < policy.first_delay_s:
            raise DataError(f"{name}.max_delay_s ({policy.max_delay_s:g}) must be at least "
                            f"first_delay_s ({policy.first_delay_s:g})")
        return policy

    def call(self, url: str, read: Callable[[], T]) -> T:
        """``read()``, retried while it fails with a :func:`transient` error, for at most
        ``max_wait_s``; other errors pass through at once."""
        start, retries = time.monotonic(), 0
        while True:
            try:
                return read()
            except Exception as error:
                if not transient(error):
                    raise
                waited = time.monotonic() - start
                left = self.max_wait_s - waited
                if left <= 0:
                    if self.max_wait_s <= 0:
                        raise StorageUnavailable(f"{url} is unreachable: {brief(error)}"
                                                 ) from error
                    raise StorageUnavailable(
                        f"{url} stayed unreachable for {waited:.0f} s, past storage_retry "
                        f"max_wait_s={self.max_wait_s:g} ({retries} "
                        f"{'retry' if retries == 1 else 'retries'}, {_reader()}): "
                        f"{brief(error)}; once it is back, resume with --ckpt_path last"
                    ) from error
                retries += 1
                delay = min(self.max_delay_s, self.first_delay_s * 2 ** (retries - 1))
                self._announce(url, retries, waited, error)
                time.sleep(min(left, random.uniform(delay / 2, delay)))

    def _announce(self, url: str, retries: int, waited: float, error: BaseException) -> None:
        """One line per outage per process: a line, then silence while this process keeps
        meeting failures of the same store (until ``max(60 s, max_wait_s)`` have passed)."""
        now, key = time.monotonic(), (os.getpid(), url)
        if now - _ANNOUNCED.get(key, -math.inf) < max(60.0, self.max_wait_s):
            return
        _ANNOUNCED[key] = now
        print(f"waiting for {url} (retry {retries}, {waited:.0f} s of at most "
              f"{self.max_wait_s:g} s, {_reader()}): {brief(error)}", file=sys.stderr,
              flush=True)


#: For readers with no policy of their own (tools such as ``inspect``): no waiting.
NO_RETRY = StorageRetry(max_wait_s=0.0)

__all__ = ["NO_RETRY", "StorageRetry", "StorageUnavailable", "brief", "transient"]
