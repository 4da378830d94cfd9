#!/usr/bin/env python3
"""bench/cluster.py: how fast a Fulcrum cluster notices and spreads things, and what
clustering costs the proxy.

Five measurements, each over real processes on 127.0.0.1 with free ports (the release
`fulcrum` binary for nodes and backend simulators, `redis-server`, and for the
throughput part an upstream nginx and `wrk`):

1. detect     dead-node detection: kill -9 one of 3 nodes; time until both others list
              it `failed` (gossip 200 ms / phi 8, the defaults, and 100 ms / 6.0, the
              end-to-end tests' setting);
2. health     backend failure propagation: only node-1 health-checks (200 ms, fall 2);
              kill the backend; time until node-1, then all 3 nodes, report it
              `unhealthy`; once every peer's views count, and 1 s after the cluster
              formed (inside the health merge's rejoin grace);
3. failover   leader failover with Redis (lease_ttl 3 s and 2 s): kill -9 the leader;
              time until a survivor reports another leader, and the fencing tokens;
4. config     config propagation (redis and none): `POST .../strategy?consistency=async`
              on node-1, time until nodes 2 and 3 report the new strategy; latency of a
              `?consistency=all` write;
5. throughput one node with clustering on (3 nodes, redis) vs off (same config without
              `cluster:`), wrk against 3 upstreams, rounds interleaved, req/s and
              requests per proxy CPU-second, plus the one-connection latency floor.

Each timing is repeated --reps times (default 5); the median and the max are reported.
Times are taken with a monotonic clock from just before the kill (or the POST) to the
first admin-API response that shows the new state, polled every 20 ms (1 ms for config
propagation), so each figure carries up to one poll interval plus one admin round trip
(measured and printed as the observation floor).

The throughput part first waits (up to --quiet-wait) for a 1-minute load average below
--max-load, starts each round on a machine idle but for this script, and discards and
reruns a round in which a proxy did not get its CPU (another tenant's job on CPU 0).

Usage:   cargo build --release -p fulcrum && python3 bench/cluster.py
         python3 bench/cluster.py --only detect,failover --reps 3
Options: python3 bench/cluster.py --help

Output: markdown tables on stdout; the same plus every per-repetition value in
bench/results/cluster-<timestamp>.{md,json} (git-ignored). Every process started here
is stopped on exit, on error and on Ctrl-C (and killed by the kernel if this script is
killed: PR_SET_PDEATHSIG).

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = 0  # the node under test, alone (as bench/compare.sh)
LOAD_CPU = 1  # wrk, the upstream nginx, redis and the two other nodes
DEADLINE = 30.0  # longest wait for anything to happen, seconds
POLL = 0.020
CONFIG_POLL = 0.001
# Throughput: a run whose proxy got less than this share of its CPU was disturbed by
# another process on that CPU (undisturbed runs get 0.93-0.99 on this VM).
STARVED = 0.85
# Throughput: machine-wide busy cores, measured between runs while ours idle, below which
# the machine counts as quiet.
IDLE_BUSY = 0.2


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of the benchmark could not be carried out; the message says which."""


# ------------------------------------------------------------------------------------
# Processes


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """Runs in the child before exec: die with this script (PR_SET_PDEATHSIG = SIGKILL,
    so even `kill -9` of the script leaves nothing behind), and pin to `cpu`."""

    parent = os.getpid()

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the script died before prctl took effect
            os._exit(1)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


class Procs:
    """Every process this script started, so that all of them are stopped on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.live: list[subprocess.Popen] = []
        self.seq = 0

    def spawn(self, label: str, argv: list[str], cpu: int | None = None) -> tuple[subprocess.Popen, Path, Path]:
        """Starts `argv` with stdout and stderr in files of the temp dir; returns the
        process and the two file paths."""
        self.seq += 1
        out = self.tmp / f"{self.seq:03d}-{label}.out"
        err = self.tmp / f"{self.seq:03d}-{label}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            # A new session: a Ctrl-C on the terminal reaches this script only, which then
            # stops its children in order.
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                start_new_session=True,
                preexec_fn=_child_setup(cpu),
            )
        self.live.append(p)
        return p, out, err

    def kill9(self, p: subprocess.Popen) -> None:
        """SIGKILL, as a crash."""
        p.kill()
        p.wait()
        self.forget(p)

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.forget(p)

    def forget(self, p: subprocess.Popen) -> None:
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(self.live):
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + 3.0
        for p in list(self.live):
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.live.clear()


def ready_line(p: subprocess.Popen, out: Path, err: Path, label: str, timeout: float = DEADLINE) -> dict:
    """The first JSON line a `fulcrum` command prints once listening."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = out.read_text(errors="replace")
        if "\n" in text:
            try:
                return json.loads(text.split("\n", 1)[0])
            except json.JSONDecodeError as e:
                raise BenchError(f"{label}: unreadable ready line {text[:200]!r}") from e
        if p.poll() is not None:
            raise BenchError(f"{label} exited with {p.returncode} during startup: {tail(err)}")
        time.sleep(0.02)
    raise BenchError(f"{label} printed no ready line within {timeout:.0f} s: {tail(err)}")


