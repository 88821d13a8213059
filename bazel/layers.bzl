"""One cc_library per layer directory of cc/, as CMakeLists.txt builds them."""

load("@rules_cc//cc:defs.bzl", "cc_library")

# Files CMake builds only with nvcc, and tests, in any layer.
_NOT_HOST_LIBRARY = [
    "**/*.cu",
    "**/*.cuh",
    "**/*_cuda.cc",
    "**/*_cuda.h",
    "**/*_test.cc",
]

def layer_library(name, directory, deps = [], **kwargs):
    """The host sources and headers of `directory`, as one library."""
    exclude = [directory + "/" + pattern for pattern in _NOT_HOST_LIBRARY]
    cc_library(
        name = name,
        srcs = native.glob([directory + "/*.cc"], exclude = exclude),
        hdrs = native.glob([directory + "/*.h"], exclude = exclude),
        deps = deps,
        **kwargs
    )
