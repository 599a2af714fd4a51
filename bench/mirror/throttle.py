#!/usr/bin/env python3
"""A registry's egress, throttled: an HTTP proxy on 127.0.0.1:PORT that
forwards GET and HEAD to UPSTREAM and sends every response body, all
connections together, at RATE MiB/s at most. It counts the body bytes it
sent and writes the count to COUNT_FILE after each response.

    throttle.py 5100 127.0.0.1:5000 40 /tmp/upstream-bytes
"""
import http.client
import http.server
import sys
import threading
import time

PORT, UPSTREAM, RATE, COUNT_FILE = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) * (1 << 20), sys.argv[4]
lock = threading.Lock()
state = {"next": time.monotonic(), "bytes": 0}


def take(n):
    """Waits until n more bytes may go out at RATE."""
    with lock:
        now = time.monotonic()
        start = max(state["next"], now)
        state["next"] = start + n / RATE
        state["bytes"] += n
    delay = start - now
    if delay > 0:
        time.sleep(delay)


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: without TCP_NODELAY the
    # body of a small answer waits for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True

    def forward(self, body):
        conn = http.client.HTTPConnection(UPSTREAM, timeout=300)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range", "authorization")}
        conn.request(self.command, self.path, headers=headers)
        r = conn.getresponse()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "transfer-encoding"):
                self.send_header(k, v)
        self.end_headers()
        while body:
            chunk = r.read(64 << 10)
            if not chunk:
                break
            take(len(chunk))
            try:
                self.wfile.write(chunk)
            except OSError:
                break
        conn.close()
        with lock:
            sent = state["bytes"]
        with open(COUNT_FILE, "w") as f:
            f.write(f"{sent}\n")

    def handle(self):
        # A client trying TLS first (dockerd and containerd do so for a
        # registry on 127.0.0.1) gets the answer an HTTP-only Go server
        # gives, on which they fall back to plain HTTP.
        if self.rfile.peek(1)[:1] == b"\x16":
            self.wfile.write(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
            return
        super().handle()

    def do_GET(self):
        self.forward(True)

    def do_HEAD(self):
        self.forward(False)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Proxy).serve_forever()
