"""HTTP benchmark: GET /kv of a real kvstore beside a bare Klein route over a dict, with wrk, in one run.

    python bench/kvstore_http.py [--seconds 10] [--rounds 3] [--connections 50]

Load: wrk with 50 connections GETs keys drawn at random from 10,000 (all PUT first), 100-byte
values, for ``--seconds`` after a 2 s warm-up. wrk runs on core 0 and the server on core 1 (taskset). Servers
run in interleaved rounds; the best round of each counts. Printed: requests/s, p50 and p99, and the ratio
kvstore / Klein baseline against the target (>= 0.8x).
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvstore import pinned, stop, wait_port

from chashd.launcher import free_ports, twistd_command

HERE = Path(__file__).resolve().parent
KEYS = 10_000
TARGET = 0.8
LUA = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", string.format("/kv/key:%05d", math.random(0, 9999)))
end
"""


def start(name: str, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start one server on core 1; returns the process and its HTTP port."""
    http_port, line_port = free_ports(2)
    log = work / f"{name}.log"
    if name == "kvstore":
        command = twistd_command(
            "chash-kvstore",
            ["--node-id", "bench", "--engine", "memory", "--port", f"tcp:{http_port}:interface=127.0.0.1",
             "--line-port", f"tcp:{line_port}:interface=127.0.0.1"],
        )  # fmt: skip
    else:
        command = [sys.executable, str(HERE / "klein_baseline.py"), str(http_port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(pinned(command, 1), stdout=out, stderr=subprocess.STDOUT)
    wait_port(http_port, process, log)
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    for i in range(KEYS):
        connection.request("PUT", f"/kv/key:{i:05d}", body=b"v" * 100)
        response = connection.getresponse()
        response.read()
        assert response.status == 204, response.status
    connection.close()
    return process, http_port


def wrk(port: int, seconds: int, connections: int, script: Path) -> dict[str, Any]:
    """Run wrk on core 0; parse requests/s and the latency percentiles."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
               f"http://127.0.0.1:{port}/"]  # fmt: skip
    out = subprocess.run(pinned(command, 0), capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rate": rate,
        "p50": percentiles.get("50"),
        "p99": percentiles.get("99"),
        "non2xx": errors.group(1) if errors else "0",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/kvstore_http.py needs wrk (Debian package wrk: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="chashd-http-bench-"))
    script = work / "keys.lua"
    script.write_text(LUA)
    best: dict[str, dict[str, Any]] = {}
    for round_number in range(1, args.rounds + 1):
        for name in ("kvstore", "klein"):
            process, port = start(name, work)
            try:
                wrk(port, 2, args.connections, script)
                result = wrk(port, args.seconds, args.connections, script)
            finally:
                stop(process)
            print(f"round {round_number} {name:8s} {result['rate']:10,.0f} req/s  p50 {result['p50']}  "
                  f"p99 {result['p99']}  non-2xx {result['non2xx']}", flush=True)  # fmt: skip
            if name not in best or result["rate"] > best[name]["rate"]:
                best[name] = result
        time.sleep(1)
    ratio = best["kvstore"]["rate"] / best["klein"]["rate"]
    print("best of each:")
    for name, result in best.items():
        print(f"  {name:8s} {result['rate']:10,.0f} req/s  p50 {result['p50']}  p99 {result['p99']}")
    verdict = "ok" if ratio >= TARGET else "MISSED"
    print(f"kvstore GET /kv / bare Klein: {ratio:.2f}x  (target >= {TARGET}x: {verdict})")


if __name__ == "__main__":
    main()
