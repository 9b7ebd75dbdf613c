"""Whisper's tokenizer, built only from the model directory's own tokenizer.json (never from a hub).

Wraps a ``tokenizers.Tokenizer`` and knows Whisper's special tokens: start of transcript, languages,
tasks, no-timestamps and the timestamp tokens.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from specasr_vllm.config import MAX_TARGET_POSITIONS
from specasr_vllm.errors import InvalidRequestError

TIME_PRECISION = 0.02  # seconds per timestamp token
MAX_PROMPT_TOKENS = MAX_TARGET_POSITIONS // 2 - 1  # Whisper keeps half the context for the prompt


class WhisperTokenizer:
    def __init__(self, tokenizer: Tokenizer, multilingual: bool):
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.eot = special["<|endoftext|>"]
        self.sot = special["<|startoftranscript|>"]
        self.sot_prev = special["<|startofprev|>"]
        self.translate = special["<|translate|>"]
        self.transcribe = special["<|transcribe|>"]
        self.no_speech = special.get("<|nospeech|>", special.get("<|nocaptions|>"))
        self.no_timestamps = special["<|notimestamps|>"]
        self.timestamp_begin = self.no_timestamps + 1
        # language tokens sit between <|startoftranscript|> and <|translate|>, in Whisper's order
        self.language_ids = {c[2:-2]: i for c, i in special.items() if self.sot < i < self.translate}

    @classmethod
    def from_dir(cls, model_dir: Path, vocab_size: int) -> WhisperTokenizer:
        return cls(Tokenizer.from_file(str(model_dir / "tokenizer.json")), multilingual=vocab_size >= 51865)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of the ordinary tokens in ``ids`` (special and timestamp tokens dropped)."""
        return self.tokenizer.decode([i for i in ids if i < self.eot])

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each ordinary token id stands for (byte-level BPE pieces may split characters)."""
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        vocab = self.tokenizer.get_vocab()
        table = [b""] * self.eot
        for piece, i in vocab.items():
            if i < self.eot:
                table[i] = bytes(byte_of[c] for c in piece)
        return table

    def language_code(self, language: str) -> str:
        """Normalise ``en`` / ``English`` / ``english`` to a code this model knows, or raise."""
        code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
        if not self.multilingual:
            if code != "en":
                raise InvalidRequestError(f"this model is English-only; language {language!r} is not supported")
            return code
        if code not in self.language_ids or code not in LANGUAGES:
            raise InvalidRequestError(
                f"unsupported language {language!r}; use an ISO 639-1 code such as 'en', 'de', 'es'"
            )
        return code

    def prefix(self, language: str | None, task: str = "transcribe", timestamps: bool = False,
               prompt: str | list[int] | None = None) -> list[int]:
        """The forced start: [<|startofprev|> prompt] <|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>].

        English-only models take no language or task token; with ``timestamps`` the model predicts
        timestamp tokens around each segment instead of being told not to. A ``prompt`` (earlier
        text, spellings of names; or tokens: a prompt's plus the previous windows' when conditioning
        on previous text) is kept to its last ``MAX_PROMPT_TOKENS`` tokens, as Whisper does.
        """
        if task not in ("transcribe", "translate"):
            raise InvalidRequestError(f"unknown task {task!r}; use 'transcribe' or 'translate'")
        context = self.prompt_tokens(prompt) if isinstance(prompt, str) or prompt is None else prompt
        start = [self.sot_prev, *context[-MAX_PROMPT_TOKENS:]] if context else []
        end = [] if timestamps else [self.no_timestamps]
        if not self.multilingual:
            return [*start, self.sot, *end]
        if language is None:
            raise InvalidRequestError("a multilingual model needs a language (or language detection)")
        task_id = self.transcribe if task == "transcribe" else self.translate
        return [*start, self.sot, self.language_ids[self.language_code(language)], task_id, *end]

    def asks_for_timestamps(self, prompt: list[int]) -> bool:
        """Whether a decoder prompt is ``prefix(..., timestamps=True)``'s: it ends where that prefix ends (the task
        token, or <|startoftranscript|> for English-only models). A language-detection prompt (a multilingual
        model's <|startoftranscript|> alone) does not, nor does one ending in <|notimestamps|>."""
        if not prompt:
            return False
        return prompt[-1] in ((self.transcribe, self.translate) if self.multilingual else (self.sot,))

    def prompt_tokens(self, prompt: str | None) -> list[int]:
        """A text prompt's tokens, as Whisper encodes it (with a leading space).

        Text such as ``<|startoftranscript|>`` would become that special token and corrupt the prefix;
        it is refused, as transformers refuses it.
        """
        tokens = self.encode(" " + prompt.strip()) if prompt else []
        if any(t >= self.eot for t in tokens):
            raise InvalidRequestError("the prompt contains a special token's text (such as <|endoftext|>); remove it")
        return tokens

    def seconds(self, token: int) -> float:
        """The time a timestamp token stands for, from the start of its window."""
        return (token - self.timestamp_begin) * TIME_PRECISION
