#!/usr/bin/env python3
"""Fault-injecting HTTP range server for the PageCache tests (stdlib only).

Usage: faultserver.py --file IMAGE --log LOG.jsonl [--port 0] [--host 127.0.0.1]
                      [--tls-cert CERT.pem --tls-key KEY.pem] [--serve NAME=FILE]...
Prints "PORT <n>" on stdout once listening (on --host, a loopback address;
with --tls-cert, HTTPS). Every path serves IMAGE, but /NAME (with --serve
NAME=FILE) serves FILE.

Every request is logged as one JSON line {"method", "path", "range", "status",
"host", "secret", "auth"} (the Host, X-Secret and Authorization request
headers; flushed before the response is sent), so tests can count requests
and see which credentials reached this server.

The behaviour is chosen per request by the query string of the URL, e.g.
/image?mode=5xx&n=2&id=test1 . Counters are kept per distinct query string, so
each test (with its own id=) has its own. Modes:
  ok        (default) proper ranges, HEAD with Accept-Ranges, ETag, Last-Modified
  5xx       the first n GETs answer 503, then ok
  reset     the first n GETs send the headers and half the body, then RST
  truncate  the first n GETs send the headers and half the body, then FIN
  slow      the first n GETs send half the body, sleep `delay` s, send the rest
  norange   GET answers 200 with the full body; HEAD has no Accept-Ranges
  etag      the ETag changes on every request
  nohead    HEAD answers 405; GET ok
  badrange  206 with a Content-Range (and body) one byte later than asked
  missing   404
  redirect  HEAD and GET answer `status` (default 302) with Location: `to`
            (a percent-encoded URL, absolute or relative)
  novalidators  GET answers 206 without ETag and Last-Modified; HEAD has the
            ETag "fixed-1", or "fixed-2" after the first `changeafter` HEADs
  flip      GET bodies carry the byte at offset `at` of the file inverted
            (the first n GETs; n=0: every GET), headers as ok
Any mode takes lag=S: every GET waits S seconds before it answers.
"""
import argparse, json, os, socket, ssl, struct, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

LOCK = threading.Lock()
COUNTERS = {}
IMAGE = b""
FILES = {}
LOG = None


def bump(key):
    with LOCK:
        COUNTERS[key] = COUNTERS.get(key, 0) + 1
        return COUNTERS[key]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def log_request_line(self, status):
        entry = {"method": self.command, "path": self.path,
                 "range": self.headers.get("Range"), "status": status,
                 "host": self.headers.get("Host"), "secret": self.headers.get("X-Secret"),
                 "auth": self.headers.get("Authorization")}
        with LOCK:
            LOG.write(json.dumps(entry) + "\n")
            LOG.flush()

    def body(self):
        """The file this request's path names (IMAGE unless --serve gave its name)."""
        name = urlsplit(self.path).path.strip("/")
        return FILES.get(name, IMAGE)

    def params(self):
        q = parse_qs(urlsplit(self.path).query)
        return {k: v[0] for k, v in q.items()}, urlsplit(self.path).query

    def send(self, status, headers, body=b"", head=False):
        self.log_request_line(status)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def common_headers(self, mode, count, p=None, key=""):
        if mode == "novalidators":
            if self.command != "HEAD":
                return [("Accept-Ranges", "bytes")]
            after = int((p or {}).get("changeafter", "-1"))
            heads = bump(key + "#head")
            etag = '"fixed-2"' if 0 <= after < heads else '"fixed-1"'
            return [("ETag", etag), ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Accept-Ranges", "bytes")]
        etag = '"v%d"' % count if mode == "etag" else '"fixed-1"'
        h = [("ETag", etag), ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")]
        if mode != "norange":
            h.append(("Accept-Ranges", "bytes"))
        return h

    def do_HEAD(self):
        p, key = self.params()
        mode = p.get("mode", "ok")
        count = bump(key)
        if mode == "missing":
            return self.send(404, [], head=True)
        if mode == "nohead":
            return self.send(405, [("Allow", "GET")], head=True)
        if mode == "redirect":
            return self.send(int(p.get("status", "302")), [("Location", p.get("to", "/"))], head=True)
        self.log_request_line(200)
        self.send_response(200)
        for k, v in self.common_headers(mode, count, p, key):
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(self.body())))
        self.end_headers()

    def do_GET(self):
        p, key = self.params()
        mode = p.get("mode", "ok")
        n = int(p.get("n", "0"))
        count = bump(key)
        gets = bump(key + "#get")
        time.sleep(float(p.get("lag", "0")))
        if mode == "missing":
            return self.send(404, [], b"not found\n")
        if mode == "5xx" and gets <= n:
            return self.send(503, [("Retry-After", "0")], b"busy\n")
        if mode == "redirect":
            return self.send(int(p.get("status", "302")), [("Location", p.get("to", "/"))], b"moved\n")
        headers = self.common_headers(mode, count, p, key)
        rng = self.headers.get("Range")
        data = self.body()
        if mode == "norange" or rng is None:
            return self.send(200, headers, data)
        if not rng.startswith("bytes=") or "," in rng:
            return self.send(416, [], b"")
        a, _, b = rng[6:].partition("-")
        size = len(data)
        if a == "":
            first, last = max(0, size - int(b)), size - 1
        else:
            first = int(a)
            last = min(int(b), size - 1) if b else size - 1
        if first >= size or first > last:
            return self.send(416, [("Content-Range", "bytes */%d" % size)], b"")
        if mode == "badrange":
            first, last = first + 1, min(last + 1, size - 1)
        body = data[first:last + 1]
        at = int(p.get("at", "-1"))
        if mode == "flip" and (n == 0 or gets <= n) and first <= at <= last:
            body = body[:at - first] + bytes([body[at - first] ^ 0xFF]) + body[at - first + 1:]
        headers.append(("Content-Range", "bytes %d-%d/%d" % (first, last, size)))
        fault = mode in ("reset", "truncate", "slow") and gets <= n
        if not fault:
            return self.send(206, headers, body)
        self.log_request_line(206)
        self.send_response(206)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        if mode == "slow":
            time.sleep(float(p.get("delay", "2")))
            try:
                self.wfile.write(body[half:])
                self.wfile.flush()
            except OSError:
                pass
            return
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR) if mode == "truncate" else None
        except OSError:
            pass
        self.connection.close()


def main():
    global IMAGE, LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--serve", action="append", default=[])
    args = ap.parse_args()
    with open(args.file, "rb") as f:
        IMAGE = f.read()
    for spec in args.serve:
        name, _, path = spec.partition("=")
        with open(path, "rb") as f:
            FILES[name] = f.read()
    LOG = open(args.log, "a")
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    if not args.host.startswith("127."):
        sys.exit("--host must be a loopback address (127.x.y.z)")
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("PORT %d" % server.server_address[1], flush=True)
    # Exit when the test process goes away (its end of our stdin closes).
    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)
    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
