"""A MODEL, not a measurement: this library's GPU fabric path (DESIGN §6) projected onto AWS
EFA (p5en: 8 H200 per node, 2 x 200 Gb/s of EFA per GPU) at EP8/16/32/64, beside the published
CPU-proxy kernels' EFA numbers of DESIGN §1 (T=128, H=7168, top-8 of 256 experts, fp8
dispatch with 56 fp32 scales, bf16 combine).

Per step (dispatch; combine mirrors it with one write per peer):

    pack + max(fabric leg, NVLink leg) + unpack
    fabric leg = GPU->proxy signal + CPU posting + EFA wire + EFA write latency + release

Measured inputs come from benchmarks/results/*.json (the run fails if a field is missing),
the rest are published figures or stated assumptions; every one is recorded with its source
in benchmarks/results/efa_model.json and .md.

    python benchmarks/efa_model.py [--efa_latency_us=15] [--efa_GBps=50]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from absl import app, flags

from bench_report import command, machine, now, write

HERE = os.path.dirname(os.path.abspath(__file__))

# The shapes of DESIGN §1's published table.
TOKENS, HIDDEN, EXPERTS, TOPK, SCALES = 128, 7168, 256, 8, 7168 // 128
# DESIGN §1, "CPU-proxy kernels on EFA" column: (dispatch, combine) µs.
PUBLISHED_EFA_US = {8: (49.7, 64.2), 16: (214.8, 241.5), 32: (229.1, 335.0), 64: (266.7, 391.2)}
PUBLISHED_POST_US = 27.9  # DESIGN §1: CPU cost of posting all writes of one EP64 step on EFA
# The published step's write count is not given: taken as a routing-count write and one token
# chunk (DESIGN §1: "one RDMA write per peer") to each of EP64's 56 fabric peers.
PUBLISHED_POST_WRITES = 2 * 56
# fabric_proxy.cc: dispatch posts route row, slot ranks and records to each fabric peer;
# combine posts the partial rows.
WRITES_PER_PEER = {"dispatch": 3, "combine": 1}
PHASES = tuple(WRITES_PER_PEER)

FLAGS = flags.FLAGS
flags.DEFINE_list("ep", ["8", "16", "32", "64"], "Expert-parallel sizes to project.")
flags.DEFINE_integer("ranks_per_node", 8, "GPUs per node reached over NVLink (p5en: 8).")
flags.DEFINE_float("efa_GBps", 50.0, "EFA bandwidth per GPU, GB/s (p5en: 2 x 200 Gb/s).")
flags.DEFINE_float("efa_latency_us", 15.0,
                   "ASSUMED one-way latency of an EFA write, µs (not measured here).")
flags.DEFINE_list("sensitivity_latency_us", ["8", "25"], "Other EFA latencies to print.")
flags.DEFINE_float("post_us_per_write", PUBLISHED_POST_US / PUBLISHED_POST_WRITES,
                   "CPU time to post one write, µs (default: the published EP64 figure over "
                   "its writes).")
flags.DEFINE_string("results_dir", os.path.join(HERE, "results"), "Where the measured inputs are.")
flags.DEFINE_string("out_dir", os.path.join(HERE, "results"), "Where efa_model.json/.md go.")


# --- shapes: layout.h / nvlink_layout.h / fabric_proxy.cc, in bytes ---

def align16(n):
    return -(-n // 16) * 16


def record_bytes():
    """A dispatch record: fp8 x, fp32 scales, src token, k local experts, k weights."""
    return align16(HIDDEN + 4 * SCALES + 4 + 4 * TOPK + 4 * TOPK)


def combine_row_bytes():
    return align16(2 * HIDDEN)


def route_row_bytes(ranks):
    return ranks * (1 + EXPERTS // ranks) * 4


def fabric_bytes(phase, records, peers, ranks):
    """What one GPU's fabric writes carry for `records` records to `peers` peers."""
    if phase == "dispatch":  # route row to every peer; slot ranks [k] int32 and a record each
        return peers * route_row_bytes(ranks) + records * (4 * TOPK + record_bytes())
    return records * combine_row_bytes()


