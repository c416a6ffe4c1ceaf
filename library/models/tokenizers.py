"""The CLIP-L and T5-XXL tokenizers (reference 5.6): found locally first, the hub last, never a hang offline.

Resolution order for `name_or_path`:
  1. a local folder of that name (what `save_pretrained` writes, or a hub snapshot);
  2. `<--tokenizer_cache_dir>/<id with "/" replaced by "_">` (sd-scripts' layout, e.g. `openai_clip-vit-large-patch14`);
  3. the Hugging Face hub: the local HF cache first, then a download unless HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is
     set. A tokenizer that came from the hub is saved into the cache dir when one was given, as sd-scripts does.

`write_tiny_tokenizers` builds small stand-ins with the same file layout, so tests and the quickstart run offline.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

CLIP_TOKENIZER_ID = "openai/clip-vit-large-patch14"
T5_TOKENIZER_ID = "google/t5-v1_1-xxl"


class TokenizerNotFoundError(ValueError):
    """No usable tokenizer was found; the message lists every place tried and how to provide one."""


def cache_folder_name(name_or_path: str) -> str:
    """The folder name sd-scripts uses under --tokenizer_cache_dir for a hub id."""
    return name_or_path.replace("/", "_")


def hub_offline() -> bool:
    """True when the user asked for no network (checked on every call, so a changed environment counts)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    try:  # huggingface_hub reads the variable once at import; honour that too
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# Files a folder must hold for each tokenizer (any one alternative). Checked before loading because transformers 5
# returns an EMPTY tokenizer (2 special tokens, no error) for a folder or id without them.
_NEEDS = {"CLIP-L": (("tokenizer.json",), ("vocab.json", "merges.txt")),
          "T5-XXL": (("tokenizer.json",), ("spiece.model",))}
_HUB_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "spiece.model"]


def _from_folder(cls, folder: Path, what: str):
    if not any(all((folder / f).is_file() for f in files) for files in _NEEDS[what]):
        wanted = " or ".join(" + ".join(files) for files in _NEEDS[what])
        raise TokenizerNotFoundError(f"{folder}: not a {what} tokenizer folder (it needs {wanted})")
    if not (folder / "tokenizer.json").is_file() and (folder / "spiece.model").is_file():
        import importlib.util
        if importlib.util.find_spec("google.protobuf") is None:
            raise TokenizerNotFoundError(f"{folder}: reading spiece.model needs the protobuf package "
                                         "(pip install protobuf), or use a folder that holds a tokenizer.json")
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise TokenizerNotFoundError(f"{folder}: could not be loaded as the {what} tokenizer ({_short(e)})") from e
    if len(tokenizer) < 16:  # the silent empty-vocab failure, whatever its cause
        raise TokenizerNotFoundError(f"{folder}: loaded as the {what} tokenizer with only {len(tokenizer)} tokens")
    return tokenizer