def tail(path: Path, n: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free port on 127.0.0.1 (bound, then released for the child to take)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------
# HTTP


class Admin:
    """A keep-alive HTTP/1.1 client of one node's admin API."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=DEADLINE)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
                self.close()
                if attempt == 2:
                    raise BenchError(f"{method} {path} on {self.host}:{self.port}: {e}") from e
        raise AssertionError("unreachable")

    def get(self, path: str) -> dict:
        status, body = self.request("GET", path)
        if status != 200:
            raise BenchError(f"GET {path} on {self.host}:{self.port}: {status} {body}")
        return body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def http_body(addr: str) -> tuple[int, str]:
    """Status and body of one `GET /` on a fresh connection."""
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        c.request("GET", "/", headers={"host": "bench.local"})
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace").strip()
    finally:
        c.close()


# ------------------------------------------------------------------------------------
# Fulcrum processes


@dataclass
class Backend:
    """A `fulcrum backend` simulator."""

    proc: subprocess.Popen
    address: str


@dataclass
class Node:
    """A `fulcrum run` process."""

    node_id: str
    proc: subprocess.Popen
    admin: Admin
    web: str


@dataclass
class Gossip:
    interval: str = "200ms"
    phi: float = 8.0


@dataclass
class Coordination:
    kind: str = "none"  # none | redis
    url: str = ""
    lease_ttl: str = "3s"

    def yaml(self) -> str:
        if self.kind == "none":
            return "    backend: none\n"
        return f"    backend: redis\n    url: {self.url}\n    lease_ttl: {self.lease_ttl}\n"


class Bench:
    """Starts and stops the processes of one run."""

    def __init__(self, procs: Procs, binary: Path) -> None:
        self.procs = procs
        self.bin = str(binary)

    def backend(self, name: str, listen: str = "127.0.0.1:0") -> Backend:
        p, out, err = self.procs.spawn(f"backend-{name}", [self.bin, "backend", "--listen", listen, "--name", name])
        ready = ready_line(p, out, err, f"backend {name}")
        return Backend(p, ready["address"])

    def node(self, node_id: str, yaml: str, cpu: int | None = None) -> Node:
        path = self.procs.tmp / f"{node_id}-{self.procs.seq + 1:03d}.yaml"
        path.write_text(yaml)
        check = subprocess.run([self.bin, "check", "--config", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"{node_id}: config rejected: {check.stderr.strip()}")
        p, out, err = self.procs.spawn(node_id, [self.bin, "run", "--config", str(path), "--threads", "1"], cpu)
        ready = ready_line(p, out, err, node_id)
        web = next(item["listen"] for item in ready["listeners"] if item["name"] == "web")
        return Node(node_id, p, Admin(ready["admin"]), web)

    def redis(self, cpu: int | None = None) -> tuple[subprocess.Popen, str]:
        port = free_port()
        p, _, err = self.procs.spawn(
            "redis",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
            cpu,
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if p.poll() is not None:
                raise BenchError(f"redis-server exited: {tail(err)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return p, f"redis://127.0.0.1:{port}"
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError(f"redis-server did not answer PING on :{port} within 10 s")


def pool_yaml(backends: list[str], extra: str = "") -> str:
    entries = "".join(f"      - address: {a}\n" for a in backends)
    return f"pools:\n  app:\n    strategy: round_robin\n    backends:\n{entries}{extra}"


def node_yaml(
    node_id: str | None,
    backends: list[str],
    *,
    gossip_port: int = 0,
    seeds: list[int] | None = None,
    gossip: Gossip | None = None,
    coordination: Coordination | None = None,
    pool_extra: str = "",
    level: str = "info",
) -> str:
    """One node's configuration; `node_id=None` leaves out the `cluster:` block."""
    text = (
        "runtime: { drain_timeout: 1s }\n"
        f"log: {{ level: {level} }}\n"
        "admin: { listen: 127.0.0.1:0 }\n"
        "listeners:\n"
        "  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\n"
        + pool_yaml(backends, pool_extra)
    )
    if node_id is None:
        return text
    g = gossip or Gossip()
    c = coordination or Coordination()
    seed_list = ", ".join(f"127.0.0.1:{p}" for p in (seeds or []))
    return text + (
        "cluster:\n"
        f"  node_id: {node_id}\n"
        "  gossip:\n"
        f"    listen: 127.0.0.1:{gossip_port}\n"
        f"    seeds: [{seed_list}]\n"
        f"    interval: {g.interval}\n"
        f"    phi_threshold: {g.phi}\n"
        "  coordination:\n" + c.yaml()
    )


class Cluster:
    """Three (or `n`) nodes gossiping on 127.0.0.1, each seeded with all the others."""

    def __init__(
        self,
        bench: Bench,
        backends: list[str],
        *,
        n: int = 3,
        gossip: Gossip | None = None,
        coordination: Coordination | None = None,
        pool_extra: list[str] | None = None,
        cpus: list[int | None] | None = None,
        level: str = "info",
    ) -> None:
        self.bench = bench
        ports = [free_port(socket.SOCK_DGRAM) for _ in range(n)]
        self.nodes: list[Node | None] = []
        for i in range(n):
            yaml = node_yaml(
                f"node-{i + 1}",
                backends,
                gossip_port=ports[i],
                seeds=[p for p in ports if p != ports[i]],
                gossip=gossip,
                coordination=coordination,
                pool_extra=(pool_extra or [""] * n)[i],
                level=level,
            )
            self.nodes.append(bench.node(f"node-{i + 1}", yaml, (cpus or [None] * n)[i]))

    def node(self, i: int) -> Node:
        n = self.nodes[i]
        if n is None:
            raise BenchError(f"node-{i + 1} is not running")
        return n

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n is not None]

    def kill9(self, i: int) -> None:
        n = self.node(i)
        n.admin.close()
        self.bench.procs.kill9(n.proc)
        self.nodes[i] = None

    def stop(self) -> None:
        for n in self.running():
            n.admin.close()
            self.bench.procs.stop(n.proc)
        self.nodes = [None] * len(self.nodes)

    def wait_all_alive(self) -> None:
        count = len(self.nodes)
        for n in self.running():
            eventually(f"{n.node_id} lists {count} nodes alive", lambda n=n: alive_count(n) == count)


def members(n: Node) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in n.admin.get("/api/cluster/nodes")["nodes"]}


def alive_count(n: Node) -> int:
    return sum(1 for s in members(n).values() if s == "alive")


def backend_state(n: Node, address: str) -> str:
    for b in n.admin.get("/api/pools/app/backends")["backends"]:
        if b["address"] == address:
            return b["state"]
    raise BenchError(f"{n.node_id} does not list backend {address}")


def leader(n: Node) -> tuple[str | None, int | None]:
    v = n.admin.get("/api/cluster/leader")
    return v.get("leader"), v.get("token")


def strategy(n: Node) -> str:
    return n.admin.get("/api/pools/app")["strategy"]


