"""Where a kernel's time goes, by source line.

ncu samples each warp's state per instruction (`--section WarpStateStats --section
SourceCounters --import-source yes`; then `ncu -i REP --page source --csv --print-source sass`
writes them per SASS instruction). This script attributes those samples to the source lines
that `nvdisasm -g` reads from the kernel's cubin: the object file CMake built (with -lineinfo)
holds it, and `cuobjdump -xelf all OBJ` extracts it. It refuses a cubin whose instructions
differ from the profiled ones (another build).

    python scripts/ncu_lines.py --csv=kernels_r1_case1.sass.csv \\
        --cubin=dispatch_kernels.sm_90a.cubin --kernel=DispatchKernel --top=30

Prints, for each profiled launch of a kernel whose name contains --kernel: per source line
(file:line, the innermost inlined one), the samples of every warp state, those waiting at a
barrier and those waiting for instructions to arrive, and the distinct instructions of the
line that ran. scripts/gpu_check.sh's profile stage runs it where nvdisasm exists.
"""

from __future__ import annotations

import collections
import csv
import re
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("csv", None, "ncu's source page, SASS, as CSV.", required=True)
flags.DEFINE_string("cubin", None, "The cubin of the profiled build.", required=True)
flags.DEFINE_string("kernel", None, "Part of the kernel's name.", required=True)
flags.DEFINE_integer("top", 30, "Source lines to print per launch.")
flags.DEFINE_string("nvdisasm", "nvdisasm", "nvdisasm to run.")

LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def cubin_functions(cubin: str) -> dict[str, list[tuple[str, tuple[str, int] | None]]]:
    """Mangled function name -> its instructions in order, as (text, (file, line))."""
    text = subprocess.run([FLAGS.nvdisasm, "-g", "-c", cubin], check=True,
                          capture_output=True, text=True).stdout
    functions, current, where = {}, None, None
    for line in text.splitlines():
        if line.startswith(".text."):
            current = functions.setdefault(line[len(".text."):].rstrip(":"), [])
            where = None
        elif current is not None and (m := LINE.search(line)):
            where = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
        elif current is not None and (m := INSTRUCTION.search(line)):
            current.append((m.group(2), where))
    return functions


def profiled_launches(path: str):
    """(kernel name, column names, rows) for each launch in ncu's CSV."""
    launch = None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "Kernel Name":
                if launch:
                    yield launch
                launch = [row[1], None, []]
            elif launch and row and row[0] == "Address":
                launch[1] = row
            elif launch and launch[1] and row:
                launch[2].append(row)
    if launch:
        yield launch


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def matching_function(functions, rows, source_col):
    """The cubin function whose instructions are the profiled ones, or None."""
    for name, instructions in functions.items():
        if len(instructions) == len(rows) and all(
                text.split()[0] in row[source_col] for (text, _), row in zip(instructions, rows)):
            return name, instructions
    return None


def report(name, columns, rows, functions) -> bool:
    src = columns.index("Source")
    match = matching_function(functions, rows, src)
    if match is None:
        print(f"{name[:100]}: no function of the cubin has the profiled instructions "
              "(another build?)", file=sys.stderr)
        return False
    _, instructions = match
    col = {key: columns.index(key) for key in (
        "Warp Stall Sampling (All Samples)", "stall_barrier", "stall_no_inst",
        "Instructions Executed")}
    samples, barrier, no_inst, ran = (collections.Counter() for _ in range(4))
    for (_, where), row in zip(instructions, rows):
        samples[where] += number(row[col["Warp Stall Sampling (All Samples)"]])
        barrier[where] += number(row[col["stall_barrier"]])
        no_inst[where] += number(row[col["stall_no_inst"]])
        ran[where] += number(row[col["Instructions Executed"]]) > 0
    total = sum(samples.values()) or 1.0
    print(f"{name[:100]}: {len(rows)} instructions, {sum(ran.values())} of them ran; "
          f"{total:.0f} samples, {100 * sum(barrier.values()) / total:.0f}% at a barrier, "
          f"{100 * sum(no_inst.values()) / total:.0f}% waiting for instructions")
    print(f"{'line':<32} {'samples':>8} {'%':>5} {'barrier':>8} {'no inst':>8} {'ran':>5}")
    for where, n in samples.most_common(FLAGS.top):
        label = f"{where[0]}:{where[1]}" if where else "?"
        print(f"{label:<32} {n:>8.0f} {100 * n / total:>5.1f} {barrier[where]:>8.0f} "
              f"{no_inst[where]:>8.0f} {ran[where]:>5}")
    return True


def main(argv):
    del argv
    functions = cubin_functions(FLAGS.cubin)
    found = ok = 0
    for name, columns, rows in profiled_launches(FLAGS.csv):
        if FLAGS.kernel in name and columns:
            found += 1
            ok += report(name, columns, rows, functions)
            print()
    if not found:
        sys.exit(f"no launch of a kernel named like {FLAGS.kernel!r} in {FLAGS.csv}")
    sys.exit(0 if ok == found else 1)


if __name__ == "__main__":
    app.run(main)
