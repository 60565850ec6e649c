"""Measure the cost of one ``kapow get`` against the bare interpreter.

Run by hand::

    .venv/bin/python bench/bench_get.py [-n 50] [--server URL --handler ID]

Starts a tiny threaded data server on 127.0.0.1 (a random port) that answers
every GET with 200 and a short body (or uses ``--server``), writes the fast
launcher into a temporary directory, then runs interleaved, N times each:

* ``python -I -S -c pass`` (the floor: the interpreter alone),
* the launcher's ``kapow get /request/method`` (the Python lean client),
* the native client's, when it was built, and ``/bin/true`` beside it,
* the pip console script's ``kapow get /request/method``, when it exists,

and prints the median wall time of each in milliseconds and its ratio to the
bare interpreter.  The target for the launcher is a ratio of at most 1.3.
"""

import argparse
import http.server
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from kapow.commands.launcher import native_client, write_launcher  # noqa: E402


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"GET"
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def _start_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # "localhost" like the default data URL (http://localhost:8082)
    return server, "http://localhost:%d" % server.server_address[1]


def _run(argv, env):
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        message = "%s failed (%d): %s"
        raise SystemExit(message % (argv, done.returncode, done.stderr.decode()))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=50, help="repetitions (default 50)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--server", help="data API URL of a running server")
    parser.add_argument("--handler", default="bench", help="handler id to use")
    parser.add_argument(
        "--real",
        action="store_true",
        help="start a real kapow server and read from a live handler of it",
    )
    args = parser.parse_args()

    server = real = None
    if args.real:
        real, url, args.handler = _start_real_server()
    elif args.server:
        url = args.server
    else:
        server, url = _start_server()
    env = dict(os.environ, KAPOW_DATA_URL=url, KAPOW_HANDLER_ID=args.handler)

    with tempfile.TemporaryDirectory() as tmp:
        launcher = write_launcher(tmp, args.python)
        cases = {
            "python -I -S -c pass": [args.python, "-I", "-S", "-c", "pass"],
            "launcher kapow get": [launcher, "get", "/request/method"],
        }
        if native_client() is not None:
            native = write_launcher(os.path.join(tmp, "native"), args.python, native=native_client())
            cases["native kapow get"] = [native, "get", "/request/method"]
            cases["/bin/true"] = ["/bin/true"]
        script = os.path.join(os.path.dirname(args.python), "kapow")
        if os.path.isfile(script) and os.access(script, os.X_OK):
            cases["console script kapow get"] = [script, "get", "/request/method"]
        for argv in cases.values():  # warm up caches and bytecode
            _run(argv, env)
        times = {name: [] for name in cases}
        for _ in range(args.n):
            for name, argv in cases.items():
                times[name].append(_run(argv, env))

    bare = statistics.median(times["python -I -S -c pass"])
    print("data API: %s   repetitions: %d" % (url, args.n))
    print("%-28s %10s %10s %8s" % ("command", "median ms", "min ms", "ratio"))
    for name, samples in times.items():
        median = statistics.median(samples)
        row = (name, median * 1e3, min(samples) * 1e3, median / bare)
        print("%-28s %10.2f %10.2f %8.2f" % row)
    if server is not None:
        server.shutdown()
    if real is not None:
        real.stop()


def _start_real_server():
    """A real server with one handler parked until the bench ends."""
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(HERE))
    from tests.support.kapowserver import KapowServer, wait_for

    tmp = Path(tempfile.mkdtemp(prefix="kapow-bench-"))
    real = KapowServer(tmp, extra=("--shutdown-timeout", "0"))
    real.add_route("/park", "echo $KAPOW_HANDLER_ID > %s/id; sleep 600" % tmp)
    subprocess.Popen(["curl", "-s", "-o", "/dev/null", real.user + "/park"])
    handler = wait_for(lambda: (tmp / "id").exists() and (tmp / "id").read_text().strip())
    return real, real.data, handler


if __name__ == "__main__":
    main()
