"""Serve the example Echo service until Ctrl-C: python python/echo_server.py [port]."""
import contextlib
import os
import signal
import sys

import octo_core

echo_thrift = octo_core.load_idl(os.path.join(os.path.dirname(__file__), "echo.thrift"))

#: The signals that stop the server (gracefully: calls in flight are answered).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class EchoHandler:
    async def echo(self, message: str) -> str:       # coroutine: runs on the event loop
        if not message:
            raise echo_thrift.EchoRefused("empty message")
        return message

    def log(self, line: str) -> None:                 # plain function: business thread pool
        print("log:", line, flush=True)


def serve(port: int) -> int:
    """Serve on 127.0.0.1:``port`` until SIGINT or SIGTERM; 1 if the port cannot be bound."""
    server = octo_core.Server(appkey="com.example.echo", host="127.0.0.1", port=port)
    server.add_service(echo_thrift.Echo, EchoHandler())
    # Blocked before the server's thread starts (it inherits the mask), the stop
    # signals reach only sigwait below; leaving the 'with' then stops the server.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(server)               # binds: a taken port fails here
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            print(f"echo_server: cannot listen on 127.0.0.1:{port}: {reason}", file=sys.stderr)
            return 1
        print(f"serving Echo on {server.address} (unified protocol and framed thrift)",
              flush=True)
        signal.sigwait(STOP_SIGNALS)
        # A second Ctrl-C, during the stop, makes it at once (KeyboardInterrupt)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 9001))
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
