// expect: TIME_LIMIT
int main() {
  volatile unsigned long long n = 0;
  for (;;) n++;
}