# --- routing statistics (uniform top-k without replacement) ---

def hit_probability(experts, ranks, topk):
    """P(a given rank holds at least one of a token's k experts)."""
    local = experts // ranks
    return 1.0 - math.comb(experts - local, topk) / math.comb(experts, topk)


def expected_distinct_ranks(experts, ranks, topk):
    """E[number of distinct ranks among a token's k experts]: a sum of per-rank indicators."""
    return ranks * hit_probability(experts, ranks, topk)


def expected_max_binomial(n, p, m):
    """E[max of m independent Binomial(n, p)] = sum_x P(max > x)."""
    x = np.arange(n + 1)
    log_pmf = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1)
                                              for i in x])
               + x * math.log(p) + (n - x) * math.log1p(-p))
    cdf = np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)
    return float(np.sum(1.0 - cdf[:-1] ** m))


def busiest_records(peers, ranks):
    """Records through the busiest GPU's links: a GPU receives (dispatch) and sends back
    (combine) one record per (peer, token) pair that hits it, Binomial(peers * T, p); its
    senders' side varies less. Expected max over the ranks' GPUs, taken as independent (their
    counts are slightly anti-correlated, so this errs high)."""
    if peers == 0:
        return 0.0
    return expected_max_binomial(peers * TOKENS, hit_probability(EXPERTS, ranks, TOPK), ranks)


# --- the model ---

@dataclasses.dataclass(frozen=True)
class Inputs:
    kernel_us: dict          # phase -> (send kernel, recv kernel) µs
    signal_us: float         # one way, GPU -> proxy and proxy -> GPU alike
    post_us_per_write: float
    efa_GBps: float
    efa_latency_us: float
    nvlink_GBps: float
    ranks_per_node: int


def step(phase, ranks, x):
    """Predicted µs of one phase at EP `ranks`: its parts and total. A leg a rank does not
    have (no fabric peers at EP8) is absent, not zero."""
    node = min(ranks, x.ranks_per_node)
    fabric_peers, nvlink_peers = ranks - node, node - 1
    send, recv = x.kernel_us[phase]
    parts = {"pack": send}
    if fabric_peers:
        wire = fabric_bytes(phase, busiest_records(fabric_peers, ranks), fabric_peers, ranks)
        fabric = {"signal": x.signal_us,
                  "post": fabric_peers * WRITES_PER_PEER[phase] * x.post_us_per_write,
                  "efa_wire": wire / (x.efa_GBps * 1e3),
                  "efa_latency": x.efa_latency_us,
                  "release": x.signal_us}
        parts.update(fabric, fabric_leg=sum(fabric.values()))
    if nvlink_peers:
        wire = fabric_bytes(phase, busiest_records(nvlink_peers, ranks), nvlink_peers, ranks)
        parts["nvlink_leg"] = wire / (x.nvlink_GBps * 1e3)
    parts["unpack"] = recv
    legs = [parts[k] for k in ("fabric_leg", "nvlink_leg") if k in parts]
    parts["total"] = send + max(legs) + recv
    return parts


def traffic(ranks, ranks_per_node):
    """Expected routing and bytes per GPU at EP `ranks` (for the report)."""
    node = min(ranks, ranks_per_node)
    p = hit_probability(EXPERTS, ranks, TOPK)
    out = {"hit_probability": p,
           "expected_distinct_ranks_per_token": expected_distinct_ranks(EXPERTS, ranks, TOPK)}
    for leg, peers in (("fabric", ranks - node), ("nvlink", node - 1)):
        busiest = busiest_records(peers, ranks)
        out[leg] = {"peers": peers, "records_mean": peers * TOKENS * p,
                    "records_busiest_gpu": busiest,
                    **{f"{phase}_bytes_busiest_gpu": fabric_bytes(phase, busiest, peers, ranks)
                       for phase in PHASES}}
    return out


