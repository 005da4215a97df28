"""benches/gpu/kit.py: the fatbin stripping and the packing into device calls (the GPU kit's parts
that run here; benches/gpu/measure.sh --dry-run covers the rest)."""

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

KIT_PATH = Path(__file__).resolve().parents[2] / "benches" / "gpu" / "kit.py"
spec = importlib.util.spec_from_file_location("gpu_kit", KIT_PATH)
kit = importlib.util.module_from_spec(spec)
sys.modules["gpu_kit"] = kit
spec.loader.exec_module(kit)


def entry(kind: int, arch: int, payload: bytes) -> bytes:
    """A fatbin entry as cuobjdump reads it: 64-byte header, then the payload."""
    header = struct.pack("<HHIQIIHHI", kind, 0x0101, 64, len(payload), 0, 0, 0, 0, arch)
    return header + bytes(64 - len(header)) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    blob = struct.pack("<IHHQ", kit.FATBIN_MAGIC, 1, 16, len(body)) + body
    return blob + bytes(-len(blob) % 8)


def elf_with_section(name: str, content: bytes) -> bytes:
    """A minimal 64-bit little-endian ELF file: section headers null, .shstrtab, `name`."""
    shstrtab = b"\0.shstrtab\0" + name.encode() + b"\0"
    data_off = 64
    str_off = data_off + len(content)
    sh_off = (str_off + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 1)
    body = header + content + shstrtab
    body += bytes(sh_off - len(body))

    def sh(name_off, typ, off, size):
        return struct.pack("<IIQQQQIIQQ", name_off, typ, 0, 0, off, size, 0, 0, 1, 0)

    return body + sh(0, 0, 0, 0) + sh(1, 3, str_off, len(shstrtab)) + sh(11, 1, data_off, len(content))


def fatbin_file(tmp_path: Path) -> tuple[Path, dict]:
    payloads = {name: bytes([i + 1]) * (40 + 8 * i) for i, name in enumerate(["a80", "a90", "a90ptx", "b120", "c90", "c75"])}
    section = (
        container(entry(2, 80, payloads["a80"]), entry(2, 90, payloads["a90"]))
        + container(entry(2, 120, payloads["b120"]))  # nothing for sm_90: stays as it was
        + container(entry(2, 75, payloads["c75"]), entry(1, 90, payloads["a90ptx"]))  # PTX runs: sm_75 goes
    )
    path = tmp_path / "lib.so"
    path.write_bytes(elf_with_section(".nv_fatbin", section))
    return path, payloads


def test_strip_fatbin_zeroes_only_other_architectures_code_where_sm90_can_run(tmp_path):
    src, payloads = fatbin_file(tmp_path)
    dst = tmp_path / "stripped.so"
    report = kit.strip_fatbin(src, dst, 90)
    before, after = src.read_bytes(), dst.read_bytes()
    assert len(after) == len(before)
    assert report["zeroed_bytes"] == len(payloads["a80"]) + len(payloads["c75"])
    assert report["containers"] == 3 and report["containers_without_code"] == 1
    for kept in ("a90", "a90ptx", "b120"):
        assert payloads[kept] in after
    for gone in ("a80", "c75"):
        assert payloads[gone] in before and payloads[gone] not in after
    # Only payload bytes changed: every header is where it was.
    start, size = kit.elf_section(after, ".nv_fatbin")
    assert [e[:3] for e in kit.fatbin_entries(after, start, size)] == [e[:3] for e in kit.fatbin_entries(before, start, size)]


def test_strip_fatbin_refuses_what_it_cannot_read(tmp_path):
    not_elf = tmp_path / "x.so"
    not_elf.write_bytes(b"hello")
    with pytest.raises(kit.KitError, match="not a 64-bit"):
        kit.strip_fatbin(not_elf, tmp_path / "y.so", 90)
    no_section = tmp_path / "plain.so"
    no_section.write_bytes(elf_with_section(".text", b"\x90" * 16))
    with pytest.raises(kit.KitError, match="no .nv_fatbin"):
        kit.strip_fatbin(no_section, tmp_path / "y.so", 90)
    # An entry that claims more bytes than its container holds.
    bad = bytearray(container(entry(2, 90, b"\1" * 16)))
    struct.pack_into("<Q", bad, 16 + 8, 4096)
    broken = tmp_path / "broken.so"
    broken.write_bytes(elf_with_section(".nv_fatbin", bytes(bad)))
    with pytest.raises(kit.KitError, match="entries end at"):
        kit.strip_fatbin(broken, tmp_path / "y.so", 90)
    assert not (tmp_path / "y.so").exists()