def eventually(what: str, check: Callable[[], bool], timeout: float = DEADLINE, poll: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > end:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for: {what}")
        time.sleep(poll)


def first_seen(t0: float, checks: dict[str, Callable[[], bool]], poll: float, timeout: float = DEADLINE) -> dict[str, float]:
    """Polls every check each `poll` seconds; returns, per check, seconds from `t0` to the
    first response that satisfied it (the response's arrival time)."""
    seen: dict[str, float] = {}
    while len(seen) < len(checks):
        start = time.monotonic()
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            missing = ", ".join(k for k in checks if k not in seen)
            raise BenchError(f"not seen within {timeout:.0f} s: {missing}")
        time.sleep(max(0.0, start + poll - time.monotonic()))
    return seen


# ------------------------------------------------------------------------------------
# Statistics and machine state


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_s(duration: str) -> float:
    """Seconds of a config duration written as `200ms` or `3s`."""
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1e3
    if duration.endswith("s"):
        return float(duration[:-1])
    raise ValueError(f"unsupported duration {duration!r}")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def busiest(ours: Procs | None = None) -> str:
    """The other processes with the highest CPU share (ps: CPU time ÷ lifetime), to say
    who makes the machine busy; processes this script started are left out."""
    mine = {p.pid for p in ours.live} if ours else set()
    out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.strip().splitlines()]
    others = [f"{comm} {pcpu}%" for pid, pcpu, comm in rows if int(pid) not in mine and int(pid) != os.getpid()]
    return ", ".join(others[:4])


def proc_ticks(pid: int) -> int:
    """utime + stime of `pid` (all its threads), in clock ticks. Field 2 may hold spaces,
    so the fields are split after the last ')'."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(busy, steal) jiffies of one CPU: busy = user + nice + system + irq + softirq."""
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0] == f"cpu{cpu}":
            return int(f[1]) + int(f[2]) + int(f[3]) + int(f[6]) + int(f[7]), int(f[8])
    raise BenchError(f"cpu{cpu} not in /proc/stat")


def vm_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def observation_floor(n: Node, path: str) -> float:
    """Median seconds of one admin GET of `path`: what every timing includes at least."""
    times = []
    for _ in range(30):
        t = time.monotonic()
        n.admin.get(path)
        times.append(time.monotonic() - t)
    return med(times)


# ------------------------------------------------------------------------------------
# 1. Dead-node detection


def bench_detect(bench: Bench, reps: int, results: dict) -> None:
    b = bench.backend("d1")
    out = results["detect"] = {}
    for label, g in [("defaults", Gossip("200ms", 8.0)), ("tests", Gossip("100ms", 6.0))]:
        rows = out[label] = {"interval": g.interval, "phi": g.phi, "reps": []}
        for rep in range(1, reps + 1):
            cluster = Cluster(bench, [b.address], gossip=g)
            try:
                cluster.wait_all_alive()
                # Steady state: the failure detector has real heartbeat samples, not only its
                # prior; then a random phase against the gossip rounds.
                time.sleep(3.0 + random.uniform(0, parse_s(g.interval)))
                watchers = [cluster.node(0), cluster.node(1)]
                if rep == 1:
                    rows["admin_get_s"] = observation_floor(watchers[0], "/api/cluster/nodes")
                t0 = time.monotonic()
                cluster.kill9(2)
                seen = first_seen(
                    t0,
                    {n.node_id: (lambda n=n: members(n).get("node-3") == "failed") for n in watchers},
                    POLL,
                )
                row = {"first": min(seen.values()), "both": max(seen.values()), "per_node": seen}
                rows["reps"].append(row)
                log(f"detect {label} rep {rep}: node-3 failed on both after {row['both']:.3f} s (first {row['first']:.3f} s)")
            except BenchError as e:
                rows["reps"].append({"error": str(e)})
                log(f"detect {label} rep {rep}: FAILED: {e}")
            finally:
                cluster.stop()
    bench.procs.stop(b.proc)


# ------------------------------------------------------------------------------------
# 2. Backend failure propagation


# A peer's backend views count in the health merge only once it has been alive for the
# "rejoin grace" (runtime.rs `rejoin_grace`): at most 10 × publish_interval (1 s by
# default), which node-2 and node-3 reach here because their own checks run hourly.
REJOIN_GRACE_MAX = 10.0


def bench_health(bench: Bench, reps: int, results: dict) -> None:
    # Only node-1 checks actively; node-2 and node-3 check once an hour, so they can learn
    # of the failure only through the cluster (as in tests/cluster.rs).
    fast = "    health_check: { path: /health, interval: 200ms, timeout: 150ms, rise: 1, fall: 2 }\n"
    slow = (
        "    health_check: { path: /health, interval: 1h, timeout: 1s, rise: 1, fall: 2 }\n"
        "    outlier_detection: { consecutive_failures: 1000 }\n"
    )
    out = results["health"] = {"interval": "200ms", "fall": 2, "gossip": "200ms / phi 8"}
    # `steady`: the backend dies once every peer's views count; `formed`: 1 s after the
    # cluster formed, inside the rejoin grace, as in tests/cluster.rs.
    for variant, settle in [("steady", REJOIN_GRACE_MAX + 1.0), ("formed", 1.0)]:
        rows = out[variant] = []
        for rep in range(1, reps + 1):
            # A fresh cluster per repetition, so the phases of the nodes' timers differ.
            b1 = bench.backend("h1")
            b2 = bench.backend("h2")
            cluster = None
            try:
                cluster = Cluster(bench, [b1.address, b2.address], pool_extra=[fast, slow, slow])
                cluster.wait_all_alive()
                if "admin_get_s" not in out:
                    out["admin_get_s"] = observation_floor(cluster.node(0), "/api/pools/app/backends")
                for n in cluster.running():
                    eventually(f"{n.node_id} sees {b2.address} healthy", lambda n=n: backend_state(n, b2.address) == "healthy")
                time.sleep(settle + random.uniform(0, 0.2))
                t0 = time.monotonic()
                bench.procs.kill9(b2.proc)
                seen = first_seen(
                    t0,
                    {n.node_id: (lambda n=n: backend_state(n, b2.address) == "unhealthy") for n in cluster.running()},
                    POLL,
                )
                local = seen["node-1"]
                everywhere = max(seen.values())
                rows.append({"local": local, "all": everywhere, "cluster_share": everywhere - local, "per_node": seen})
                log(f"health {variant} rep {rep}: node-1 {local:.3f} s, all 3 {everywhere:.3f} s")
            except BenchError as e:
                rows.append({"error": str(e)})
                log(f"health {variant} rep {rep}: FAILED: {e}")
            finally:
                if cluster is not None:
                    cluster.stop()
                bench.procs.stop(b1.proc)
                bench.procs.stop(b2.proc)


