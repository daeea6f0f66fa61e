#!/usr/bin/env python3
"""A tiny upstream for tests/nginx/run.sh: answers 200 to every request and
counts them. GET /__count answers the count (not counted). Binds a free
loopback port and writes it to the file named by argv[1]."""
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

count = 0
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def answer(self):
        global count
        if self.path == "/__count":
            with lock:
                body = json.dumps({"count": count}).encode()
        else:
            with lock:
                count += 1
            body = json.dumps({"upstream": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = answer

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
server.serve_forever()
