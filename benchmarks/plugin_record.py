"""What the vLLM plugin costs per engine step and per scrape, next to vLLM's own Prometheus logger.

Goal: ``DeepSpecStatLogger.record()`` at most 5 us median per engine step on this
CPU with k = 4 and 3 windows (1m, 5m, 1h), and a scrape of its metrics at most 5 ms.

Set-up: a real ``VllmConfig`` for the tiny target/draft pair (k = 4, ``draft_model``), and a draft
manifest with a baseline (written into a temp dir, ``DSPEC_MANIFEST``), so the drift CUSUM runs on
every step as it does for an exported draft. The stats are a pre-built list of decode steps of B
requests (B = 1, 8, 64): ``SchedulerStats`` with ``SpecDecodingStats.new(4)`` filled by
``observe_draft`` (each position accepted with probability 0.8 until the first rejection,
seeded), and an ``IterationStats`` as vLLM's output processor fills it (generated tokens, one
inter-token latency per request, and about one request in 100 finishing per step with a new one
taking its place: TTFT, prompt tokens, a ``FinishedRequestStats``); also ``iteration_stats=None``.

The SAME step objects go to every arm, called as vLLM's ``StatLoggerManager`` calls a logger
(``record(s, i, mm_cache_stats=None, engine_idx=0)``), interleaved per step in rotating order so
that machine noise hits every arm alike:

* ``null``: an empty function of the same signature: the floor (timer + one Python call);
* ``deepspec``: ``DeepSpecStatLogger.record``, its telemetry on a simulated clock that advances 5 ms
  per step (``itertools.count(t, 0.005).__next__``, a builtin like ``time.monotonic``), so it folds
  its accumulator into the windows once per 200 steps as in a server stepping every 5 ms;
* ``deepspec, real clock``: the same on ``time.monotonic`` (a tight loop: a flush per real second);
* ``deepspec, flush every step``: a clock advancing 1 s per step, so every step pays the fold into
  the cumulative counts and the three windows (the cost of the one step per second that does);
* ``vllm``: vLLM's ``PrometheusStatLogger.record`` (gauges, counters, spec-decode counters,
  histograms of the iteration stats: much more than the plugin does);
* ``vllm spec``: only its ``SpecDecodingProm.observe`` (the like-for-like part, in a one-line
  wrapper of the same signature).

Each call is timed alone (``perf_counter_ns``; median, p90, p99, max) and each arm also in a loop
over the steps without a per-call timer (the mean, no timer overhead). The windows are filled
(an hour of simulated steps) before timing. Scrapes: ``generate_latest`` of a registry holding only
the plugin's ``TelemetryCollector``, and of the whole ``REGISTRY`` (vLLM's metrics too), alternated,
for 1 and 8 engines. Multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, in a child process, half the
steps): the arms ``null``, ``deepspec``, ``vllm``, ``vllm spec`` while the plugin's publisher thread
runs, then ``MultiprocessPublisher.publish()`` alone and vLLM's multiprocess ``/metrics`` scrape.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plugin_record.py \
        [--tiny /tmp/tinyp/t] [--steps 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

K = 4
STEP_S = 0.005  # simulated time between engine steps
ALPHA = 0.8  # per-position acceptance probability of the simulated draft
FILL_S = 3700  # simulated seconds of traffic before timing: the 1h window full
GOAL_RECORD_US = 5.0
GOAL_SCRAPE_MS = 5.0
BATCHES = (1, 8, 64)
RESULTS = Path(__file__).resolve().parent / "results" / "plugin_record.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


# --- set-up ----------------------------------------------------------------------------------


def tiny_pair(reuse: Path, work: Path) -> tuple[Path, Path]:
    """The tiny target and draft: reused from ``reuse`` when built there, else built in ``work``."""
    if (reuse / "target" / "config.json").is_file() and (reuse / "draft" / "config.json").is_file():
        return reuse / "target", reuse / "draft"
    from deepspec_plugin.models import build_tiny

    built = build_tiny(work / "tiny", seed=0, perturb=0.02)
    return built.target, built.draft


def manifest_with_baseline(target: Path, work: Path) -> Path:
    """A k = 4 manifest whose baseline (rate 0.6) turns the CUSUM on, with measured costs at two
    batch sizes, so that every step counts its batch and every scrape computes the break-even
    gauges; the target's own fingerprint, so the fingerprint check finds no mismatch."""
    from deepspec_plugin.manifest import Baseline, DraftManifest, write_manifest
    from deepspec_plugin.metrics import StepCosts
    from deepspec_plugin.models import fingerprint, tokenizer_fingerprint

    per_position = [0.85, 0.7, 0.55, 0.3]
    costs = [StepCosts(1, 0.05, {1: 1.07, 2: 1.16, 4: 1.53}), StepCosts(8, 0.08, {4: 1.9})]
    baseline = Baseline(k=K, temperature=0.0, acceptance_rate=sum(per_position) / K,
                        acceptance_length=1 + sum(per_position), per_position=per_position,
                        report={"batch_size": 1}, costs=costs,
                        speedups=[{"k": K, "batch_size": 1, "measured": 1.5, "ci95": [1.4, 1.6],
                                   "predicted": 1.6}])
    manifest = DraftManifest(target_fingerprint=fingerprint(target),
                             tokenizer_fingerprint=tokenizer_fingerprint(target),
                             method="draft_model", k=K, baseline=baseline)
    return write_manifest(manifest, work / "deepspec.json")


