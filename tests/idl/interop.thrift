// Every thrift type, for the interop tests against Apache Thrift's C++ and Java
// libraries (tests/test_interop_cpp.py, tests/test_interop_java.py; their peers,
// tests/cpp/ and tests/java/, are built from this IDL by `thrift --gen cpp` and
// `thrift --gen java` at test time; Java's classes are in the default package).
//
// everything.thrift cannot be compiled as C++: its Node holds a Node by value.
// Here recursion goes through a list only, and fields are declared in id order.

namespace cpp octo_interop

enum Sign {
  FLOOR = -2147483648,
  MINUS_ONE = -1,
  ZERO = 0,
  CEILING = 2147483647,
}

struct Scalars {
  1: bool flag,
  2: i8 tiny,
  3: i16 small,
  4: i32 medium,
  5: i64 large,
  6: double real,
  7: string text,
  8: binary blob,
  9: Sign sign,
}

struct Inner {
  1: required string name,
  2: optional i64 count,
  3: i32 weight = 10,
}

union Variant {
  1: i64 number,
  2: string text,
  3: Inner inner,
  4: list<double> reals,
}

struct Node {
  1: i32 value,
  2: list<Node> children,
}

struct Containers {
  1: list<i32> ints,
  2: set<string> tags,
  3: map<string, i64> counts,
  4: list<list<i16>> matrix,
  5: map<Sign, list<Inner>> by_sign,
  6: map<i32, map<string, binary>> nested,
  7: list<set<i64>> set_list,
  8: set<double> real_set,
  9: map<binary, bool> by_blob,
  10: list<map<string, set<i8>>> deep,
  11: set<Sign> signs,
  12: list<bool> bools,
  13: list<Variant> variants,
}

struct Defaults {
  1: i32 answer = 42,
  2: string greeting = "hello",
  3: double ratio = 0.5,
  4: bool enabled = true,
  5: list<i32> primes = [2, 3, 5],
  6: map<string, i32> ages = {"ann": 31},
  7: Sign sign = Sign.MINUS_ONE,
  8: optional i64 offset = -1,
  9: required string must = "m",
}

exception Oops {
  1: string message,
  2: i32 code = 7,
}

exception Fatal {
  1: required string reason,
  2: optional list<string> trace,
}

struct Everything {
  1: Scalars scalars,
  2: Containers containers,
  3: Defaults defaults,
  4: optional Variant variant,
  5: optional Node tree,
  6: list<Inner> inners,
}

service Interop {
  void ping(),
  Everything echo(1: Everything payload),
  Variant echo_variant(1: Variant value),
  // kind: "oops" and "fatal" throw the declared exceptions, "undeclared" an
  // error the IDL does not declare; anything else is returned.
  string fail(1: string kind) throws (1: Oops oops, 2: Fatal fatal),
  oneway void notify(1: string event),
  // The events notify() has received, in order (to see that a oneway call arrived).
  list<string> notes(),
  // Waits delay_ms, then returns text.
  string slow(1: string text, 2: i32 delay_ms),
}

// Served by neither side: its method is unknown wherever it is called.
service Unserved {
  void ghost(),
}
