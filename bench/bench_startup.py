#!/usr/bin/env python3
"""
Two start-up figures, medians of several starts:

* start of ``kapow server`` until the control API answers (a pinned mTLS
  ``GET /routes`` returning 200);
* start until an init program that adds 20 routes with ``kapow route add``
  is done: until the 20th route answers 200 on the user port (readiness).

Usage: python bench/bench_startup.py [--runs N] [--reference PATH_TO_GO_KAPOW]

With --reference, the Go reference binary is timed the same way in the same
run (it needs its certificates from the environment of an init program, so an
init program writes them to a directory first; its init programs find it as
``kapow`` first on PATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answer(port: int, creds: Path, deadline: float) -> None:
    """Poll until a pinned mTLS GET /routes answers 200."""
    while time.monotonic() < deadline:
        if (creds / "client.key").exists() and (creds / "server.crt").exists():
            try:
                context = ssl.create_default_context(cafile=str(creds / "server.crt"))
                context.load_cert_chain(str(creds / "client.crt"), str(creds / "client.key"))
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    tls.sendall(b"GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if tls.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except (OSError, ssl.SSLError):
                pass
        time.sleep(0.002)
    raise RuntimeError("control API never answered")


def time_until_answer(argv: list[str], control: int, creds: Path, timeout: float) -> float:
    """Seconds from starting ``argv`` until its control API on ``control`` answers."""
    start = time.monotonic()
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_answer(control, creds, start + timeout)
        return time.monotonic() - start
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()


ROUTES = 20


def wait_route(port: int, path: str, deadline: float) -> None:
    """Poll until ``GET path`` on the user port answers 200."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"{path} never answered")


def routes_init(work: Path) -> Path:
    """An init program adding /r0 ... /r19, one ``kapow route add`` each."""
    init = work / "routes.pow"
    lines = ["#!/bin/sh"]
    lines += [f"kapow route add /r{i} -c 'echo {i} | kapow set /response/body'" for i in range(ROUTES)]
    init.write_text("\n".join(lines) + "\n")
    init.chmod(0o755)
    return init


def time_until_ready(argv: list[str], user: int, env: dict[str, str] | None = None) -> float:
    """Seconds from starting ``argv`` until the last route of :func:`routes_init` answers."""
    start = time.monotonic()
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    try:
        wait_route(user, f"/r{ROUTES - 1}", start + 120)
        return time.monotonic() - start
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()


def ready_kapow(argv_head: list[str], work: Path) -> float:
    user, control = free_port(), free_port()
    argv = [
        *argv_head,
        "--bind", f"127.0.0.1:{user}",
        "--control-bind", f"127.0.0.1:{control}",
        "--data-bind", f"127.0.0.1:{free_port()}",
        str(routes_init(work)),
    ]  # fmt: skip
    return time_until_ready(argv, user)


