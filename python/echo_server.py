"""Serve the example Echo service until Ctrl-C: python python/echo_server.py [port]."""
import os
import sys

import octo_core

echo_thrift = octo_core.load_idl(os.path.join(os.path.dirname(__file__), "echo.thrift"))


class EchoHandler:
    async def echo(self, message: str) -> str:       # coroutine: runs on the event loop
        if not message:
            raise echo_thrift.EchoRefused("empty message")
        return message

    def log(self, line: str) -> None:                 # plain function: business thread pool
        print("log:", line, flush=True)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9001
    server = octo_core.Server(appkey="com.example.echo", host="127.0.0.1", port=port)
    server.add_service(echo_thrift.Echo, EchoHandler())
    print(f"serving Echo on 127.0.0.1:{port} (unified protocol and framed thrift)", flush=True)
    server.serve_forever()
