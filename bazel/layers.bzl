"""One cc_library per layer directory of cc/, as CMakeLists.txt builds them, and the C++
tests that talk over the fabric."""

load("@rules_cc//cc:defs.bzl", "cc_library", "cc_test")

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

def fabric_test(name, src, deps):
    """`name` over tcp;ofi_rxm on loopback, and `name`_reordered with JEM_REORDER_SEED set:
    arrivals and completions out of order, as EFA may deliver them."""
    for suffix, env in [("", {}), ("_reordered", {"JEM_REORDER_SEED": "12345"})]:
        cc_test(
            name = name + suffix,
            size = "small",
            srcs = [src],
            env = dict({"FI_TCP_IFACE": "lo"}, **env),
            deps = deps,
        )