# --- measured inputs ---

def field(doc, path, name):
    """doc[path...], or a loud failure naming the file and the missing field."""
    value = doc
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise SystemExit(f"{name} lacks field {'.'.join(map(str, path))}") from None
    return value


def pick(runs, key, value, name):
    """The element of list `runs` whose `key` is `value` (fails loudly if none)."""
    found = [r for r in runs if r.get(key) == value]
    if not found:
        raise SystemExit(f"{name} has no run with {key}={value!r}")
    return found[0]


def load(name):
    path = os.path.join(FLAGS.results_dir, name)
    with open(path) as f:
        return json.load(f), name


def measured_inputs():
    """{input: {value, unit, source, where}} for everything read from the results files."""
    out = {}
    kernels, kname = load("nvlink_kernels_2xh200.json")
    # One rank, no peer: the kernels without link time (the model adds the links itself).
    run = pick(field(kernels, ["one_rank", "runs"], kname), "name", f"T={TOKENS}", kname)
    for phase in PHASES:
        for half in ("send", "recv"):
            key = f"{phase}_{half}_us"
            out[key] = {"value": field(run, [key, "median"], kname), "unit": "µs",
                        "source": "measured", "where": f"{kname} one_rank.runs[name=T={TOKENS}]"
                                                      f".{key}.median"}
    out["nvlink_GBps"] = {"value": field(kernels, ["two_ranks", "peer_copy_1GiB_GBps"], kname),
                          "unit": "GB/s", "source": "measured",
                          "where": f"{kname} two_ranks.peer_copy_1GiB_GBps"}

    signal, sname = load("signal_gpu.json")
    runs = field(signal, ["runs"], sname)
    rtts = {field(r, ["provider"], sname): field(r, ["proxy_rtt_p50_us"], sname) for r in runs}
    slowest = max(rtts, key=rtts.get)  # the provider barely matters; take the slower
    out["signal_us"] = {"value": rtts[slowest] / 2, "unit": "µs", "source": "measured",
                        "where": f"{sname} runs[provider={slowest}].proxy_rtt_p50_us / 2"}

    post, pname = load("post_cpu.json")
    most = max(field(post, ["points"], pname), key=lambda p: field(p, ["peers"], pname))
    out["post_us_per_write_measured"] = {
        "value": field(most, ["post_us_per_write_median"], pname), "unit": "µs",
        "source": "measured (shown only, not used)",
        "where": f"{pname} points[peers={most['peers']}].post_us_per_write_median: from Python "
                 "on a loaded 2-core VM (shm), so it overstates the C++ proxy's cost"}
    return out


def all_inputs():
    out = measured_inputs()
    default_post = FLAGS["post_us_per_write"].default
    out["post_us_per_write"] = {
        "value": FLAGS.post_us_per_write, "unit": "µs",
        "source": ("published / ASSUMED write count" if FLAGS.post_us_per_write == default_post
                   else "flag"),
        "where": f"DESIGN §1: {PUBLISHED_POST_US} µs for all writes of one EP64 step, over an "
                 f"ASSUMED {PUBLISHED_POST_WRITES} writes (2 per fabric peer)"}
    out["efa_GBps"] = {"value": FLAGS.efa_GBps, "unit": "GB/s", "source": "published",
                       "where": "DESIGN §1/§5: p5en, 2 EFA devices of 200 Gb/s per GPU, taken at "
                                "line rate"}
    out["efa_latency_us"] = {"value": FLAGS.efa_latency_us, "unit": "µs", "source": "ASSUMED",
                             "where": "one EFA write, posted to landed; not measured here"}
    out["ranks_per_node"] = {"value": FLAGS.ranks_per_node, "unit": "ranks", "source": "published",
                             "where": "DESIGN §5: a p5en node has 8 GPUs"}
    return out


