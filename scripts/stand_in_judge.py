"""A stand-in OpenAI-compatible judge for measuring chatvec's judging:
answers GET /v1/models, and every chat completion after DELAY seconds
with a grade computed from the request ("Rating: [[N]]"), many at once.

    python3 scripts/stand_in_judge.py PORT [DELAY]
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Judge(BaseHTTPRequestHandler):
    delay = 0.2

    def log_message(self, *args):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"data": [{"id": "stand-in"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.delay)
        grade = 1 + len(body["messages"][-1]["content"]) % 10
        self.reply({"choices": [{"message": {"role": "assistant", "content": f"Rating: [[{grade}]]"}}]})


class Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 would hold concurrent clients
    # back in the kernel's queue, which is the server's delay, not theirs.
    request_queue_size = 256
    daemon_threads = True


if __name__ == "__main__":
    Judge.delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
    Server(("127.0.0.1", int(sys.argv[1])), Judge).serve_forever()
