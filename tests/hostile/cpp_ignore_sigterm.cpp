// expect: TIME_LIMIT
#include <csignal>
int main() {
  signal(SIGTERM, SIG_IGN);
  signal(SIGXCPU, SIG_IGN);
  volatile unsigned long long n = 0;
  for (;;) n++;
}