def model_inputs(table):
    v = {k: e["value"] for k, e in table.items()}
    return Inputs(kernel_us={p: (v[f"{p}_send_us"], v[f"{p}_recv_us"]) for p in PHASES},
                  signal_us=v["signal_us"], post_us_per_write=v["post_us_per_write"],
                  efa_GBps=v["efa_GBps"], efa_latency_us=v["efa_latency_us"],
                  nvlink_GBps=v["nvlink_GBps"], ranks_per_node=v["ranks_per_node"])


def check(model):
    """Every part positive; totals rising with EP."""
    for ep, phases in model.items():
        for phase, parts in phases.items():
            bad = {k: v for k, v in parts.items() if not v > 0}
            assert not bad, f"EP{ep} {phase}: non-positive parts {bad}"
    eps = sorted(model)
    for phase in PHASES:
        totals = [model[ep][phase]["total"] for ep in eps]
        assert all(a < b for a, b in zip(totals, totals[1:])), f"{phase} not monotone: {totals}"


# --- report ---

ROWS = [("pack", "pack (send kernel)"), ("signal", "GPU->proxy signal"),
        ("post", "CPU posting"), ("efa_wire", "EFA wire (busiest GPU)"),
        ("efa_latency", "EFA write latency (ASSUMED)"), ("release", "proxy->GPU release"),
        ("fabric_leg", "= fabric leg"), ("nvlink_leg", "NVLink leg (in parallel)"),
        ("unpack", "unpack (recv kernel)"), ("total", "**total (model)**")]


def cell(parts, key):
    return f"{parts[key]:.1f}" if key in parts else "—"


def markdown(report):
    inputs, model, tr = report["inputs"], report["model_us"], report["traffic"]
    lines = [
        "# EFA projection: a MODEL, not a measurement", "",
        f"- date: {report['date']}",
        f"- machine (where the model ran): {report['machine']['host']}, "
        f"{report['machine']['cpu_model']}",
        f"- command: `{report['command']}`",
        f"- shapes: T={TOKENS}, H={HIDDEN}, top-{TOPK} of {EXPERTS} experts, fp8 dispatch with "
        f"{SCALES} fp32 scales (record {record_bytes()} B), bf16 combine (row "
        f"{combine_row_bytes()} B); uniform routing; {FLAGS.ranks_per_node} ranks per node", "",
        "Per step: pack + max(fabric leg, NVLink leg) + unpack; fabric leg = signal + posting "
        "+ EFA wire + EFA write latency + release. µs.", ""]
    for ep in model:
        t = tr[str(ep)]
        lines += [f"## EP{ep}: {t['fabric']['peers']} fabric peers, {t['nvlink']['peers']} NVLink "
                  f"peers; {t['expected_distinct_ranks_per_token']:.2f} distinct ranks per token; "
                  f"busiest GPU {t['fabric']['records_busiest_gpu']:.0f} fabric records "
                  f"(mean {t['fabric']['records_mean']:.0f})", "",
                  "| phase | dispatch | combine |", "|---|---|---|"]
        lines += [f"| {label} | {cell(model[ep]['dispatch'], key)} | "
                  f"{cell(model[ep]['combine'], key)} |" for key, label in ROWS]
        pub = report["published_efa_us"].get(str(ep))
        if pub:
            lines.append(f"| published CPU-proxy kernels on EFA | {pub[0]} | {pub[1]} |")
        lines.append("")
    lines += ["## Model beside the published CPU-proxy numbers (DESIGN §1, EFA)", "",
              "| EP | model dispatch | published dispatch | model combine | published combine |",
              "|---|---|---|---|---|"]
    for ep in model:
        pub = report["published_efa_us"].get(str(ep), ("—", "—"))
        lines.append(f"| {ep} | {model[ep]['dispatch']['total']:.1f} | {pub[0]} | "
                     f"{model[ep]['combine']['total']:.1f} | {pub[1]} |")
    lines += ["", "Sensitivity to the ASSUMED EFA write latency (dispatch / combine, µs):", ""]
    for lat, totals in report["sensitivity_efa_latency_us"].items():
        lines.append(f"- {lat} µs: " + ", ".join(f"EP{ep} {d:.1f} / {c:.1f}"
                                                 for ep, (d, c) in totals.items()))
    lines += ["", "## Inputs", "", "| input | value | source | where |", "|---|---|---|---|"]
    lines += [f"| {k} | {e['value']:.4g} {e['unit']} | {e['source']} | {e['where']} |"
              for k, e in inputs.items()]
    lines += ["", "## Assumptions and what is left out", ""]
    lines += [f"- {a}" for a in report["assumptions"]]
    return "\n".join(lines) + "\n"


