// expect: RUNTIME_ERROR
#include <cstdio>
int down(volatile int n) {
  volatile char pad[1024];
  pad[0] = static_cast<char>(n);
  return down(n + 1) + pad[0];
}
int main() { printf("%d\n", down(0)); }
