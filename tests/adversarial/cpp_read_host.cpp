// class: host
// expect: OK
// output: SAFE
// Read what the host holds (see py_read_host.py), from C++.
#include <dirent.h>
#include <cstdio>
#include <string>

const char* kProbes[] = {@PROBES_CPP@};

int main() {
  std::string read;
  for (const char* path : kProbes) {
    if (DIR* d = opendir(path)) {
      int entries = 0;
      while (dirent* e = readdir(d)) entries += e->d_name[0] != '.';
      closedir(d);
      if (entries > 0) read += std::string(path) + " ";
      continue;
    }
    if (FILE* f = fopen(path, "rb")) {
      if (fgetc(f) != EOF) read += std::string(path) + " ";
      fclose(f);
    }
  }
  if (read.empty()) {
    puts("SAFE");
  } else {
    printf("LEAK %s\n", read.c_str());
  }
}
