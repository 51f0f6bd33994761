"""What reading an unframed (buffered-transport) thrift message costs when a peer
trickles it in: the frame reader, one byte per read, unframed against the same
message framed.

An unframed message has no length prefix, so the reader finds its end by walking
its structure; the walk keeps its place between reads. The figure to watch is
the ratio to framed reading of the same bytes: it stays near 1 at every size
when the cost is linear (a reader that walked from the start at every read
would grow with the square of the size: about 0.6 s at 32 KiB, hours at 16 MiB).

Run with::

    python benchmarks/bench_unframed.py
    python benchmarks/bench_unframed.py --sizes 32768,1048576 --chunk 1

``python -m pytest benchmarks/bench_unframed.py`` runs a small smoke version.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from thriftpy2.thrift import TMessageType

import octo_core
from octo_core import codec
from octo_core.protocol import FrameDecoder

IDL = octo_core.load_idl(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                      "tests", "idl", "everything.thrift"))
SIZES = (32 * 1024, 256 * 1024, 1024 * 1024)


KINDS = ("one binary", "strings", "small structs")


def messages(size: int) -> List[bytes]:
    """Messages of about ``size`` bytes, one per ``KINDS``: a binary whose length
    says where it ends, then a set of 28-byte strings and a list of 8-byte structs,
    whose counts bound only a small part of their size (a reader cannot wait
    for the claimed bytes and be done: it has to walk them)."""
    service = IDL.EverythingService
    binary = codec.encode_message("checksum", TMessageType.CALL, 1,
                                  service.checksum_args(data=b"z" * size))
    strings = codec.encode_message("checksum", TMessageType.CALL, 2, service.checksum_args(
        algorithms={f"{i:024d}" for i in range(max(1, size // 28))}))
    structs = codec.encode_message("classify", TMessageType.CALL, 3, service.classify_args(
        items=[IDL.Inner(name="n")] * max(1, size // 9)))
    return [binary, strings, structs]


def read_cpu_seconds(stream: bytes, chunk: int) -> float:
    """CPU seconds to feed ``stream`` to a frame reader ``chunk`` bytes at a time."""
    decoder = FrameDecoder(max_frame_size=64 * 1024 * 1024)
    started = time.process_time()
    frames = 0
    for at in range(0, len(stream), chunk):
        frames += len(decoder.feed(stream[at:at + chunk]))
    spent = time.process_time() - started
    assert frames == 1 and decoder.buffered == 0
    return spent


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--chunk", type=int, default=1, help="bytes per read (default 1)")
    args = parser.parse_args(argv)
    print(f"{args.chunk} byte(s) per read")
    print("| message | bytes | unframed s | framed s | unframed ÷ framed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for size in (int(s) for s in args.sizes.split(",")):
        for kind, message in zip(KINDS, messages(size)):
            unframed = read_cpu_seconds(message, args.chunk)
            framed = read_cpu_seconds(len(message).to_bytes(4, "big") + message, args.chunk)
            print(f"| {kind} | {len(message):,} | {unframed:.3f} | {framed:.3f} | "
                  f"{unframed / framed:.2f} |")
    return 0


def test_unframed_smoke() -> None:
    """Both kinds of message come out whole when trickled (no timing asserted)."""
    for message in messages(2048):
        read_cpu_seconds(message, 1)


if __name__ == "__main__":
    sys.exit(main())
