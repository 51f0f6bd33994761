"""Every call mode against the example server: python python/call_modes.py [host:port]."""
import asyncio
import os
import sys

import octo_core

echo_thrift = octo_core.load_idl(os.path.join(os.path.dirname(__file__), "echo.thrift"))
NODE = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9001"
OPTIONS = dict(appkey="com.example.caller", remote_appkey="com.example.echo",
               hosts=[NODE], timeout=1.0)


async def async_calls() -> None:
    async with octo_core.AsyncClient(echo_thrift.Echo, **OPTIONS) as client:
        print("asyncio:", await client.echo("hi"))
        answers = await asyncio.gather(*(client.echo(str(i)) for i in range(64)))
        print("64 in flight on one connection:", len(answers), "answers")
        try:
            await client.echo("")
        except echo_thrift.EchoRefused as refused:
            print("declared exception:", refused.reason)


def blocking_calls() -> None:
    with octo_core.Client(echo_thrift.Echo, protocol="thrift", **OPTIONS) as client:
        print("sync (native thrift):", client.echo("hi"))
        print("future:", client.future.echo("later").result())
        done = client.callback.echo("cb", callback=lambda result: print("callback:", result))
        done.result()
        client.log("oneway: returns once written")


if __name__ == "__main__":
    asyncio.run(async_calls())
    blocking_calls()