def test_pack_splits_across_calls_and_unpack_restores_every_byte(tmp_path, monkeypatch):
    import random

    rng = random.Random(0)
    wheel = tmp_path / "in" / "a.whl"
    big = tmp_path / "in" / "provider.so"
    wheel.parent.mkdir()
    wheel.write_bytes(rng.randbytes(3000))
    big.write_bytes(rng.randbytes(9000) + bytes(20000))
    kit_dir = tmp_path / "kit"
    with pytest.raises(kit.KitError, match="no room"):
        kit.pack(kit_dir, 4000, [wheel], [big])
    monkeypatch.setattr(kit, "MIN_BUDGET", 1000)
    budget = 4000
    plan = kit.pack(kit_dir, budget, [wheel], [big])
    packed = sum(p["size"] for a in plan["artifacts"] for p in a["parts"])
    assert plan["calls"] == -(-packed // budget) > 2  # every call filled before the next
    wheel_parts = [p for a in plan["artifacts"] if a["name"] == "a.whl" for p in a["parts"]]
    assert [p["call"] for p in wheel_parts] == [1]  # stage 1: whole, in the first call
    for c in range(1, plan["calls"] + 1):
        files = [f for f in (kit_dir / f"call{c}").iterdir() if f.name != kit.KIT_JSON]
        assert sum(f.stat().st_size for f in files) <= budget
        assert json.loads((kit_dir / f"call{c}" / kit.KIT_JSON).read_text()) == plan

    dest = tmp_path / "dest"
    assert [p.name for p in kit.unpack(kit_dir, dest, 1)] == ["a.whl"]
    assert not (dest / "provider.so").exists()
    assert [p.name for p in kit.unpack(kit_dir, dest, 2)] == ["a.whl", "provider.so"]
    assert (dest / "a.whl").read_bytes() == wheel.read_bytes()
    assert (dest / "provider.so").read_bytes() == big.read_bytes()


def test_unpack_names_the_missing_call_and_refuses_damaged_parts(tmp_path, monkeypatch):
    import random

    monkeypatch.setattr(kit, "MIN_BUDGET", 1000)
    data = tmp_path / "lib.so"
    data.write_bytes(random.Random(1).randbytes(6000))
    kit_dir = tmp_path / "kit"
    plan = kit.pack(kit_dir, 4000, [], [data], compress=False)
    assert plan["calls"] == 2
    part2 = kit_dir / plan["artifacts"][0]["parts"][1]["file"]
    saved = part2.read_bytes()
    part2.unlink()
    with pytest.raises(kit.KitError, match=r"missing from call\(s\) 2 of 2"):
        kit.unpack(kit_dir, tmp_path / "dest", 2)
    part2.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(kit.KitError, match="damaged in transfer"):
        kit.unpack(kit_dir, tmp_path / "dest", 2)
    assert not (tmp_path / "dest" / "lib.so").exists()
    part2.write_bytes(saved)
    kit.unpack(kit_dir, tmp_path / "dest", 2)
    assert (tmp_path / "dest" / "lib.so").read_bytes() == data.read_bytes()
    with pytest.raises(kit.KitError, match="no call folder"):
        kit.unpack(tmp_path / "nothing", tmp_path / "dest", 2)


def test_results_section_replaces_the_previous_one(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nCPU numbers.\n")
    section = tmp_path / "gpu-results.md"
    section.write_text(f"{kit.BEGIN}\n## GPU\nfirst\n{kit.END}\n")
    kit.merge_results(section, results)
    section.write_text(f"{kit.BEGIN}\n## GPU\nsecond\n{kit.END}\n")
    kit.merge_results(section, results)
    text = results.read_text()
    assert text.count(kit.BEGIN) == 1 and "second" in text and "first" not in text and "CPU numbers." in text
    section.write_text("something else\n")
    with pytest.raises(kit.KitError, match="not a section"):
        kit.merge_results(section, results)
