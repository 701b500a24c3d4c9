// class: earlier
// expect: OK
// output: done
// Leaves a token behind: in its binary (a string), in /tmp, in its working directory.
#include <cstdio>
#include <initializer_list>
const char kToken[] = "@TOKEN@";
int main() {
  for (const char* path : {"/tmp/left.txt", "left_here.txt"}) {
    if (FILE* f = fopen(path, "w")) {
      fputs(kToken, f);
      fclose(f);
    }
  }
  puts("done");
}
