#!/usr/bin/env python3
"""W1-style throughput of the network sinks next to the file sink (a stand-in until
`cargo xtask bench` covers them).

Generates 64 files of ~16 MiB of nginx-like lines with `voltail generate`, then for each sink
runs a fresh `voltail run` until every line is read and acknowledged (`voltail_lag_bytes` 0),
and prints MiB of log data per wall second and per CPU second of the voltail process (user +
system, from /proc/<pid>/stat). The http sink posts to a discarding HTTP/1.1 server on
127.0.0.1 (in this script's process, so its CPU is not counted).

Usage: tests/scripts/bench-sinks.py <path to a release voltail> [work dir] [MiB per file]
"""
import http.server, os, re, shutil, signal, subprocess, sys, threading, time, urllib.request

voltail = os.path.abspath(sys.argv[1])
work = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else "/tmp/voltail-bench-sinks")
mib_per_file = int(sys.argv[3]) if len(sys.argv) > 3 else 16
FILES = 64
TICK = os.sysconf("SC_CLK_TCK")

logs = os.path.join(work, "logs")
if not os.path.isdir(logs):
    os.makedirs(logs)
    lines = mib_per_file * (1 << 20) // 215
    subprocess.run([voltail, "generate", "--dir", logs, "--pods", str(FILES), "--rate", "0",
                    "--lines", str(lines)], check=True)
total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(logs) for f in fs)
print(f"input: {total / (1 << 20):.0f} MiB in {FILES} files")

received = {"bytes": 0, "requests": 0}

class Discard(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        while n:
            n -= len(self.rfile.read(min(n, 1 << 20)))
        received["bytes"] += int(self.headers.get("Content-Length", 0))
        received["requests"] += 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Discard)
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{srv.server_address[1]}/ingest"

def metric(port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body, re.M)]
    return sum(vals) if vals else None

def run(name, sink):
    data = os.path.join(work, "data-" + name)
    shutil.rmtree(data, ignore_errors=True)
    out = os.path.join(work, "out-" + name)
    shutil.rmtree(out, ignore_errors=True)
    port = 19464
    cfg = os.path.join(work, name + ".toml")
    with open(cfg, "w") as f:
        f.write(f'''data_dir = "{data}"
probe = "off"
[metrics]
address = "127.0.0.1:{port}"
[[sources]]
name = "w1"
include = ["{logs}/**/*.log"]
[sink]
{sink.replace("OUT", out).replace("URL", url)}
''')
    p = subprocess.Popen([voltail, "run", "--config", cfg], stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while True:
            time.sleep(0.2)
            try:
                read = metric(port, "voltail_read_bytes_total") or 0
                lag = metric(port, "voltail_lag_bytes")
            except OSError:
                continue
            if read >= total and lag == 0:
                break
            if time.time() - t0 > 600:
                raise SystemExit(f"{name}: not done after 600 s (read {read}, lag {lag})")
        wall = time.time() - t0
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()
    mib = total / (1 << 20)
    print(f"{name:>14}: {mib / wall:7.1f} MiB/s wall  {mib / cpu:7.1f} MiB per CPU-second"
          f"  ({cpu:.1f} CPU-s, {wall:.1f} s)")

run("file-zstd1", 'type = "file"\npath = "OUT"\ncompression = "zstd"\ncompression_level = 1')
run("http-zstd1", 'type = "http"\nurl = "URL"\ncompression = "zstd"\ncompression_level = 1')
run("http-gzip1", 'type = "http"\nurl = "URL"\ncompression = "gzip"\ncompression_level = 1')
run("http-none", 'type = "http"\nurl = "URL"\ncompression = "none"')
print(f"http server received {received['requests']} requests, {received['bytes'] / (1 << 20):.0f} MiB")
