"""Authentication, roles, worker identity and limits: who may touch what.

* Every RPC, streams included, refuses a missing, wrong or malformed token with
  UNAUTHENTICATED naming the token file, without reading a request stream; the
  right token makes every RPC work; the Python client, the CLI and a nanny-started
  worker need no configuration.
* A worker token reaches only its own worker's data; other scopes and admin calls
  need the daemon's own token.
* A worker id's kept data goes back only to a hello with its resume secret (also
  across a restart with ``persist``); the nanny's ids are its workers' alone.
* Every limit (value size, message size, calls and sessions per client) refuses
  with a status code and a message saying what to do.

Tests on other users (``test_other_user.py``) and on TLS and bind rules
(``test_tls.py``) live beside this one.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memctl import Client
from memctl.auth import find_token, token_file_name
from memctl.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.auth import Authenticator
from memctl_server.edge import SERVICE as SERVICE_DESCRIPTOR
from tests.conftest import DATA_PLANE, Daemon, run_memctl, start_daemon, wait_until
from tests.inprocess import serving
from tests.test_bad_input import put_stream
from tests.test_edge import assert_status, eventually, held_open, rpc_error
from tests.tokens import sending, token_of

pytestmark = DATA_PLANE

MiB = 1 << 20


def request_for(method: str) -> bytes:
    """A well-formed request for ``method`` (the first message of a stream)."""
    messages: dict[str, bytes] = {
        "Put": pb.PutRequest(header=pb.PutHeader(key="k", size=1)).SerializeToString(),
        "Get": pb.GetRequest(key="k").SerializeToString(),
        "Attach": pb.AttachRequest(hello=pb.Hello(worker_id="w", pid=1)).SerializeToString(),
    }
    return messages.get(method, b"")


async def call_raw(channel: grpc.aio.Channel, name: str) -> None:
    """Call ``name`` once with a well-formed request; streams are left open after their
    first message, so a refusal must not depend on reading them to the end."""
    method = SERVICE_DESCRIPTOR.methods_by_name[name]
    path = f"/memctl.v1.MemctlService/{name}"
    first = request_for(name)
    if method.client_streaming and method.server_streaming:
        call = channel.stream_stream(path)(held_open(first), timeout=10)
        await call.read()
        call.cancel()
    elif method.client_streaming:
        await channel.stream_unary(path)(held_open(first), timeout=10)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path)(first, timeout=10):
            pass
    else:
        await channel.unary_unary(path)(first, timeout=10)


def test_every_method_refuses_a_missing_wrong_or_malformed_token(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as (server, channel):
            token_path = str(server.authenticator.token_path)
            assert token_path.endswith(".token")
            headers: list[tuple[str, str] | None] = [
                None,
                ("authorization", "Bearer not-the-token"),
                ("authorization", f"Basic {server.authenticator.token}"),
                ("authorization", "Bearer "),
                ("authorization", "Bearer w.bm9ib2R5.0000"),  # a forged worker token
            ]
            for header in headers:
                interceptors = sending(header) if header else None
                async with grpc.aio.insecure_channel(
                    server.address, interceptors=interceptors
                ) as ch:
                    for method in SERVICE_DESCRIPTOR.methods:
                        error = await rpc_error(call_raw(ch, method.name))
                        assert_status(error, grpc.StatusCode.UNAUTHENTICATED, token_path)
                    # Reflection needs the token too; health checks do not.
                    health = health_pb2_grpc.HealthStub(ch)
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert server.core.service_scope.sizes.keys == 0  # no refused Put stored anything
            # The right token: every method answers (with its own errors, if any).
            stub = pb_grpc.MemctlServiceStub(channel)
            await stub.Put(put_stream("k", 1, b"v"), timeout=10)
            for method in SERVICE_DESCRIPTOR.methods:
                try:
                    await call_raw(channel, method.name)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, method.name

    asyncio.run(scenario())


def test_a_session_needs_the_token_on_every_call(tmp_path: Path) -> None:
    """The Attach stream carried the token; data calls with its session but without
    the token are still refused, and the session id alone proves nothing."""

    async def scenario() -> None:
        async with serving(tmp_path) as (server, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            attach = stub.Attach(held_open(pb.AttachRequest(hello=pb.Hello(worker_id="w"))))
            session = (await attach.read()).session.session_id
            with_session = (("memctl-session", session),)
            await stub.Put(put_stream("mine", 1, b"v"), metadata=with_session, timeout=10)
            async with grpc.aio.insecure_channel(server.address) as bare:
                bare_stub = pb_grpc.MemctlServiceStub(bare)
                error = await rpc_error(
                    bare_stub.Get(pb.GetRequest(key="mine"), metadata=with_session).read()
                )
                assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "no token")
                error = await rpc_error(
                    bare_stub.Put(put_stream("mine", 1, b"x"), metadata=with_session)
                )
                assert_status(error, grpc.StatusCode.UNAUTHENTICATED)
            assert server.core.scopes["w"].stat("mine").size == 1
            attach.cancel()
            await eventually(lambda: not server.control.attached)

    asyncio.run(scenario())


def test_auth_none_serves_without_a_token_on_loopback(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            serving(tmp_path, auth="none") as (server, _),
            grpc.aio.insecure_channel(server.address) as bare,
        ):
            assert not server.authenticator.enabled
            assert server.authenticator.token_path is None
            stub = pb_grpc.MemctlServiceStub(bare)
            await stub.Put(put_stream("k", 1, b"v"), timeout=10)
            assert (await stub.Status(pb.StatusRequest(), timeout=10)).scopes

    asyncio.run(scenario())


WORKER = textwrap.dedent(
    """
    import os, sys
    from memctl import Client
    with Client() as client, client.attach(os.environ["MEMCTL_WORKER_ID"]) as session:
        incarnation = "restarted" if session.keys_kept else "first"
        if not session.keys_kept:
            client.put("result", b"computed by " + os.environ["MEMCTL_WORKER_ID"].encode())
        print(incarnation, session.supervised, session.keys_kept, flush=True)
        if incarnation == "first":
            os._exit(3)  # die; the nanny starts it again
        # The worker token reaches nothing but this worker's own scope.
        try:
            Client().put("outside", b"x")
        except PermissionError as exc:
            print("refused:", type(exc).__name__, flush=True)
        sys.stdin.read()  # stay until stopped
    """
)


def test_a_nanny_worker_needs_no_configuration_and_gets_its_data_back(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "worker.out"
    daemon = spawn(
        "--worker",
        f"sh -c '{sys.executable} {script} >> {log} 2>&1'",
        address="127.0.0.1:0",
    )
    wait_until(lambda: log.exists() and "refused" in log.read_text(), timeout=60)
    lines = log.read_text().splitlines()
    assert lines[0] == "first True 0", lines
    assert lines[1] == "restarted True 1", lines  # the same scope, proven by its secret
    assert lines[2] == "refused: PermissionDenied", lines
    # The admin (this test, finding the token file) reads the worker's scope by name;
    # the CLI does with --scope.
    with Client(daemon.address, scope="worker-0") as admin:
        assert admin.get("result") == b"computed by worker-0"
    got = run_memctl("get", "result", "--scope", "worker-0", "--address", daemon.address)
    assert got.returncode == 0 and got.stdout == b"computed by worker-0", got.stderr
    keys = run_memctl("keys", "--scope", "worker-0", "--address", daemon.address)
    assert keys.stdout.decode().startswith("result\t"), keys.stderr
    with Client(daemon.address) as admin:
        with pytest.raises(KeyError):
            admin.get("result")  # not in the service scope
        assert "outside" not in {info.key for info in admin.list_keys()}


def test_the_cli_and_client_find_the_token_with_no_configuration(daemon: Daemon) -> None:
    token = find_token(daemon.address)
    assert token.token and token.source.endswith(token_file_name(daemon.address))
    put = run_memctl("put", "greeting", "-", "--address", daemon.address, input=b"hello")
    assert put.returncode == 0, put.stderr
    with Client(daemon.address) as client:
        assert client.get("greeting") == b"hello"
    # A wrong token (the environment variable wins over the file) is refused in one line.
    wrong = run_memctl("get", "greeting", "--address", daemon.address, env={"MEMCTL_TOKEN": "x"})
    assert wrong.returncode == 1
    message = wrong.stderr.decode()
    assert message.count("\n") == 1 and "Traceback" not in message, message
    assert "not this daemon's" in message and token_file_name(daemon.address) in message


def test_a_worker_token_reaches_only_its_own_worker(daemon: Daemon) -> None:
    worker_token = Authenticator(token_of(daemon.address), None).worker_token("w1")
    with Client(daemon.address) as admin:
        admin.put("service-secret", b"admin only")
        with admin.attach("w2"):
            admin.put("w2-secret", b"w2 only")
    with Client(daemon.address, token=worker_token) as worker:
        assert worker.status().scopes  # reading the service's state is allowed
        with pytest.raises(PermissionDenied, match="w1"):
            worker.get("service-secret")  # the service scope is not w1's
        with pytest.raises(PermissionDenied, match="may attach only as 'w1'"):
            worker.attach("w2")
        with pytest.raises(PermissionDenied, match="workers"):
            worker.trim(workers=True)
        assert worker.trim().detail  # the daemon's own trim is harmless
        with worker.attach("w1"):
            worker.put("mine", b"w1's")
            assert worker.get("mine") == b"w1's"
    with (
        Client(daemon.address, token=worker_token, scope="w2") as nosy,
        pytest.raises(PermissionDenied, match="own token"),
    ):
        nosy.get("w2-secret")
    with Client(daemon.address, scope="w2") as admin:
        assert admin.get("w2-secret") == b"w2 only"
    with (
        Client(daemon.address, scope="nobody-here") as admin,
        pytest.raises(FailedPrecondition, match="no scope named"),
    ):
        admin.get("x")


def test_a_worker_id_is_taken_back_only_with_its_resume_secret(daemon: Daemon) -> None:
    with Client(daemon.address) as owner, Client(daemon.address) as impostor:
        with owner.attach("w", memory_limit="1 GiB") as session:
            owner.put("secret", b"owner's")
            secret = session.resume_secret
            assert len(secret) >= 20 and not session.supervised
            with pytest.raises(FailedPrecondition, match="already attached"):
                impostor.attach("w", resume_secret=secret)
        # Detached: its data is kept, for the holder of the secret only.
        for claim in ({}, {"resume_secret": "guess"}, {"pid": os.getpid()}):
            with pytest.raises(FailedPrecondition, match="resume secret"):
                impostor.attach("w", **claim)
        status = {scope.name: scope for scope in impostor.status().scopes}
        assert status["w"].state == "detached" and status["w"].keys_in_memory == 1
        with owner.attach("w", resume_secret=secret) as session:
            assert session.keys_kept == 1 and session.resume_secret == secret
            assert owner.get("secret") == b"owner's"
        # A fresh id is anyone's, with a secret of its own.
        with impostor.attach("other") as other:
            assert other.keys_kept == 0 and other.resume_secret != secret


def test_resume_secrets_outlive_a_restart_with_persist(tmp_path: Path) -> None:
    first = start_daemon(tmp_path / "d", "--set", "persist=true")
    with Client(first.address) as client, client.attach("w") as session:
        client.put("kept", b"across restarts")
        secret = session.resume_secret
    assert first.stop() == 0
    identities = next(first.local_directory.rglob("identities.json"))
    assert stat.S_IMODE(identities.stat().st_mode) == 0o600
    assert secret not in identities.read_text()  # only a digest is stored
    second = start_daemon(tmp_path / "d", "--set", "persist=true")
    try:
        with Client(second.address) as client:
            with pytest.raises(FailedPrecondition, match="resume secret"):
                client.attach("w")
            with client.attach("w", resume_secret=secret) as session:
                assert session.keys_kept == 1
                assert client.get("kept") == b"across restarts"
    finally:
        assert second.stop() == 0


def refused_start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``memctl serve`` with ``args``, which must refuse to start (exit 1)."""
    address = f"unix:{tmp_path / 's.sock'}"
    local = str(tmp_path / "l")
    refused = run_memctl(
        "serve", "--address", address, "--local-directory", local, *args, timeout=60
    )
    assert refused.returncode == 1, refused.stderr
    return refused