# ------------------------------------------------------------------------------------
# 3. Leader failover with Redis


def bench_failover(bench: Bench, reps: int, results: dict) -> None:
    b = bench.backend("f1")
    out = results["failover"] = {}
    for ttl in ["3s", "2s"]:
        rows = out[ttl] = {"reps": []}
        for rep in range(1, reps + 1):
            # A fresh Redis per repetition: no lease or token left from the previous one.
            redis, url = bench.redis()
            cluster = None
            try:
                cluster = Cluster(bench, [b.address], coordination=Coordination("redis", url, ttl))
                cluster.wait_all_alive()
                agreed: dict[str, tuple[str | None, int | None]] = {}

                def all_agree() -> bool:
                    for n in cluster.running():
                        agreed[n.node_id] = leader(n)
                    views = set(agreed.values())
                    return len(views) == 1 and None not in next(iter(views))

                eventually("every node agrees on a leader with a token", all_agree)
                old, token = next(iter(agreed.values()))
                # A random phase against the leader's renewals (every ttl/3).
                time.sleep(1.0 + random.uniform(0, parse_s(ttl) / 3))
                index = int(old.removeprefix("node-")) - 1
                survivors = [n for i, n in enumerate(cluster.running()) if i != index]
                new: dict[str, tuple[str, int]] = {}

                def changed(n: Node) -> bool:
                    lead, tok = leader(n)
                    if lead is not None and lead != old:
                        new[n.node_id] = (lead, tok)
                        return True
                    return False

                t0 = time.monotonic()
                cluster.kill9(index)
                seen = first_seen(t0, {n.node_id: (lambda n=n: changed(n)) for n in survivors}, POLL)
                first_node = min(seen, key=seen.get)
                successor, new_token = new[first_node]
                row = {
                    "first": min(seen.values()),
                    "both": max(seen.values()),
                    "old": old,
                    "new": successor,
                    "token_before": token,
                    "token_after": new_token,
                    "agree": len({v for v in new.values()}) == 1,
                }
                rows["reps"].append(row)
                log(
                    f"failover ttl {ttl} rep {rep}: {old} (token {token}) -> {successor} (token {new_token}) "
                    f"first seen {row['first']:.3f} s, both {row['both']:.3f} s"
                )
            except BenchError as e:
                rows["reps"].append({"error": str(e)})
                log(f"failover ttl {ttl} rep {rep}: FAILED: {e}")
            finally:
                if cluster is not None:
                    cluster.stop()
                bench.procs.stop(redis)
    bench.procs.stop(b.proc)


# ------------------------------------------------------------------------------------
# 4. Config propagation


def bench_config(bench: Bench, reps: int, results: dict) -> None:
    out = results["config"] = {}
    for kind in ["redis", "none"]:
        rows = out[kind] = {"reps": []}
        for rep in range(1, reps + 1):
            # A fresh cluster (and Redis) per repetition, so the phases of the nodes'
            # gossip and publication timers differ each time.
            b1 = bench.backend("c1")
            b2 = bench.backend("c2")
            redis = None
            cluster = None
            try:
                coordination = Coordination()
                if kind == "redis":
                    redis, url = bench.redis()
                    coordination = Coordination("redis", url)
                cluster = Cluster(bench, [b1.address, b2.address], coordination=coordination)
                cluster.wait_all_alive()
                n1 = cluster.node(0)
                others = cluster.running()[1:]
                if rep == 1:
                    rows["admin_get_s"] = observation_floor(others[0], "/api/pools/app")
                time.sleep(1.0 + random.uniform(0, 0.2))
                target = "p2c"
                t0 = time.monotonic()
                status, body = n1.admin.request("POST", "/api/pools/app/strategy?consistency=async", {"strategy": target})
                post_s = time.monotonic() - t0
                if status != 200:
                    raise BenchError(f"async write answered {status}: {body}")
                seen = first_seen(t0, {n.node_id: (lambda n=n: strategy(n) == target) for n in others}, CONFIG_POLL)
                # Before the next write, every node reports the first one's version, so the
                # `all` write waits for itself only.
                version = body["write"]["version"]
                for n in others:
                    eventually(
                        f"node-1 sees {n.node_id} at version {version}",
                        lambda n=n: any(
                            m["node_id"] == n.node_id and m["config_version"] >= version
                            for m in n1.admin.get("/api/cluster/nodes")["nodes"]
                        ),
                    )
                time.sleep(0.5 + random.uniform(0, 0.2))
                target = "least_connections"
                t1 = time.monotonic()
                status, body = n1.admin.request("POST", "/api/pools/app/strategy?consistency=all", {"strategy": target})
                all_s = time.monotonic() - t1
                acked = len(body.get("write", {}).get("acknowledged", [])) if status == 200 else 0
                if status != 200 or acked != 3:
                    raise BenchError(f"consistency=all write answered {status}: {body}")
                # Acknowledged by all 3 should mean all 3 run it now.
                lagging = [n.node_id for n in others if strategy(n) != target]
                row = {
                    "async_post": post_s,
                    "node2": seen["node-2"],
                    "node3": seen["node-3"],
                    "both": max(seen.values()),
                    "all_write": all_s,
                    "version": body["write"]["version"],
                    "acknowledged_but_not_applied": lagging,
                }
                rows["reps"].append(row)
                log(
                    f"config {kind} rep {rep}: async POST {post_s * 1e3:.1f} ms, nodes 2+3 "
                    f"{row['both'] * 1e3:.1f} ms; consistency=all {all_s * 1e3:.1f} ms"
                    + (f" (acknowledged but not applied on {lagging})" if lagging else "")
                )
            except BenchError as e:
                rows["reps"].append({"error": str(e)})
                log(f"config {kind} rep {rep}: FAILED: {e}")
            finally:
                if cluster is not None:
                    cluster.stop()
                if redis is not None:
                    bench.procs.stop(redis)
                bench.procs.stop(b1.proc)
                bench.procs.stop(b2.proc)


# ------------------------------------------------------------------------------------
# 5. Proxy throughput, clustering on vs off


