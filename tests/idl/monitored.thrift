// A base service that others extend, as fb303's FacebookService is for scribe
// and Hive's metastore: a server hosts the child and, for callers of the base
// service's name (monitoring), the base too (tests/test_wire_calls.py).
service Monitored {
  string status(),
}

service Store extends Monitored {
  string put(1: string key),
}
