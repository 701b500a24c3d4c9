// class: persist
// expect: OK
// output: built
// A tree 1,500 directories deep in the working directory (see py_deep_tree.py).
#include <sys/stat.h>
#include <unistd.h>
#include <cstdio>
int main() {
  for (int depth = 0; depth < 1500; depth++) {
    if (FILE* f = fopen("f", "w")) {
      fputs("left behind", f);
      fclose(f);
    }
    if (mkdir("d", 0755) != 0 || chdir("d") != 0) return 1;
  }
  puts("built");
}
