"""A test worker that attaches, then never sends a heartbeat: a held worker thread.

``python mute.py ADDRESS WORKER_ID PID [--report-rss]`` says hello with PID (``self``
for its own), sends one heartbeat carrying its RSS if ``--report-rss`` (a worker
in another PID namespace), prints ``attached`` once it has its session, then stays
alive and silent, reading commands, until killed (also after the stream ends).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import grpc
import psutil

from memctl.auth import call_metadata
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc


def main(address: str, worker_id: str, pid_text: str, *flags: str) -> None:
    pid = os.getpid() if pid_text == "self" else int(pid_text)
    messages = [pb.AttachRequest(hello=pb.Hello(worker_id=worker_id, pid=pid, nthreads=1))]
    if "--report-rss" in flags:
        rss = psutil.Process().memory_info().rss
        messages.append(pb.AttachRequest(heartbeat=pb.Heartbeat(rss=rss)))

    def requests() -> Iterator[pb.AttachRequest]:
        yield from messages
        threading.Event().wait()  # silent from here on

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        responses = stub.Attach(requests(), metadata=call_metadata(address))
        for response in responses:
            if response.WhichOneof("kind") == "session":
                print("attached", flush=True)
    threading.Event().wait()  # alive after the stream ends, until killed


if __name__ == "__main__":
    main(*sys.argv[1:])
