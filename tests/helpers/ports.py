"""A free local TCP port, for the servers and process groups tests start (moto, the fault
proxy, torchrun's rendezvous)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port no one listens on now (the OS's pick for port 0). Another process may take it
    before the caller binds it; the tests that start servers live with that rare race."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
