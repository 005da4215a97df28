"""The set's tokenizer (a built-in one, or a file, via the `tokenizers` package, padded/truncated as
the runtime does) gives exactly transformers' CLIPTokenizer(padding="max_length", max_length=77,
truncation=True) ids; the built-in tokenizers are the runtime's asset, byte for byte, and tokenizer
files' gzip bytes are deterministic."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import COMMITTED_FIXTURES, COMMITTED_SET, REPO

from t2i_export.fixtures import TOKENIZER_PROMPTS, tokenizer_fixture
from t2i_export.tiny import write_clip_tokenizer_dir
from t2i_export.tokenizer import (
    BUILTIN_SHA256,
    builtin_text,
    encode_padded,
    entry_backend,
    export_tokenizer,
    load_backend,
    load_tokenizer,
    write_gzip,
)

RUNTIME_ASSET = REPO / "runtime" / "assets" / "clip-tokenizer.json.gz"


def _rows(fixtures_dir):
    return json.loads((fixtures_dir / "tokenizer.json").read_text(encoding="utf-8"))


def _check(set_dir, rows):
    manifest = json.loads((set_dir / "manifest.json").read_text(encoding="utf-8"))
    t = manifest["text_encoders"][0]["tokenizer"]
    backend = entry_backend(set_dir, t)
    assert backend.padding is None and backend.truncation is None
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
def test_committed_sets_name_builtin_tokenizers(name):
    """The committed sets carry no tokenizer file: SD 1.x and SDXL's first encoder use the built-in
    `clip`, SD 2.x and SDXL's second `openclip` (pad "!")."""
    set_dir = REPO / "graphs" / name
    manifest = json.loads((set_dir / "manifest.json").read_text(encoding="utf-8"))
    for te in manifest["text_encoders"]:
        t = te["tokenizer"]
        assert "file" not in t and t["sha256"] == BUILTIN_SHA256[t["builtin"]]
        assert t["builtin"] == ("clip" if t["pad_token_id"] == 49407 else "openclip")
    assert not list(set_dir.glob("tokenizer*")), "a tokenizer file the manifest does not name"


def test_builtin_clip_is_the_runtime_asset(tmp_path):
    """The runtime embeds runtime/assets/clip-tokenizer.json.gz and derives `openclip` from it; the
    exporter makes `clip` from the open_clip wheel: the same text, gzipped deterministically."""
    data = RUNTIME_ASSET.read_bytes()
    assert gzip.decompress(data) == builtin_text("clip").encode("utf-8")
    # magic, deflate, flags 0 (no FNAME/FCOMMENT/FEXTRA), mtime 0, XFL 2 (level 9); then the OS byte
    assert data[:9] == bytes.fromhex("1f8b08000000000002"), data[:10].hex()
    write_gzip(tmp_path / "again.gz", gzip.decompress(data))
    assert (tmp_path / "again.gz").read_bytes() == data, "re-gzipping gives other bytes (another zlib?)"


def test_openclip_differs_from_clip_by_its_pad_token():
    clip, openclip = builtin_text("clip"), builtin_text("openclip")
    added = json.loads(openclip)["added_tokens"]
    assert added[0]["content"] == "!" and added[0]["id"] == 0 and added[0]["special"]
    assert json.loads(clip)["added_tokens"] == added[1:]


def test_a_tokenizer_that_is_no_builtin_is_written_as_a_file(tmp_path):
    write_clip_tokenizer_dir(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    entry = export_tokenizer(tokenizer, tmp_path / "tokenizer.json.gz", 77)
    assert entry == {"builtin": "clip", "sha256": BUILTIN_SHA256["clip"], "max_length": 77, "pad_token_id": 49407}
    assert not (tmp_path / "tokenizer.json.gz").exists()
    tokenizer.add_tokens(["<shape>"])
    entry = export_tokenizer(tokenizer, tmp_path / "tokenizer.json.gz", 77)
    assert entry == {"max_length": 77, "pad_token_id": 49407}
    data = (tmp_path / "tokenizer.json.gz").read_bytes()
    assert data[:9] == bytes.fromhex("1f8b08000000000002"), data[:10].hex()
    backend = load_backend(tmp_path / "tokenizer.json.gz")
    assert backend.encode("a <shape>").ids[-2] == tokenizer.convert_tokens_to_ids("<shape>")