def wait_quiet(max_load: float, max_wait: float) -> dict:
    """Waits until the 1-minute load average is below `max_load`, up to `max_wait` s."""
    start = time.monotonic()
    first = loadavg()
    while True:
        if load1() < max_load:
            return {"quiet": True, "waited_s": round(time.monotonic() - start), "load_at_check": first, "load_at_start": loadavg()}
        waited = time.monotonic() - start
        if waited >= max_wait:
            return {
                "quiet": False,
                "waited_s": round(waited),
                "load_at_check": first,
                "load_at_start": loadavg(),
                "busiest": busiest(),
            }
        log(f"load average {loadavg()} (want < {max_load}); busiest: {busiest()}; waiting ({waited:.0f}/{max_wait:.0f} s)")
        time.sleep(15)


def machine_busy(seconds: float = 2.0) -> float:
    """Busy cores of the whole machine over `seconds` (user + nice + system + irq +
    softirq of all CPUs). Unlike the load average it does not remember our own runs."""

    def busy() -> int:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(f[1]) + int(f[2]) + int(f[3]) + int(f[6]) + int(f[7])

    b0 = busy()
    time.sleep(seconds)
    return (busy() - b0) / CLK_TCK / seconds


def wait_idle(until: float, ours: Procs) -> float:
    """Waits until the machine is idle but for us (< IDLE_BUSY cores), at most until the
    monotonic time `until`; returns the last busy figure."""
    while True:
        b = machine_busy()
        if b < IDLE_BUSY or time.monotonic() >= until:
            return b
        log(f"machine busy ({b:.2f} cores; busiest: {busiest(ours)}); waiting before the next round")
        time.sleep(5)


def upstream_nginx(bench: Bench, tmp: Path) -> tuple[subprocess.Popen, list[str]]:
    """One nginx process serving three servers with a distinct 5-byte body each (the
    upstream of bench/compare.sh, on free ports)."""
    d = tmp / "upstream"
    d.mkdir(exist_ok=True)
    ports = [free_port() for _ in range(3)]
    servers = "".join(
        f'    server {{ listen 127.0.0.1:{p}; location / {{ return 200 "ok {i}\\n"; }} }}\n' for i, p in enumerate(ports, 1)
    )
    conf = d / "nginx.conf"
    conf.write_text(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 16384;\n"
        f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
        "events { worker_connections 8192; }\n"
        "http {\n    access_log off;\n    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n"
        "    default_type text/plain;\n"
        f"    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n"
        f"    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
        + servers
        + "}\n"
    )
    p, _, err = bench.procs.spawn("upstream-nginx", ["nginx", "-e", f"{d}/error.log", "-p", str(d), "-c", str(conf)], LOAD_CPU)
    addrs = [f"127.0.0.1:{port}" for port in ports]
    for a in addrs:
        eventually(f"upstream nginx on {a}", lambda a=a: _connects(a) or _died(p, err), timeout=10)
    return p, addrs


