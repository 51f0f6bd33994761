// Included by stranger_shop.thrift from a subdirectory: typedefs of typedefs,
// an enum with negative, sparse and implicit values, consts of containers,
// struct defaults. Fields are declared in id order, so Apache's generated code
// (which writes them in id order) and thriftpy2's (declaration order) write
// the same bytes.
namespace py octo_stranger_apache.base

typedef i64 Timestamp
typedef Timestamp Millis
typedef string Id

enum Status {
  UNKNOWN = 0,
  ACTIVE = 1,
  DISABLED = -1,
  DELETED = -100,
  ARCHIVED = 50,
  NEXT,
}

const i32 MAX_PAGE = 500
const map<string, i32> LIMITS = {"read": 10, "write": -3}

struct Money {
  1: required string currency = "CNY",
  2: required i64 cents,
}

struct Page {
  1: i32 offset = 0,
  2: i32 limit = MAX_PAGE,
  3: optional string cursor,
}

exception BaseError {
  1: string message,
  2: i32 code = -1,
}
