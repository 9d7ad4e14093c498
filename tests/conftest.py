"""Shared test configuration.

No network during unit tests: an autouse fixture makes every socket connection (and every name
lookup or datagram) to anything but the loopback interface or a Unix socket raise
:class:`NetworkAccessBlocked`, and fails the test even when the code under test swallowed that
error.  Loopback stays open, so Jupyter kernels (ZMQ on 127.0.0.1), Gloo process groups, local
HTTP servers and headless browsers keep working; subprocesses are not affected.
"""
import ipaddress
import socket

import pytest

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


class NetworkAccessBlocked(RuntimeError):
    """A unit test tried to reach the network (only loopback and Unix sockets are allowed)."""


def _is_local_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0].strip("[]").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == socket.gethostname().lower()  # resolved from /etc/hosts, not by DNS
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or (mapped is not None and mapped.is_loopback)


def _is_local_address(family, address) -> bool:
    if family == getattr(socket, "AF_UNIX", object()) or isinstance(address, (str, bytes)):
        return True  # a Unix socket path
    if isinstance(address, tuple) and address:
        return _is_local_host(address[0])
    return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Block non-loopback network access for the duration of each test (see the module docstring)."""
    attempts = []

    def refuse(what, target):
        attempts.append(f"{what} {target!r}")
        raise NetworkAccessBlocked(f"network access during unit tests is not allowed: {what} {target!r} "
                                   f"(only loopback and Unix sockets are)")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_create = socket.socket.sendto, socket.create_connection
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if not _is_local_address(self.family, address):
            refuse("connect to", address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _is_local_address(self.family, address):
            refuse("connect_ex to", address)
        return real_connect_ex(self, address)

    def sendto(self, data, *args):
        address = args[-1] if args else None
        if not _is_local_address(self.family, address):
            refuse("sendto", address)
        return real_sendto(self, data, *args)

    def create_connection(address, *args, **kwargs):
        if not _is_local_address(socket.AF_INET, address):
            refuse("create_connection to", address)
        return real_create(address, *args, **kwargs)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local_host(host):
            refuse("name lookup of", host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    if attempts:
        pytest.fail("the test tried to reach the network (even if it caught the error): " + "; ".join(attempts),
                    pytrace=False)