def _hub_snapshot(repo_id: str, tried: list[str]) -> Path | None:
    """A local folder with the hub repo's tokenizer files: the HF cache first, a download only when online."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        tried.append(f"Hugging Face hub: unavailable ({_short(e)})")
        return None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        tried.append(f"Hugging Face cache for {repo_id!r}: not there")
    if hub_offline():
        tried.append("hub download: skipped (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
        return None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:
        tried.append(f"hub download of {repo_id!r}: failed ({_short(e)})")
        return None


def _load(cls, what: str, name_or_path: str, tokenizer_cache_dir: str | os.PathLike | None):
    tried = []
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return _from_folder(cls, local, what)
    tried.append(f"local folder {str(local)!r}: does not exist")

    cached = Path(tokenizer_cache_dir) / cache_folder_name(name_or_path) if tokenizer_cache_dir else None
    if cached is not None:
        if cached.is_dir():
            return _from_folder(cls, cached, what)
        tried.append(f"--tokenizer_cache_dir folder {str(cached)!r}: does not exist")
    else:
        tried.append("--tokenizer_cache_dir: not given")

    snapshot = _hub_snapshot(name_or_path, tried)
    if snapshot is None:
        cache = tokenizer_cache_dir or "DIR"
        raise TokenizerNotFoundError(
            f"could not find the {what} tokenizer {name_or_path!r}. Tried:\n  - " + "\n  - ".join(tried) +
            f"\nProvide one: put a tokenizer folder (written by save_pretrained, or the tokenizer files of the hub "
            f"repo {name_or_path}) at {cache}/{cache_folder_name(name_or_path)}/ and pass --tokenizer_cache_dir "
            f"{cache}, or pass that folder itself in place of {name_or_path!r}."
        )
    tokenizer = _from_folder(cls, snapshot, what)
    if cached is not None:  # sd-scripts keeps a copy so later runs need no hub
        tokenizer.save_pretrained(str(cached))
    return tokenizer


def load_clip_tokenizer(tokenizer_cache_dir: str | os.PathLike | None = None,
                        name_or_path: str = CLIP_TOKENIZER_ID):
    """The CLIP-L tokenizer (`transformers.CLIPTokenizer`); see the module docstring for where it is looked for.

    Raises TokenizerNotFoundError (a ValueError) listing what was tried when none is found.
    """
    from transformers import CLIPTokenizer

    return _load(CLIPTokenizer, "CLIP-L", name_or_path, tokenizer_cache_dir)


def load_t5_tokenizer(tokenizer_cache_dir: str | os.PathLike | None = None, name_or_path: str = T5_TOKENIZER_ID):
    """The T5-XXL tokenizer (`transformers.T5TokenizerFast`); see the module docstring for where it is looked for.

    A folder holding only `spiece.model` (the hub repo's layout) needs the `protobuf` package under transformers 5;
    folders written by `save_pretrained` carry a `tokenizer.json` and do not.
    Raises TokenizerNotFoundError (a ValueError) listing what was tried when none is found.
    """
    from transformers import T5TokenizerFast

    return _load(T5TokenizerFast, "T5-XXL", name_or_path, tokenizer_cache_dir)


# ----------------------------------------------------------------------------------------------------------------
# Tiny tokenizers, built from a small built-in corpus by this module

_CORPUS = [
    "a photo of a cat sitting on a red sofa in a sunny living room",
    "an oil painting of a mountain lake at sunset, highly detailed, dramatic light",
    "portrait of a young woman with blue eyes and long brown hair, soft focus",
    "a dog running on the beach, 35mm film photograph, golden hour",
    "a futuristic city at night with neon signs and flying cars, cinematic",
    "watercolor illustration of a small house in the forest under the snow",
    "close-up of a green apple on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with an egg and green onions, food photography",
    "the quick brown fox jumps over the lazy dog",
    "sks person wearing a black jacket and a white shirt, standing in the street",
    "a bird flying over the ocean with clouds in the sky",
    "anime style girl holding an umbrella in the rain",
    "black and white sketch of an old man reading a book",
    "a colorful bouquet of flowers in a glass vase near the window",
    "low poly 3d render of a tree, isometric view, simple background",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "punctuation: . , ; : ! ? ' \" ( ) [ ] { } - _ + = * / \\ | @ # $ % ^ & < > ~ `",
]

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character table (the one `tokenizers`' ByteLevel uses).

    Printable bytes map to themselves, the others to chr(256 + n) in byte order; the dict keeps that order,
    which is also the order of the first 256 entries of CLIP's vocab."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _learn_clip_bpe(corpus: list[str], n_merges: int) -> tuple[dict[str, int], list[str]]:
    """Learn byte-level BPE merges the way CLIP's vocab is laid out: 256 bytes, the same with `</w>` (end of word),
    one token per merge, then the two special tokens last -- so EOS has the highest id, as in the real vocab
    (CLIP's pooled output takes the argmax of the ids)."""
    byte_of = _bytes_to_unicode()
    byte_chars = list(byte_of.values())
    words = Counter()
    for line in corpus:
        for w in _CLIP_WORD.findall(line.lower()):
            chars = [byte_of[b] for b in w.encode("utf-8")]
            chars[-1] += "</w>"
            words[tuple(chars)] += 1
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))  # ties broken by text: deterministic
        if count < 2:
            break
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    vocab += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tiny_clip(folder: Path, n_merges: int = 256) -> int:
    vocab, merges = _learn_clip_bpe(_CORPUS, n_merges)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                   "do_lower_case": True, "errors": "replace", **special})
    return len(vocab)


def _write_tiny_t5(folder: Path, vocab_size: int = 400) -> int:
    """A SentencePiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos), plus a `tokenizer.json`
    equivalent to it so that loading needs no protobuf. Training uses the identity normaliser so both agree."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [(sp.id_to_piece(i), 0.0 if sp.is_control(i) or sp.is_unknown(i) else sp.get_score(i))
              for i in range(sp.get_piece_size())]

    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                   "model_max_length": 512, **special})
    return len(pieces)


def write_tiny_tokenizers(out_dir: str | os.PathLike) -> dict[str, int]:
    """Write tiny CLIP and T5 tokenizers in the --tokenizer_cache_dir layout and return their vocab sizes.

    `out_dir/openai_clip-vit-large-patch14` gets a byte-level BPE (vocab.json, merges.txt, configs): any text
    tokenizes, unknown characters fall back to bytes. `out_dir/google_t5-v1_1-xxl` gets a SentencePiece unigram model
    (spiece.model, tokenizer.json, configs): characters it never saw become <unk> (id 2), as with the real T5.
    Both are deterministic and small (returned as {"clip": n, "t5": n}, each under 1000) so tiny encoders stay tiny.
    """
    out_dir = Path(out_dir)
    return {
        "clip": _write_tiny_clip(out_dir / cache_folder_name(CLIP_TOKENIZER_ID)),
        "t5": _write_tiny_t5(out_dir / cache_folder_name(T5_TOKENIZER_ID)),
    }
