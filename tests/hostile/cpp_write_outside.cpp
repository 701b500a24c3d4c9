// expect: RUNTIME_ERROR
#include <cstdio>
int main() {
  FILE* f = fopen("/tmp/rlef_hostile_target", "w");
  FILE* g = fopen("/tmp/rlef_hostile_sentinel", "w");
  if (f == nullptr || g == nullptr) return 3;
  fputs("pwned", f);
  fputs("pwned", g);
}
