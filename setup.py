"""Builds the sandbox executor (csrc/) as rlef_hpc.sandbox._executor; everything else is in
pyproject.toml. Linux only: the executor is namespaces, seccomp and rlimits."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rlef_hpc.sandbox._executor",
            sources=["csrc/executor.cc", "csrc/policy.cc"],
            depends=["csrc/sandbox.h"],
            include_dirs=["csrc"],
            libraries=["seccomp"],
            language="c++",
            extra_compile_args=[
                "-std=c++17",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
