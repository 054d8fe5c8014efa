"""Bearer-token checks, free of the framework: the lean path and the dependencies share them."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from app.config import Settings
from app.errors import Forbidden, ManagementDisabled, Unauthorized


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; Unauthorized otherwise."""
    if header is None:
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()


def _matches(token: str, secret: SecretStr | None) -> bool:
    """Constant-time comparison, so the time taken tells nothing about the token."""
    if secret is None:
        return False
    return hmac.compare_digest(token.encode(), secret.get_secret_value().encode())


def authorize_api(header: str | None, settings: Settings) -> None:
    """Accept the API token or the admin token when MODELPORT_API_TOKEN is set."""
    if settings.api_token is None:
        return
    token = bearer_token(header)
    if not (_matches(token, settings.api_token) or _matches(token, settings.admin_token)):
        raise Forbidden("the API token is wrong")


def authorize_admin(header: str | None, settings: Settings) -> None:
    """Management needs the admin token; with none configured it is disabled."""
    if settings.admin_token is None:
        raise ManagementDisabled(
            "management endpoints are disabled: start the service with MODELPORT_ADMIN_TOKEN "
            "set to a secret of 32+ characters to enable them"
        )
    if not _matches(bearer_token(header), settings.admin_token):
        raise Forbidden("the admin token is wrong")
