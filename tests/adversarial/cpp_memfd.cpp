// class: exhaust
// expect: OK
// output: SAFE
// Hold 512 MB in a memfd, outside RLIMIT_AS (64 MB here).
#include <sys/mman.h>
#include <unistd.h>
#include <cstdio>
#include <vector>
int main() {
  int fd = memfd_create("hoard", 0);
  if (fd < 0) {
    puts("SAFE");
    return 0;
  }
  std::vector<char> block(1 << 20, 'x');
  long held = 0;
  for (int i = 0; i < 512; i++) held += write(fd, block.data(), block.size()) > 0;
  printf(held > 128 ? "LEAK %ld MB\n" : "SAFE\n", held);
}
