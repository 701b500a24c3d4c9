"""The RLEF training loop, its config and its command line (`rlef-train`)."""
