"""Repository rules for the Bazel build of jax_efa_moe's C++ core.

Everything comes from the local machine (no downloads): the XLA FFI headers from the
installed jaxlib, libfabric from the system, and stand-ins for the rule repositories that
Bazel 4's built-in tools load but that an offline machine cannot fetch.
"""

_LIBFABRIC_MISSING = (
    "libfabric not found. Install the development package (Debian/Ubuntu: " +
    "'apt-get install libfabric-dev'), or set LIBFABRIC_ROOT to its prefix " +
    "(the AWS EFA installer uses /opt/amazon/efa)."
)

def _run(ctx, args, what):
    result = ctx.execute(args)
    if result.return_code != 0:
        fail("%s failed (%s): %s%s" % (what, " ".join([str(a) for a in args]), result.stdout, result.stderr))
    return result.stdout.strip()

def _python(ctx):
    # The interpreter whose jaxlib the extension will run against: the rule's attribute,
    # then PYTHON_BIN_PATH (the variable JAX's and TensorFlow's builds use), then python3.
    path = ctx.attr.python or ctx.os.environ.get("PYTHON_BIN_PATH", "")
    if path:
        return ctx.path(path)
    found = ctx.which("python3")
    if not found:
        fail("No python3 on PATH; set PYTHON_BIN_PATH to an interpreter that has jax installed.")
    return found

def _local_jaxlib_ffi_impl(ctx):
    python = _python(ctx)
    result = ctx.execute([python, "-c", "import jax; print(jax.ffi.include_dir())"])
    if result.return_code != 0:
        fail(("%s cannot import jax (%s). Install jax and jaxlib into it, or point " +
              "PYTHON_BIN_PATH at an interpreter that has them.") % (python, result.stderr.strip()))
    include_dir = result.stdout.strip()
    if not ctx.path(include_dir + "/xla/ffi/api/ffi.h").exists:
        fail("jax.ffi.include_dir() = %s has no xla/ffi/api/ffi.h" % include_dir)
    ctx.symlink(include_dir, "include")
    ctx.file("BUILD", """\
# XLA FFI headers of the jaxlib installed for {python}.
cc_library(
    name = "ffi",
    hdrs = glob(["include/xla/ffi/api/*.h"]),
    includes = ["include"],
    visibility = ["//visibility:public"],
)
""".format(python = python))

local_jaxlib_ffi = repository_rule(
    implementation = _local_jaxlib_ffi_impl,
    attrs = {"python": attr.string(doc = "Python interpreter with jax installed (default: $PYTHON_BIN_PATH, then python3).")},
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
    doc = "Exposes //:ffi, the XLA FFI headers shipped inside the installed jaxlib.",
)

def _libfabric_location(ctx):
    """Returns (include dir, linkopts), as CMakeLists.txt finds them."""
    root = ctx.os.environ.get("LIBFABRIC_ROOT", "")
    if not root and ctx.path("/opt/amazon/efa/include/rdma/fabric.h").exists:
        root = "/opt/amazon/efa"
    if root:
        if not ctx.path(root + "/include/rdma/fabric.h").exists:
            fail("libfabric not found under LIBFABRIC_ROOT=%s (no include/rdma/fabric.h)" % root)
        for lib in ["lib", "lib64"]:
            if ctx.path("%s/%s/libfabric.so" % (root, lib)).exists:
                libdir = "%s/%s" % (root, lib)
                return root + "/include", ["-L" + libdir, "-Wl,-rpath," + libdir, "-lfabric"]
        fail("libfabric not found under LIBFABRIC_ROOT=%s (no lib/libfabric.so or lib64/libfabric.so)" % root)

    pkg_config = ctx.which("pkg-config")
    if not pkg_config or ctx.execute([pkg_config, "--exists", "libfabric"]).return_code != 0:
        fail(_LIBFABRIC_MISSING)
    include_dir = _run(ctx, [pkg_config, "--variable=includedir", "libfabric"], "pkg-config")
    linkopts = _run(ctx, [pkg_config, "--libs", "libfabric"], "pkg-config").split(" ")
    # A library outside the loader's default path must still be found when tests run.
    rpaths = ["-Wl,-rpath," + opt[2:] for opt in linkopts if opt.startswith("-L")]
    return include_dir, [opt for opt in linkopts if opt] + rpaths

