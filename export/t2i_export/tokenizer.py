"""`tokenizer.json.gz`: the checkpoint's CLIP tokenizer as a HF `tokenizers` JSON, padding and truncation
off, gzipped (1.68 MB of JSON, 0.55 MB gzipped; the runtime reads `.json` and `.json.gz`).

Or no file at all (format 4): when that JSON text is, byte for byte, one of the tokenizers built into
the runtime (BUILTIN_SHA256: OpenAI's CLIP tokenizer, and the same with "!" as a special pad token, as
SD 2.x and SDXL's second encoder have), the manifest names the builtin and records the text's SHA-256,
and the runtime checks that its own builtin has that digest (runtime/src/tokenizer.rs holds the same
digests). SD checkpoints' tokenizers are CLIP's vocabulary with one of those two pad conventions, so
graph sets need not each carry it; a tokenizer that serialises differently in any byte keeps its file.

The gzip bytes are deterministic (`write_gzip`): level 9, mtime 0, no file name in the header, so a
set regenerates byte for byte, given the same zlib (classic zlib 1.2.x/1.3.x; zlib-ng deflates
differently).

transformers 5's `CLIPTokenizer` *is* a `tokenizers` backend (NFC + whitespace collapse + lowercase,
CLIP's split regex, byte-level BPE with `</w>`, BOS/EOS post-processor), so its `backend_tokenizer`
serialised is the exact tokenizer diffusers uses. The runtime encodes with special tokens, then
truncates to `max_length` keeping EOS last (BOS + 75 tokens + EOS) and pads with `pad_token_id` —
which is what `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)` does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

from tokenizers import Tokenizer
from transformers import CLIPTokenizer

from .errors import ExportError

# SHA-256 of each built-in tokenizer's JSON text, as `tokenizer_json` writes it.
BUILTIN_SHA256 = {
    "clip": "061c0fc253b8b858696ce64e5d3c984b1db7f26fdace336d3e2d0345d4c234fc",
    "openclip": "87d34ee065ca32dc5b0711dd219f8f04b7a9927ce49d7b851a8145ed636ace2a",
}
# The pad token of each builtin's tokenizer/ directory (tiny.write_clip_tokenizer_dir).
BUILTIN_PAD_TOKEN = {"clip": "<|endoftext|>", "openclip": "!"}


def load_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    try:
        return CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # transformers raises many kinds; the user needs the directory and the cause
        raise ExportError(f"tokenizer: cannot load a CLIP tokenizer from {tokenizer_dir}: {e}".replace("\n", " ")) from e


def backend_without_padding(tokenizer: CLIPTokenizer) -> Tokenizer:
    # A copy: transformers configures padding/truncation on its backend for each call.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def max_length(tokenizer: CLIPTokenizer, text_max_positions: int) -> int:
    n = tokenizer.model_max_length
    if not isinstance(n, int) or n > text_max_positions:
        raise ExportError(
            f"tokenizer: model_max_length={n} is not usable with a text encoder of {text_max_positions} positions; "
            "set model_max_length in tokenizer/tokenizer_config.json"
        )
    return n


def write_gzip(path: Path, data: bytes) -> None:
    """gzip `data` into `path` with nothing in the header that varies: level 9, mtime 0, no file name."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as f:
        f.write(data)
    path.write_bytes(buf.getvalue())


def read_tokenizer_text(path: Path) -> str:
    """A graph set's tokenizer file as JSON text: `.json`, or `.json.gz` (format 3 sets)."""
    data = path.read_bytes()
    return (gzip.decompress(data) if path.name.endswith(".gz") else data).decode("utf-8")


def load_backend(path: Path) -> Tokenizer:
    """A graph set's tokenizer file (`.json` or `.json.gz`) as a `tokenizers` Tokenizer."""
    return Tokenizer.from_str(read_tokenizer_text(path))


def builtin_text(name: str) -> str:
    """The JSON text of built-in tokenizer `name`, made from the CLIP vocabulary in the open_clip wheel."""
    import tempfile

    from .tiny import write_clip_tokenizer_dir

    if name not in BUILTIN_SHA256:
        raise ExportError(f"tokenizer: no built-in tokenizer {name!r}; known: {', '.join(BUILTIN_SHA256)}")
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_dir(Path(tmp), pad_token=BUILTIN_PAD_TOKEN[name])
        text = tokenizer_json(load_tokenizer(Path(tmp)))
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != BUILTIN_SHA256[name]:
        raise ExportError(f"tokenizer: the built-in {name!r} tokenizer made here differs from the runtime's (sha256)")
    return text


def builtin_name(text: str) -> str | None:
    """The builtin whose JSON text is `text`, if any."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return next((name for name, d in BUILTIN_SHA256.items() if d == digest), None)


def entry_backend(set_dir: Path, entry: dict) -> Tokenizer:
    """The tokenizer a manifest's `tokenizer` entry names, a file of `set_dir` or a builtin."""
    if "builtin" in entry:
        return Tokenizer.from_str(builtin_text(entry["builtin"]))
    return load_backend(set_dir / entry["file"])


def tokenizer_json(tokenizer: CLIPTokenizer) -> str:
    """The JSON text `Tokenizer.save(path, pretty=False)` writes (what format 2 sets held uncompressed)."""
    return backend_without_padding(tokenizer).to_str(pretty=False)


def export_tokenizer(tokenizer: CLIPTokenizer, path: Path, text_max_positions: int) -> dict:
    """The manifest's `tokenizer` entry: a builtin's name and digest when the tokenizer is one, or else
    `path` written (`*.json.gz`: gzipped by `write_gzip`) and the entry without `file`/`sha256`."""
    if tokenizer.pad_token_id is None:
        raise ExportError("tokenizer: no pad token configured (SD 1.x pads with <|endoftext|>)")
    entry = {"max_length": max_length(tokenizer, text_max_positions), "pad_token_id": int(tokenizer.pad_token_id)}
    text = tokenizer_json(tokenizer)
    builtin = builtin_name(text)
    if builtin is not None:
        return {"builtin": builtin, "sha256": BUILTIN_SHA256[builtin], **entry}
    if path.name.endswith(".gz"):
        write_gzip(path, text.encode("utf-8"))
    else:
        path.write_text(text, encoding="utf-8")
    return entry


def encode_padded(backend: Tokenizer, prompt: str, max_len: int, eos_id: int, pad_id: int) -> list[int]:
    """What the runtime does with the tokenizer file (used by the tests to prove it)."""
    ids = backend.encode(prompt).ids
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + [eos_id]
    return ids + [pad_id] * (max_len - len(ids))
