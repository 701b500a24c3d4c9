// expect: SANDBOX_VIOLATION
#include <signal.h>
#include <unistd.h>
int main() { return kill(getppid(), SIGKILL); }
