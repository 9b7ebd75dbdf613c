"""Configuration in one place: paths, audio constants and defaults, each overridable by environment.

Everything else imports from here instead of repeating a literal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from specasr_vllm.errors import InvalidRequestError

# --- audio (Whisper's front end; these are properties of the model family, not tunables) ---
SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480 000 samples in one window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3 000 mel frames in one window

# --- decoding ---
MAX_TARGET_POSITIONS = 448  # Whisper's decoder length limit, prefix included
DRAFT_MARGIN_FRAMES = 100  # 1 s of context past the audio's end for the draft's unpadded encoder
MAX_INITIAL_TIMESTAMP = 1.0  # seconds: the latest a window's first timestamp may be (Whisper's default)

# --- models ---
DEFAULT_MODEL = "whisper-base"
DEFAULT_DRAFT = "whisper-tiny.en"
METHODS = ("ar", "sd", "specasr")
DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes the engine runs in
OUTPUT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")  # OpenAI's response formats


def cache_dir() -> Path:
    """Where converted models live: ``$SPECASR_CACHE_DIR`` or the user's cache directory."""
    env = os.environ.get("SPECASR_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("specasr-vllm"))


def speech_data_dir() -> Path:
    """The bundled dev set: ``$SPECASR_SPEECH_DIR`` or ``../shared/data/speech`` beside the checkout."""
    env = os.environ.get("SPECASR_SPEECH_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "speech"


def default_manifest() -> Path:
    return speech_data_dir() / "manifest.jsonl"


MIN_TEMPERATURE_INCREMENT = 0.05  # at most 21 decodes of one window: a request cannot buy unbounded work


def check_temperatures(temperature: float, increment: float | None) -> None:
    """The one rule for a fallback schedule: a temperature in [0, 1], an increment of 0 or none (no
    fallback) or in [MIN_TEMPERATURE_INCREMENT, 1]."""
    if not 0.0 <= temperature <= 1.0:
        raise InvalidRequestError(f"temperature must be between 0 and 1, got {temperature:g}")
    if increment and not MIN_TEMPERATURE_INCREMENT <= increment <= 1.0:
        raise InvalidRequestError(f"temperature_increment_on_fallback must be 0 or between "
                                  f"{MIN_TEMPERATURE_INCREMENT:g} and 1, got {increment:g}")


@dataclass(frozen=True)
class DecodeOptions:
    """What one request asks of decoding: openai-whisper's names and thresholds, transformers' long-form
    conventions (the decoding the engine is tested token-identical to).

    Temperature fallback: a window is decoded at ``temperature``; while its text compresses too well
    (a repetition loop) or its average log-probability is too low, it is decoded again at a
    temperature ``temperature_increment_on_fallback`` higher, up to 1.0 (``None``: never again).
    A window whose no-speech probability is above ``no_speech_threshold`` and whose log-probability is
    at most ``logprob_threshold`` is silence: it yields no text. Sampling is seeded: the same ``seed``
    gives the same text, with every decoding method (see ``models/sampling.py``). As in transformers,
    ``prompt`` conditions every window, ``condition_on_previous_text`` is off by default, and a window
    decoded at 0.5 or hotter is not used as the next window's prompt.
    """

    task: str = "transcribe"
    timestamps: bool = False  # timestamp tokens and segments (audio over 30 s always decodes them)
    prompt: str | None = None  # earlier text, spellings of names: conditions every window
    temperature: float = 0.0
    temperature_increment_on_fallback: float | None = 0.2
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = False  # prompt each window with the text before it (transformers' default)
    word_timestamps: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_temperatures(self.temperature, self.temperature_increment_on_fallback)

    def temperatures(self) -> list[float]:
        """The fallback schedule: ``temperature``, then up by the increment while at most 1.0."""
        step = self.temperature_increment_on_fallback
        if not step or step <= 0:
            return [self.temperature]
        count = int(round((1.0 - self.temperature) / step, 6)) + 1
        return [round(self.temperature + k * step, 6) for k in range(max(count, 1))]


@dataclass
class SpecConfig:
    """SpecASR's knobs. ``method`` picks a preset; the switches allow ablations of each idea."""

    adaptive: bool = True  # stop drafting on low confidence (else a fixed length ``k``)
    recycling: bool = True  # reuse the rejected draft's remainder, re-checked in one parallel pass
    # second pass (the paper's sparse tree): alternatives at the chain's least confident positions. Off by
    # default: on this CPU its branch steps and wider verification cost more than the extra tokens they
    # win (compiled target, 24 dev files: decode 1.07x of AR with the tree, 1.19x without; eager: 1.48x vs 1.57x)
    tree: bool = False
    k: int = 8  # fixed draft length when not adaptive (plain speculative decoding)
    auto_threshold: bool = True  # tune the stopping rule online from observed acceptance and costs
    threshold: float = 0.4  # with auto_threshold off: stop below this top-1 draft probability
    max_draft: int = 24  # adaptive cap on a chain's length
    tree_branches: int = 2  # low-confidence chain positions that get an alternative
    tree_threshold: float = 0.8  # only positions whose draft probability is below this branch
    tree_depth: int = 2  # tokens per alternative branch (the alternative plus a greedy continuation)
    concurrent_draft: bool = False  # draft ahead on a second thread while the target verifies (measured slower here)
    min_chain: int = 2  # with concurrent drafting: sequential draft steps only top a chain up to this
    draft_unpadded: bool = True  # the draft's encoder sees the audio, not the padded 30 s window
    draft_int8: bool = True  # dynamic int8 quantisation of the draft's linear layers (CPU)
    # the draft's work over the audio in bfloat16 on a CPU that has it natively: its encoder, and its cross K/V,
    # which a draft step of several rows is bound by reading (DraftModel)
    draft_bf16_audio: bool = True
    draft_vocab: int | None = 16384  # the draft's output layer covers only the first N ids (BPE's most frequent)
    # greedy draft steps per call where the draft's steps are CUDA graphs (DraftModel.run): one replay drafts
    # this many tokens, the host reading them at once; steps past where the chain stops are wasted device work.
    # H200, 32 dev files at batch 1, SpecASR's decode against AR's: fp16 0.62x one step at a time, 0.76x in runs
    # of 4, 0.71x of 8; fp32 0.92x, 0.90x, 0.80x (benchmarks/results/gpu-h200-draft-runs.*)
    draft_run: int = 4
    # passes before judging whether drafting pays for a request (Drafter.pays). A request's first passes are its
    # worst: in interleaved CPU runs on 32 dev files, judged after 4 passes, 9 files stopped drafting at 3.75-5.75
    # tokens a pass (max_loss -0.05), of which 8 were faster drafting to the end; with max_loss 0.1, 2 files
    # (2.83 and 1.25 tokens a pass), 1.37x and 0.99x of AR drafting to the end, 0.94x and 0.84x stopped
    fallback_after: int = 8
    # measured: a request stops drafting once its whole speculative passes emit tokens this much slower than AR
    # steps would
    max_loss: float = 0.1
    # modelled, where no AR step was timed: accepted tokens per pass, beyond paying for the draft steps in
    # verification passes, that drafting must earn (the host's own work per pass is not in the model)
    min_accept: float = 0.3
    # where drafting paid (by max_loss, measured) for none of the last 4 requests judged, only every probe_every-th
    # new request drafts, to notice when it pays again; the others decode as AR from the start (Drafter.paid_lately)
    probe_every: int = 8
    # draft only for batches of at most this many windows (the embedded engine decodes a wider batch as AR); a batch
    # drafts together or not at all (Drafter.admit, judged together in Drafter.pays). One by default: on this 2-core
    # CPU an 8-row pass of 7 tokens costs ~2 AR steps of 8 rows and its 6-7 draft steps ~1.2 more, for ~4.4 tokens a
    # row, and batches of 8 decoded 1.01x of AR drafting (benchmarks/results/xeon-engines-b8-s18; 0.93-1.02x before)
    max_batch: int = 1
    # where several requests draft in one pass, each tree has at most this many nodes: the target verifies every row
    # as wide as the longest tree, and draft steps run for every row until the longest chain stops
    batch_draft: int = 6

    @classmethod
    def for_method(cls, method: str, **overrides) -> SpecConfig:
        if method == "sd":
            base = {"adaptive": False, "recycling": False, "tree": False}
        else:
            base = {}
        return cls(**{**base, **overrides})


def compile_by_default() -> bool:
    """Compiled steps unless ``SPECASR_EAGER`` is set (to anything but 0)."""
    return os.environ.get("SPECASR_EAGER", "") in ("", "0")


@dataclass
class EngineConfig:
    """How the embedded engine runs: which models, which decoding method, where, how many at once."""

    model: str = DEFAULT_MODEL
    draft: str | None = None
    method: str = "ar"
    device: str = "cpu"
    dtype: str = "float32"  # one of DTYPES
    # the target's encoder and its cross-attention K/V over the audio in another of DTYPES (None: ``dtype``;
    # ``whisper.with_encoder_dtype``). bfloat16 on a CPU with AMX (Xeon, 2 threads, compiled): a 30 s window's
    # encoder 355 -> 120 ms, its K/V 32 -> 6 ms; 63 of 64 English dev transcripts unchanged (WER 4.36 -> 4.30%);
    # the decoder stays in ``dtype``, so speculative output stays AR's token for token
    encoder_dtype: str | None = None
    batch_size: int = 8  # 30 s windows encoded and decoded together
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)
    # compiled decoder steps and encoder (models/compiled.py; the draft's encoder too): each graph costs 10-30
    # s the first time in a process. False (``--eager``, or SPECASR_EAGER=1) runs the eager modules: for
    # debugging, and for tests, where compiling every engine would cost more than it saves.
    compile: bool = field(default_factory=compile_by_default)
    spec: SpecConfig = None  # type: ignore[assignment]  # None: the method's preset, SpecConfig.for_method(method)

    def __post_init__(self) -> None:
        if self.spec is None:  # EngineConfig(method="sd") drafts a fixed length, as `--method sd` does
            self.spec = SpecConfig.for_method(self.method)


@dataclass
class ServerConfig:
    """The HTTP server's limits and identity; every default works out of the box."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default_factory=lambda: os.environ.get("SPECASR_API_KEY") or None)
    served_model_name: str | None = None  # the name clients send; default: the engine's model name
    aliases: tuple[str, ...] = ("whisper-1",)  # also accepted, so OpenAI's own examples work unchanged
    max_upload_mb: float = 25.0  # OpenAI's limit
    max_audio_seconds: float = 600.0
    max_queue: int = 64  # requests waiting for the engine before new ones get 503
    batch_wait_ms: float = 5.0  # how long the engine waits to gather a batch after the first request
    retry_after_s: int = 1  # the Retry-After a rejected client is told
    metrics_backend: str = "prometheus"  # "ray" inside Ray Serve replicas (see server/metrics.py)


VLLM_SETTINGS_FILE = "specasr.json"  # beside the target's weights in the directory vLLM serves


@dataclass
class VLLMPluginConfig:
    """The SpecASR proposer's settings inside vLLM, read from ``specasr.json`` in the target's directory.

    vLLM's ``speculative_config`` has no room for a draft model of a custom proposer or its knobs, so
    they live beside the target's weights, where ``vllm serve <dir>`` finds them in every process.
    ``specasr serve --engine vllm`` writes that file; without one, these defaults apply.
    """

    draft: str = DEFAULT_DRAFT  # a registry name or a local Hugging Face Whisper directory
    method: str = "specasr"  # "specasr" (adaptive length + recycling) or "sd" (fixed length k)
    spec: dict = field(default_factory=dict)  # SpecConfig overrides, e.g. {"max_draft": 16}
    max_batch: int = SpecConfig.max_batch  # SpecConfig's rule, in vLLM's scheduler: with more requests decoding
    # the proposer drafts nothing (a step of several requests already fills this CPU: benchmarks/results/vllm-*)

    @classmethod
    def load(cls, model_dir: Path) -> VLLMPluginConfig:
        path = Path(model_dir) / VLLM_SETTINGS_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def spec_config(self) -> SpecConfig:
        """vLLM verifies one chain per request (no tree attention in 0.32) and owns the threads; the drafter's
        ``max_batch`` is the proposer's (what it warms, and the widest pass it learns AR steps from)."""
        return SpecConfig.for_method(self.method, **{**self.spec, "tree": False, "concurrent_draft": False,
                                                     "max_batch": self.max_batch})
