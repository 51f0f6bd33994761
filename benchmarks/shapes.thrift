// Shapes for benchmarks/bench_codec_shapes.py: one struct per shape, each
// loaded by thriftpy2 (octo_core, cybin) and compiled by `thrift --gen py`
// (Apache fastbinary). Fields are declared in field-id order, as Apache writes them.

namespace py octo_bench_shapes

enum Color {
  RED = 1,
  GREEN = 2,
  BLUE = 3,
}

typedef i64 Timestamp
typedef string Name
typedef list<i32> IntList

struct Scalars {
  1: bool b,
  2: i8 y,
  3: i16 s,
  4: i32 i,
  5: i64 l,
  6: double d,
}

struct Wide {
  1: i32 f1, 2: i64 f2, 3: string f3, 4: double f4, 5: bool f5,
  6: i32 f6, 7: i64 f7, 8: string f8, 9: double f9, 10: bool f10,
  11: i32 f11, 12: i64 f12, 13: string f13, 14: double f14, 15: bool f15,
  16: i32 f16, 17: i64 f17, 18: string f18, 19: double f19, 20: bool f20,
  21: i32 f21, 22: i64 f22, 23: string f23, 24: double f24, 25: bool f25,
  26: i32 f26, 27: i64 f27, 28: string f28, 29: double f29, 30: bool f30,
  31: i32 f31, 32: i64 f32, 33: string f33, 34: double f34, 35: bool f35,
  36: i32 f36, 37: i64 f37, 38: string f38, 39: double f39, 40: bool f40,
  41: i32 f41, 42: i64 f42, 43: string f43, 44: double f44, 45: bool f45,
  46: i32 f46, 47: i64 f47, 48: string f48, 49: double f49, 50: bool f50,
  51: i32 f51, 52: i64 f52, 53: string f53, 54: double f54, 55: bool f55,
  56: i32 f56, 57: i64 f57, 58: string f58, 59: double f59, 60: bool f60,
}

struct N8 { 1: i32 leaf }
struct N7 { 1: N8 child }
struct N6 { 1: N7 child }
struct N5 { 1: N6 child }
struct N4 { 1: N5 child }
struct N3 { 1: N4 child }
struct N2 { 1: N3 child }
struct N1 { 1: N2 child }

struct I32s { 1: list<i32> v }
struct I64s { 1: list<i64> v }
struct Doubles { 1: list<double> v }
struct Bools { 1: list<bool> v }
struct I16s { 1: list<i16> v }
struct I8s { 1: list<i8> v }
struct Strings { 1: list<string> v }
struct Binaries { 1: list<binary> v }
struct Blob { 1: binary v }
struct Text { 1: string v }
struct MapI32Str { 1: map<i32, string> v }
struct MapStrI64 { 1: map<string, i64> v }
struct MapStrListI64 { 1: map<string, list<i64>> v }
struct SetStr { 1: set<string> v }
struct SetI32 { 1: set<i32> v }
struct ListListI32 { 1: list<list<i32>> v }
struct ListMapStrStr { 1: list<map<string, string>> v }

struct Item {
  1: i32 id,
  2: string name,
  3: double score,
}
struct Items { 1: list<Item> v }
struct MapI64Item { 1: map<i64, Item> v }
struct MapStrMap { 1: map<string, map<string, string>> v }
struct ListSetI32 { 1: list<set<i32>> v }

struct Sparse {
  1: optional i32 o1, 2: optional i64 o2, 3: optional string o3, 4: optional double o4,
  5: optional i32 o5, 6: optional i64 o6, 7: optional string o7, 8: optional double o8,
  9: optional i32 o9, 10: optional i64 o10, 11: optional string o11, 12: optional double o12,
  13: optional i32 o13, 14: optional i64 o14, 15: optional string o15, 16: optional double o16,
  17: optional i32 o17, 18: optional i64 o18, 19: optional string o19, 20: optional double o20,
  21: optional list<i32> o21, 22: optional map<string, string> o22, 23: optional Item o23,
  24: optional bool o24, 25: optional string o25, 26: optional i64 o26,
  27: optional i32 o27, 28: optional string o28, 29: optional double o29, 30: optional i64 o30,
}

struct Enums {
  1: Color one,
  2: list<Color> many,
  3: map<Color, string> names,
}

union Choice {
  1: i32 number,
  2: string text,
  3: Item item,
}
struct Choices { 1: list<Choice> v }

exception Failure {
  1: i32 code,
  2: string message,
  3: map<string, string> detail,
}

struct Empty {}
struct Empties { 1: list<Empty> v }

struct Typedefs {
  1: Timestamp at,
  2: Name who,
  3: IntList values,
  4: list<Timestamp> times,
}

struct Defaults {
  1: i32 retries = 3,
  2: string mode = "fast",
  3: double ratio = 0.5,
  4: bool enabled = true,
  5: list<i32> levels = [1, 2, 3],
  6: map<string, i32> weights = {"a": 1, "b": 2},
  7: Color color = Color.GREEN,
}