def ready_reference(binary: str, work: Path) -> float:
    bindir = work / "ref-bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "kapow").exists():
        (bindir / "kapow").symlink_to(os.path.abspath(binary))
    user, control = free_port(), free_port()
    argv = [
        binary, "server",
        "--bind", f"127.0.0.1:{user}",
        "--control-bind", f"127.0.0.1:{control}",
        "--control-reachable-addr", f"127.0.0.1:{control}",
        "--data-bind", f"127.0.0.1:{free_port()}",
        str(routes_init(work)),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAPOW_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', os.defpath)}"
    return time_until_ready(argv, user, env)


def time_kapow(argv_head: list[str], work: Path) -> float:
    creds = work / "creds"
    shutil.rmtree(creds, ignore_errors=True)
    control = free_port()
    argv = [
        *argv_head,
        "--bind", f"127.0.0.1:{free_port()}",
        "--control-bind", f"127.0.0.1:{control}",
        "--data-bind", f"127.0.0.1:{free_port()}",
        "--write-control-credentials", str(creds),
    ]  # fmt: skip
    return time_until_answer(argv, control, creds, 30)


def time_reference(binary: str, work: Path) -> float:
    creds = work / "ref-creds"
    shutil.rmtree(creds, ignore_errors=True)
    creds.mkdir(mode=0o700)
    init = work / "dump.pow"
    init.write_text(
        "#!/bin/sh\n"
        f'printf "%s" "$KAPOW_CONTROL_SERVER_CERT" > {creds}/server.crt.tmp\n'
        f'printf "%s" "$KAPOW_CONTROL_CLIENT_CERT" > {creds}/client.crt\n'
        f'printf "%s" "$KAPOW_CONTROL_CLIENT_KEY" > {creds}/client.key\n'
        f"mv {creds}/server.crt.tmp {creds}/server.crt\n"
    )
    init.chmod(0o755)
    control = free_port()
    argv = [
        binary, "server",
        "--bind", f"127.0.0.1:{free_port()}",
        "--control-bind", f"127.0.0.1:{control}",
        "--control-reachable-addr", f"127.0.0.1:{control}",
        "--data-bind", f"127.0.0.1:{free_port()}",
        str(init),
    ]  # fmt: skip
    return time_until_answer(argv, control, creds, 60)


def rsa_keygen_seconds(runs: int) -> float:
    """Median time to generate two RSA-4096 keys here (OpenSSL, via cryptography)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    times = []
    for _ in range(runs):
        started = time.monotonic()
        for _ in range(2):
            rsa.generate_private_key(public_exponent=65537, key_size=4096)
        times.append(time.monotonic() - started)
    return statistics.median(times)


GO_KEYGEN = """package main

import (
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"time"
)

func main() {
	start := time.Now()
	for i := 0; i < 2; i++ {
		if _, err := rsa.GenerateKey(rand.Reader, 4096); err != nil {
			panic(err)
		}
	}
	fmt.Println(time.Since(start).Seconds())
}
"""


def go_keygen_seconds(runs: int) -> float | None:
    """
    Median time Go's crypto/rsa takes to generate two RSA-4096 keys, as the
    reference does at every start; ``None`` without a Go toolchain.
    """
    go = shutil.which("go")
    if go is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "keygen.go"
        source.write_text(GO_KEYGEN)
        binary = Path(tmp) / "keygen"
        subprocess.run(
            [go, "build", "-o", str(binary), str(source)],
            check=True,
            cwd=tmp,
            env={**os.environ, "GOCACHE": str(Path(tmp) / "cache"), "GO111MODULE": "off"},
        )
        times = [
            float(subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout)
            for _ in range(runs)
        ]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--reference", help="path of the Go reference kapow binary")
    args = parser.parse_args()
    kapow_server = [str(VENV_BIN / "kapow"), "server"]
    answers = {
        "kapow server": lambda work: time_kapow(kapow_server, work),
        "twist kapow": lambda work: time_kapow([str(VENV_BIN / "twist"), "kapow"], work),
    }
    ready = {"kapow server": lambda work: ready_kapow(kapow_server, work)}
    if args.reference:
        answers["reference (Go)"] = lambda work: time_reference(args.reference, work)
        ready["reference (Go)"] = lambda work: ready_reference(args.reference, work)
    for title, candidates in (
        ("start -> control API answers", answers),
        (f"start -> an init program's {ROUTES} routes added and the last one answers", ready),
    ):
        results: dict[str, list[float]] = {name: [] for name in candidates}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.runs):
                for name, run in candidates.items():
                    results[name].append(run(Path(tmp)))
        print(f"{title}, median of {args.runs} starts")
        for name, times in results.items():
            print(f"  {name:16} {statistics.median(times) * 1000:8.1f} ms   (min {min(times) * 1000:.1f})")
        if "reference (Go)" in results:
            ratio = statistics.median(results["kapow server"]) / statistics.median(results["reference (Go)"])
            print(f"  {'ours/ref':16} {ratio:8.2f}")
    print("what the reference generates at every start, two RSA-4096 keys:")
    print(f"  {'OpenSSL':16} {rsa_keygen_seconds(args.runs) * 1000:8.1f} ms")
    go = go_keygen_seconds(args.runs)
    if go is not None:
        print(f"  {'Go crypto/rsa':16} {go * 1000:8.1f} ms   (the reference's own library)")


if __name__ == "__main__":
    main()
