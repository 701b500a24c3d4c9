// expect: RUNTIME_ERROR
#include <chrono>
#include <thread>
int main() {
  for (;;) std::thread([] { std::this_thread::sleep_for(std::chrono::hours(1)); }).detach();
}
