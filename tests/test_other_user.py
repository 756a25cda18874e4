"""Another local user cannot use a memctl daemon run by root.

The daemon runs as root (as the tests do); the other user is the real unprivileged
``nobody``, reached with ``setpriv`` (or ``runuser``). As ``nobody`` a small Python
script tries what an intruder would: connect to the unix socket, call every RPC over
TCP without the token or with a made-up one, read the token file, run the ``memctl``
command, move the directories the daemon made so as to listen in its place. Each
script prints what happened as JSON; the test asserts on it, and checks as root that
nothing the intruder sent changed the daemon's data.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memctl import Client
from memctl.auth import find_token, token_file_name
from memctl.v1 import memctl_pb2 as pb
from tests.conftest import Daemon

OTHER_USER = "nobody"
SERVICE = pb.DESCRIPTOR.services_by_name["MemctlService"]
#: The methods the contract has today. The other user's script calls every method of
#: the service descriptor (one added later, with an empty request), not only these.
METHODS = {
    "Status",
    "Put",
    "Get",
    "Attach",
    "Delete",
    "ListKeys",
    "Stat",
    "Evict",
    "Trim",
    "Events",
}

#: Run as the other user to decide whether its Python can talk to memctl.
PROBE = "import os, grpc, memctl, memctl.cli, memctl.v1.memctl_pb2_grpc; print(os.geteuid())"

#: Run as root with the test's interpreter: the files of every non-stdlib top-level
#: module the client needs, for copying where the other user can read them.
NEEDED_MODULES = """
import json, os, sys, sysconfig
import grpc, memctl, memctl.cli, memctl.v1.memctl_pb2_grpc
stdlib = [os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")]
def third_party(path):
    path = os.path.realpath(path)
    if any(part in ("site-packages", "dist-packages") for part in path.split(os.sep)):
        return True
    return not any(path.startswith(root + os.sep) for root in stdlib)
found = {}
for name, module in list(sys.modules.items()):
    if "." in name or module is None:
        continue
    paths = list(getattr(module, "__path__", None) or [])
    if not paths and getattr(module, "__file__", None):
        paths = [module.__file__]
    paths = [p for p in paths if os.path.exists(p) and third_party(p)]
    if paths:
        found[name] = paths
# Installed metadata too: some packages read their own version at import.
from importlib.metadata import distribution, packages_distributions
metadata = set()
for name, distributions in packages_distributions().items():
    for dist_name in distributions if name in found else ():
        files = distribution(dist_name).files or []
        for file in files:
            if file.parts[0].endswith((".dist-info", ".egg-info")):
                metadata.add(str(distribution(dist_name).locate_file(file.parts[0])))
                break
print(json.dumps({"modules": found, "metadata": sorted(metadata)}))
"""

#: As the other user: connect to the unix socket by hand, then call Status and Get
#: (with the daemon's real token, given as argv[4]: the socket alone must stop it).
UNIX_SCRIPT = """
import errno, json, socket, sys
import grpc
from memctl.v1 import memctl_pb2 as pb, memctl_pb2_grpc as pb_grpc
path, address, key, token = sys.argv[1:5]
out = {}
probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    probe.connect(path)
    out["connect"] = ["connected", ""]
except OSError as exc:
    out["connect"] = [type(exc).__name__, errno.errorcode.get(exc.errno, str(exc.errno))]
finally:
    probe.close()
metadata = [("authorization", "Bearer " + token)]
with grpc.insecure_channel(address) as channel:
    stub = pb_grpc.MemctlServiceStub(channel)
    calls = {
        "Status": lambda: stub.Status(pb.StatusRequest(), metadata=metadata, timeout=10),
        "Get": lambda: list(stub.Get(pb.GetRequest(key=key), metadata=metadata, timeout=10)),
    }
    for name, call in calls.items():
        try:
            out[name] = ["OK", repr(call())]
        except grpc.RpcError as exc:
            out[name] = [exc.code().name, exc.details() or ""]
print(json.dumps(out))
"""

#: As the other user: every method of MemctlService, with well-formed requests
#: aimed at the secret's key, once per made-up credential.
TCP_SCRIPT = """
import base64, json, os, sys
import grpc
from memctl.v1 import memctl_pb2 as pb, memctl_pb2_grpc as pb_grpc
address, key = sys.argv[1:3]
data = b"overwritten by another user"
hello = pb.Hello(worker_id="intruder", pid=os.getpid(), nthreads=1, memory_limit="none")
requests = {
    "Put": [pb.PutRequest(header=pb.PutHeader(key=key, size=len(data))),
            pb.PutRequest(chunk=data)],
    "Get": pb.GetRequest(key=key),
    "Stat": pb.StatRequest(key=key),
    "ListKeys": pb.ListKeysRequest(),
    "Evict": pb.EvictRequest(all=True),
    "Delete": pb.DeleteRequest(keys=[key]),
    "Status": pb.StatusRequest(),
    "Trim": pb.TrimRequest(workers=True),
    "Events": pb.EventsRequest(),
    "Attach": [pb.AttachRequest(hello=hello)],
}
forged = "w." + base64.urlsafe_b64encode(b"intruder").decode().rstrip("=") + "." + "0" * 64
credentials = {
    "no token": [],
    "made-up token": [("authorization", "Bearer " + "x" * 43)],
    "forged worker token": [("authorization", "Bearer " + forged)],
}
service = pb.DESCRIPTOR.services_by_name["MemctlService"]
results = {}
with grpc.insecure_channel(address) as channel:
    stub = pb_grpc.MemctlServiceStub(channel)
    for label, metadata in credentials.items():
        results[label] = {}
        for method in service.methods:
            request = requests.get(method.name)
            if request is None:
                request = getattr(pb, method.input_type.name)()
                request = [request] if method.client_streaming else request
            argument = iter(request) if method.client_streaming else request
            try:
                response = getattr(stub, method.name)(argument, metadata=metadata, timeout=10)
                if method.server_streaming:
                    response = list(response)
                results[label][method.name] = ["OK", repr(response)]
            except grpc.RpcError as exc:
                results[label][method.name] = [exc.code().name, exc.details() or ""]
print(json.dumps({"methods": [m.name for m in service.methods], "results": results}))
"""

#: As the other user: read the token file, list and stat in its directory.
FILE_SCRIPT = """
import errno, json, os, sys
path, directory = sys.argv[1:3]
def read():
    with open(path, "rb") as file:
        return file.read()
out = {}
for name, action in (("open", read), ("listdir", lambda: os.listdir(directory)),
                     ("stat", lambda: os.stat(path))):
    try:
        action()
        out[name] = ["ok", ""]
    except OSError as exc:
        out[name] = [type(exc).__name__, errno.errorcode.get(exc.errno, str(exc.errno))]
print(json.dumps(out))
"""

#: As the other user: try to move each directory given (so as to put one's own in its
#: place: a socket of one's own that root's clients would send their token and values
#: to), and to create an entry beside it.
HIJACK_SCRIPT = """
import errno, json, os, sys
out = {}
for directory in sys.argv[1:]:
    for label, action in (
        ("rename", lambda: os.rename(directory, directory + ".moved")),
        ("create beside", lambda: os.mkdir(directory + ".intruder")),
    ):
        try:
            action()
            out[f"{label} {directory}"] = ["ok", ""]
        except OSError as exc:
            out[f"{label} {directory}"] = [
                type(exc).__name__, errno.errorcode.get(exc.errno, str(exc.errno))
            ]
print(json.dumps(out))
"""


# --- running Python as the other user ------------------------------------------------------
def _switch_user_prefix() -> list[str]:
    """The argv prefix that runs a command as ``nobody`` with a clean environment;
    skips the test when that is impossible here."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to run commands as {OTHER_USER} (euid is {os.geteuid()})")
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.skip(f"no user {OTHER_USER!r} on this host")
    setpriv, runuser, env = shutil.which("setpriv"), shutil.which("runuser"), shutil.which("env")
    if env is None:
        pytest.skip("no env(1) to give the other user a clean environment")
    if setpriv is not None:
        switch = [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    elif runuser is not None:
        switch = [runuser, "-u", OTHER_USER, "--"]
    else:
        pytest.skip(f"neither setpriv nor runuser is installed to run as {OTHER_USER}")
    return [*switch, env, "-i", f"PATH={os.defpath}", "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1"]


def _works(python: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*python, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd="/", check=False
    )


def _copy_modules(destination: Path) -> None:
    """Copy the third-party and memctl modules the client imports into ``destination``,
    readable by everyone."""
    listing = subprocess.run(
        [sys.executable, "-c", NEEDED_MODULES], capture_output=True, text=True, check=True
    )
    needed = json.loads(listing.stdout)
    modules: dict[str, list[str]] = needed["modules"]
    ignore = shutil.ignore_patterns("__pycache__")
    for name, paths in modules.items():
        for source in map(Path, paths):
            if source.is_dir():
                shutil.copytree(source, destination / name, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(source, destination / source.name)
    for metadata in map(Path, needed["metadata"]):
        shutil.copytree(metadata, destination / metadata.name, dirs_exist_ok=True)
    for root, directories, files in os.walk(destination):
        for directory in directories:
            os.chmod(os.path.join(root, directory), 0o755)
        for file in files:
            path = os.path.join(root, file)
            os.chmod(
                path, os.stat(path).st_mode | 0o444 | (0o111 if os.access(path, os.X_OK) else 0)
            )
    destination.chmod(0o755)


def _interpreters() -> list[str]:
    """Interpreters that can load the copied packages (same Python version, so the
    same extension ABI): the one behind this virtualenv, then the system's."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [os.path.realpath(getattr(sys, "_base_executable", sys.executable))]
    system = shutil.which(version, path=os.defpath)
    if system is not None and os.path.realpath(system) not in found:
        found.append(os.path.realpath(system))
    return found


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[list[str]]:
    """The argv prefix that runs, as ``nobody``, a Python that imports grpc and memctl:
    this interpreter if ``nobody`` can use it, else an interpreter of the same version
    with the needed packages copied to a world-readable directory (removed at the end)."""
    switch = _switch_user_prefix()
    uid = str(pwd.getpwnam(OTHER_USER).pw_uid)
    direct = _works([*switch, sys.executable])
    if direct.returncode == 0 and direct.stdout.strip() == uid:
        yield [*switch, sys.executable]
        return
    failures = [f"{sys.executable} ({_last_line(direct.stderr)})"]
    copied = Path(tempfile.mkdtemp(prefix="memctl-other-user-python-", dir="/tmp"))
    try:
        _copy_modules(copied)
        for interpreter in _interpreters():
            python = [*switch, f"PYTHONPATH={copied}", interpreter]
            done = _works(python)
            if done.returncode == 0 and done.stdout.strip() == uid:
                break
            failures.append(f"{interpreter} with PYTHONPATH={copied} ({_last_line(done.stderr)})")
        else:
            pytest.skip(
                f"{OTHER_USER} can run no Python that imports grpc and memctl: "
                + "; ".join(failures)
            )
        yield python
    finally:
        shutil.rmtree(copied, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def run_as_other_user(
    python: list[str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` as the other user; with ``check``, it must succeed."""
    done = subprocess.run(
        [*python, *args], capture_output=True, text=True, timeout=120, cwd="/", check=False
    )
    if check:
        assert done.returncode == 0, f"the other user's script failed:\n{done.stderr}"
    return done


def script_result(python: list[str], script: str, *args: str) -> Any:
    """Run ``script`` as the other user; the JSON it printed."""
    return json.loads(run_as_other_user(python, "-c", script, *args).stdout)


# --- helpers for the daemon side -------------------------------------------------------------
@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block (and the processes it starts) under ``mask``."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def public_directory() -> Iterator[Path]:
    """A fresh directory of root's, mode 0755: any user may traverse it."""
    path = Path(tempfile.mkdtemp(prefix="memctl-other-user-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def token_path_of(daemon: Daemon) -> Path:
    """Where the daemon says it wrote its token (the line after its address)."""
    assert daemon.process.stdout is not None
    line = daemon.process.stdout.readline()
    assert line.startswith("memctl token in "), f"unexpected second line {line!r}"
    return Path(line.removeprefix("memctl token in ").strip())


def new_secret() -> tuple[str, bytes]:
    return f"secret-{secrets.token_hex(4)}", f"secret value {secrets.token_hex(16)}".encode()


# --- the tests -------------------------------------------------------------------------------
def test_unix_socket_is_closed_to_other_users_even_under_umask_000(
    nobody_python: list[str], public_directory: Path, spawn: Callable[..., Daemon]
) -> None:
    socket_path = public_directory / "memctl.sock"
    with umask(0):
        daemon = spawn(address=f"unix:{socket_path}")
    mode = socket_path.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, f"socket mode {stat.S_IMODE(mode):04o}"
    assert socket_path.lstat().st_uid == 0

    key, secret = new_secret()
    with Client(daemon.address) as client:
        client.put(key, secret)
        assert client.get(key) == secret
    token = find_token(daemon.address).token
    assert token is not None

    done = run_as_other_user(
        nobody_python, "-c", UNIX_SCRIPT, str(socket_path), daemon.address, key, token
    )
    assert secret.decode() not in done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["connect"] == ["PermissionError", "EACCES"]
    for method in ("Status", "Get"):
        assert result[method][0] == "UNAVAILABLE", result[method]

    with Client(daemon.address) as client:
        assert client.get(key) == secret
    assert daemon.stop() == 0


def test_every_rpc_over_tcp_needs_the_token(
    nobody_python: list[str], spawn: Callable[..., Daemon]
) -> None:
    daemon = spawn(address="127.0.0.1:0")
    token_path = token_path_of(daemon)
    key, secret = new_secret()
    with Client(daemon.address) as client:
        client.put(key, secret)

    done = run_as_other_user(nobody_python, "-c", TCP_SCRIPT, daemon.address, key)
    assert secret.decode() not in done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["methods"] == [method.name for method in SERVICE.methods]
    assert set(result["methods"]) >= METHODS
    for label, outcomes in result["results"].items():
        assert set(outcomes) == set(result["methods"]), label
        for method, (code, details) in outcomes.items():
            assert code == "UNAUTHENTICATED", f"{method} with {label}: {code} {details}"
            assert str(token_path) in details, f"{method} with {label}: {details}"
    assert set(result["results"]) == {"no token", "made-up token", "forged worker token"}

    with Client(daemon.address) as client:
        assert client.get(key) == secret  # nobody's Put and Delete changed nothing
        assert [info.key for info in client.list_keys()] == [key]
        assert [scope.name for scope in client.status().scopes] == ["service"]  # no Attach
    assert daemon.stop() == 0


@pytest.mark.parametrize("runtime", ["default", "fresh under umask 000"])
def test_token_file_is_root_only(
    runtime: str,
    nobody_python: list[str],
    public_directory: Path,
    spawn: Callable[..., Daemon],
) -> None:
    args: list[str] = []
    if runtime != "default":
        args = ["--set", f"runtime-directory={public_directory / 'run'}"]
    with umask(0) if runtime != "default" else contextlib.nullcontext():
        daemon = spawn(*args, address="127.0.0.1:0")
    token_path = token_path_of(daemon)
    directory = token_path.parent
    if runtime != "default":
        assert directory == public_directory / "run"
    assert token_path.name == token_file_name(daemon.address)

    info = token_path.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600, f"token file mode {info.st_mode:o}"
    assert info.st_uid == 0
    directory_info = directory.lstat()
    assert stat.S_ISDIR(directory_info.st_mode)
    assert stat.S_IMODE(directory_info.st_mode) == 0o700, f"{directory} {directory_info.st_mode:o}"
    assert directory_info.st_uid == 0
    token = token_path.read_text().strip()
    assert token

    done = run_as_other_user(nobody_python, "-c", FILE_SCRIPT, str(token_path), str(directory))
    assert token not in done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result == {
        "open": ["PermissionError", "EACCES"],
        "listdir": ["PermissionError", "EACCES"],
        "stat": ["PermissionError", "EACCES"],
    }

    status = run_as_other_user(
        nobody_python, "-m", "memctl", "status", "--address", daemon.address, check=False
    )
    assert status.returncode == 1, status
    assert status.stdout == ""
    assert "Traceback" not in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1, status.stderr
    assert "token" in status.stderr
    assert str(token_path) in status.stderr

    given = run_as_other_user(
        nobody_python,
        "-m",
        "memctl",
        "status",
        "--address",
        daemon.address,
        "--token-file",
        str(token_path),
        check=False,
    )
    assert given.returncode == 1, given
    assert "Traceback" not in given.stderr
    assert len(given.stderr.strip().splitlines()) == 1, given.stderr
    assert "cannot read the memctl token" in given.stderr
    assert "Permission denied" in given.stderr
    assert token not in given.stdout + given.stderr

    assert daemon.stop() == 0
    assert not token_path.exists()  # removed at a clean shutdown


def test_paths_made_under_umask_000_cannot_be_taken_over(
    nobody_python: list[str], public_directory: Path, spawn: Callable[..., Daemon]
) -> None:
    """The directories the daemon makes for its socket and token file, and every missing
    parent it makes on the way, are closed to other users whatever the umask: else
    another user could move the socket's directory away and listen in its place,
    receiving root's clients' token and values."""
    socket_directory = public_directory / "sockets" / "memctl"
    runtime_directory = public_directory / "runtime" / "memctl"
    with umask(0):
        daemon = spawn(
            "--set",
            f"runtime-directory={runtime_directory}",
            address=f"unix:{socket_directory / 'memctl.sock'}",
        )
    token_path = token_path_of(daemon)
    assert token_path.parent == runtime_directory
    made = [
        socket_directory.parent,
        socket_directory,
        runtime_directory.parent,
        runtime_directory,
    ]
    modes = {str(path): f"{stat.S_IMODE(path.lstat().st_mode):04o}" for path in made}

    result = script_result(
        nobody_python, HIJACK_SCRIPT, str(socket_directory), str(runtime_directory)
    )
    assert len(result) == 4
    denied = ["PermissionError", "EACCES"]
    assert result == {attempt: denied for attempt in result}, (result, modes)
    assert all(int(mode, 8) & 0o022 == 0 for mode in modes.values()), modes

    with Client(daemon.address, token_file=token_path) as client:
        assert client.status().scopes[0].name == "service"
    assert daemon.stop() == 0
