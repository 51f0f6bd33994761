// Benchmark payloads for `octo bench codec` and benchmarks/bench_codec.py.

struct Small {
  1: i32 id,
  2: string name,
  3: double score,
}

struct Payload {
  1: i32 code,
  2: i64 timestamp,
  3: double ratio,
  4: bool active,
  5: string title,        // ~20 bytes
  6: string body,         // ~200 bytes
  7: list<i64> ids,       // 100 entries
  8: map<string, string> tags,   // 10 entries
  9: list<Small> items,   // 20 entries
}

service Echo {
  string echo(1: string message),
  Payload echo_payload(1: Payload payload),
}
