// Services for the wire tests (tests/test_protocol.py, tests/test_wire_*.py).
//
// Echo covers every call shape the RPC layer must carry: a plain value, a
// declared exception, a void method, a oneway method, a slow method (served by a
// coroutine handler) and a blocking one (served by the business thread pool).
// Calc is the second service hosted on the same port; it shares `whoami` with
// Echo so native (service-less) dispatch of that name is ambiguous.

// The package Apache's `thrift --gen py` writes (tests/test_wire_apache.py).
namespace py octo_echo_apache

exception EchoError {
  1: string message,
  2: i32 code,
}

service Echo {
  string echo(1: string text),
  // kind: "declared" raises EchoError, "undeclared" a ValueError, "app" a
  // TApplicationException; anything else returns kind.
  string fail(1: string kind) throws (1: EchoError err),
  void ping(),
  oneway void notify(1: string text),
  // Waits delay_ms (coroutine handler on the event loop), then returns text.
  string slow(1: string text, 2: i32 delay_ms),
  // Sleeps delay_ms on a business thread (plain function), then returns text.
  string nap(1: string text, 2: i32 delay_ms),
  // Blocks its business thread until the test releases it.
  string block(1: string text),
  string whoami(),
}

service Calc {
  i32 add(1: i32 a, 2: i32 b),
  string whoami(),
}
