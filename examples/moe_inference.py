"""A stack of expert-parallel MoE blocks with random weights, across processes.

    python examples/moe_inference.py                          # small model, 2 CPU processes
    python examples/moe_inference.py --preset=deepseek-v3     # 256 experts, top-8, hidden 7168
    python examples/moe_inference.py --preset=kimi-k2 --platform=cuda   # one process per GPU
    python examples/moe_inference.py --train                  # a few SGD steps instead

It starts its own processes (one per rank, joined through ``jax.distributed``), runs the
model with ``jax_efa_moe.AllToAll`` (``--comm=reference`` for the stock JAX path), and prints
tokens per second, the per-layer dispatch and combine times, and how far each layer's output
is from the same layer run with ``jax_efa_moe.reference.ReferenceAllToAll`` on the same input.
It exits non-zero when that error exceeds ``--rtol``.

With ``--train`` it instead fits the stack to a random teacher (float32 master weights, the
model in bfloat16, gradients through dispatch and combine) with ``--train_steps`` of SGD on
one batch, prints the loss at every step, and exits non-zero unless the loss went down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name: (hidden, expert ffn, shared ffn, experts, top-k, tokens per rank)
PRESETS = {
    "small": (512, 256, 256, 32, 8, 32),
    "deepseek-v3": (7168, 2048, 2048, 256, 8, 128),
    "kimi-k2": (7168, 2048, 2048, 384, 8, 128),
}

flags.DEFINE_enum("preset", "small", list(PRESETS), "Model shape.")
flags.DEFINE_integer("hidden", None, "Hidden size (overrides the preset).")
flags.DEFINE_integer("ffn", None, "Routed expert intermediate size (overrides the preset).")
flags.DEFINE_integer("shared_ffn", None, "Shared expert intermediate size, 0 for none.")
flags.DEFINE_integer("experts", None, "Number of routed experts (overrides the preset).")
flags.DEFINE_integer("topk", None, "Experts per token (overrides the preset).")
flags.DEFINE_integer("tokens_per_rank", None, "Tokens per rank (overrides the preset).")
flags.DEFINE_integer("layers", 2, "Number of MoE blocks.")
flags.DEFINE_enum("dispatch_dtype", "fp8", ["fp8", "bf16"], "Dispatch dtype (fp8: e4m3 + scales).")
flags.DEFINE_enum("combine_dtype", "bf16", ["bf16", "f32"], "Combine dtype.")
flags.DEFINE_enum("platform", "auto", ["auto", "cpu", "cuda"], "auto: cuda where GPUs exist.")
flags.DEFINE_integer("processes", 0, "Ranks; 0: 2 on CPU, one per GPU on cuda.")
flags.DEFINE_enum("comm", "ours", ["ours", "reference"], "Dispatch/combine to run the model with.")
flags.DEFINE_integer("steps", 5, "Timed forward passes.")
flags.DEFINE_integer("repeats", 20, "Timed calls of dispatch and of dispatch+combine.")
flags.DEFINE_float("rtol", 2e-2, "Largest allowed per-layer max|ours-ref| / max|ref|.")
flags.DEFINE_integer("seed", 0, "Seed of weights and tokens.")
flags.DEFINE_bool("train", False, "Run SGD steps on the stack instead of timing inference.")
flags.DEFINE_integer("train_steps", 8, "SGD steps with --train.")
flags.DEFINE_float("lr", 0.5, "SGD learning rate with --train.")
flags.DEFINE_float("timeout_s", 900.0, "Deadline for the whole run.")
FLAGS = flags.FLAGS

AXIS = "ep"


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def _config():
    import jax.numpy as jnp
    from jax_efa_moe.moe import MoEConfig

    H, F, Fs, E, k, T = PRESETS[FLAGS.preset]
    pick = lambda flag, default: default if flag is None else flag
    cfg = MoEConfig(hidden=pick(FLAGS.hidden, H), ffn=pick(FLAGS.ffn, F),
                    shared_ffn=pick(FLAGS.shared_ffn, Fs), num_experts=pick(FLAGS.experts, E),
                    experts_per_token=pick(FLAGS.topk, k),
                    dispatch_dtype=jnp.float8_e4m3fn if FLAGS.dispatch_dtype == "fp8" else jnp.bfloat16,
                    combine_dtype=jnp.float32 if FLAGS.combine_dtype == "f32" else jnp.bfloat16)
    return cfg, pick(FLAGS.tokens_per_rank, T)


def _make_comm(kind, mesh, cfg, tokens):
    if kind == "ours":
        from jax_efa_moe import AllToAll
        # Serving needs no gradient context; training does.
        return AllToAll(mesh, AXIS, max_tokens_per_rank=tokens, differentiable=FLAGS.train,
                        **cfg.comm_kwargs())
    from jax_efa_moe.reference import ReferenceAllToAll
    # The padded exchange: same rows as the ragged one, and it runs on every backend in either
    # process model (XLA:CPU has no ragged_all_to_all; see benchmarks/ for GPU caveats).
    return ReferenceAllToAll(mesh, AXIS, max_tokens_per_rank=tokens, check=False,
                             exchange="padded", **cfg.comm_kwargs())


def _median_ms(fn, args, repeats):
    from jax_efa_moe import timing
    return timing.summary(timing.time_calls(fn, args, repeats), unit=1e3)["median"]


def worker(rank, world, args):
    """One rank: build the model, time it, compare it layer by layer with the reference."""
    FLAGS(["moe_inference"] + list(args))
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax_efa_moe import moe, per_rank

    cfg, T = _config()
    mesh = per_rank.ep_mesh(AXIS)
    R = mesh.shape[AXIS]
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{R} ranks on {jax.devices()[0].platform}, preset {FLAGS.preset}: {FLAGS.layers} layers, "
        f"hidden {cfg.hidden}, {cfg.num_experts} experts top-{cfg.experts_per_token}, "
        f"expert ffn {cfg.ffn}, shared ffn {cfg.shared_ffn}, {T} tokens per rank, "
        f"dispatch {FLAGS.dispatch_dtype}, combine {FLAGS.combine_dtype}, comm {FLAGS.comm}")

    key_w, key_x = jax.random.split(jax.random.key(FLAGS.seed))
    params = moe.init_params(key_w, cfg, mesh, AXIS, num_layers=FLAGS.layers)
    x = jax.jit(lambda k: jax.random.normal(k, (R * T, cfg.hidden), jnp.float32).astype(cfg.dtype),
                out_shardings=NamedSharding(mesh, P(AXIS)))(key_x)
    layer_specs = moe.param_specs(AXIS, (None,))

    def model(comm):
        def forward(params, x):
            def block(h, p):
                return moe.moe_block(p, h, comm, cfg), h
            return jax.lax.scan(block, x, params)   # output, and each layer's input
        return jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(layer_specs, P(AXIS)),
                                     out_specs=(P(AXIS), P(None, AXIS))))

    def layerwise(comm):
        def each(params, inputs):
            return jax.lax.map(lambda pi: moe.moe_block(pi[0], pi[1], comm, cfg), (params, inputs))
        return jax.jit(jax.shard_map(each, mesh=mesh, in_specs=(layer_specs, P(None, AXIS)),
                                     out_specs=P(None, AXIS)))

    comm = _make_comm(FLAGS.comm, mesh, cfg, T)
    if FLAGS.train:
        first, last = _train(comm, cfg, mesh, params, x, say)
        comm.close()
        if not last < first:
            raise SystemExit(f"FAILED: the loss went from {first:.4g} to {last:.4g}")
        say(f"PASSED: the loss went down from {first:.4g} to {last:.4g}")
        return
    ref = _make_comm("reference", mesh, cfg, T)
    run = model(comm)

    # Throughput of the whole stack.
    jax.block_until_ready(run(params, x))
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        out, _ = run(params, x)
    jax.block_until_ready(out)
    step_s = (time.perf_counter() - t0) / FLAGS.steps
    say(f"forward: {1e3 * step_s:.2f} ms per step, {R * T / step_s:,.0f} tokens/s "
        f"({R} ranks x {T} tokens, {FLAGS.layers} layers)")

    # Dispatch and combine of one layer (layer 0's routing), timed per call.
    def routed(p, h):
        h = moe.rms_norm(h)
        ids, w = moe.route(h, p.router, cfg.experts_per_token)
        hq, sc = (moe.quantize_fp8(h) if FLAGS.dispatch_dtype == "fp8" else (h, None))
        return hq, sc, ids, w

    p0 = jax.tree.map(lambda a: a[0], params)
    spec0 = moe.param_specs(AXIS)
    hq, sc, ids, w = jax.jit(jax.shard_map(routed, mesh=mesh, in_specs=(spec0, P(AXIS)),
                                           out_specs=P(AXIS)))(p0, x)

    def dispatch(hq, sc, ids, w):
        d = comm.dispatch(hq, ids, w, x_scale=sc)
        return d.expert_x, d.expert_counts

    def round_trip(hq, sc, ids, w):
        d = comm.dispatch(hq, ids, w, x_scale=sc)
        return comm.combine(d.expert_x.astype(cfg.combine_dtype), d.handle)

    shard = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    t_dispatch = _median_ms(shard(dispatch), (hq, sc, ids, w), FLAGS.repeats)
    t_round = _median_ms(shard(round_trip), (hq, sc, ids, w), FLAGS.repeats)
    say(f"per layer ({FLAGS.comm}, median of {FLAGS.repeats} calls incl. launch): dispatch "
        f"{t_dispatch:.3f} ms, combine {max(t_round - t_dispatch, 0.0):.3f} ms "
        f"(dispatch+combine {t_round:.3f} ms)")

    # Each layer on the reference stack's own inputs, so that routing cannot drift apart.
    ref_out, ref_inputs = model(ref)(params, x)
    ours_layers = layerwise(comm)(params, ref_inputs)
    # Per leading index: max |a - b| and max |b|, over every rank.
    stats = jax.jit(lambda a, b: (jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)),
                                          axis=(1, 2)),
                                  jnp.max(jnp.abs(b.astype(jnp.float32)), axis=(1, 2))))
    ref_layers = jax.jit(lambda i, o: jnp.concatenate([i[1:], o[None]]))(ref_inputs, ref_out)
    err, scale = (jax.device_get(v) for v in stats(ours_layers, ref_layers))
    worst = 0.0
    for layer in range(FLAGS.layers):
        rel = float(err[layer]) / max(float(scale[layer]), 1e-30)
        worst = max(worst, rel)
        say(f"layer {layer}: {FLAGS.comm} vs reference, max abs error {float(err[layer]):.3g}, "
            f"max rel error {rel:.3g}")
    end_err, end_scale = (float(v[0]) for v in stats(out[None], ref_out[None]))
    say(f"whole stack (routing may differ at near-ties): max abs error {end_err:.3g}, "
        f"max rel error {end_err / max(end_scale, 1e-30):.3g}")
    comm.close()
    ref.close()
    if worst > FLAGS.rtol:
        raise SystemExit(f"FAILED: per-layer max rel error {worst:.3g} > rtol {FLAGS.rtol:.3g}")
    say(f"PASSED: per-layer max rel error {worst:.3g} <= rtol {FLAGS.rtol:.3g}")


def _train(comm, cfg, mesh, params, x, say):
    """SGD on float32 master weights of the stack, towards tanh(x A) for a random A; returns
    the first and the last loss."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax_efa_moe import moe

    def forward(params, x):
        def block(h, p):
            return moe.moe_block(jax.tree.map(lambda a: a.astype(cfg.dtype), p), h, comm,
                                 cfg), None
        return jax.lax.scan(block, x, params)[0]

    stack = jax.shard_map(forward, mesh=mesh, in_specs=(moe.param_specs(AXIS, (None,)), P(AXIS)),
                          out_specs=P(AXIS))

    def loss_fn(params, x, target):
        return jnp.mean((stack(params, x).astype(jnp.float32) - target) ** 2)

    @jax.jit
    def step(params, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
        return jax.tree.map(lambda p, g: p - FLAGS.lr * g, params, grads), loss

    H = cfg.hidden
    teacher = jax.jit(
        lambda k, x: jnp.tanh(x.astype(jnp.float32) @ (jax.random.normal(k, (H, H)) / H ** 0.5)),
        out_shardings=NamedSharding(mesh, P(AXIS)))
    target = teacher(jax.random.key(FLAGS.seed + 1), x)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    losses = []
    for i in range(FLAGS.train_steps):
        t0 = time.perf_counter()
        params, loss = step(params, x, target)
        losses.append(float(loss))
        say(f"step {i}: loss {losses[-1]:.5f} ({1e3 * (time.perf_counter() - t0):.0f} ms"
            f"{', compiling' if i == 0 else ''})")
    return losses[0], losses[-1]


def main(argv):
    from jax_efa_moe import launch

    gpus = _gpu_count()
    platform = FLAGS.platform if FLAGS.platform != "auto" else ("cuda" if gpus else "cpu")
    if platform == "cuda" and not gpus:
        raise app.UsageError("--platform=cuda but nvidia-smi finds no GPU")
    n = FLAGS.processes or (gpus if platform == "cuda" else 2)
    path = os.pathsep.join([HERE, ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    try:
        outputs = launch.run("moe_inference:worker", num_processes=n, args=sys.argv[1:],
                             timeout_s=FLAGS.timeout_s, env={"PYTHONPATH": path},
                             platform=platform)
    except launch.LaunchError as e:
        print(e, file=sys.stderr)
        return 1
    print(outputs[0], end="")
    return 0


if __name__ == "__main__":
    sys.path[:0] = [ROOT]
    app.run(main)
