"""vLLM's offline ``LLM`` as an engine, run in a worker subprocess.

vLLM spawns processes (its engine core) and wants its caller's main module guarded, so the harness
never imports it: a worker, ``python -m deepspec_plugin.bench.engines.vllm_offline``, holds the
``LLM`` instances and speaks JSON lines over stdin/stdout (one request, one answer). Everything the
worker or vLLM prints goes to a log file in a temp dir (``log_text()`` reads it; set
``DSPEC_KEEP_VLLM_LOG=1`` to keep it after close); closing the engine ends the worker's whole
process group and removes the temp dir.

The worker keeps at most two instances: one without speculation (the baseline, k=None) and one
with ``speculative_config={"method": METHOD, "model": DRAFT, "num_speculative_tokens": k}`` for
the current k, each created on first use; a new k, or a new draft (``set_draft``), closes the
previous speculative instance. ``method`` is ``draft_model`` (a standalone draft model),
``eagle3`` (an EAGLE-3 head exported for vLLM) or ``medusa`` (Medusa heads; vLLM 0.32 is the
last release with it, and has the MLP speculator's model disabled). An instance is created
with ``max_num_seqs`` = the batch size (at least 4) and recreated if a larger batch comes.

Failures: where vLLM cannot start or run the models (a model it has no kernel for, a config it
refuses), or the worker dies or stops answering, the engine ends the worker and raises a
:class:`~deepspec_plugin.bench.engines.vllm_failure.VLLMEngineError`: one line with vLLM's own
reason (found in the exception chain or in the worker's log) and a fix.

Prompts go in as token ids, with ``SamplingParams(temperature, max_tokens, seed, stop_token_ids,
ignore_eos=True, detokenize=False)``: ``ignore_eos`` so that a request stops at exactly
``cfg.stop_token_ids``, as in every engine (vLLM would otherwise also stop at the model's eos), and
``generation_config="vllm"`` so that the model's generation_config.json does not change sampling.
Prefix caching is off so that repeated prompts cost the same every time.

Counts are per request and exact: vLLM 0.32 reports each request's acceptance histogram
(``per_request_spec_decode_metrics``, ``CompletionOutput.spec_decode_metrics``): drafts = its sum,
accepted = sum(j * hist[j]), accepted_per_position[i] = drafts with more than i accepted. The batch
totals are their sum; the worker also reads the delta of ``LLM.get_metrics()``'s spec-decode
counters over the batch (``last_metric_counts``), which must agree. vLLM's bookkeeping (read in
vllm/v1/core/sched/scheduler.py): the prefill emits the first token without a draft; every draft
proposes k tokens (capped only by max_model_len, not by max_tokens); a verification counts
``accepted = emitted - 1`` before the output is cut at a stop token or at max_tokens.

Timing: vLLM does not time single forward steps. For plain decoding ``target_step_s`` is the mean
decode interval of the batch's requests ((last token - first token) / (tokens - 1)), which is one
target step at batch size 1; ``draft_step_s`` is not available.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepspec_plugin.bench.engines.base import BatchResult, Engine, Generation, GenerationConfig
from deepspec_plugin.bench.engines.vllm_failure import VLLMEngineError, chain_reason, failure_reason
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

INSTALL_FIX = "install it with pip install 'deepspec-plugin[vllm]' (or run scripts/setup.sh)"
MIN_NUM_SEQS = 4
SPEC_METHODS = ("draft_model", "eagle3", "medusa")
GROUP_EXIT_S = 15.0  # how long vLLM's processes get to end by themselves after the worker
IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1: the longest socket path ZMQ binds
IPC_NAME_CHARS = 37  # "/" and a uuid4: the name vLLM gives each socket


def require_vllm() -> None:
    """Raise a DspecError naming the install command when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise DspecError("vLLM is not installed", INSTALL_FIX)


