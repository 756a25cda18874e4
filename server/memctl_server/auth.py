"""Who may call: the daemon's token, worker tokens, and the interceptor checking them.

Two kinds of token, both sent as ``authorization: Bearer <token>`` call metadata:

* the **admin token**, the daemon's own: made at every start (or read from
  ``token-file``) and written to a file only the daemon's user may read
  (``memctl.auth`` says where). It may do everything.
* a **worker token**, which the nanny gives each worker it starts
  (``MEMCTL_TOKEN``): it lets that worker attach as its own worker id and touch
  only its own scope's data. It is derived from the admin token (an HMAC of the
  worker id), so checking it needs no table and takes constant time.

``AuthInterceptor`` checks every call, streams included, before the method runs:
a missing or wrong token is UNAUTHENTICATED with a message saying where the token
lives. Health checks are exempt: they reveal only SERVING, and load balancers and
Kubernetes probes cannot send a token. What an authenticated caller may touch
(roles) is decided by the servicer, from ``Authenticator.principal``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import inspect
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from memctl.auth import (
    AUTHORIZATION_METADATA_KEY,
    TOKEN_FILE_VARIABLE,
    TOKEN_VARIABLE,
    read_token_file,
    token_file_name,
)

from .edge import rewrap
from .errors import StartupError
from .spilldir import make_directories

logger = logging.getLogger(__name__)

_WORKER_PREFIX = "w."
#: Methods any caller may use without a token.
UNAUTHENTICATED_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)
#: Tokens shorter than this are refused in ``token-file``: guessable.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    """Who a call comes from: the admin, or one worker (``worker_id``)."""

    worker_id: str | None = None

    @property
    def admin(self) -> bool:
        return self.worker_id is None


ADMIN = Principal()


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class Authenticator:
    """The daemon's tokens; ``token`` None means ``auth: none`` (everyone is admin)."""

    def __init__(self, token: str | None, token_path: Path | None):
        self.token = token
        #: Where clients of the daemon's user find the token (for messages).
        self.token_path = token_path
        self._key = token.encode() if token is not None else b""

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def worker_token(self, worker_id: str) -> str:
        """The token that lets only ``worker_id`` attach and touch its own data."""
        encoded = base64.urlsafe_b64encode(worker_id.encode()).decode().rstrip("=")
        return f"{_WORKER_PREFIX}{encoded}.{self._mac(worker_id)}"

    def _mac(self, worker_id: str) -> str:
        return hmac.new(self._key, b"worker:" + worker_id.encode(), hashlib.sha256).hexdigest()

    def principal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        """Who sent a call with this metadata; None if its token is missing or wrong."""
        if self.token is None:
            return ADMIN
        return self.principal_for(_bearer(metadata))

    def principal_for(self, given: str | None) -> Principal | None:
        """Who holds the token ``given``; None if it is missing or wrong."""
        if self.token is None:
            return ADMIN
        if not given:
            return None
        if hmac.compare_digest(given.encode(), self._key):
            return ADMIN
        if given.startswith(_WORKER_PREFIX):
            encoded, _, mac = given[len(_WORKER_PREFIX) :].rpartition(".")
            try:
                worker_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            if hmac.compare_digest(mac.encode(), self._mac(worker_id).encode()):
                return Principal(worker_id)
        return None

    def refusal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """Why a call was refused, and where the token lives."""
        given = _bearer(metadata)
        if given is None:
            problem = "this call carried no token (call metadata authorization: Bearer <token>)"
        elif given == "":
            problem = "the authorization metadata is not 'Bearer <token>'"
        else:
            problem = (
                "the token sent is not this daemon's (a daemon without token-file makes a "
                "new one at every start)"
            )
        where = f"its token is in {self.token_path}" if self.token_path else "ask its operator"
        return (
            f"memctl refused the call: {problem}; {where}, readable only by the user "
            f"running memctl serve, whose clients find it there; anyone else passes it "
            f"with {TOKEN_VARIABLE}, {TOKEN_FILE_VARIABLE} or --token-file"
        )


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without a valid token, before its method runs."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in UNAUTHENTICATED_METHODS:
            return handler
        metadata = details.invocation_metadata
        if self.authenticator.principal(metadata) is not None:
            return handler
        message = self.authenticator.refusal(metadata)
        return rewrap(handler, lambda behaviour: _refuse(behaviour, message))


def _refuse(behaviour: Callable[..., Any], message: str) -> Callable[..., Any]:
    """A method of the same kind as ``behaviour`` that only answers UNAUTHENTICATED
    (it reads nothing from a request stream)."""

    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises; this makes it a generator

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return unary


# --- the token and its file --------------------------------------------------------------
def check_private_directory(path: Path, what: str, *, owner_only: bool) -> None:
    """Refuse a directory others could swap files in: it must belong to this user (or
    root, unless ``owner_only``) and be writable by nobody else unless sticky (/tmp)."""
    info = path.stat()
    owners = {os.geteuid()} if owner_only else {os.geteuid(), 0}
    if info.st_uid not in owners:
        raise StartupError(
            f"{what} {path} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}); use a directory of your own"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise StartupError(
            f"{what} {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"chmod go-w it, or use another directory"
        )


def open_runtime_directory(path: Path) -> Path:
    """The runtime directory, made 0700 if it does not exist; refused if others control it."""
    try:
        make_directories(path, 0o700)
        check_private_directory(path, "runtime directory", owner_only=True)
    except OSError as exc:
        raise StartupError(
            f"cannot use runtime directory {path}: {exc.strerror}; set runtime-directory"
        ) from exc
    return path


def configured_token(token_file: Path) -> str:
    """The token in ``token-file``; refused if others may read it, or too short."""
    try:
        mode = stat.S_IMODE(token_file.stat().st_mode)
        token = read_token_file(token_file)
    except OSError as exc:
        raise StartupError(f"cannot read token-file {token_file}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise StartupError(f"token-file {token_file} holds no token: {exc}") from exc
    if mode & 0o077:
        raise StartupError(
            f"token-file {token_file} may be read by other users (mode {mode:04o}); "
            f"chmod 600 {token_file}"
        )
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise StartupError(
            f"token-file {token_file}: a token is one word of at least {MIN_TOKEN_LENGTH} "
            "characters (make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return token


def write_token_file(runtime_directory: Path, address: str, token: str) -> Path:
    """Write ``token`` where clients of this user find it for ``address``: mode 0600,
    created under a temporary name and renamed, so no reader sees half a token."""
    path = runtime_directory / token_file_name(address)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(partial, path)
    return path


def remove_token_file(path: Path, token: str) -> None:
    """Remove the token file at shutdown, unless another daemon has replaced it."""
    with contextlib.suppress(OSError, ValueError):
        if read_token_file(path) == token:
            path.unlink()


def new_token() -> str:
    return secrets.token_urlsafe(32)
