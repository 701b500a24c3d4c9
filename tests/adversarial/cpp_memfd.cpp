// class: exhaust
// expect: OK
// output: SAFE
// Hold memory outside RLIMIT_AS (64 MB here) in memfds, each under the file-size limit.
#include <sys/mman.h>
#include <unistd.h>
#include <cstdio>
#include <vector>
int main() {
  std::vector<char> block(1 << 20, 'x');
  long held = 0;
  for (int i = 0; i < 8; i++) {
    int fd = memfd_create("hoard", 0);
    if (fd < 0) break;
    for (int j = 0; j < 60; j++) held += write(fd, block.data(), block.size()) > 0;
  }
  if (held > 128) {
    printf("LEAK %ld MB\n", held);
  } else {
    puts("SAFE");
  }
}