def assumptions():
    return [
        "EFA write latency (posted to landed, one write) is ASSUMED, not measured: see the "
        "sensitivity lines.",
        "EFA runs at line rate (2 x 200 Gb/s per GPU, peers split over both NICs); posting and "
        "the wire are added, not overlapped (the first writes leave while later ones are posted).",
        "Posting cost per write: the published EP64 figure over an ASSUMED "
        f"{PUBLISHED_POST_WRITES} writes; the figure measured here from Python on a loaded "
        "2-core VM is shown beside it and overstates.",
        "Kernel times: one rank, no peer, T=128 medians (nvlink_kernels_2xh200.json one_rank): "
        "kernels without link time, as the model adds the links. The recv kernels expand the "
        "same expected T*k rows at any EP; the send kernels there pack one copy of each token, "
        "where at EP R they pack one per distinct rank "
        f"({expected_distinct_ranks(EXPERTS, 64, TOPK):.1f} at EP64): those extra HBM stores "
        "are not modelled.",
        "The busiest GPU: expected max over the EP's GPUs of its Binomial record count, the "
        "GPUs taken as independent (errs high); uniform routing, no hot experts.",
        "NVLink peers' bytes cross in parallel with the fabric leg at the measured 2-GPU "
        "peer-copy bandwidth; an 8-GPU NVSwitch node is assumed to give each GPU the same.",
        "Signal and release: measured with the engine's proxy thread on shm and tcp on the H200 "
        "machine; on EFA that thread also polls EFA's completion queues.",
        "Left out: the credits that free buffers for the next step (off one step's critical "
        "path), posting the route rows while the GPU still packs (DESIGN §6), CPU jitter, p99.",
    ]


def main(_):
    inputs = all_inputs()
    x = model_inputs(inputs)
    eps = sorted(int(e) for e in FLAGS.ep)
    model = {ep: {phase: step(phase, ep, x) for phase in PHASES} for ep in eps}
    check(model)
    sensitivity = {
        str(lat): {str(ep): [step(phase, ep, dataclasses.replace(x, efa_latency_us=float(lat)))
                             ["total"] for phase in PHASES]
                   for ep in eps if ep > x.ranks_per_node}
        for lat in FLAGS.sensitivity_latency_us}
    report = {"title": "EFA projection of the GPU fabric path: a MODEL, not a measurement",
              "date": now(), "machine": machine(), "command": command(),
              "shapes": {"tokens": TOKENS, "hidden": HIDDEN, "experts": EXPERTS, "topk": TOPK,
                         "fp32_scales": SCALES, "record_bytes": record_bytes(),
                         "combine_row_bytes": combine_row_bytes()},
              "inputs": inputs, "assumptions": assumptions(),
              "traffic": {str(ep): traffic(ep, x.ranks_per_node) for ep in eps},
              "model_us": model, "sensitivity_efa_latency_us": sensitivity,
              "published_efa_us": {str(ep): PUBLISHED_EFA_US[ep] for ep in eps
                                   if ep in PUBLISHED_EFA_US}}
    write(FLAGS.out_dir, "efa_model", report, markdown(report))


if __name__ == "__main__":
    app.run(main)
