"""One cc_library per layer directory of cc/, as CMakeLists.txt builds them, with the layer's
C++ tests."""

load("@rules_cc//cc:defs.bzl", "cc_library", "cc_test")

# Files CMake builds only with nvcc, and tests, in any layer.
_NOT_HOST_LIBRARY = [
    "**/*.cu",
    "**/*.cuh",
    "**/*_cuda.cc",
    "**/*_cuda.h",
    "**/*_test.cc",
]

# A fabric test runs twice over tcp;ofi_rxm on loopback: as is, and with JEM_REORDER_SEED set,
# arrivals and completions out of order, as EFA may deliver them.
_FABRIC_RUNS = [
    ("", {"FI_TCP_IFACE": "lo"}),
    ("_reordered", {"FI_TCP_IFACE": "lo", "JEM_REORDER_SEED": "12345"}),
]

def layer_library(name, directory, deps = [], tests = [], fabric_tests = [], **kwargs):
    """The host sources and headers of `directory`, as one library, and the layer's C++ tests
    on it: `directory`/<test>.cc for each of `tests` and `fabric_tests`."""
    exclude = [directory + "/" + pattern for pattern in _NOT_HOST_LIBRARY]
    cc_library(
        name = name,
        srcs = native.glob([directory + "/*.cc"], exclude = exclude),
        hdrs = native.glob([directory + "/*.h"], exclude = exclude),
        deps = deps,
        **kwargs
    )
    runs = [(test, [("", {})]) for test in tests] + [(test, _FABRIC_RUNS) for test in fabric_tests]
    for test, variants in runs:
        for suffix, env in variants:
            cc_test(
                name = test + suffix,
                size = "small",
                srcs = [directory + "/" + test + ".cc"],
                env = env,
                deps = [":" + name],
            )