def engine_config(target: Path, draft: Path):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), max_model_len=256, speculative_config={
        "model": str(draft), "num_speculative_tokens": K, "method": "draft_model",
    }).create_engine_config()


def make_steps(n: int, batch: int, seed: int, with_iteration: bool) -> list[tuple]:
    """``n`` decode steps of ``batch`` requests: (SchedulerStats, IterationStats or None)."""
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    rng = random.Random(seed)
    steps = []
    for _ in range(n):
        sd = SpecDecodingStats.new(K)
        generated = 0
        for _ in range(batch):
            accepted = 0
            while accepted < K and rng.random() < ALPHA:
                accepted += 1
            sd.observe_draft(K, accepted)
            generated += accepted + 1
        sched = SchedulerStats(num_running_reqs=batch, num_waiting_reqs=rng.randrange(3),
                               kv_cache_usage=rng.random(), spec_decoding_stats=sd)
        it = None
        if with_iteration:
            it = IterationStats()
            it.num_generation_tokens = generated
            it.inter_token_latencies_iter = [rng.uniform(0.004, 0.03) for _ in range(batch)]
            # Mean request length ~100 steps: each request finishes with probability 1/100, and a
            # new one is prefilled in its place (its prompt tokens, TTFT).
            for _ in range(sum(rng.random() < 0.01 for _ in range(batch))):
                prompt = rng.randrange(16, 200)
                it.prompt_token_stats.computed += prompt
                it.prompt_token_stats.total += prompt
                it.time_to_first_tokens_iter.append(rng.uniform(0.02, 0.2))
                it.max_num_generation_tokens_iter.append(256)
                it.n_params_iter.append(1)
                it.finished_requests.append(FinishedRequestStats(
                    finish_reason=FinishReason.STOP, e2e_latency=rng.uniform(0.5, 3.0),
                    num_prompt_tokens=prompt, num_generation_tokens=rng.randrange(50, 256),
                    max_tokens_param=256, queued_time=0.001, prefill_time=0.05,
                    inference_time=1.0, decode_time=0.95, mean_time_per_output_token=0.01))
        steps.append((sched, it))
    return steps


