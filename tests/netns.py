"""Several hosts on one machine: network namespaces on a bridge, links shaped with tc, cut at will.

Each `Host` is a network namespace with one interface, `eth0`, addressed in 198.18.0.0/24 (part of
198.18.0.0/15, the range set aside for benchmarking networks). Its cable is a veth pair whose other
end sits on a bridge inside a separate "switch" namespace. Nothing is added to the root
namespace and the switch has no uplink, so no packet can leave these namespaces; closing the
`Network` deletes them all (and a later run deletes any that a killed run left behind).

* `rate="1gbit"` shapes the host's link both ways with a token bucket (`tc qdisc ... tbf`; netem
  is not in every kernel, tbf is).
* `network.cut(host)` / `network.restore(host)` set the switch end of its cable down / up: the host's
  packets vanish without a reset, as when a cable is pulled or a machine loses power.
* Names resolve as on a cluster: every host's /etc/hosts (ip netns exec mounts
  /etc/netns/NAME/hosts over it) lists every host name, and `alias(name, hosts)` adds a name with
  several addresses, like a headless Service's DNS record.
* `host.popen(argv)` runs a process inside the host.

Needs root and iproute2; `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "fluxmesh-t"  # every namespace these tests make starts with it, then the owner's pid
SUBNET = "198.18.0"
NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (for pytest.skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _remove_stale() -> None:
    """Namespaces left by a test run that was killed before it could clean up."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        if not name.startswith(PREFIX):
            continue
        owner = name.removeprefix(PREFIX).split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _ip("netns", "del", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    cable: str  # the switch end of its veth pair
    processes: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: Sequence[str], *, log: Path | None = None, **kwargs) -> subprocess.Popen:
        """Start `argv` inside this host (own session, so stopping it stops its children)."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *argv],
            stdout=kwargs.pop("stdout", out),
            stderr=kwargs.pop("stderr", subprocess.STDOUT),
            start_new_session=True,
            **kwargs,
        )
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )


def _burst(rate: str) -> str:
    """A bucket holding 10 ms of traffic (at least 64 KiB, one GSO packet): tbf needs room for a
    timer tick's worth, or it shapes below the rate."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    number, unit = next((rate[: -len(u)], u) for u in units if rate.endswith(u))
    bytes_per_second = float(number) * units[unit] / 8
    return str(max(int(bytes_per_second / 100), 65536))


class Network:
    """A switch and the hosts plugged into it; `close()` removes everything."""

    def __init__(self) -> None:
        _remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.aliases: dict[str, list[str]] = {}
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def host(self, name: str, *, rate: str | None = None) -> Host:
        number = len(self.hosts) + 2
        namespace = f"{self.tag}-{name}"
        cable = f"port{number}"
        _ip("netns", "add", namespace)
        _ip("link", "add", cable, "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.switch, "link", "set", cable, "master", "br0", "up")
        address = f"{SUBNET}.{number}"
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        if rate is not None:
            for ns, device in ((namespace, "eth0"), (self.switch, cable)):  # both directions
                subprocess.run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        device,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        _burst(rate),
                        "latency",
                        "50ms",
                    ],
                    check=True,
                    capture_output=True,
                )
        host = Host(name, namespace, address, cable)
        self.hosts[name] = host
        self._write_hosts_files()
        return host

    def alias(self, name: str, hosts: Sequence[Host]) -> None:
        """`name` resolves to every one of `hosts`' addresses (a headless Service's record)."""
        self.aliases[name] = [h.address for h in hosts]
        self._write_hosts_files()

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1 localhost"]
        lines += [f"{h.address} {h.name}" for h in self.hosts.values()]
        lines += [f"{address} {name}" for name, addresses in self.aliases.items() for address in addresses]
        for host in self.hosts.values():
            folder = NETNS_ETC / host.namespace
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def cut(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.cable, "down")

    def restore(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.cable, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + 10
        for host in self.hosts.values():
            for process in host.processes:
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)
        for host in self.hosts.values():
            _ip("netns", "del", host.namespace, check=False)
            shutil.rmtree(NETNS_ETC / host.namespace, ignore_errors=True)
        _ip("netns", "del", self.switch, check=False)

    def __enter__(self) -> Network:  # noqa: PYI034 (final class in practice)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
