"""uvicorn's httptools protocol, extended so the app can drop its connection on purpose.

ASGI has no way to say "reset this connection": an app that raises before responding gets
a 500 from uvicorn, and one that returns mid-body gets an error logged. The mock needs
real broken connections (the "reset" and "cut" faults), so each request's scope carries
an ``abort(reset)`` callable (extension routerd.mock.abort) bound to its transport.
"""

from __future__ import annotations

import socket
import struct

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from routerd.mock.asgi import ABORT_EXTENSION

# SO_LINGER on with a zero timeout makes close() discard unsent data and send a TCP RST
# instead of the orderly FIN: the peer sees "connection reset by peer".
_LINGER_RESET = struct.pack("ii", 1, 0)


class AbortableHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose request scopes can abort the underlying connection."""

    def on_message_begin(self) -> None:
        """Start a request's scope as uvicorn does, then attach the abort extension."""
        super().on_message_begin()
        self.scope["extensions"] = {ABORT_EXTENSION: {"abort": self._abort}}

    def _abort(self, reset: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()
        else:
            # close() still flushes what the app already wrote, so the client sees the
            # chunks that were sent and then the end of the connection.
            transport.close()
