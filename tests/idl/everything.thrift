// Every thrift type and nesting pattern, for the octo_core codec tests.
//
// Loaded by thriftpy2 (octo_core.load_idl) and compiled by Apache's
// `thrift --gen py` (the namespace below names the generated package), so it
// must stay inside what both accept.
//
// Fields are declared in ascending id order: octo_core and thriftpy2 write
// fields in declaration order, Apache's Python generator in id order, so only
// then can the three agree byte for byte. `OutOfOrder` deliberately breaks the
// rule (decoding must not care about field order).

namespace py octo_everything_apache

const i32 ANSWER = 42

typedef i64 Timestamp
typedef list<Inner> InnerList

enum Color {
  RED = 0,
  GREEN = 1,
  BLUE = 2,
  INFRARED = -7,
  ULTRAVIOLET = 2147483647,
}

enum Shape {
  CIRCLE = 1,
  SQUARE = 2,
}

struct Empty {
}

struct Inner {
  1: string name,
  2: optional i64 count,
}

// A struct whose fields are all primitives: Apache structs are unhashable, so
// only thriftpy2 can hold these in sets and as map keys (see PyOnly).
struct Point {
  1: required i32 x,
  2: required i32 y,
}

exception Oops {
  1: string message,
  2: i32 code = 7,
}

exception Fatal {
  1: required string reason,
  2: optional list<string> trace,
}

struct Scalars {
  1: bool flag,
  2: byte b,
  3: i8 tiny,
  4: i16 small,
  5: i32 medium,
  6: i64 large,
  7: double real,
  8: string text,
  9: binary blob,
  10: Color color,
  11: Shape shape,
}

struct Containers {
  1: list<i32> ints,
  2: set<string> tags,
  3: map<string, i64> counts,
  4: list<list<i32>> matrix,
  5: map<string, list<Inner>> groups,
  6: map<i32, map<string, binary>> nested_maps,
  7: list<set<i64>> set_list,
  8: map<Color, Inner> by_color,
  9: list<Color> colors,
  10: set<Color> color_set,
  11: list<binary> blobs,
  12: map<binary, string> by_blob,
  13: list<double> reals,
  14: set<bool> bools,
  15: list<Oops> oopses,
  16: map<i16, set<byte>> byte_sets,
  17: list<map<string, list<set<i32>>>> deep,
  18: set<double> real_set,
  19: map<i64, bool> flags,
  20: list<bool> bool_list,
  21: list<Empty> empties,
  22: map<string, map<Color, list<Inner>>> layered,
}

struct Defaults {
  1: i32 answer = ANSWER,
  2: string greeting = "hello",
  3: double ratio = 0.5,
  4: bool enabled = true,
  5: list<i32> primes = [2, 3, 5],
  6: map<string, i32> ages = {"ann": 31, "bob": 27},
  7: set<string> letters = ["x", "y"],
  8: Color color = Color.GREEN,
  9: optional i64 offset = -1,
  10: required string must = "m",
  11: i16 small = -300,
  12: byte tiny = -8,
  13: list<list<string>> grid = [["a"], [], ["b", "c"]],
}

struct Requiredness {
  1: required i32 req,
  2: optional i32 opt,
  3: i32 plain,
  4: required Inner req_struct,
  5: optional list<string> opt_list,
  6: required map<string, string> req_map,
}

// Recursive: a tree node (and a linked list through `next`).
struct Node {
  1: i32 value,
  2: optional list<Node> children,
  3: optional Node sibling,
  4: optional map<string, Node> named,
}

// The largest field id. (Apache's generated thrift_spec is indexed by id, so
// this one is a 32768-entry tuple; fine for fastbinary.)
struct HighId {
  1: i32 low,
  32767: i64 highest,
}

// Negative field ids. The Apache compiler keeps them only with
// --allow-neg-keys (and warns that they differ from what it would auto-assign).
// Its Python generator writes fields sorted by id, hence -2 before -1, and
// emits an empty thrift_spec for this struct, so fastbinary (the accelerated
// Apache protocol) cannot serialise it: compare it with pure Apache only.
struct NegativeIds {
  -2: string minus_two,
  -1: i32 minus_one,
  1: i32 one,
  32767: bool top,
}

// 70 fields: more than the decoder keeps on its C stack (64).
struct Wide {
  1: byte f1,
  2: i16 f2,
  3: i32 f3,
  4: i64 f4,
  5: double f5,
  6: string f6,
  7: binary f7,
  8: Color f8,
  9: list<i32> f9,
  10: bool f10,
  11: byte f11,
  12: i16 f12,
  13: i32 f13,
  14: i64 f14,
  15: double f15,
  16: string f16,
  17: binary f17,
  18: Color f18,
  19: list<i32> f19,
  20: bool f20,
  21: byte f21,
  22: i16 f22,
  23: i32 f23,
  24: i64 f24,
  25: double f25,
  26: string f26,
  27: binary f27,
  28: Color f28,
  29: list<i32> f29,
  30: bool f30,
  31: byte f31,
  32: i16 f32,
  33: i32 f33,
  34: i64 f34,
  35: double f35,
  36: string f36,
  37: binary f37,
  38: Color f38,
  39: list<i32> f39,
  40: bool f40,
  41: byte f41,
  42: i16 f42,
  43: i32 f43,
  44: i64 f44,
  45: double f45,
  46: string f46,
  47: binary f47,
  48: Color f48,
  49: list<i32> f49,
  50: bool f50,
  51: byte f51,
  52: i16 f52,
  53: i32 f53,
  54: i64 f54,
  55: double f55,
  56: string f56,
  57: binary f57,
  58: Color f58,
  59: list<i32> f59,
  60: bool f60,
  61: byte f61,
  62: i16 f62,
  63: i32 f63,
  64: i64 f64,
  65: double f65,
  66: string f66,
  67: binary f67,
  68: Color f68,
  69: list<i32> f69,
  70: bool f70,
}

struct Everything {
  1: Scalars scalars,
  2: Containers containers,
  3: Defaults defaults,
  4: Requiredness requiredness,
  5: optional Node tree,
  6: Oops oops,
  7: HighId high,
  8: Empty empty,
  9: optional Wide wide,
  10: Timestamp created,
  11: InnerList inners,
}

// Declared out of id order on purpose (see the top of the file).
struct OutOfOrder {
  3: string third,
  1: i32 first,
  2: list<i64> second,
}

// Shapes only thriftpy2 can represent in Python: sets of unhashable values
// (decoded as lists) and sets/map keys of structs. Apache's generated Python
// would fail at run time on these, so the differential tests against Apache
// leave this struct out.
struct PyOnly {
  1: set<list<i32>> set_of_lists,
  2: set<map<string, i32>> set_of_maps,
  3: set<set<i16>> set_of_sets,
  4: set<Point> points,
  5: map<Point, string> by_point,
  6: list<set<list<byte>>> mixed,
}

service EverythingService {
  void ping(),
  i32 add(1: i32 a, 2: i32 b),
  Everything echo(1: Everything payload) throws (1: Oops oops, 2: Fatal fatal),
  oneway void notify(1: string event, 2: map<string, string> attrs),
  list<Node> walk(1: required Node root, 2: i32 depth = 3) throws (1: Oops oops),
  binary checksum(1: binary data, 2: set<string> algorithms),
  map<Color, list<Inner>> classify(1: list<Inner> items),
}
