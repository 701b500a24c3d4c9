// expect: OUTPUT_LIMIT
#include <cstdio>
int main() {
  for (;;) puts("spam spam spam spam spam spam spam spam");
}
