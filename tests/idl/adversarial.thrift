// Shapes the other test IDLs lack, for tests/test_adversarial_inputs.py: map keys
// and set elements whose Python hash an attacker can choose (container keys,
// decoded as tuples and frozensets; structs holding containers, hashed by
// thriftpy2 from their values), unions, recursion through a union, services
// with `extends`.

enum Level { LOW = -2147483648, MID = 0, HIGH = 2147483647 }

struct Leaf {
  1: i32 a,
  2: string b,
}

struct Path {
  1: list<i64> parts,
}

union Choice {
  1: i32 number,
  2: string text,
  3: Leaf leaf,
  4: list<Choice> many,
}

// Recursive, as a set element and a map key: thriftpy2 hashes it in Python,
// a few frames a level.
struct Chain {
  1: optional Chain link,
  2: i32 v,
}

struct Keyed {
  1: map<list<i64>, i32> by_list,
  2: map<set<i64>, i32> by_set,
  3: set<Path> paths,
  4: map<Path, string> by_path,
  5: map<Leaf, i32> by_leaf,
  6: set<Leaf> leaves,
  7: set<binary> blobs,
  8: map<double, string> by_real,
  9: set<Chain> chains,
  10: map<Chain, i32> by_chain,
}

exception E1 {
  1: string m,
}

exception E2 {
  1: i32 code,
  2: E1 cause,
}

exception E3 {
}

service Base {
  void ping(),
  i32 add(1: i32 a, 2: i32 b) throws (1: E1 e1),
}

service Derived extends Base {
  oneway void fire(1: string what),
  Choice pick(1: Choice c, 2: Keyed k) throws (1: E1 e1, 2: E2 e2, 3: E3 e3),
  list<Level> levels(1: set<Level> ls),
}
