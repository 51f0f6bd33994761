// Method names the clients use themselves (tests/test_wire_calls.py): they must
// not shadow the clients' own attributes, and stay callable by name.
service Clash {
  string close(1: string why),
  i32 call(1: i32 x),
  string future(),
  string callback(),
  string timeout(),
  string echo(1: string text),
}