def deepspec_logger(vllm_config, engines, clock=None):
    """A ``DeepSpecStatLogger`` (installed as vLLM would), its fingerprint thread done, on
    ``clock`` when given (replacing ``time.monotonic``)."""
    from deepspec_plugin.serving.vllm_logger import DeepSpecStatLogger

    logger = DeepSpecStatLogger(vllm_config, list(engines))
    if logger.telemetry is None:
        raise SystemExit("the deepspec plugin disabled itself; see the warning above")
    for th in threading.enumerate():
        if th.name == "deepspec-fingerprint":
            th.join()
    if clock is not None:
        logger.telemetry.clock = clock
    return logger


def check_filled(telemetry, engines: int) -> None:
    """Every window of every engine holds drafts (else the timings would be of empty windows)."""
    rates = [x for spec, samples in telemetry.families()
             if spec.name == "deepspec_acceptance_rate" for x in samples]
    if len(rates) != len(telemetry.window_labels) * engines:
        raise SystemExit(f"windows not filled: {len(rates)} acceptance-rate samples for "
                         f"{engines} engine(s) x {len(telemetry.window_labels)} windows")


def sim_clock(start: float, step: float):
    """A clock advancing ``step`` seconds per call (the telemetry reads it once per step)."""
    return itertools.count(start, step).__next__


def fill(logger, steps, engines=(0,), seconds: float = FILL_S, t0: float | None = None) -> float:
    """Feed ``seconds`` of simulated traffic (one step per engine per second, from ``t0``) to
    fill every window; returns the simulated time reached. The default start is just after the
    real clock's now: the telemetry may have read ``time.monotonic`` already (the multiprocess
    publisher does at install), and a simulated time before that reading would never flush."""
    if t0 is None:
        t0 = time.monotonic() + 1.0
    telemetry = getattr(logger, "telemetry", None)
    if telemetry is not None:
        telemetry.clock = sim_clock(t0, 1.0 / len(engines))
    for j in range(int(seconds)):
        s, it = steps[j % len(steps)]
        for e in engines:
            logger.record(s, it, mm_cache_stats=None, engine_idx=e)
    return t0 + seconds + 1.0


# --- timing ----------------------------------------------------------------------------------


