"""The broker's own vault token: log in, renew, log in again, revoke at shutdown.

One background task keeps the token alive:

- **Login** with the configured method at start-up, and again whenever the token cannot be
  renewed: the vault capped a renewal (the token's max TTL is near), the token is not
  renewable and two thirds of its TTL have passed, or the vault says it is gone (revoked
  from outside, expired). A `token_env` / `token_file` token is looked up instead, and a
  `token_file` is re-read when it changes.
- **Renewal** at two thirds of the token's TTL (`renew-self`, asking for its TTL again).
- **Vault down.** Logins and renewals back off exponentially with jitter; the token (while
  it lasts) and everything cached keep serving. With no valid token, calls fail closed at
  once with the reason, and readiness says it.
- **A check** (`lookup-self`) when no call succeeded with the token for
  `TOKEN_CHECK_SECONDS` notices a token revoked from outside between renewals; so does any
  call the vault refuses with 403.
- **close()** revokes every token the broker logged in for (`revoke-self`), after the
  leases, and the audit trail says so. A token it was given is left alone: it may be shared.

Leases die with the token that created them (the vault revokes a token's leases when the
token expires or is revoked). Each token is a *generation*; `remaining(generation)` tells the
lease manager how long the leases of that token can still be served.

The token never appears in a log line, message, metric or audit event; its accessor does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.credentials.vault_auth import (
    Login,
    LoginMethod,
    Transport,
    VaultCallError,
    WrappingTokenRefused,
)
from broker.errors import CredentialUnavailable
from broker.observe.audit import AuditLog
from broker.observe.metrics import Metrics

log = logging.getLogger("sidekey.vault")

# Renew at two thirds of the TTL: a third of it is left to retry through a vault outage.
RENEW_FRACTION = 2 / 3
# Backoff between failed logins or renewals: doubles from the base up to the cap, with
# jitter so a fleet of brokers that lost the vault together does not come back in lockstep.
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# The token is looked up when no call has shown it valid for this long: bounds how long the
# broker serves leases the vault already revoked with a token someone revoked from outside.
TOKEN_CHECK_SECONDS = 10.0
# The vault rounds TTLs to whole seconds: a grant this much shorter than asked is the max
# TTL cutting in, not rounding.
MAX_TTL_TOLERANCE_SECONDS = 1.0
# The keeper wakes at least this often even with nothing due (a missed wake-up, or a clock
# that jumped, never delays a renewal for long).
MAX_SLEEP_SECONDS = 5.0


@dataclass(slots=True, eq=False)
class Token:
    """One token the broker holds. `value` is the secret: never logged."""

    value: str = field(repr=False)
    generation: int
    accessor: str
    subject: str
    ttl: float  # granted at login: asked for again at each renewal; 0 = never expires
    expires: float  # clock time it ends (inf: never)
    renew_at: float
    renewable: bool
    policies: tuple[str, ...] = ()
    checked: float = 0.0  # clock time a call last showed the vault accepts it
    capped: bool = False  # a renewal granted less than asked: its max TTL is near
    renew_failing: bool = False  # the last renewal did not reach the vault
    dead: bool = False  # revoked, expired or otherwise refused by the vault

    def valid(self, now: float) -> bool:
        return not self.dead and now < self.expires


class TokenKeeper:
    """Holds the broker's current token and keeps it valid (see the module docstring)."""

    def __init__(
        self,
        method: LoginMethod,
        vault: Transport,
        *,
        metrics: Metrics,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        renew_fraction: float = RENEW_FRACTION,
        backoff_base: float = BACKOFF_BASE_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        check_interval: float = TOKEN_CHECK_SECONDS,
    ) -> None:
        self.method = method
        self._vault = vault
        self._audit = audit
        self._clock = clock
        self.renew_fraction = renew_fraction
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.check_interval = check_interval
        self._current: Token | None = None
        # Tokens replaced by a newer login while still alive: their leases live until they
        # end, and close() revokes them. Keyed by generation.
        self._superseded: dict[int, Token] = {}
        self._generation = 0
        self._error: str | None = None  # why the last login or renewal failed
        self._failures = 0  # consecutive, for the backoff
        self._retry_at = 0.0  # no login attempt before this (backoff)
        self._poll_at = 0.0
        self._login_task: asyncio.Task[Token] | None = None
        self._verifying: dict[int, asyncio.Task[bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._last_emitted: tuple[str, Any] | None = None
        self._logins = metrics.vault_logins
        self._renewals = metrics.vault_renewals
        metrics.vault_token_expiry.set_function(self.seconds_left)

    def __repr__(self) -> str:
        tok = self._current
        state = f"generation={tok.generation}" if tok else "no token"
        return f"TokenKeeper({self.method.describe()}, {state})"

    # ------------------------------------------------------------------ what callers use

    def start(self) -> None:
        """Start the background task (idempotent; the first call needing a token does it)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="vault-token")

    async def token(self) -> Token:
        """A valid token, logging in first if there is none and no backoff is running.

        Raises `CredentialUnavailable` with the reason when there is no valid token.
        """
        self.start()
        now = self._clock()
        tok = self._current
        if tok is not None and tok.valid(now):
            return tok
        if self._closed:
            raise CredentialUnavailable("vault: client is closed")
        if self._login_task is not None or now >= self._retry_at:
            new = await self._login("a call needs a token")
            if new is not None and new.valid(self._clock()):
                return new
        raise CredentialUnavailable(self.no_token_reason())

    def accepted(self, tok: Token) -> None:
        """A call with `tok` succeeded: the vault still accepts it (no check needed)."""
        tok.checked = self._clock()

    async def rejected(self, tok: Token) -> Token | None:
        """A call made with `tok` got a 403: is the token gone (revoked from outside)?

        If so, log in again and return the new token to retry with; None when the token is
        fine (the policy said no) or no new one could be had.
        """
        cur = self._current
        if cur is not None and cur is not tok and cur.valid(self._clock()):
            return cur  # replaced meanwhile: retry with the new one
        if not tok.dead:
            task = self._verifying.get(tok.generation)
            if task is None:
                task = asyncio.create_task(self._verify(tok), name="vault-token-verify")
                self._verifying[tok.generation] = task
                task.add_done_callback(lambda _: self._verifying.pop(tok.generation, None))
            if await asyncio.shield(task):
                return None
        if not self.method.can_login and not await self.method.changed():
            return None
        new = await self._login("the vault refused the token")
        return new if new is not None and new.valid(self._clock()) else None

    @property
    def generation(self) -> int:
        """The current token's generation (0 before the first login)."""
        return self._current.generation if self._current is not None else 0

    def remaining(self, generation: int) -> float:
        """Seconds the token of `generation` (and so its leases) still lives; inf while it
        is current and renewing well, 0 once it is gone."""
        now = self._clock()
        cur = self._current
        if cur is not None and cur.generation == generation:
            if not cur.valid(now):
                return 0.0
            if cur.renewable and not cur.capped and not cur.renew_failing:
                return math.inf
            return cur.expires - now
        old = self._superseded.get(generation)
        if old is None or not old.valid(now):
            return 0.0
        return old.expires - now

    def seconds_left(self) -> float:
        """Seconds until the current token expires: 0 without one, inf if it never does."""
        tok = self._current
        now = self._clock()
        return max(0.0, tok.expires - now) if tok is not None and tok.valid(now) else 0.0

    @property
    def ready(self) -> bool:
        tok = self._current
        return tok is not None and tok.valid(self._clock())

    def no_token_reason(self) -> str:
        reason = (self._error or "not logged in yet").removeprefix("vault: ")
        retry = max(0.0, self._retry_at - self._clock())
        again = f"; next attempt in {retry:.0f}s" if retry >= 1 else ""
        return f"vault: the broker has no valid token ({self.method.describe()}): {reason}{again}"

    def status(self) -> dict[str, Any]:
        """For readiness: whether there is a valid token, and why not."""
        tok = self._current
        body: dict[str, Any] = {"ready": self.ready, "auth": self.method.describe()}
        if self.ready and tok is not None:
            left = tok.expires - self._clock()
            body["token_expires_in"] = None if math.isinf(left) else round(left, 1)
            body["accessor"] = tok.accessor
            if self._error is not None:
                body["last_error"] = self._error
        else:
            body["error"] = self.no_token_reason()
        return body

    async def close(self) -> None:
        """Stop the life cycle and revoke the tokens the broker logged in for."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # A login in flight still makes a token: let it finish so it is revoked too.
        if self._login_task is not None:
            await asyncio.gather(self._login_task, return_exceptions=True)
        await asyncio.gather(*self._verifying.values(), return_exceptions=True)
        if not self.method.owns_token:
            return
        now = self._clock()
        tokens = [t for t in [*self._superseded.values(), self._current] if t and t.valid(now)]
        await asyncio.gather(*(self._revoke(t) for t in tokens))

    # ------------------------------------------------------------------ the life cycle

    async def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                await self._step()
            except Exception:
                # A bug must not end the token's life cycle: log it and carry on.
                log.exception("vault token maintenance failed")
            delay = min(max(0.0, self._next_due() - self._clock()), MAX_SLEEP_SECONDS)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _step(self) -> None:
        now = self._clock()
        self._prune(now)
        poll = self.method.poll_interval
        if poll is not None and now >= self._poll_at:
            self._poll_at = now + poll
            if await self.method.changed():
                await self._login("the token file changed")
                return
        tok = self._current
        why = self._why_login(tok, now)
        if why is not None:
            if now >= self._retry_at:
                await self._login(why)
            return
        assert tok is not None
        if now >= tok.renew_at and tok.renewable:
            await self._renew(tok)
        elif now >= tok.checked + self.check_interval:
            tok.checked = now  # the next check comes a full interval later, whatever it says
            await self._verify(tok)

    def _why_login(self, tok: Token | None, now: float) -> str | None:
        if tok is None:
            return "start"
        if tok.dead:
            return "the token was revoked"
        if now >= tok.expires:
            return "the token expired"
        if not self.method.can_login:
            return None
        if tok.capped:
            return "the token is near its max TTL"
        if not tok.renewable and now >= tok.renew_at:
            return "the token is not renewable"
        return None

    def _next_due(self) -> float:
        now = self._clock()
        due = now + MAX_SLEEP_SECONDS
        if self.method.poll_interval is not None:
            due = min(due, self._poll_at)
        tok = self._current
        if tok is None or self._why_login(tok, now) is not None:
            return min(due, self._retry_at)
        due = min(due, tok.checked + self.check_interval, tok.expires)
        if tok.renewable or self.method.can_login:
            due = min(due, tok.renew_at)
        return due

    async def _login(self, why: str) -> Token | None:
        """Log in once (concurrent callers share one attempt); None if it failed."""
        task = self._login_task
        if task is None:
            task = asyncio.create_task(self._do_login(why), name="vault-login")
            self._login_task = task

            def done(t: asyncio.Task[Token]) -> None:
                if self._login_task is t:
                    self._login_task = None
                if not t.cancelled():
                    t.exception()  # retrieved: waiters may all have gone

            task.add_done_callback(done)
        try:
            return await asyncio.shield(task)
        except CredentialUnavailable:
            return None

    async def _do_login(self, why: str) -> Token:
        started = self._clock()
        name = self.method.name
        try:
            login = await self.method.login(self._vault)
        except CredentialUnavailable as exc:
            self._logins.labels(method=name, outcome="error").inc()
            self._failed(exc, "login")
            if isinstance(exc, WrappingTokenRefused):
                self._emit("vault_wrapping_token_refused", outcome="refused", error=str(exc))
            self._emit("vault_login", outcome="error", reason=why, error=str(exc), once=True)
            raise
        self._logins.labels(method=name, outcome="ok").inc()
        tok = self._install(login, started)
        log.info(
            "vault login method=%s address=%s accessor=%s ttl=%.0fs renewable=%s "
            "generation=%d reason=%s",
            name, self._vault.address, tok.accessor, login.ttl, tok.renewable,
            tok.generation, why,
        )  # fmt: skip
        self._emit(
            "vault_login",
            outcome="ok",
            reason=why,
            subject=login.subject,
            accessor=tok.accessor,
            ttl=login.ttl,
            renewable=tok.renewable,
            policies=list(tok.policies),
            generation=tok.generation,
        )
        return tok

    def _install(self, login: Login, started: float) -> Token:
        cur = self._current
        expires = started + login.ttl if login.ttl > 0 else math.inf
        increment = login.increment or login.ttl
        renew_at = started + login.ttl * self.renew_fraction if login.ttl > 0 else math.inf
        self._failures, self._retry_at, self._error = 0, 0.0, None
        if cur is not None and cur.value == login.token and not cur.dead:
            # The same token looked up again (token_env / token_file): same generation.
            cur.expires, cur.renew_at, cur.ttl = expires, renew_at, increment
            cur.renewable, cur.renew_failing = login.renewable, False
            cur.checked = self._clock()
            return cur
        self._generation += 1
        tok = Token(
            value=login.token,
            generation=self._generation,
            accessor=login.accessor,
            subject=login.subject,
            ttl=increment,
            expires=expires,
            renew_at=renew_at,
            renewable=login.renewable,
            policies=login.policies,
            checked=self._clock(),
        )
        if cur is not None and cur.valid(self._clock()):
            self._superseded[cur.generation] = cur
        self._current = tok
        self._wake.set()
        return tok

    async def _renew(self, tok: Token) -> None:
        started = self._clock()
        try:
            with self.method.client_cert() as cert:
                response = await self._vault.send(
                    lambda c: c.auth.token.renew_self(increment=int(tok.ttl)),
                    where="auth/token/renew-self",
                    what="token",
                    token=tok.value,
                    cert=cert,
                )
            auth = response.get("auth") if isinstance(response, dict) else None
            granted = float(auth["lease_duration"]) if isinstance(auth, dict) else -1.0
        except VaultCallError as exc:
            self._renewals.labels(outcome="error").inc()
            if exc.kind == "denied":
                self._lost(tok, str(exc))
            elif exc.kind in ("rejected", "not_found"):
                # The vault will not renew it (not renewable, or cert auth found another
                # certificate than the login's): use it while it lasts, log in again.
                tok.capped, tok.renewable = True, False
                self._note(exc, "renewal")
            else:
                tok.renew_failing = True
                self._failed(exc, "renewal")
                tok.renew_at = min(self._retry_at, tok.expires)
            return
        except (CredentialUnavailable, TypeError, ValueError, KeyError) as exc:
            self._renewals.labels(outcome="error").inc()
            tok.renew_failing = True
            self._failed(CredentialUnavailable(f"vault: renew-self: {exc}"), "renewal")
            tok.renew_at = min(self._retry_at, tok.expires)
            return
        if granted < 0:
            self._renewals.labels(outcome="error").inc()
            tok.capped, tok.renewable = True, False
            return
        self._renewals.labels(outcome="ok").inc()
        self._failures, self._retry_at, self._error = 0, 0.0, None
        tok.renew_failing, tok.checked = False, self._clock()
        tok.expires = started + granted if granted > 0 else math.inf
        tok.renew_at = started + granted * self.renew_fraction if granted > 0 else math.inf
        if granted < tok.ttl - MAX_TTL_TOLERANCE_SECONDS and not tok.capped:
            tok.capped = True
            log.info(
                "vault token near its max TTL (renewed for %.0fs of %.0fs asked); %s "
                "accessor=%s",
                granted, tok.ttl,
                "logging in again" if self.method.can_login else "it ends then", tok.accessor,
            )  # fmt: skip
            self._wake.set()
        else:
            log.debug("vault token renewed ttl=%.0fs accessor=%s", granted, tok.accessor)

    async def _verify(self, tok: Token) -> bool:
        """Look `tok` up: True if the vault still honours it. A 403 marks it dead."""
        try:
            await self._vault.send(
                lambda c: c.auth.token.lookup_self(),
                where="auth/token/lookup-self",
                what="token",
                token=tok.value,
            )
        except VaultCallError as exc:
            if exc.kind == "denied":
                self._lost(tok, str(exc))
                return False
            return True  # unreachable or similar: nothing learnt about the token
        except CredentialUnavailable:
            return True
        return True

    def _lost(self, tok: Token, error: str) -> None:
        if tok.dead:
            return
        tok.dead = True
        log.warning(
            "vault token no longer valid (revoked or expired); %s accessor=%s generation=%d "
            "error=%s",
            self.method.when_lost(), tok.accessor, tok.generation, error,
        )  # fmt: skip
        self._emit(
            "vault_token_invalid",
            accessor=tok.accessor,
            generation=tok.generation,
            error=error,
        )
        if tok is self._current:
            self._error = (
                f"the vault no longer accepts the token (accessor {tok.accessor}); "
                f"{self.method.when_lost()}"
            )
            self._retry_at = 0.0
        self._wake.set()

    async def _revoke(self, tok: Token) -> None:
        try:
            with self.method.client_cert() as cert:
                await self._vault.send(
                    lambda c: c.auth.token.revoke_self(),
                    where="auth/token/revoke-self",
                    what="token",
                    token=tok.value,
                    cert=cert,
                )
        except CredentialUnavailable as exc:
            log.warning("vault token not revoked accessor=%s error=%s", tok.accessor, exc)
            self._emit(
                "vault_token_revoked", outcome="error", accessor=tok.accessor, error=str(exc)
            )
            return
        tok.dead = True
        log.info("vault token revoked at shutdown accessor=%s", tok.accessor)
        self._emit(
            "vault_token_revoked",
            outcome="ok",
            accessor=tok.accessor,
            generation=tok.generation,
            after="the broker's leases",
        )

    def _failed(self, exc: CredentialUnavailable, what: str) -> None:
        self._failures += 1
        step = min(self.backoff_max, self.backoff_base * 2 ** (self._failures - 1))
        # Equal jitter: at least half the step, so a retry never comes right back.
        delay = step / 2 + random.uniform(0, step / 2)  # noqa: S311 - not for secrets
        self._retry_at = self._clock() + delay
        self._note(exc, what, delay)

    def _note(self, exc: CredentialUnavailable, what: str, retry: float | None = None) -> None:
        self._error = str(exc)
        again = f" retry_in={retry:.1f}s" if retry is not None else ""
        log.warning("vault %s failed%s error=%s", what, again, exc)

    def _prune(self, now: float) -> None:
        for generation, tok in list(self._superseded.items()):
            if not tok.valid(now):
                del self._superseded[generation]

    def _emit(self, event: str, *, once: bool = False, **fields: Any) -> None:
        if self._audit is None:
            return
        if once:
            # Failures repeat at the backoff's pace while the vault is down; one line per
            # new reason keeps the trail readable.
            key = (event, fields.get("error"))
            if key == self._last_emitted:
                return
            self._last_emitted = key
        else:
            self._last_emitted = None
        self._audit.emit(event, method=self.method.name, address=self._vault.address, **fields)
