"""The SPIFFE Workload API (a SPIRE agent's socket): the broker's X.509-SVID and bundles, its
JWT bundles, and JWT-SVIDs of the broker, through py-spiffe's `WorkloadApiClient`.

py-spiffe streams from threads of its own; each update is handed to the event loop with
``call_soon_threadsafe`` and applied there, so nothing else in the broker sees a thread. Its
own reconnect loop retries silently, so it is switched off (``retry_connect=False``) and
`WorkloadApiWatch` reconnects itself: every lost or refused stream (the agent restarting,
its socket not there yet, "no identity issued" before the registration entry syncs) is
reported to `on_error` (the material logs and counts it) and retried after an exponential
backoff with jitter, as the SPIFFE Workload API standard asks of clients.

The client is made per stream and per fetch: a gRPC channel to a unix socket costs a few
milliseconds, and a fresh one after a failure never inherits a broken connection. gRPC is not
fork-safe: a broker process that forks workers must start the watch after the fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from spiffe import JwtBundleSet, WorkloadApiClient
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.x509_context import X509Context

from .trust import SIGNING_KEYS, WORKLOAD_API, Bundle, JwtAuthorities, Svid

log = logging.getLogger("sidekey.identity")

# First wait after a lost stream; doubled per failure up to the cap. An agent restart takes
# about a second, so the first retries find it back quickly; the cap keeps a broker whose
# agent is gone for long from hammering the socket, and bounds how late it notices the return.
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# A one-shot call (a JWT-SVID fetch) that takes longer has an agent that is stuck.
FETCH_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class JwtSvidToken:
    """A JWT-SVID of the broker: the token, its subject, and when it expires."""

    token: str
    spiffe_id: str
    expires: datetime

    def __repr__(self) -> str:  # the token is a credential: never in a log line
        return f"JwtSvidToken(spiffe_id={self.spiffe_id!r}, expires={self.expires.isoformat()})"


class WorkloadApiWatch:
    """Keeps the X.509 and JWT streams of one Workload API endpoint open, reconnecting with
    backoff; hands every update to the callbacks on the event loop."""

    def __init__(
        self,
        endpoint: str,
        *,
        on_x509: Callable[[Svid, Mapping[str, Bundle]], None],
        on_jwt: Callable[[Mapping[str, JwtAuthorities]], None],
        on_error: Callable[[str, str], None],
    ) -> None:
        self.endpoint = endpoint
        self.source = f"{WORKLOAD_API}:{endpoint}"
        self._on_x509 = on_x509
        self._on_jwt = on_jwt
        self._on_error = on_error
        # What /inventory and readiness say about the connection.
        self.connected: dict[str, bool] = {"x509": False, "jwt": False}
        # The latest error of any stream (inventory), and of each stream (readiness waits for
        # the X.509 one: a JWT stream's error is not why the SVID is missing).
        self.last_error: str | None = None
        self.stream_errors: dict[str, str] = {}
        self.errors = 0

    async def watch_x509(self) -> None:
        await self._stream("x509", self._start_x509)

    async def watch_jwt(self) -> None:
        await self._stream("jwt", self._start_jwt)

    async def fetch_jwt_svid(self, audience: str) -> JwtSvidToken:
        """A JWT-SVID of this workload for `audience`; raises PySpiffeError (or OSError)."""

        def fetch() -> JwtSvidToken:
            with WorkloadApiClient(self.endpoint, default_timeout=FETCH_TIMEOUT_SECONDS) as c:
                svid = c.fetch_jwt_svid({audience})
            return JwtSvidToken(
                svid.token, str(svid.spiffe_id), datetime.fromtimestamp(svid.expiry, UTC)
            )

        return await asyncio.to_thread(fetch)

    # ------------------------------------------------------------------------ streams

    def _start_x509(self, client: WorkloadApiClient, put: Callable[[Any], None]) -> Any:
        def success(context: X509Context) -> None:
            put(self._convert_x509(context))

        return client.stream_x509_contexts(success, _Failure.put(put), retry_connect=False)

    def _start_jwt(self, client: WorkloadApiClient, put: Callable[[Any], None]) -> Any:
        def success(bundles: JwtBundleSet) -> None:
            put({b.trust_domain.name: dict(b.jwt_authorities) for b in bundles.bundles})

        return client.stream_jwt_bundles(success, _Failure.put(put), retry_connect=False)

    def _convert_x509(self, context: X509Context) -> tuple[Svid, dict[str, Bundle]]:
        """On py-spiffe's thread: its types to ours (parsing done there, off the loop)."""
        svid = context.default_svid
        key = svid.private_key
        if not isinstance(key, SIGNING_KEYS):
            raise PySpiffeError(f"the SVID's key is a {type(key).__name__}, not a signing key")
        ours = Svid(tuple(svid.cert_chain), key, self.source, str(svid.spiffe_id))
        bundles = {
            b.trust_domain.name: Bundle(
                b.trust_domain.name,
                tuple(sorted(b.x509_authorities, key=lambda c: c.serial_number)),
                self.source,
            )
            for b in context.x509_bundle_set.bundles
        }
        return ours, bundles

    async def _stream(
        self, kind: str, start: Callable[[WorkloadApiClient, Callable[[Any], None]], Any]
    ) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_INITIAL_SECONDS
        while True:
            queue: asyncio.Queue[Any] = asyncio.Queue()

            def put(item: Any, queue: asyncio.Queue[Any] = queue) -> None:
                # A late update after the loop closed has nobody to go to.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            client: WorkloadApiClient | None = None
            handler: Any = None
            try:
                client = WorkloadApiClient(self.endpoint)
                handler = start(client, put)
                while True:
                    item = await queue.get()
                    if isinstance(item, _Failure):
                        raise item.error
                    self.connected[kind] = True
                    backoff = BACKOFF_INITIAL_SECONDS
                    if kind == "x509":
                        self._on_x509(*item)
                    else:
                        self._on_jwt(item)
            except (PySpiffeError, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
            finally:
                self.connected[kind] = False
                if handler is not None:
                    handler.cancel()
                if client is not None:
                    client.close()
            self.errors += 1
            self.last_error = self.stream_errors[kind] = f"{kind} stream: {error}"
            self._on_error(kind, error)
            delay = backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret
            log.warning(
                "Workload API at %s: %s stream lost (%s); retrying in %.1fs",
                self.endpoint,
                kind,
                error,
                delay,
            )
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)


@dataclass(frozen=True, slots=True)
class _Failure:
    """A stream's end, as py-spiffe reports it from its thread."""

    error: Exception

    @staticmethod
    def put(put: Callable[[Any], None]) -> Callable[[Exception], None]:
        def failed(exc: Exception) -> None:
            put(_Failure(exc if isinstance(exc, PySpiffeError) else PySpiffeError(str(exc))))

        return failed
