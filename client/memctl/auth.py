"""Where a daemon's token lives, and how a client finds it: shared by both ends.

Every daemon (unless run with ``auth: none``) has a token: made at start, or read
from ``token-file``. It writes the token to a file only its own user may read, in
its runtime directory, named after the address it serves (``tcp-7075.token``,
``unix-<path>.token``). A client of the same user finds that file for the address
it talks to, so the rightful user needs no configuration; anyone else needs the
token given to them (``MEMCTL_TOKEN``, ``MEMCTL_TOKEN_FILE``, ``token=``).

The runtime directory is ``runtime-directory`` if configured, else
``$XDG_RUNTIME_DIR/memctl``, else ``/run/memctl`` for root, else
``<tmp>/memctl-<uid>``. A client looks in each of these, so a root daemon started by
systemd (no ``XDG_RUNTIME_DIR``) is found from a login shell (which has one).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

#: Call metadata carrying the token, as ``Bearer <token>``.
AUTHORIZATION_METADATA_KEY = "authorization"
#: Call metadata naming another scope for a data call (admin token only).
SCOPE_METADATA_KEY = "memctl-scope"
#: Call metadata telling the daemon which client a call comes from, for the
#: per-client limits (else the connection's peer address is used).
CLIENT_METADATA_KEY = "memctl-client"
#: Environment variables a client reads: the token, or a file holding it.
TOKEN_VARIABLE = "MEMCTL_TOKEN"
TOKEN_FILE_VARIABLE = "MEMCTL_TOKEN_FILE"
#: The runtime directory (also the daemon's ``runtime-directory`` key).
RUNTIME_DIRECTORY_VARIABLE = "MEMCTL_RUNTIME_DIRECTORY"
#: Set by the nanny for the workers it starts: the secret of their worker id.
RESUME_SECRET_VARIABLE = "MEMCTL_RESUME_SECRET"
WORKER_ID_VARIABLE = "MEMCTL_WORKER_ID"


def _default_directories() -> list[Path]:
    """The runtime directories a daemon of this user may default to, its own first:
    ``$XDG_RUNTIME_DIR/memctl``, ``/run/memctl`` for root, ``<tmp>/memctl-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    defaults = [Path(xdg) / "memctl"] if xdg else []
    if os.geteuid() == 0:
        defaults.append(Path("/run/memctl"))
    defaults.append(Path(tempfile.gettempdir()) / f"memctl-{os.geteuid()}")
    return defaults


def runtime_directory(configured: str | None) -> Path:
    """Where a daemon keeps its token file: ``configured`` (``runtime-directory``),
    else this user's default."""
    return Path(configured) if configured else _default_directories()[0]


def _runtime_directories() -> list[Path]:
    """Where a client looks for token files, most specific first."""
    configured = os.environ.get(RUNTIME_DIRECTORY_VARIABLE)
    candidates = [Path(configured)] if configured else []
    return list(dict.fromkeys([*candidates, *_default_directories()]))


def unix_socket_path(address: str) -> Path | None:
    """The socket file of a ``unix:`` address, absolute; None for host:port."""
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return Path(os.path.abspath(address[len(prefix) :]))
    return None


def token_file_name(address: str) -> str:
    """The token file's name for a daemon at ``address``.

    TCP addresses are named by port alone, so that ``localhost:7075``,
    ``127.0.0.1:7075`` and a daemon bound to ``0.0.0.0:7075`` all find one file.
    """
    socket = unix_socket_path(address)
    if socket is None:
        return f"tcp-{address.rsplit(':', 1)[-1]}.token"
    name = quote(str(socket), safe="")
    if len(name) > 200:  # file names stop at 255 bytes
        name = hashlib.sha256(str(socket).encode()).hexdigest()[:32]
    return f"unix-{name}.token"


@dataclass(frozen=True)
class Credentials:
    """The token a client sends, and where it came from (for error messages)."""

    token: str | None
    source: str
    #: The file it was read from, if any: read again when it changes.
    path: Path | None = None


def read_token_file(path: Path) -> str:
    """A token file's token; OSError if unreadable, ValueError if empty."""
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def find_token(
    address: str, token: str | None = None, token_file: str | Path | None = None
) -> Credentials:
    """The token to send to the daemon at ``address``: ``token``, else ``token_file``,
    else ``$MEMCTL_TOKEN``, else ``$MEMCTL_TOKEN_FILE``, else the daemon's own token
    file in this user's runtime directory. None if there is none (the daemon may run
    with ``auth: none``; if not, it says where its token lives)."""
    if token:
        return Credentials(token, "the token given")
    if token_file is None and os.environ.get(TOKEN_VARIABLE):
        return Credentials(os.environ[TOKEN_VARIABLE], TOKEN_VARIABLE)
    if token_file is None and os.environ.get(TOKEN_FILE_VARIABLE):
        token_file = os.environ[TOKEN_FILE_VARIABLE]
    if token_file is not None:
        path = Path(token_file)
        return Credentials(read_token_file(path), f"token file {token_file}", path)
    name = token_file_name(address)
    for directory in _runtime_directories():
        path = directory / name
        try:
            return Credentials(read_token_file(path), f"token file {path}", path)
        except (OSError, ValueError):
            continue
    return Credentials(None, f"no token ({TOKEN_VARIABLE} unset, no {name} found)")


class TokenSource:
    """The ``authorization`` metadata a client sends. A token read from a file is read
    again whenever the file changes (one ``stat`` per call), so that a long-lived
    client keeps working when the daemon restarts with a new token; with no token
    found yet (the daemon may be starting), its file is looked for at every call."""

    def __init__(self, address: str, token: str | None, token_file: str | Path | None):
        self._address = address
        found = find_token(address, token, token_file)
        self.path = found.path
        self._seen = self._stamp()
        self.items = authorization(found.token)

    def _stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def current(self) -> tuple[tuple[str, str], ...]:
        """The metadata for the next call."""
        if self.path is None:
            if not self.items:  # nothing found yet
                found = find_token(self._address)
                self.path, self.items = found.path, authorization(found.token)
                self._seen = self._stamp()
            return self.items
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen:
            try:
                self.items = authorization(read_token_file(self.path))
            except (OSError, ValueError):
                return self.items
            self._seen = stamp
        return self.items


def bearer(token: str) -> str:
    return f"Bearer {token}"


def authorization(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata sending ``token``; none without one."""
    return ((AUTHORIZATION_METADATA_KEY, bearer(token)),) if token else ()


def call_metadata(address: str) -> tuple[tuple[str, str], ...]:
    """The call metadata proving this user to the daemon at ``address`` (empty if no
    token is found), for code calling memctl through its own gRPC stubs."""
    return authorization(find_token(address).token)
