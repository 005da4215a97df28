"""The set's tokenizer file (via the `tokenizers` package, padded/truncated as the runtime does) gives
exactly transformers' CLIPTokenizer(padding="max_length", max_length=77, truncation=True) ids; its
gzip bytes are deterministic."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import COMMITTED_FIXTURES, COMMITTED_SET, REPO

from t2i_export.fixtures import TOKENIZER_PROMPTS, tokenizer_fixture
from t2i_export.tokenizer import encode_padded, load_backend, read_tokenizer_text, write_gzip


def _rows(fixtures_dir):
    return json.loads((fixtures_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _check(set_dir, rows):
    manifest = json.loads((set_dir / "manifest.json").read_text(encoding="utf-8"))
    t = manifest["text_encoders"][0]["tokenizer"]
    raw = json.loads(read_tokenizer_text(set_dir / t["file"]))
    assert raw["padding"] is None and raw["truncation"] is None
    backend = load_backend(set_dir / t["file"])
    eos = backend.token_to_id("<|endoftext|>")
    for row in rows:
        got = encode_padded(backend, row["prompt"], t["max_length"], eos, t["pad_token_id"])
        assert got == row["ids"], row["prompt"]
    # The same with the tokenizers package's own padding/truncation switched on.
    backend.enable_truncation(t["max_length"])
    backend.enable_padding(length=t["max_length"], pad_id=t["pad_token_id"], pad_token="<|endoftext|>")
    for row in rows:
        assert backend.encode(row["prompt"]).ids == row["ids"], row["prompt"]


def test_fixture_covers_the_listed_prompt_kinds(zoo):
    rows = _rows(zoo.fixtures_dir)
    assert [r["prompt"] for r in rows] == TOKENIZER_PROMPTS
    assert all(len(r["ids"]) == 77 for r in rows)
    long = rows[-1]["ids"]
    assert long[0] == 49406 and long[-1] == 49407 and 49407 not in long[1:-1]  # truncated, EOS kept
    assert rows[0]["ids"][:7] == [49406, 320, 1125, 539, 550, 18376, 6765]  # real CLIP ids: "a photo of an astronaut riding"


def test_fixture_is_transformers_clip_tokenizer(zoo, oracle):
    assert _rows(zoo.fixtures_dir) == tokenizer_fixture(oracle)


def test_exported_tokenizer_matches(zoo):
    _check(zoo.set_dir, _rows(zoo.fixtures_dir))


def test_committed_tokenizer_matches_committed_fixture():
    _check(COMMITTED_SET, _rows(COMMITTED_FIXTURES))


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd1-fp16", "tiny-sd2", "tiny-sdxl", "tiny-sd1-inpaint"])
def test_committed_tokenizers_are_deterministic_gzip(name, tmp_path):
    """Every committed tokenizer is `.json.gz` with a header that cannot vary (no mtime, no file name,
    level 9), and gzipping its JSON again gives the same bytes."""
    manifest = json.loads((REPO / "graphs" / name / "manifest.json").read_text(encoding="utf-8"))
    for te in manifest["text_encoders"]:
        path = REPO / "graphs" / name / te["tokenizer"]["file"]
        data = path.read_bytes()
        assert path.name.endswith(".json.gz"), path
        # magic, deflate, flags 0 (no FNAME/FCOMMENT/FEXTRA), mtime 0, XFL 2 (level 9); then the OS byte
        assert data[:9] == bytes.fromhex("1f8b08000000000002"), data[:10].hex()
        write_gzip(tmp_path / "again.gz", gzip.decompress(data))
        assert (tmp_path / "again.gz").read_bytes() == data, f"{path}: re-gzipping gives other bytes (another zlib?)"
