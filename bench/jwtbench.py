"""Inbound token verification per core, timed in a process of its own.

The bench's token issuer (`BenchIssuer`: an ES256 and an RS256 key, their JWKS in a file the
broker's `http-jwt` service reads) and the in-process row: ``python -m bench.jwtbench
--jwks F --key-dir D --alg ES256 --duration S --start-at T`` verifies JWT-SVIDs through the
broker's own `JwtAuthority.verify` (the path an HTTP request or a PostgreSQL login takes:
cache lookup, PyJWT signature and claims checks, the SPIFFE checks, metrics) on an event loop
for `duration` seconds from `start-at`, and prints ``{"ops", "cpu_s", "wall_s"}``: CPU is the
process's utime+stime over the window, so ops / cpu_s is verifications per core.

``--mode uncached`` verifies distinct tokens with the cache off (every one pays the
signature check); ``--mode cached`` verifies the same token again (what a kept-alive client
that reuses its token costs after the first request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The broker's audience for the bench's token service (the service's name).
AUDIENCE = "http-jwt"
# Distinct tokens the uncached mode cycles through (pre-minted: signing is not measured).
DISTINCT_TOKENS = 256
# Tokens outlive any bench run.
TOKEN_LIFETIME = 24 * 3600
KIDS = {"ES256": "bench-es256", "RS256": "bench-rs256"}


class BenchIssuer:
    """Two signing keys (ES256 P-256, RS256 2048-bit) in `directory`, and their JWKS."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.jwks_path = directory / "jwks.json"
        keys: list[dict[str, Any]] = []
        for alg, kid in KIDS.items():
            path = directory / f"{kid}.pem"
            if not path.exists():
                key: Any = (
                    ec.generate_private_key(ec.SECP256R1())
                    if alg == "ES256"
                    else rsa.generate_private_key(public_exponent=65537, key_size=2048)
                )
                path.write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                path.chmod(0o600)
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            to_jwk = ECAlgorithm.to_jwk if alg == "ES256" else RSAAlgorithm.to_jwk
            jwk = json.loads(to_jwk(key.public_key()))
            jwk.update(kid=kid, alg=alg, use="sig")
            keys.append(jwk)
        self.jwks_path.write_text(json.dumps({"keys": keys}))

    def mint(self, alg: str, sub: str, aud: str = AUDIENCE, jti: str | None = None) -> str:
        kid = KIDS[alg]
        key = serialization.load_pem_private_key(
            (self.directory / f"{kid}.pem").read_bytes(), password=None
        )
        now = int(time.time())
        claims: dict[str, Any] = {"sub": sub, "aud": aud, "iat": now, "exp": now + TOKEN_LIFETIME}
        if jti is not None:
            claims["jti"] = jti
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})  # type: ignore[arg-type]


def _cpu() -> float:
    times = os.times()
    return float(times.user + times.system)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from broker.config import Section
    from broker.config.jwt import parse_jwt
    from broker.identity import jwt as jwtmod
    from broker.identity.jwks import JwtAuthority
    from broker.observe.metrics import Metrics

    issuer = BenchIssuer(Path(args.key_dir))
    trust_domain = args.sub.split("/")[2]
    config = parse_jwt(
        Section({"issuers": [{"name": "bench", "jwks": str(issuer.jwks_path)}]}, "identity.jwt"),
        Path(args.key_dir),
        trust_domain,
    )
    authority = JwtAuthority(config, Metrics())
    if args.mode == "uncached":
        # The same keys, no cache: every verification pays the signature check.
        keys = authority.verifier.keys("bench")
        authority.verifier = jwtmod.JwtVerifier(config, max_cached=0)
        authority.verifier.set_keys("bench", keys)
        tokens = [issuer.mint(args.alg, args.sub, jti=str(i)) for i in range(DISTINCT_TOKENS)]
    else:
        tokens = [issuer.mint(args.alg, args.sub)]
    for token in tokens:  # warm: every path taken once, the cached one primed
        await authority.verify(token, AUDIENCE)
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    ends = time.time() + args.duration
    cpu0, wall0 = _cpu(), time.monotonic()
    ops, n = 0, len(tokens)
    verify = authority.verify
    while time.time() < ends:
        for _ in range(64):
            await verify(tokens[ops % n], AUDIENCE)
            ops += 1
    return {"ops": ops, "cpu_s": _cpu() - cpu0, "wall_s": time.monotonic() - wall0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key-dir", required=True)
    parser.add_argument("--alg", choices=sorted(KIDS), required=True)
    parser.add_argument("--mode", choices=("uncached", "cached"), default="uncached")
    parser.add_argument("--sub", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(json.dumps(runner.run(_run(args))))


if __name__ == "__main__":
    main()