def counts_from_histogram(histogram: list[int], num_draft_tokens: int) -> SpecCounts:
    """SpecCounts of one request from vLLM's per-request acceptance histogram.

    ``histogram[j]`` is the number of drafts with exactly j accepted tokens (j = 0..k). As
    ``SpecCounts.record_draft`` builds them, per-position counts have one entry per draft position
    0..k-1 (zeros included), and none when there was no draft.
    """
    drafts = sum(histogram)
    positions = [sum(histogram[i + 1 :]) for i in range(len(histogram) - 1)] if drafts else []
    return SpecCounts(
        num_drafts=drafts,
        num_draft_tokens=int(num_draft_tokens),
        num_accepted_tokens=sum(j * n for j, n in enumerate(histogram)),
        accepted_per_position=positions,
    )


class VLLMOfflineEngine(Engine):
    """A target (and optional draft or EAGLE-3 head) served by vLLM's offline LLM in a worker
    process."""

    name = "vllm"
    per_request_counts = True

    def __init__(
        self,
        target: Path,
        draft: Path | None = None,
        *,
        method: str = "draft_model",
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        kv_cache_space_gib: int = 1,
        request_timeout_s: float = 1800.0,
        draft_sample_method: str = "probabilistic",
    ):
        from deepspec_plugin.bench.engines.base import check_draft_sample_method

        require_vllm()
        self.target = Path(target)
        self.draft = Path(draft) if draft is not None else None
        self.method = _spec_method(method)
        for p in (self.target, self.draft):
            _require_model_dir(p)
        self.options = {
            "target": str(self.target),
            "draft": str(self.draft) if self.draft else None,
            "method": self.method,
            "draft_sample_method": check_draft_sample_method(draft_sample_method),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "seed": seed,
            "enforce_eager": enforce_eager,
        }
        self.kv_cache_space_gib = kv_cache_space_gib
        self.request_timeout_s = request_timeout_s
        self._proc: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._log_path: Path | None = None
        self._log_file = None
        self._buffer = b""
        self._describe: dict | None = None
        # The get_metrics() counter delta of the last speculative batch (None where unavailable).
        self.last_metric_counts: SpecCounts | None = None

    # --- the worker process ------------------------------------------------------------------

    def _start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="dspec-vllm-"))
        self._log_path = self._tmp / "vllm-worker.log"
        env = dict(os.environ)
        # vLLM's ZMQ sockets go here too, so that close removes them even where vLLM dies
        # without cleaning up; only where the socket paths stay short enough to bind.
        ipc = self._tmp / "ipc"
        if len(str(ipc)) + IPC_NAME_CHARS <= IPC_PATH_MAX:
            ipc.mkdir()
            env.setdefault("VLLM_RPC_BASE_PATH", str(ipc))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_space_gib))
        env.setdefault("VLLM_CACHE_ROOT", str(self._tmp / "vllm-cache"))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._log_file = open(self._log_path, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "deepspec_plugin.bench.engines.vllm_offline"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            start_new_session=True,  # its own process group: close() ends vLLM's children too
        )
        self._send({"op": "init", **self.options})

    def _send(self, message: dict) -> dict:
        if self._proc is None:
            self._start()  # starts the worker and sends it init before `message`
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(message) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._fail(self._exit_status())
        answer = self._read_answer()
        if not answer.get("ok"):
            if answer.get("engine_error"):  # vLLM failed; the worker still answers, so it can
                # shut vLLM's processes down properly
                self._fail("failed", answer.get("reason"), graceful=True)
            if answer.get("user_error"):
                raise DspecError(answer["error"], answer.get("fix"))
            raise RuntimeError(
                f"vLLM worker failed: {answer.get('error')}\n{answer.get('traceback', '')}"
            )
        return answer

    def _read_answer(self) -> dict:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self.request_timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"ran past {self.request_timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self._fail(self._exit_status())
                self._buffer += chunk
            elif self._proc.poll() is not None:
                self._fail(self._exit_status())
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _exit_status(self) -> str:
        assert self._proc is not None
        try:
            rc = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its pipe"
        return f"exited with status {rc}"

    def log_text(self) -> str:
        """Everything the worker and vLLM have logged so far ("" before the start or after
        close)."""
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            return ""

    def _context(self) -> str:
        if self.draft is None:
            return f"running the target {self.target}"
        return f"running the target {self.target} with the {self.method} draft {self.draft}"

    def _fail(self, what: str, worker_reason: str | None = None, graceful: bool = False):
        """End the worker and raise vLLM's reason for ``what`` as one line."""
        reason = failure_reason(self.log_text(), worker_reason)
        self._stop(graceful)
        raise VLLMEngineError(what, reason, self._context())

    # --- the Engine interface ----------------------------------------------------------------

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> BatchResult:
        if cfg.k is not None and self.draft is None:
            raise DspecError(
                "speculative decoding asked of a vLLM engine without a draft", "pass a draft model"
            )
        if cfg.k is not None and cfg.k < 1:
            raise DspecError(f"k is {cfg.k}", "use k >= 1, or no k for plain decoding")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise DspecError("an empty batch or an empty prompt", "give every request >= 1 token")
        answer = self._send(
            {
                "op": "generate",
                "prompts": [list(map(int, p)) for p in prompts],
                "k": cfg.k,
                "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature,
                "seed": cfg.seed,
                "stop_token_ids": list(cfg.stop_token_ids),
            }
        )
        generations = []
        for g in answer["generations"]:
            counts = SpecCounts.from_dict(g["counts"]) if g.get("counts") is not None else None
            generations.append(Generation(token_ids=g["token_ids"], counts=counts))
        metric_counts = answer.get("metric_counts")
        self.last_metric_counts = SpecCounts.from_dict(metric_counts) if metric_counts else None
        if cfg.k is None:
            total = SpecCounts()
        elif all(g.counts is not None for g in generations):
            total = SpecCounts.total(g.counts for g in generations)
        elif self.last_metric_counts is not None:
            total = self.last_metric_counts
            for g in generations:
                g.counts = None
        else:
            raise RuntimeError("vLLM reported no speculative-decoding counts for this batch")
        return BatchResult(
            generations=generations,
            elapsed_s=answer["elapsed_s"],
            counts=total,
            draft_step_s=None,
            target_step_s=answer.get("decode_step_s") if cfg.k is None else None,
        )

    def set_draft(self, draft: Path, method: str | None = None) -> None:
        """Speculate with ``draft`` (and ``method``, default the current one) from the next
        speculative batch on; the baseline instance stays loaded."""
        draft, method = Path(draft), _spec_method(method or self.method)
        _require_model_dir(draft)
        self.draft, self.method = draft, method
        self.options.update(draft=str(draft), method=method)
        self._describe = None
        if self._proc is not None:
            self._send({"op": "set_draft", "draft": str(draft), "method": method})

    def describe(self) -> dict:
        if self._describe is None:
            self._describe = self._send({"op": "describe"})["info"]
        return {
            "engine": self.name,
            **self._describe,
            "batching": "one vLLM batch per call (continuous batching, max_num_seqs >= batch size)",
            "counts": "per request, from vLLM's per-request spec-decode metrics",
            "draft_type": self.method if self.draft else None,
            "draft_sample_method": self.options["draft_sample_method"] if self.draft else None,
            "worker_log": str(self._log_path) if self._log_path else None,
            **({"warning": CPU_SAMPLING_WARNING}
               if self.draft and self._describe.get("platform") == "cpu" else {}),
        }

    def close(self) -> None:
        self._stop(graceful=True)

    def _stop(self, graceful: bool) -> None:
        """End the worker (asking it to shut vLLM down first where ``graceful``), then its whole
        process group; remove the temp dir."""
        proc, self._proc = self._proc, None
        self._buffer = b""
        if proc is not None:
            try:
                if graceful and proc.poll() is None and proc.stdin is not None:
                    proc.stdin.write(b'{"op": "close"}\n')
                    proc.stdin.flush()
                    proc.wait(timeout=30)
                    # vLLM's processes (and Python's resource tracker, which removes shared
                    # memory a dead engine left) finish on their own once the worker is gone.
                    _wait_for_group(proc.pid, GROUP_EXIT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own group: vLLM's children too
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            keep = os.environ.get("DSPEC_KEEP_VLLM_LOG")
            if not keep:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._log_path = None
            self._tmp = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _wait_for_group(pgid: int, timeout_s: float) -> None:
    """Wait until no live (non-zombie) process is left in process group ``pgid``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (zombies count as alive there)
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


# Measured here (tests/test_vllm_eagle3.py pins it): vLLM-CPU 0.32's rejection sampler spreads
# per-request temperatures over draft tokens with a C++ stand-in for a Triton kernel
# (vllm/utils/cpu_triton_utils.py: _expand_kernel_impl) that never writes its output back, so at
# T > 0 the target probabilities it verifies with are garbage (vllm-project/vllm#55005).
CPU_SAMPLING_WARNING = (
    "vLLM-CPU 0.32 verifies speculation at T > 0 with uninitialised per-token temperatures "
    "(vllm-project/vllm#55005): its acceptance and samples at T > 0 are not the target's; greedy "
    "(T = 0) is exact")


# vllm 0.32 model_executor/models/registry.py: "MLPSpeculatorPreTrainedModel" is commented out
# ("Temporarily disabled ... once the MLP Speculator is supported in V1"); 0.33 dropped the method.
# tests/test_head_drafts_vllm.py loads one for real to keep this true.
MLP_SPECULATOR_REFUSAL = ("vLLM 0.32 cannot run an MLP speculator: its model registry has "
                          "MLPSpeculatorPreTrainedModel disabled (not yet ported to the V1 "
                          "engine), and vLLM 0.33 removed the method")


def _spec_method(method: str) -> str:
    if method == "mlp_speculator":
        raise DspecError(MLP_SPECULATOR_REFUSAL, "serve an MLP speculator with TGI (dspec export "
                         "tgi), or bench it with --engine reference")
    if method not in SPEC_METHODS:
        raise DspecError(f"unknown vLLM speculative method {method!r}",
                         f"use one of {', '.join(SPEC_METHODS)}")
    return method


def _require_model_dir(path: Path | None) -> None:
    if path is not None and not (Path(path) / "config.json").is_file():
        raise DspecError(
            f"{path} is not a model directory (no config.json)",
            "pass a Hugging Face model directory",
        )


# --- the worker (runs in its own process; imports vLLM) ----------------------------------------


class EngineFailure(Exception):
    """vLLM raised while starting or running (not a bug of the worker): reported as
    ``engine_error`` with vLLM's reason."""


class _Worker:
    def __init__(self, options: dict):
        self.options = options
        self.instances: dict[int | None, tuple[object, int]] = {}

    # instances

    def _create(self, k: int | None, num_seqs: int):
        from vllm import LLM
        from vllm.platforms import current_platform

        o = self.options
        enforce_eager = o["enforce_eager"]
        if enforce_eager is None:
            enforce_eager = current_platform.is_cpu()  # CUDA graphs are worth keeping on a GPU
        kwargs = dict(
            model=o["target"],
            tokenizer=o["target"],
            dtype=o["dtype"],
            seed=o["seed"],
            enforce_eager=enforce_eager,
            max_num_seqs=num_seqs,
            disable_log_stats=False,
            generation_config="vllm",
            enable_prefix_caching=False,
        )
        if o["max_model_len"]:
            kwargs["max_model_len"] = o["max_model_len"]
        if k is not None:
            kwargs["speculative_config"] = {
                "method": o["method"],
                "model": o["draft"],
                "num_speculative_tokens": int(k),
                "draft_sample_method": o.get("draft_sample_method", "probabilistic"),
            }
            kwargs["per_request_spec_decode_metrics"] = "summary"
        try:
            return LLM(**kwargs)
        except Exception as exc:
            raise EngineFailure() from exc

    @staticmethod
    def _shutdown(llm) -> None:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass

    def set_draft(self, req: dict) -> dict:
        self.options.update(draft=req["draft"], method=req["method"])
        for key in [key for key in self.instances if key is not None]:
            self._shutdown(self.instances.pop(key)[0])
        return {"ok": True}

    def instance(self, k: int | None, batch: int):
        wanted = max(batch, self.options["max_num_seqs"] or MIN_NUM_SEQS)
        for key in list(self.instances):
            llm, num_seqs = self.instances[key]
            stale_k = k is not None and key is not None and key != k
            too_small = key == k and num_seqs < batch
            if stale_k or too_small:
                del self.instances[key]
                self._shutdown(llm)
        if k not in self.instances:
            import gc

            gc.collect()
            self.instances[k] = (self._create(k, wanted), wanted)
        return self.instances[k][0]

    # requests

    def generate(self, req: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = req["k"]
        llm = self.instance(k, len(req["prompts"]))
        params = SamplingParams(
            temperature=float(req["temperature"]),
            max_tokens=int(req["max_new_tokens"]),
            seed=int(req["seed"]),
            stop_token_ids=[int(t) for t in req["stop_token_ids"]],
            ignore_eos=True,
            detokenize=False,
        )
        prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
        before = _metric_counts(llm) if k is not None else None
        start = time.perf_counter()
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:
            raise EngineFailure() from exc
        elapsed = time.perf_counter() - start
        after = _metric_counts(llm) if k is not None else None

        generations, intervals = [], []
        for out in outputs:
            completion = out.outputs[0]
            counts = None
            m = getattr(completion, "spec_decode_metrics", None)
            if k is not None and m is not None:
                counts = counts_from_histogram(list(m.histogram), m.num_draft_tokens).to_dict()
            elif k is not None:
                counts = SpecCounts().to_dict()  # finished before any draft (e.g. max_tokens 1)
            generations.append({"token_ids": list(completion.token_ids), "counts": counts})
            stats = getattr(out, "metrics", None)
            n = len(completion.token_ids)
            if stats is not None and n > 1 and stats.last_token_ts > stats.first_token_ts > 0:
                intervals.append((stats.last_token_ts - stats.first_token_ts) / (n - 1))
        metric_counts = None
        if before is not None and after is not None:
            metric_counts = after.since(before).to_dict()
        return {
            "ok": True,
            "generations": generations,
            "elapsed_s": elapsed,
            "metric_counts": metric_counts,
            "decode_step_s": sum(intervals) / len(intervals) if intervals else None,
        }

    def describe(self) -> dict:
        import torch
        import vllm
        from vllm.platforms import current_platform

        return {
            "ok": True,
            "info": {
                "vllm": vllm.__version__,
                "torch": torch.__version__,
                "platform": str(current_platform.device_type),
                "dtype": self.options["dtype"],
                "max_model_len": self.options["max_model_len"],
                "enforce_eager": self.options["enforce_eager"]
                if self.options["enforce_eager"] is not None
                else current_platform.is_cpu(),
                "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                "spec_method": self.options["method"],
            },
        }

    def close(self) -> None:
        for llm, _ in self.instances.values():
            self._shutdown(llm)
        self.instances.clear()


def _metric_counts(llm) -> SpecCounts | None:
    """The spec-decode counters of ``LLM.get_metrics()``, summed over label sets; None if absent."""
    from vllm.v1.metrics.reader import Counter, Vector

    fields = {
        "vllm:spec_decode_num_drafts": "num_drafts",
        "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    }
    out, found = SpecCounts(), False
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in fields:
            setattr(out, fields[metric.name], getattr(out, fields[metric.name]) + int(metric.value))
            found = True
        elif (
            isinstance(metric, Vector)
            and metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos"
        ):
            out.add(SpecCounts(accepted_per_position=[int(v) for v in metric.values]))
    return out if found else None


def _worker_main() -> None:
    """Serve JSON-line requests on stdin; answer on the original stdout, log on stderr."""
    import traceback

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything vLLM (or its children) print goes to the log, not into the protocol
    worker: _Worker | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "init":
                worker = _Worker(req)
                answer = {"ok": True}
            elif op == "close":
                break
            elif worker is None:
                answer = {"ok": False, "error": "the worker got a request before init"}
            elif op == "generate":
                answer = worker.generate(req)
            elif op == "set_draft":
                answer = worker.set_draft(req)
            elif op == "describe":
                answer = worker.describe()
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except EngineFailure as exc:  # vLLM's own failure: its reason, for one line in the parent
            traceback.print_exc()
            cause = exc.__cause__
            answer = {
                "ok": False,
                "engine_error": True,
                "error": f"{type(cause).__name__}: {cause}",
                "reason": chain_reason(cause) if cause is not None else None,
            }
        except Exception as exc:  # a bug: reported to the parent, which raises it there
            traceback.print_exc()
            answer = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        answers.write(json.dumps(answer) + "\n")
    if worker is not None:
        worker.close()
    answers.close()


if __name__ == "__main__":
    _worker_main()