def test_a_configured_token_file_is_used_and_must_be_private(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a-configured-token-of-some-length\n")
    token_file.chmod(0o644)
    refused = refused_start(tmp_path, "--token-file", str(token_file))
    assert "chmod 600" in refused.stderr.decode() and refused.stderr.decode().count("\n") == 1
    token_file.chmod(0o600)
    daemon = start_daemon(tmp_path / "d", "--token-file", str(token_file))
    try:
        assert find_token(daemon.address).token == "a-configured-token-of-some-length"
        with Client(daemon.address, token="a-configured-token-of-some-length") as client:
            client.put("k", b"v")
        with (
            Client(daemon.address, token="wrong-token-of-some-length") as client,
            pytest.raises(Unauthenticated),
        ):
            client.get("k")
    finally:
        daemon.stop()


def test_a_runtime_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)
    refused = refused_start(tmp_path, "--set", f"runtime-directory={runtime}")
    assert "belongs to uid 65534" in refused.stderr.decode()
    assert list(runtime.iterdir()) == []


def test_unix_socket_mode_and_group_are_configurable(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--set", "unix-socket-mode=0660", "--set", f"unix-socket-group={os.getgid()}")
    path = Path(daemon.address.removeprefix("unix:"))
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == os.getgid()
    with Client(daemon.address) as client:
        assert client.status().scopes


async def refused_soon(
    stub: pb_grpc.MemctlServiceStub, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.AioRpcError:
    """The error of a Status call from this client, polled until one is refused."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            await stub.Status(pb.StatusRequest(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc
        assert asyncio.get_running_loop().time() < deadline, "never refused"
        await asyncio.sleep(0.02)


def test_limits_refuse_with_a_status_and_a_way_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(
            tmp_path,
            limits__max_value_size="8 MiB",
            limits__max_message_size="2 MiB",
            limits__max_calls_per_client="2",
            limits__max_sessions_per_client="1",
        ) as (server, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            big = b"x" * (8 * MiB + 1)
            error = await rpc_error(stub.Put(put_stream("big", len(big), big), timeout=10))
            assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "limits.max-value-size")

            async def oversized() -> AsyncIterator[pb.PutRequest]:
                yield pb.PutRequest(header=pb.PutHeader(key="m", size=3 * MiB))
                yield pb.PutRequest(chunk=b"x" * (3 * MiB))

            error = await rpc_error(stub.Put(oversized(), timeout=10))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert "larger than max" in (error.details() or ""), error.details()
            assert server.core.service_scope.data.location("m") is None

            me = (("memctl-client", "one-client"),)
            sessions = [
                stub.Attach(
                    held_open(pb.AttachRequest(hello=pb.Hello(worker_id=f"w{i}"))), metadata=me
                )
                for i in range(2)
            ]
            assert (await sessions[0].read()).WhichOneof("kind") == "session"
            error = await rpc_error(sessions[1].read())
            assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "max-sessions-per-client")
            # Two calls in progress (the open Attach and a stalled Put): the third of
            # the same client is refused, another client's is not.
            stalled_put = held_open(pb.PutRequest(header=pb.PutHeader(key="stalled", size=10)))
            stalled = stub.Put(stalled_put, metadata=me)
            error = await refused_soon(stub, me)
            assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "max-calls-per-client")
            await stub.Status(pb.StatusRequest(), metadata=(("memctl-client", "two"),))
            stalled.cancel()
            sessions[0].cancel()
            await eventually(lambda: not server.control.attached)

    asyncio.run(scenario())


def test_the_token_file_is_private_and_removed_at_stop(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn(address="127.0.0.1:0")
    found = find_token(daemon.address)
    path = Path(found.source.removeprefix("token file "))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.parent.stat().st_uid == os.geteuid()
    assert daemon.stop() == 0
    assert not path.exists()
    assert find_token(daemon.address).token is None
