"""Optional bearer token for ``/predict`` and ``/admin/*``; plain code, no Ray.

The token is read from the environment variable named by
``serve.auth_token_env`` in the process that starts serving, and only its
SHA-256 reaches the replicas (deployment arguments live in the Serve
controller; the token itself never does). Requests are compared by digest in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os


class AuthError(PermissionError):
    """Missing or wrong bearer token (-> HTTP 401)."""


def token_digest(env_var: str | None, environ: dict[str, str] | None = None) -> str | None:
    """SHA-256 hex of the token in ``env_var``; None when auth is off."""
    return None if env_var is None else _digest(_token(env_var, environ))


def auth_headers(env_var: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What a client of the endpoint sends: the bearer token in ``env_var`` (as the
    replicas' digest was made from), none when auth is off."""
    return {} if env_var is None else {"authorization": f"Bearer {_token(env_var, environ)}"}


def _token(env_var: str, environ: dict[str, str] | None) -> str:
    token = (os.environ if environ is None else environ).get(env_var, "").strip()
    if not token:
        raise ValueError(f"serve.auth_token_env: environment variable {env_var} is not set (or empty); set it or unset serve.auth_token_env")
    return token


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class BearerAuth:
    def __init__(self, digest: str | None) -> None:
        self.digest = digest

    @property
    def enabled(self) -> bool:
        return self.digest is not None

    def check(self, authorization: str | None) -> None:
        if self.digest is None:
            return
        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        if not hmac.compare_digest(_digest(token.strip()), self.digest):
            raise AuthError("wrong bearer token")
