// expect: MEMORY_LIMIT
#include <cstring>
#include <vector>
int main() {
  std::vector<char*> hoard;
  for (;;) {
    char* block = new char[1 << 24];
    memset(block, 1, 1 << 24);
    hoard.push_back(block);
  }
}
