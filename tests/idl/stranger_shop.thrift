// An IDL written as another team writes them (tests/test_wire_apache.py): an
// include from a subdirectory, typedefs of typedefs, struct-valued defaults,
// i8 and byte, binary, a recursive struct, a service that extends another,
// methods with no arguments, a void method that throws, a oneway method.
include "stranger/base.thrift"

namespace py octo_stranger_apache.shop

struct Price {
  1: required base.Money amount = {"currency": "USD", "cents": 0},
  2: optional base.Money discount,
  3: base.Status status = base.Status.ARCHIVED,
}

struct Tree {
  1: string name,
  2: list<Tree> kids,
}

struct Order {
  1: required base.Id id,
  2: base.Status status = base.Status.DISABLED,
  3: map<base.Status, list<Price>> by_status,
  4: set<base.Millis> stamps,
  5: i8 tiny = -128,
  6: byte legacy = 127,
  7: double ratio,
  8: binary raw,
  9: optional Tree tree,
  10: base.Page page = {"limit": 20},
}

exception NotFound {
  1: string message,
  2: base.Id id,
}

service Health {
  string ping(),
  base.Millis now(),
  void fail_void(1: string why) throws (1: base.BaseError err),
}

service Shop extends Health {
  Order get(1: base.Id id) throws (1: NotFound not_found),
  map<base.Status, string> statuses(),
  oneway void audit(1: string what, 2: base.Millis at),
  double measure(1: double x),
}