def null_record(scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
    return None


def spec_observe_arm(vllm_logger):
    observe = vllm_logger.spec_decoding_prom.observe

    def vllm_spec(scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        observe(scheduler_stats.spec_decoding_stats, engine_idx)

    return vllm_spec


def time_arms(arms: dict, steps: list, rounds: int) -> dict[str, dict]:
    """Per-call times (ns) of every arm on every step, interleaved per step in rotating order;
    then each arm over the whole list in a loop without per-call timers (rotating too)."""
    names = list(arms)
    fns = [arms[n] for n in names]
    m = len(fns)
    per_call: list[list[int]] = [[] for _ in names]
    loop_ns: list[list[float]] = [[] for _ in names]
    pc = time.perf_counter_ns
    for r in range(rounds):
        gc.collect()
        for j, (s, it) in enumerate(steps):
            first = (j + r) % m
            for q in range(m):
                a = (first + q) % m
                fn = fns[a]
                t0 = pc()
                fn(s, it, mm_cache_stats=None, engine_idx=0)
                t1 = pc()
                per_call[a].append(t1 - t0)
        for q in range(m):
            a = (r + q) % m
            fn = fns[a]
            t0 = pc()
            for s, it in steps:
                fn(s, it, mm_cache_stats=None, engine_idx=0)
            loop_ns[a].append((pc() - t0) / len(steps))
    out = {}
    for a, name in enumerate(names):
        xs = sorted(per_call[a])
        out[name] = {
            "n": len(xs), "median_us": pct(xs, 0.5) / 1e3, "p90_us": pct(xs, 0.9) / 1e3,
            "p99_us": pct(xs, 0.99) / 1e3, "max_us": xs[-1] / 1e3,
            "over_goal_pct": 100.0 * sum(x > GOAL_RECORD_US * 1e3 for x in xs) / len(xs),
            "loop_mean_us": sorted(loop_ns[a])[len(loop_ns[a]) // 2] / 1e3,
        }
    return out


def pct(sorted_xs: list, q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def time_calls(fns: dict, repeats: int) -> dict[str, dict]:
    """Milliseconds per call of each zero-argument function, alternated over ``repeats`` rounds."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    extra: dict[str, dict] = {}
    for r in range(repeats):
        for name in (list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]):
            t0 = time.perf_counter()
            result = fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if isinstance(result, bytes) and name not in extra:
                extra[name] = {"bytes": len(result), "samples": sum(
                    1 for line in result.splitlines() if line and not line.startswith(b"#"))}
    out = {}
    for name, xs in times.items():
        xs.sort()
        out[name] = {"n": len(xs), "median_ms": pct(xs, 0.5), "p90_ms": pct(xs, 0.9),
                     "max_ms": xs[-1], **extra.get(name, {})}
    return out


# --- the runs --------------------------------------------------------------------------------


def record_benchmark(cfg, steps_n: int, rounds: int, multiproc: bool) -> dict:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    vllm_logger = PrometheusStatLogger(cfg, [0])
    base = make_steps(steps_n, 8, seed=99, with_iteration=True)
    loggers = {"deepspec": deepspec_logger(cfg, [0])}
    if not multiproc:  # one telemetry per process there: a second would restart the publisher
        loggers["deepspec, real clock"] = deepspec_logger(cfg, [0])
        loggers["deepspec, flush every step"] = deepspec_logger(cfg, [0])
    for name, logger in loggers.items():
        if name == "deepspec, real clock":  # an hour of history ending now, then the real clock
            fill(logger, base, t0=time.monotonic() - FILL_S - 1)
            logger.telemetry.clock = time.monotonic
        else:
            t = fill(logger, base)
            logger.telemetry.clock = sim_clock(t, 1.0 if "flush" in name else STEP_S)
        check_filled(logger.telemetry, 1)
    fill(vllm_logger, base, seconds=steps_n)
    main = loggers["deepspec"]
    from deepspec_plugin.serving import exposition

    if not multiproc:
        exposition.install(main.telemetry)  # the one REGISTRY scrapes below
    arms = {"null": null_record, **{n: lg.record for n, lg in loggers.items()},
            "vllm": vllm_logger.record, "vllm spec": spec_observe_arm(vllm_logger)}
    results = {}
    configs = [(b, True) for b in BATCHES] + [(b, False) for b in BATCHES]
    for b, with_it in configs:
        steps = make_steps(steps_n, b, seed=b, with_iteration=with_it)
        time_arms(arms, steps[:200], 1)  # warm-up
        key = f"B={b}, iteration_stats={'yes' if with_it else 'None'}"
        results[key] = {"batch": b, "iteration_stats": with_it,
                        "arms": time_arms(arms, steps, rounds)}
        r = results[key]["arms"]
        print(f"  {key:34} deepspec {r['deepspec']['median_us']:6.2f} us  "
              f"vllm {r['vllm']['median_us']:7.2f} us  vllm spec "
              f"{r['vllm spec']['median_us']:6.2f} us  null {r['null']['median_us']:5.2f} us",
              flush=True)
    cusum = main.telemetry.drift_state("0")
    return {"record": results, "cusum_active": cusum is not None,
            "windows": list(main.telemetry.window_labels), "loggers": loggers,
            "vllm_logger": vllm_logger}


def scrape_benchmark(cfg, state: dict, repeats: int) -> dict:
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from deepspec_plugin.serving import exposition

    out = {}
    for engines in (1, 8):
        if engines == 1:
            telemetry = state["loggers"]["deepspec"].telemetry
        else:
            vllm_logger = PrometheusStatLogger(cfg, list(range(engines)))  # replaces vLLM's
            logger = deepspec_logger(cfg, range(engines))
            base = make_steps(300, 8, seed=7, with_iteration=True)
            t = fill(logger, base, engines=range(engines))
            fill(vllm_logger, base, engines=range(engines), seconds=300)
            telemetry = logger.telemetry
            telemetry.clock = sim_clock(t, STEP_S)
            check_filled(telemetry, engines)
        exposition.install(telemetry)
        only = CollectorRegistry()
        only.register(exposition.TelemetryCollector(telemetry))
        r = time_calls({"deepspec collector only": lambda: generate_latest(only),
                        "full REGISTRY (vLLM + deepspec)": lambda: generate_latest(REGISTRY)},
                       repeats)
        out[f"{engines} engine{'s' if engines > 1 else ''}"] = r
        print(f"  scrape, {engines} engine(s): deepspec only "
              f"{r['deepspec collector only']['median_ms']:.3f} ms, full REGISTRY "
              f"{r['full REGISTRY (vLLM + deepspec)']['median_ms']:.3f} ms", flush=True)
    return out


def multiproc_child(args) -> None:
    """In a process started with PROMETHEUS_MULTIPROC_DIR set: record arms with the publisher
    thread running, then publish() and vLLM's multiprocess /metrics scrape."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from deepspec_plugin.serving import exposition

    cfg = engine_config(Path(args.target), Path(args.draft))
    state = record_benchmark(cfg, args.steps, args.rounds, multiproc=True)
    publisher = exposition._installed
    if not isinstance(publisher, exposition.MultiprocessPublisher):
        raise SystemExit(f"expected a MultiprocessPublisher, got {publisher!r}")
    result = {"record": state["record"], "publish": {}, "scrape": {}}
    mp_registry = CollectorRegistry()  # what vLLM's /metrics reads in multiprocess mode
    multiprocess.MultiProcessCollector(mp_registry)
    for engines in (1, 8):
        if engines > 1:
            logger = deepspec_logger(cfg, range(engines))
            t = fill(logger, make_steps(300, 8, seed=7, with_iteration=True),
                     engines=range(engines))
            logger.telemetry.clock = sim_clock(t, STEP_S)
            check_filled(logger.telemetry, engines)
            publisher = exposition._installed
        publisher.stop()  # time publish() alone, not racing its own thread
        label = f"{engines} engine{'s' if engines > 1 else ''}"
        result["publish"][label] = time_calls({"publish()": publisher.publish},
                                              args.scrape_repeats)["publish()"]
        result["publish"][label]["samples"] = len(publisher._published)
        result["scrape"][label] = time_calls(
            {"multiprocess /metrics": lambda: generate_latest(mp_registry)},
            max(5, args.scrape_repeats // 5))["multiprocess /metrics"]
    Path(args.child_out).write_text(json.dumps(result))


def run_multiproc(args, target: Path, draft: Path, work: Path) -> dict:
    mp_dir = work / "prom-multiproc"
    mp_dir.mkdir()
    out = work / "multiproc.json"
    cmd = [sys.executable, __file__, "--child-multiproc", "--child-out", str(out),
           "--target", str(target), "--draft", str(draft), "--steps", str(args.steps // 2),
           "--rounds", str(args.rounds), "--scrape-repeats", str(args.scrape_repeats)]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"multiprocess child failed:\n{proc.stderr[-4000:]}")
    print(proc.stdout, end="")
    return json.loads(out.read_text())


# --- report ----------------------------------------------------------------------------------


def machine() -> dict:
    from importlib.metadata import version

    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
            "vllm": vllm.__version__, "prometheus_client": version("prometheus_client"),
            "platform": platform.platform(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def print_record_table(title: str, record: dict) -> None:
    print(f"\n{title}: per engine step, us (per-call timer; loop = mean in an untimed loop)\n")
    print("| steps | arm | median | p90 | p99 | max | loop | % over 5 us | median / vllm | "
          "median / vllm spec |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, row in record.items():
        arms = row["arms"]
        v, vs = arms["vllm"]["median_us"], arms["vllm spec"]["median_us"]
        for name, a in arms.items():
            print(f"| {key} | {name} | {a['median_us']:.2f} | {a['p90_us']:.2f} | "
                  f"{a['p99_us']:.2f} | {a['max_us']:.0f} | {a['loop_mean_us']:.2f} | "
                  f"{a['over_goal_pct']:.1f} | {a['median_us'] / v:.2f} | "
                  f"{a['median_us'] / vs:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", type=Path, default=Path("/tmp/tinyp/t"),
                        help="reuse the tiny pair built here (target/, draft/) if present")
    parser.add_argument("--steps", type=int, default=2000, help="distinct steps per batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrape-repeats", type=int, default=100)
    parser.add_argument("--no-multiproc", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child-multiproc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--draft", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.child_multiproc:
        return multiproc_child(args)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plugin-record-") as tmp:
        work = Path(tmp)
        target, draft = tiny_pair(args.tiny, work)
        os.environ["DSPEC_MANIFEST"] = str(manifest_with_baseline(target, work))
        cfg = engine_config(target, draft)
        print(f"tiny pair {target.parent}; k = {K}; {args.steps} steps x {args.rounds} rounds per "
              f"batch size", flush=True)
        state = record_benchmark(cfg, args.steps, args.rounds, multiproc=False)
        scrape = scrape_benchmark(cfg, state, args.scrape_repeats)
        mp = None if args.no_multiproc else run_multiproc(args, target, draft, work)

    print_record_table("record(), one server process", state["record"])
    print("\nscrape, ms (generate_latest; windows filled: 1h of simulated traffic)\n")
    print("| engines | registry | median | p90 | max | samples | bytes |")
    print("|---|---|---|---|---|---|---|")
    for engines, rows in scrape.items():
        for name, r in rows.items():
            print(f"| {engines} | {name} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{r['max_ms']:.3f} | {r['samples']} | {r['bytes']} |")
    if mp is not None:
        print_record_table("record(), PROMETHEUS_MULTIPROC_DIR set (publisher thread running)",
                           mp["record"])
        print("\nmultiprocess mode, ms\n")
        print("| engines | what | median | p90 | max | samples |")
        print("|---|---|---|---|---|---|")
        for kind in ("publish", "scrape"):
            for engines, r in mp[kind].items():
                what = "publish()" if kind == "publish" else "vLLM multiprocess /metrics"
                print(f"| {engines} | {what} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                      f"{r['max_ms']:.3f} | {r['samples']} |")

    worst_record = max(r["arms"]["deepspec"]["median_us"] for r in state["record"].values())
    worst_scrape = max(r["deepspec collector only"]["median_ms"] for r in scrape.values())
    goals = {
        "record_median_us_max_over_batches": worst_record,
        "record_goal_us": GOAL_RECORD_US, "record_pass": worst_record <= GOAL_RECORD_US,
        "scrape_median_ms_max_over_engines": worst_scrape,
        "scrape_goal_ms": GOAL_SCRAPE_MS, "scrape_pass": worst_scrape <= GOAL_SCRAPE_MS,
    }
    print(f"\nrecord(): worst median {worst_record:.2f} us over B = {BATCHES} "
          f"(goal <= {GOAL_RECORD_US} us): {'PASS' if goals['record_pass'] else 'FAIL'}")
    print(f"scrape: worst median {worst_scrape:.3f} ms over 1 and 8 engines "
          f"(goal <= {GOAL_SCRAPE_MS} ms): {'PASS' if goals['scrape_pass'] else 'FAIL'}")
    print(f"cusum on: {state['cusum_active']}; windows {state['windows']}; "
          f"total {time.perf_counter() - started:.0f} s")
    result = {
        "machine": machine(),
        "settings": {"k": K, "windows": state["windows"], "cusum_active": state["cusum_active"],
                     "steps": args.steps, "rounds": args.rounds, "simulated_step_s": STEP_S,
                     "alpha": ALPHA, "fill_simulated_s": FILL_S,
                     "scrape_repeats": args.scrape_repeats},
        "goals": goals, "record": state["record"], "scrape": scrape, "multiprocess": mp,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
