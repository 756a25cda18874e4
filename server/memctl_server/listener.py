"""Where the daemon listens, and the rules for it (secure by default).

* A TCP address that is not loopback needs TLS (``tls.cert`` and ``tls.key``), or
  ``insecure: true``, which is logged as a warning at every start; ``auth: none``
  is refused there whatever else is set.
* A unix socket is created with ``unix-socket-mode`` (0600) whatever the umask,
  optionally handed to ``unix-socket-group``, in a directory no other user can
  write to (made 0700 if missing). gRPC silently replaces an existing socket file,
  so one someone still listens on is refused.
* An address in use is refused loudly: two daemons must not share a port.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import logging
import os
import socket
import ssl
import stat
from pathlib import Path

import grpc

from memctl.auth import unix_socket_path

from .auth import check_private_directory
from .config import ServiceConfig as Config
from .errors import StartupError
from .spilldir import make_directories

logger = logging.getLogger(__name__)


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(address: str) -> bool:
    """Whether a host:port address reaches only this host (every address it resolves
    to is loopback)."""
    host = _host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def check_bind_rules(config: Config) -> bool:
    """Refuse an address that would expose the daemon; whether it is exposed without
    TLS all the same (``insecure``), for a warning once bound."""
    address = config.address
    if unix_socket_path(address) is not None or is_loopback(address):
        return False
    if config.auth == "none":
        raise StartupError(
            f"refusing to listen on {address} with auth: none: anyone who reaches it could "
            "read and delete every value; use a loopback address or a unix socket, or "
            "turn authentication back on (auth: token)"
        )
    if config.tls.cert is None and not config.insecure:
        raise StartupError(
            f"refusing to listen on {address} without TLS: the token and every value would "
            "cross the network in the clear; set tls.cert and tls.key, or pass --insecure "
            "(insecure: true) to accept that"
        )
    return config.tls.cert is None


def warn_insecure(address: str) -> None:
    logger.warning(
        "Listening on %s without TLS (insecure: true): tokens and values cross the "
        "network unencrypted",
        address,
    )


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS (mutual, with ``tls.client-ca``) credentials, or None for plaintext."""
    tls = config.tls
    if tls.cert is None and tls.key is None:
        if tls.client_ca is not None:
            raise StartupError("tls.client-ca needs tls.cert and tls.key as well")
        return None
    if tls.cert is None or tls.key is None:
        raise StartupError("TLS needs both tls.cert and tls.key; one of them is missing")

    def read(path: str, key: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read {key} {path}: {exc.strerror}") from exc

    # gRPC would only say "address in use" for a file that does not parse: check here.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(
            f"cannot use tls.cert {tls.cert} with tls.key {tls.key}: they must be a PEM "
            f"certificate chain and its own PEM private key ({exc})"
        ) from exc
    if tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(
                f"cannot use tls.client-ca {tls.client_ca}: it must hold PEM CA certificates "
                f"({exc})"
            ) from exc
    client_ca = read(tls.client_ca, "tls.client-ca") if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(read(tls.key, "tls.key"), read(tls.cert, "tls.cert"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def claim_unix_socket(path: Path) -> None:
    """gRPC silently replaces an existing socket file: refuse if someone listens on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
        path.unlink(missing_ok=True)  # stale socket of a daemon that died
    else:
        raise StartupError(
            f"cannot listen on unix:{path}: another process (another memctl?) is serving "
            "there; stop it or choose another --address"
        )
    finally:
        probe.close()


def _socket_directory(path: Path) -> None:
    directory = path.parent
    try:
        make_directories(directory, 0o700)
    except OSError as exc:
        raise StartupError(f"cannot create {directory} for unix:{path}: {exc.strerror}") from exc
    check_private_directory(directory, f"the directory of unix:{path},", owner_only=False)


def _group_id(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"unix-socket-group: no group named {group!r} on this host") from None


def bind(
    server: grpc.aio.Server, config: Config, credentials: grpc.ServerCredentials | None
) -> str:
    """Bind ``config.address``; the address really bound (port 0 resolved)."""
    address = config.address
    unix = unix_socket_path(address)
    if unix is not None:
        _socket_directory(unix)
        claim_unix_socket(unix)
    # The socket file is created inside add_*_port with the process umask: make it
    # owner-only from its first moment, then widen to the configured mode.
    previous = os.umask(0o177) if unix is not None else None
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {address}: the address is in use (another memctl?) or not "
            "valid here; stop the other process or choose another --address"
        ) from exc
    finally:
        if previous is not None:
            os.umask(previous)
    if unix is not None:
        try:
            if config.unix_socket_group is not None:
                os.chown(unix, -1, _group_id(config.unix_socket_group))
            os.chmod(unix, int(config.unix_socket_mode, 8))
        except OSError as exc:
            raise StartupError(
                f"cannot set the owner or mode of unix:{unix}: {exc.strerror}"
            ) from exc
        return address
    if address.rsplit(":", 1)[-1] == "0":
        return f"{address.rsplit(':', 1)[0]}:{port}"
    return address
