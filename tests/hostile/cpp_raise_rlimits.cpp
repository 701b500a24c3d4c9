// expect: MEMORY_LIMIT
#include <sys/resource.h>
#include <cstdio>
#include <vector>
int main() {
  rlimit unlimited{RLIM_INFINITY, RLIM_INFINITY};
  setrlimit(RLIMIT_AS, &unlimited);  // fails: hard limits only go down
  std::vector<char> hoard(size_t(2) << 30, 1);
  printf("%d\n", hoard[12345] + hoard[hoard.size() - 1]);
}
