// expect: RUNTIME_ERROR
// Writes outside /tmp, the only writable directory of a test's tree.
#include <cstdio>
int main() {
  FILE* f = fopen("/solution/rlef_hostile_target", "w");
  FILE* g = fopen("/rlef_hostile_sentinel", "w");
  if (f == nullptr || g == nullptr) return 3;
  fputs("pwned", f);
  fputs("pwned", g);
}
