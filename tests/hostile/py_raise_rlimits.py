# expect: RUNTIME_ERROR
import resource

resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
hoard = bytearray(2 << 30)
