// expect: SANDBOX_VIOLATION
#include <unistd.h>
int main() {
  for (;;) fork();
}
