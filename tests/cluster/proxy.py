"""A TCP proxy a test can cut: the replicas reach PostgreSQL through it, so "the database is
unreachable" is a real network failure (connections reset, new ones refused) without
stopping the PostgreSQL every other test shares.

Sockets are only ever shut down by the thread that did not open them; each connection's
sockets are closed by the last of its two pipe threads to finish. Closing a socket another
thread still reads frees its descriptor for the next accept(), and that read then takes the
new connection's bytes: a client silently never answered, which is not the failure meant."""

from __future__ import annotations

import contextlib
import socket
import threading


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self.running = 2

    def shut(self) -> None:
        """Ends both directions; wakes both pipe threads, frees no descriptor."""
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class CuttableProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open = True
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        """Resets every connection and refuses new ones until `restore()`."""
        with self._lock:
            self._open = False
            for link in self._links:
                link.shut()

    def restore(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._acceptor.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    client.close()  # no other thread has seen it
                    continue
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                link = _Link(client, upstream)
                self._links.add(link)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(link, a, b), daemon=True).start()

    def _pipe(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        link.shut()  # one direction ended: so does the other
        with self._lock:
            link.running -= 1
            last = link.running == 0
            if last:
                self._links.discard(link)
        if last:
            for s in link.sockets:
                s.close()