def _connects(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def _died(p: subprocess.Popen, err: Path) -> bool:
    if p.poll() is not None:
        raise BenchError(f"process exited during startup: {tail(err)}")
    return False


def check_rr(name: str, addr: str) -> None:
    """The proxy answers 200 and spreads six requests over all three upstreams."""
    bodies = set()
    for _ in range(6):
        status, body = http_body(addr)
        if status != 200:
            raise BenchError(f"{name} on {addr} answered {status} {body!r}")
        bodies.add(body)
    if len(bodies) != 3:
        raise BenchError(f"{name} reached only {len(bodies)} upstream(s): {sorted(bodies)}")


def parse_wrk(text: str) -> dict:
    """rps, p50/p99 ms, requests, non-2xx and socket errors from `wrk --latency` output."""

    def ms(v: str) -> float:
        for unit, k in (("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 6e4)):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * k
        return float(v)

    r = {"non2xx": 0, "errors": 0}
    for line in text.splitlines():
        f = line.split()
        if not f:
            continue
        if f[0] == "50%":
            r["p50"] = ms(f[1])
        elif f[0] == "99%":
            r["p99"] = ms(f[1])
        elif "requests in" in line:
            r["requests"] = int(f[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            r["non2xx"] = int(f[-1])
        elif line.strip().startswith("Socket errors:"):
            nums = [int(x.strip(",")) for x in f if x.strip(",").isdigit()]
            r["errors"] = sum(nums)
        elif f[0] == "Requests/sec:":
            r["rps"] = float(f[1])
    if "rps" not in r:
        raise BenchError(f"cannot parse wrk output: {text[-300:]}")
    return r


def wrk(procs: Procs, seconds: int, conns: int, addr: str) -> str:
    p, out, err = procs.spawn(
        "wrk", ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", f"http://{addr}/"], LOAD_CPU
    )
    try:
        rc = p.wait(seconds + 30)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk against {addr} did not finish") from e
    finally:
        procs.stop(p)
    if rc != 0:
        raise BenchError(f"wrk against {addr} exited {rc}: {tail(err)}")
    return out.read_text()


def measure(procs: Procs, pid: int, addr: str, args: argparse.Namespace) -> dict:
    """Warm-up, then one measured wrk run with the proxy's CPU time (as bench/compare.sh)."""
    wrk(procs, args.warmup, args.connections, addr)
    c0 = proc_ticks(pid)
    b0, s0 = cpu_ticks(PROXY_CPU)
    l0, _ = cpu_ticks(LOAD_CPU)
    t0 = time.monotonic()
    text = wrk(procs, args.duration, args.connections, addr)
    wall = time.monotonic() - t0
    c1 = proc_ticks(pid)
    b1, s1 = cpu_ticks(PROXY_CPU)
    l1, _ = cpu_ticks(LOAD_CPU)
    r = parse_wrk(text)
    r["cpu"] = (c1 - c0) / CLK_TCK / wall
    r["per_cpu_s"] = r["rps"] / r["cpu"] if r["cpu"] > 0 else 0.0
    r["cpu0_busy"] = (b1 - b0) / CLK_TCK / wall
    r["cpu0_steal"] = (s1 - s0) / CLK_TCK / wall
    r["cpu1_busy"] = (l1 - l0) / CLK_TCK / wall
    r["raw"] = text
    return r


def floor(procs: Procs, addr: str, seconds: int) -> dict:
    wrk(procs, 1, 1, addr)
    r = parse_wrk(wrk(procs, seconds, 1, addr))
    return {k: r[k] for k in ("rps", "p50", "p99")}


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU (cores) each process uses with no traffic: the fixed cost of its timers."""
    c0 = {k: proc_ticks(p) for k, p in pids.items()}
    time.sleep(seconds)
    return {k: (proc_ticks(p) - c0[k]) / CLK_TCK / seconds for k, p in pids.items()}


def cluster_events(n: Node) -> dict:
    s = n.admin.get("/api/cluster/status")
    return {"members": s["members"], "events": s["events"], "store": s["coordination"], "leader": s["leader"].get("leader")}


def bench_throughput(bench: Bench, args: argparse.Namespace, results: dict) -> None:
    if (os.cpu_count() or 1) < 2:
        raise BenchError("the throughput part needs 2 CPUs (node on CPU 0, load on CPU 1)")
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (apt-get install {tool})")
    out = results["throughput"] = {"settings": {k: getattr(args, k) for k in ("rounds", "duration", "connections", "warmup", "floor_duration")}}
    out["machine"] = wait_quiet(args.max_load, args.quiet_wait)
    log(f"machine: {out['machine']}")
    procs = bench.procs
    upstream, addrs = upstream_nginx(bench, procs.tmp)
    redis, url = bench.redis(LOAD_CPU)
    # The node under test gets the load on CPU 0; its two peers and Redis idle on the load
    # CPU. The same configuration without `cluster:` runs beside it, also on CPU 0.
    cluster = Cluster(
        bench, addrs, coordination=Coordination("redis", url), cpus=[PROXY_CPU, LOAD_CPU, LOAD_CPU], level="warn"
    )
    off = bench.node("standalone", node_yaml(None, addrs, level="warn"), PROXY_CPU)
    on = cluster.node(0)
    try:
        cluster.wait_all_alive()
        eventually("a leader", lambda: leader(on)[0] is not None)
        check_rr("on", on.web)
        check_rr("off", off.web)
        out["cluster_before"] = cluster_events(on)
        out["peer_before"] = cluster_events(cluster.node(1))
        out["idle_cpu"] = idle_cpu({"on": on.proc.pid, "off": off.proc.pid}, 10.0)
        log(f"idle CPU over 10 s (cores): {out['idle_cpu']}")
        targets = {"on": (on.proc.pid, on.web), "off": (off.proc.pid, off.web)}
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        # Other engineers' builds come and go: each round starts on an idle machine, and a
        # round in which either proxy did not get its CPU is kept in the raw results but
        # not counted, and run again (at most `rounds` extra rounds).
        until = time.monotonic() + args.quiet_wait
        good = 0
        rnd = 0
        while good < args.rounds and rnd < 2 * args.rounds:
            rnd += 1
            busy = wait_idle(until, procs)
            order = ["on", "off"] if rnd % 2 else ["off", "on"]
            pair = {}
            for name in order:
                pid, addr = targets[name]
                r = measure(procs, pid, addr, args)
                r["round"] = rnd
                r["busy_before"] = busy
                pair[name] = r
                log(
                    f"round {rnd} {name}: {r['rps']:.0f} req/s, p99 {r['p99']:.2f} ms, CPU {r['cpu']:.2f}, "
                    f"{r['per_cpu_s']:.0f} req/CPU-s, CPU0 steal {r['cpu0_steal']:.2f}"
                    + (f", {r['non2xx']} non-2xx, {r['errors']} socket errors" if r["non2xx"] or r["errors"] else "")
                )
            disturbed = any(r["cpu"] < STARVED for r in pair.values())
            for name, r in pair.items():
                r["disturbed"] = disturbed
                runs[name].append(r)
            if disturbed:
                log(f"round {rnd} disturbed (a proxy got < {STARVED} of its CPU; busiest: {busiest(procs)}): not counted")
            else:
                good += 1
        out["runs"] = {k: [{kk: vv for kk, vv in r.items() if kk != "raw"} for r in v] for k, v in runs.items()}
        out["raw"] = {k: [r["raw"] for r in v] for k, v in runs.items()}
        out["busy_before_floor"] = wait_idle(until, procs)
        out["floor"] = {
            "upstream-direct": floor(procs, addrs[0], args.floor_duration),
            "off": floor(procs, off.web, args.floor_duration),
            "on": floor(procs, on.web, args.floor_duration),
        }
        out["rss_mib"] = {
            name: (vm_mib(pid, "VmRSS"), vm_mib(pid, "VmHWM")) for name, (pid, _) in targets.items()
        }
        out["cluster_after"] = cluster_events(on)
        out["peer_after"] = cluster_events(cluster.node(1))
        out["load_at_end"] = loadavg()
    finally:
        cluster.stop()
        procs.stop(off.proc)
        procs.stop(redis)
        procs.stop(upstream)


# ------------------------------------------------------------------------------------
# Report


def ok_reps(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def reps_cell(rows: list[dict]) -> str:
    good = len(ok_reps(rows))
    return f"{good}" if good == len(rows) else f"{good} of {len(rows)}"


def stat_row(label: str, rows: list[dict], key: str, scale: float = 1.0, digits: int = 2, extra: str = "") -> str:
    xs = [r[key] * scale for r in ok_reps(rows)]
    per = " ".join(f"{x:.{digits}f}" for x in xs)
    if not xs:
        return f"| {label} | – | – | {reps_cell(rows)} | {extra} |"
    return f"| {label} | {med(xs):.{digits}f} | {max(xs):.{digits}f} | {reps_cell(rows)} | {per}{extra} |"


def report(results: dict, meta: dict) -> str:
    lines = [f"### Results ({meta['when']})", ""]
    lines.append(
        f"Machine: {meta['cpus']} CPUs, {meta['cpu_model']}, Linux {meta['kernel']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}."
    )
    lines.append(f"Versions: {meta['versions']}.")
    lines.append(f"Command: `{meta['command']}`.")
    lines.append("")
    if "detect" in results:
        d = results["detect"]
        lines += ["#### Dead-node detection (kill -9 node-3 of 3; until node-1 and node-2 both list it `failed`)", ""]
        lines += [
            "| gossip interval / phi_threshold | until | median s | max s | reps | per rep s |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for label, rows in d.items():
            setting = f"{rows['interval']} / {rows['phi']} ({label})"
            lines.append(f"| {setting} {stat_row('both list it `failed`', rows['reps'], 'both')}")
            lines.append(f"| {setting} {stat_row('the first of the two', rows['reps'], 'first')}")
        floor_ms = [rows.get("admin_get_s", float("nan")) * 1e3 for rows in d.values()]
        lines += ["", f"Poll every {POLL * 1e3:.0f} ms; one `GET /api/cluster/nodes` takes {med(floor_ms):.1f} ms.", ""]
    if "health" in results:
        h = results["health"]
        lines += [
            "#### Backend failure propagation (kill -9 the backend; only node-1 checks: 200 ms, fall 2; gossip 200 ms)",
            "",
            "| backend killed | until | median s | max s | reps | per rep s |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for variant, when in [
            ("steady", f"{REJOIN_GRACE_MAX + 1:.0f} s after the cluster formed"),
            ("formed", "1 s after the cluster formed (rejoin grace)"),
        ]:
            rows = h.get(variant, [])
            for key, what in [
                ("local", "node-1 reports it `unhealthy` (its own check)"),
                ("all", "all 3 nodes report it `unhealthy`"),
                ("cluster_share", "the cluster's share (all 3 − node-1)"),
            ]:
                lines.append(f"| {when} {stat_row(what, rows, key)}")
        lines += [
            "",
            f"Poll every {POLL * 1e3:.0f} ms (3 nodes per round); one `GET /api/pools/app/backends` takes "
            f"{h.get('admin_get_s', float('nan')) * 1e3:.1f} ms.",
            "",
        ]
    if "failover" in results:
        f = results["failover"]
        lines += [
            "#### Leader failover with Redis (kill -9 the leader; until a survivor reports another leader)",
            "",
            "| lease_ttl | until | median s | max s | reps | per rep s |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for ttl, rows in f.items():
            for key, what in [("first", "first survivor"), ("both", "both survivors")]:
                row = stat_row(what, rows["reps"], key)
                lines.append(f"| {ttl} {row}")
        lines.append("")
        for ttl, rows in f.items():
            tokens = ", ".join(
                f"{r['old']} {r['token_before']} → {r['new']} {r['token_after']}" for r in ok_reps(rows["reps"])
            )
            lines.append(f"- fencing tokens, lease_ttl {ttl} (old leader → new leader): {tokens}")
        lines.append("")
    if "config" in results:
        c = results["config"]
        lines += [
            "#### Config propagation (`POST /api/pools/app/strategy` on node-1)",
            "",
            "| coordination | measured | median ms | max ms | reps | per rep ms |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for kind, rows in c.items():
            for key, what in [
                ("async_post", "`?consistency=async` response"),
                ("node2", "async: node-2 reports it"),
                ("node3", "async: node-3 reports it"),
                ("both", "async: nodes 2 and 3 report it"),
                ("all_write", "`?consistency=all` response (3 acknowledged)"),
            ]:
                lines.append(f"| {kind} {stat_row(what, rows['reps'], key, 1e3, 1)}")
        floor_ms = [rows.get("admin_get_s", float("nan")) * 1e3 for rows in c.values()]
        lines += [
            "",
            f"Poll every {CONFIG_POLL * 1e3:.0f} ms (2 nodes per round); one `GET /api/pools/app` takes "
            f"{med(floor_ms):.1f} ms.",
            "",
        ]
        lagging = [(k, r) for k, rows in c.items() for r in ok_reps(rows["reps"]) if r["acknowledged_but_not_applied"]]
        for kind, r in lagging:
            lines.append(f"- {kind}: version {r['version']} acknowledged by all 3 but not yet applied on {r['acknowledged_but_not_applied']}")
        if lagging:
            lines.append("")
    if "throughput" in results and "runs" in results["throughput"]:
        lines += throughput_report(results["throughput"])
    return "\n".join(lines) + "\n"


def throughput_report(t: dict) -> list[str]:
    s = t["settings"]
    m = t["machine"]
    runs = t["runs"]
    lines = ["#### Proxy throughput, clustering on vs off", ""]
    quiet = (
        f"quiet (1-min load < threshold) after {m['waited_s']} s"
        if m["quiet"]
        else f"**never quiet** within {m['waited_s']} s (busiest: {m.get('busiest', '?')})"
    )
    lines.append(
        f"Machine before the runs: {quiet}; load average {m['load_at_start']} at the first run, {t.get('load_at_end', '?')} at the end. "
        f"wrk -t1 -c{s['connections']} -d{s['duration']}s after a {s['warmup']} s warm-up, {s['rounds']} rounds interleaved "
        f"(on/off, then off/on), each started with the machine idle but for us (< {IDLE_BUSY} busy cores over 2 s); "
        f"medians over the rounds in which both proxies got ≥ {STARVED} of their CPU."
    )
    lines += ["", "| clustering | req/s | p50 ms | p99 ms | proxy CPU (cores) | req per CPU-s | RSS / peak MiB | errors | CPU0 busy (steal) / CPU1 busy |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    counted = {name: [r for r in runs[name] if not r["disturbed"]] for name in runs}
    if not counted["on"]:
        return lines + ["**No undisturbed round**: every round had a proxy starved of its CPU by other processes.", ""]
    for name in ("off", "on"):
        rs = counted[name]
        mm = {k: med([r[k] for r in rs]) for k in ("rps", "p50", "p99", "cpu", "per_cpu_s", "cpu0_busy", "cpu0_steal", "cpu1_busy")}
        medians[name] = mm
        errs = sum(r["non2xx"] + r["errors"] for r in runs[name])
        rss, hwm = t["rss_mib"][name]
        lines.append(
            f"| {name} | {mm['rps']:.0f} | {mm['p50']:.2f} | {mm['p99']:.2f} | {mm['cpu']:.2f} | {mm['per_cpu_s']:.0f} | "
            f"{rss:.1f} / {hwm:.1f} | {errs} | {mm['cpu0_busy']:.2f} ({mm['cpu0_steal']:.2f}) / {mm['cpu1_busy']:.2f} |"
        )
    lines += ["", "Per round (req/s, req per CPU-s, proxy CPU; ~~struck~~ = disturbed, not counted):", ""]
    for name in ("off", "on"):
        lines.append(
            f"- {name}: "
            + "; ".join(
                (f"~~{x}~~" if r["disturbed"] else x)
                for r in runs[name]
                for x in [f"r{r['round']} {r['rps']:.0f} / {r['per_cpu_s']:.0f} / {r['cpu']:.2f}"]
            )
        )
    if len(counted["on"]) < 3:
        lines += ["", f"**Only {len(counted['on'])} undisturbed round(s)**: the machine never stayed quiet long enough."]
    ratio_rps = medians["on"]["rps"] / medians["off"]["rps"]
    ratio_cpu = medians["on"]["per_cpu_s"] / medians["off"]["per_cpu_s"]
    paired = [on["per_cpu_s"] / off["per_cpu_s"] for on, off in zip(counted["on"], counted["off"])]
    lines += [
        "",
        "| on ÷ off | ratio | overhead | target < 5 % |",
        "| --- | ---: | ---: | --- |",
        f"| req/s | {ratio_rps:.3f} | {100 * (1 - ratio_rps):+.1f} % | {'met' if ratio_rps > 0.95 else '**not met**'} |",
        f"| req per CPU-s | {ratio_cpu:.3f} | {100 * (1 - ratio_cpu):+.1f} % | {'met' if ratio_cpu > 0.95 else '**not met**'} |",
        "",
        "Per-round ratios of req per CPU-s (same round, on ÷ off): " + " ".join(f"{x:.3f}" for x in paired) + ".",
        "",
        "Latency floor (`wrk -t1 -c1`, one connection, no queueing):",
        "",
        "| target | p50 ms | p99 ms | req/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, f in t["floor"].items():
        lines.append(f"| {name} | {f['p50']:.3f} | {f['p99']:.3f} | {f['rps']:.0f} |")
    idle = t["idle_cpu"]
    lines += [
        "",
        f"Idle CPU with no traffic (10 s, /proc/PID/stat): off {idle['off']:.4f} cores, on {idle['on']:.4f} cores.",
    ]
    for who, before, after in [
        ("the node under test (node-1)", t["cluster_before"], t["cluster_after"]),
        ("node-2", t["peer_before"], t["peer_after"]),
    ]:
        lines.append(
            f"Cluster as seen by {who}: before the runs {before['members']}, events {before['events']}; "
            f"after {after['members']}, events {after['events']}, leader {after['leader']}, store available "
            f"{after['store'].get('available')}."
        )
    lines.append("")
    return lines


def versions(binary: Path, source: Path) -> str:
    v = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.split()
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    built = time.strftime("%Y-%m-%d %H:%M", time.gmtime(source.stat().st_mtime))
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    redis_v = next((x.split("=")[1] for x in redis if x.startswith("v=")), "?")
    return (
        f"fulcrum {v[1] if len(v) > 1 else '?'} (git {git}{'+uncommitted changes' if dirty else ''}, binary built {built} UTC), "
        f"redis {redis_v}"
    )


# ------------------------------------------------------------------------------------


def main() -> int:
    parts = ["detect", "health", "failover", "config", "throughput"]
    ap = argparse.ArgumentParser(
        description="Cluster timings (failure detection, health propagation, leader failover, config "
        "propagation) and the proxy throughput cost of clustering.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each timing")
    ap.add_argument("--only", default=",".join(parts), help="comma-separated parts to run: " + ",".join(parts))
    ap.add_argument("--rounds", type=int, default=5, help="throughput: interleaved on/off rounds (at least 3)")
    ap.add_argument("--duration", type=int, default=10, help="throughput: seconds of each measured wrk run")
    ap.add_argument("--connections", type=int, default=64, help="throughput: wrk connections")
    ap.add_argument("--warmup", type=int, default=2, help="throughput: seconds of discarded load before each run")
    ap.add_argument("--floor-duration", type=int, default=5, help="throughput: seconds of each one-connection run")
    ap.add_argument("--max-load", type=float, default=1.0, help="throughput: wait until the 1-min load average is below this")
    ap.add_argument("--quiet-wait", type=float, default=600, help="throughput: longest wait for a quiet machine, s")
    ap.add_argument("--bin", type=Path, default=REPO / "target/release/fulcrum", help="the fulcrum binary")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in only if p not in parts]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; expected some of {parts}")
    if args.reps < 1 or args.rounds < 3:
        ap.error("--reps must be ≥ 1 and --rounds ≥ 3")
    if not args.bin.is_file():
        ap.error(f"{args.bin} not found: build it with `cargo build --release -p fulcrum`")
    if shutil.which("redis-server") is None and {"failover", "config", "throughput"} & set(only):
        ap.error("redis-server not found (apt-get install redis-server)")

    # Ctrl-C, SIGTERM and SIGHUP end the run through the `finally` that stops everything.
    # SIGINT is set explicitly: started in the background by a shell, Python would inherit
    # it ignored and never raise KeyboardInterrupt.
    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="fulcrum-cluster-bench."))
    procs = Procs(tmp)
    # A private copy: a rebuild of target/release during the run cannot change the binary
    # under test half-way.
    binary = tmp / "fulcrum"
    shutil.copy2(args.bin, binary)
    bench = Bench(procs, binary)
    results: dict = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
            "?",
        ),
        "kernel": os.uname().release,
        "load_start": loadavg(),
        "versions": versions(binary, args.bin),
        "command": "python3 bench/cluster.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])),
    }
    rc = 0
    try:
        for part in only:
            log(f"--- {part} (load average {loadavg()})")
            if part == "detect":
                bench_detect(bench, args.reps, results)
            elif part == "health":
                bench_health(bench, args.reps, results)
            elif part == "failover":
                bench_failover(bench, args.reps, results)
            elif part == "config":
                bench_config(bench, args.reps, results)
            elif part == "throughput":
                bench_throughput(bench, args, results)
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        log(f"interrupted ({signal.Signals(signum).name}); stopping every process started")
        rc = 128 + signum
    except BenchError as e:
        log(f"error: {e}")
        rc = 1
    finally:
        procs.stop_all()
        meta["load_end"] = loadavg()
        if results:
            md = report(results, meta)
            print(md)
            out = REPO / "bench/results"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"cluster-{stamp}.md").write_text(md)
            (out / f"cluster-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            log(f"raw results: bench/results/cluster-{stamp}.json")
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
