// expect: WRONG_ANSWER
// output: 3
#include <cstdio>
#include <unistd.h>
int main() {
  close(1);
  printf("3\n");
}
