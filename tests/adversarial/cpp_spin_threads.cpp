// class: exhaust
// expect: TIME_LIMIT
// 60 threads spinning (small stacks: the memory limit counts them): they may take this worker's
// CPU, never another worker's test's. C++, so that no interpreter lock serialises them.
#include <pthread.h>

void* spin(void*) {
  for (volatile unsigned long i = 0;; i = i + 1) {
  }
  return nullptr;
}

int main() {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 64 << 10);
  for (int i = 0; i < 60; i++) {
    pthread_t thread;
    if (pthread_create(&thread, &attr, spin, nullptr) != 0) break;  // as many as allowed
  }
  spin(nullptr);
}
