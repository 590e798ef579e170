"""Cost of checking one token the node has not seen before (a handshake's JWT work).

``python -m benchmarks.tokens`` signs N distinct HS256 tokens (and RS256/ES256
ones) and times ``Verifier`` on each, bypassing the verified-token memory, so
the figure is the signature check plus the claims: what a reconnect storm of
distinct tokens costs per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsbroker.auth import Verifier
from wsbroker.config import Settings

SECRET = "benchmark-secret-with-enough-entropy-0123456789"


async def per_token_us(verifier: Verifier, tokens: list[str]) -> float:
    check = verifier._verify  # the uncached path: what a new token costs
    for token in tokens[:100]:
        await check(token)
    started = time.perf_counter()
    for token in tokens:
        await check(token)
    return (time.perf_counter() - started) / len(tokens) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    exp = int(time.time()) + 3600
    claims = [{"sub": f"user-{i}", "exp": exp, "channels": ["room.*", f"user.{i}.>"]}
              for i in range(args.tokens)]
    print(f"pyjwt {jwt.__version__}, {args.tokens} distinct tokens, µs per token")
    hs = Verifier(Settings(jwt_secret=SECRET))
    hs_tokens = [jwt.encode(c, SECRET, algorithm="HS256") for c in claims]
    print(f"HS256  {asyncio.run(per_token_us(hs, hs_tokens)):7.1f}")
    for name, private in (("RS256", rsa.generate_private_key(public_exponent=65537,
                                                               key_size=2048)),
                          ("ES256", ec.generate_private_key(ec.SECP256R1()))):
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        path = f"/tmp/wsbroker-bench-{name}.pem"
        with open(path, "wb") as out:
            out.write(pem)
        verifier = Verifier(Settings(jwt_public_key=path, jwt_algorithms=(name,)))
        count = min(args.tokens, 5_000)
        tokens = [jwt.encode(c, private, algorithm=name) for c in claims[:count]]
        print(f"{name}  {asyncio.run(per_token_us(verifier, tokens)):7.1f}")


if __name__ == "__main__":
    main()