def _system_libfabric_impl(ctx):
    include_dir, linkopts = _libfabric_location(ctx)
    if not ctx.path(include_dir + "/rdma/fabric.h").exists:
        fail("libfabric's pkg-config names %s, which has no rdma/fabric.h. %s" % (include_dir, _LIBFABRIC_MISSING))
    ctx.symlink(include_dir + "/rdma", "include/rdma")
    ctx.file("BUILD", """\
# libfabric from {include_dir}.
cc_library(
    name = "libfabric",
    hdrs = glob(["include/rdma/**/*.h"]),
    includes = ["include"],
    linkopts = {linkopts},
    visibility = ["//visibility:public"],
)
""".format(include_dir = include_dir, linkopts = repr(linkopts)))

system_libfabric = repository_rule(
    implementation = _system_libfabric_impl,
    environ = ["LIBFABRIC_ROOT", "PKG_CONFIG_PATH", "PATH"],
    local = True,
    doc = "Exposes //:libfabric: LIBFABRIC_ROOT, /opt/amazon/efa, else pkg-config.",
)

def _native_aliases(kind, rules):
    """A defs.bzl that names the native rules as rules_<kind> does."""
    return "# The native rules under the names that rules_%s gives them.\n" % kind + "".join([
        "%s = native.%s\n" % (rule, rule)
        for rule in rules
    ])

_RULES_CC_DEFS = _native_aliases("cc", [
    "cc_binary",
    "cc_import",
    "cc_library",
    "cc_proto_library",
    "cc_test",
    "cc_toolchain",
    "cc_toolchain_suite",
    "fdo_prefetch_hints",
    "fdo_profile",
    "objc_import",
    "objc_library",
])

_RULES_JAVA_DEFS = _native_aliases("java", [
    "java_binary",
    "java_import",
    "java_library",
    "java_lite_proto_library",
    "java_package_configuration",
    "java_plugin",
    "java_proto_library",
    "java_runtime",
    "java_test",
    "java_toolchain",
])

_COVERAGE_TOOLS_BUILD = """\
# Coverage is not used by this build; these only satisfy @bazel_tools//tools/test.
filegroup(name = "coverage_report_generator", visibility = ["//visibility:public"])
filegroup(name = "lcov_merger", visibility = ["//visibility:public"])
"""

def _native_rules_shim_impl(ctx):
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    for path, content in ctx.attr.files.items():
        ctx.file(path, content)

native_rules_shim = repository_rule(
    implementation = _native_rules_shim_impl,
    attrs = {"files": attr.string_dict(doc = "path -> content")},
    doc = "A repository written from the given files, standing in for one Bazel would download.",
)

def jax_efa_moe_dependencies(python = ""):
    """Defines @jaxlib_ffi and @libfabric, and offline stand-ins that Bazel 4 needs.

    Call it from WORKSPACE. Repositories already defined (e.g. a real rules_cc) are kept.
    """
    existing = native.existing_rules()
    if "jaxlib_ffi" not in existing:
        local_jaxlib_ffi(name = "jaxlib_ffi", python = python)
    if "libfabric" not in existing:
        system_libfabric(name = "libfabric")

    # Bazel 4's own tools (@bazel_tools) load @rules_cc and @rules_java and name
    # @remote_coverage_tools; by default all three are downloaded. Native rules stand in.
    shims = {
        "rules_cc": {"cc/BUILD": "", "cc/defs.bzl": _RULES_CC_DEFS},
        "rules_java": {"java/BUILD": "", "java/defs.bzl": _RULES_JAVA_DEFS},
        "remote_coverage_tools": {"BUILD": _COVERAGE_TOOLS_BUILD},
    }
    for name, files in shims.items():
        if name not in existing:
            native_rules_shim(name = name, files = files)
