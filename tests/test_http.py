"""flowforge.Http, the client every provider plugin uses, against loopback
servers that misbehave at the socket level."""
import socket
import threading
import time

import pytest

import flowforge as ff


class Trickle:
    """A server that answers one byte every `pause` seconds (headers, then body)."""

    def __init__(self, pause, body=b'{"ok": true}'):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.pause, self.body = pause, body
        self.sent = 0
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
                    for i in range(len(reply)):
                        if self.stop.wait(self.pause):
                            return
                        conn.sendall(reply[i:i + 1])
                        self.sent += 1
                except OSError:
                    continue

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def trickle():
    server = Trickle(0.2)
    yield server
    server.close()


def test_one_deadline_for_the_whole_exchange(trickle):
    """Each byte comes well within the 1 s timeout, the whole answer (~90 bytes at
    0.2 s) would take 18 s: the exchange ends at 1 s, as a RetryLater."""
    client = ff.Http(trickle.url, {}, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ff.RetryLater) as e:
        client.request("GET", "/slow")
    took = time.monotonic() - started
    assert took < 2.5, took
    assert "no complete answer within 1 s" in str(e.value)
    assert 0 < trickle.sent < 40          # it did answer, slowly: not a refused connection


def test_a_prompt_server_is_unaffected():
    server = Trickle(0.0)
    try:
        reply = ff.Http(server.url, {}, timeout=5.0).request("GET", "/fast")
        assert reply.status == 200 and reply.json() == {"ok": True}
    finally:
        server.close()
