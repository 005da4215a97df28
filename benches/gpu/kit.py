#!/usr/bin/env python3
"""Packs what the GPU measurement needs into calls that fit the device tool's carry budget, and
unpacks it on the GPU machine. Standard library only: it runs on both machines.

    kit.py strip-fatbin SRC DST --keep-arch 90      # zero the GPU code for other architectures
    kit.py pack --out .gpu-kit --budget BYTES --stage1 FILE... --stage2 FILE...
    kit.py unpack --kit .gpu-kit --dest .gpu-work/kit --stage 1|2
    kit.py results GPU_RESULTS_MD [--into benches/RESULTS.md]

A device call carries at most 64 MiB, the tracked tree included, so the 284 MB CUDA provider cannot
travel whole. Two things make it fit in two calls:

- `strip-fatbin`: the provider's `.nv_fatbin` section (219 of its 284 MB) holds machine code for
  sm_75, 80, 86, 89, 90 and 120, and no PTX. An H100 or H200 (compute capability 9.0) can only run
  the sm_90 images, so the others' payloads are overwritten with zeros: the file keeps its size and
  layout (every header and offset stays), and the zeros compress to nothing. 52 MB as xz instead of
  185 MB.
- `pack`: each file is compressed with xz and cut into parts; parts are assigned to calls in order,
  stage 1's files (what the first call's command needs) first. Every call's folder holds the whole
  plan (kit.json), so a call that finds a part missing says which call carries it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
ELF_KIND, PTX_KIND = 2, 1
KIT_JSON = "kit.json"
CHUNK = 1 << 20
MIN_BUDGET = 1 << 20  # bytes per call below which packing is pointless


class KitError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Fatbins. Layout (as cuobjdump reads it; NVIDIA does not document it): a container header
# {u32 magic, u16 version, u16 header_size, u64 entries_size}, then entries, each
# {u16 kind (1 PTX, 2 ELF), u16, u32 header_size, u64 payload_size, u32, u32, u16 minor, u16 major,
# u32 arch, ...} followed by its payload. The .nv_fatbin section holds one container per
# compilation unit, 8-byte aligned.


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of section `name` of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KitError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        end = data.index(b"\0", strtab + name_off)
        if bytes(data[strtab + name_off:end]).decode() == name:
            return offset, size
    raise KitError(f"no {name} section")


def fatbin_entries(data: bytes | bytearray, start: int, size: int):
    """Yields (container offset, kind, arch, payload offset, payload size) of every entry of every
    container in data[start:start + size]; fails when the containers do not chain exactly."""
    pos, end = start, start + size
    while pos < end:
        if struct.unpack_from("<I", data, pos)[0] != FATBIN_MAGIC:
            if any(data[pos:pos + 8]):
                raise KitError(f"unexpected bytes at offset {pos:#x} of the fatbin section")
            pos += 8  # alignment padding between containers
            continue
        _, _, header_size, entries_size = struct.unpack_from("<IHHQ", data, pos)
        p, container_end = pos + header_size, pos + header_size + entries_size
        if container_end > end:
            raise KitError(f"fatbin container at {pos:#x} runs past its section")
        while p < container_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
            (arch,) = struct.unpack_from("<I", data, p + 28)
            yield pos, kind, arch, p + entry_header, payload
            p += entry_header + payload
        if p != container_end:
            raise KitError(f"fatbin container at {pos:#x}: entries end at {p:#x}, not {container_end:#x}")
        pos = container_end


def strip_fatbin(src: Path, dst: Path, keep_arch: int) -> dict:
    """Copies src to dst with the payloads of machine code (ELF) entries for other architectures than
    `keep_arch` zeroed, in the containers (kernel sets) that have code for `keep_arch` or PTX. A
    container with neither (sm_120-only kernels, say) cannot run on that GPU anyway and stays as it is."""
    data = bytearray(src.read_bytes())
    start, size = elf_section(data, ".nv_fatbin")
    entries = list(fatbin_entries(data, start, size))
    if not entries:
        raise KitError(f"{src}: its .nv_fatbin section holds no entries")
    runnable: dict[int, bool] = {}  # container offset -> has code that runs on keep_arch
    for container, kind, arch, _, _ in entries:
        runnable[container] = runnable.get(container, False) or kind == PTX_KIND or arch == keep_arch
    zeroed = 0
    for container, kind, arch, offset, payload in entries:
        if runnable[container] and kind == ELF_KIND and arch != keep_arch:
            data[offset:offset + payload] = bytes(payload)
            zeroed += payload
    if not any(runnable.values()):
        raise KitError(f"{src}: no code for sm_{keep_arch} (nor PTX) in it")
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dst)
    return {"entries": len(entries), "containers": len(runnable), "zeroed_bytes": zeroed,
            "containers_without_code": sum(not r for r in runnable.values())}


# ----------------------------------------------------------------------------------------------
# Packing


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def xz(src: Path, dst: Path) -> None:
    """xz -6 with every core when the xz tool is there; Python's lzma (one core) otherwise."""
    tmp = dst.with_name(dst.name + ".part")
    if shutil.which("xz"):
        with tmp.open("wb") as out:
            subprocess.run(["xz", "-6", "-T0", "-c", str(src)], stdout=out, check=True)
    else:
        with src.open("rb") as f, lzma.open(tmp, "wb", preset=6) as out:
            shutil.copyfileobj(f, out, CHUNK)
    os.replace(tmp, dst)


def pack(out: Path, budget: int, stage1: list[Path], stage2: list[Path], compress: bool = True) -> dict:
    """Compresses the files and cuts them into parts of at most `budget` bytes per call folder
    (out/call1, out/call2, ...). Stage 1's files go first, whole, so that the first call can use them."""
    if budget < MIN_BUDGET:
        raise KitError(f"the budget per call is {budget} bytes: the tracked tree leaves no room under 64 MiB")
    for f in stage1 + stage2:
        if not f.is_file():
            raise KitError(f"{f}: no such file")
    if out.exists():
        shutil.rmtree(out)
    staging = out / "staging"
    staging.mkdir(parents=True)
    artifacts, calls_used = [], [0]  # bytes used per call, calls numbered from 1

    def room(call: int) -> int:
        while len(calls_used) <= call:
            calls_used.append(0)
        return budget - calls_used[call]

    call = 1
    for stage, files in ((1, stage1), (2, stage2)):
        for f in files:
            packed = staging / (f.name + (".xz" if compress else ""))
            if compress:
                xz(f, packed)
            else:
                shutil.copyfile(f, packed)
            total, offset, parts = packed.stat().st_size, 0, []
            if stage == 1 and total > room(1):
                raise KitError(f"{f.name} ({total} bytes packed) does not fit the first call ({room(1)} bytes left)")
            with packed.open("rb") as src:
                while offset < total:
                    if room(call) <= 0:
                        call += 1
                    n = min(room(call), total - offset)
                    part = out / f"call{call}" / f"{packed.name}.{len(parts)}"
                    part.parent.mkdir(parents=True, exist_ok=True)
                    with part.open("wb") as dst:
                        remaining = n
                        while remaining:
                            block = src.read(min(CHUNK, remaining))
                            dst.write(block)
                            remaining -= len(block)
                    parts.append({"call": call, "file": f"call{call}/{part.name}", "sha256": sha256(part), "size": n})
                    calls_used[call] += n
                    offset += n
            artifacts.append({"name": f.name, "stage": stage, "xz": compress, "size": f.stat().st_size,
                              "sha256": sha256(f), "parts": parts})
            packed.unlink()
    shutil.rmtree(staging)
    plan = {"calls": len(calls_used) - 1, "budget_per_call": budget, "artifacts": artifacts}
    for c in range(1, plan["calls"] + 1):
        (out / f"call{c}").mkdir(exist_ok=True)
        (out / f"call{c}" / KIT_JSON).write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def load_plan(kit: Path) -> dict:
    plans = sorted(kit.glob(f"call*/{KIT_JSON}"))
    if not plans:
        raise KitError(f"{kit}: no call folder with {KIT_JSON}: carry the folders benches/gpu/prepare.sh made")
    return json.loads(plans[0].read_text())


def unpack(kit: Path, dest: Path, stage: int) -> list[Path]:
    """Reassembles every artifact of stages <= `stage` into dest (skipping ones already there and
    intact); fails naming the calls whose parts are missing."""
    plan = load_plan(kit)
    wanted = [a for a in plan["artifacts"] if a["stage"] <= stage]
    missing = sorted({p["call"] for a in wanted for p in a["parts"] if not (kit / p["file"]).is_file()})
    done = [a for a in wanted if (dest / a["name"]).is_file() and (dest / a["name"]).stat().st_size == a["size"]]
    if missing and len(done) < len(wanted):
        raise KitError("parts missing from call(s) " + ", ".join(map(str, missing)) + f" of {plan['calls']}: "
                       "send those calls first (on the same warm machine; a new machine starts bare)")
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for a in wanted:
        target = dest / a["name"]
        paths.append(target)
        if a in done and sha256(target) == a["sha256"]:
            continue
        for p in a["parts"]:
            if sha256(kit / p["file"]) != p["sha256"]:
                raise KitError(f"{p['file']}: damaged in transfer (checksum differs); send call {p['call']} again")
        tmp = target.with_name(target.name + ".part")
        joined = tmp.with_name(tmp.name + ".joined")
        with joined.open("wb") as out:
            for p in a["parts"]:
                with (kit / p["file"]).open("rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)
        if a["xz"]:
            with lzma.open(joined, "rb") as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            joined.unlink()
        else:
            os.replace(joined, tmp)
        if sha256(tmp) != a["sha256"]:
            tmp.unlink()
            raise KitError(f"{a['name']}: reassembled file differs from the packed one")
        os.replace(tmp, target)
    return paths


# ----------------------------------------------------------------------------------------------
# Results


BEGIN, END = "<!-- gpu-kit:begin -->", "<!-- gpu-kit:end -->"


def merge_results(section_file: Path, into: Path) -> None:
    """Replaces the GPU section of `into` (between the gpu-kit markers) with section_file's, or
    appends it."""
    section = section_file.read_text(encoding="utf-8").strip("\n") + "\n"
    if not (section.startswith(BEGIN) and section.rstrip().endswith(END)):
        raise KitError(f"{section_file}: not a section measure.py wrote (no {BEGIN} ... {END})")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compare import write_section  # here only: compare.py needs numpy, the GPU machine's kit.py calls do not

    write_section(into, section, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strip-fatbin", help="zero other architectures' GPU code in a CUDA library")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    s.add_argument("--keep-arch", type=int, default=90, help="SM architecture to keep (90: H100, H200)")
    s = sub.add_parser("pack", help="compress and cut files into call folders")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--budget", type=int, required=True, help="bytes per call")
    s.add_argument("--stage1", type=Path, nargs="*", default=[], help="files the first call needs")
    s.add_argument("--stage2", type=Path, nargs="*", default=[], help="files the later calls need")
    s.add_argument("--no-compress", action="store_true")
    s = sub.add_parser("unpack", help="reassemble the files of a stage from the call folders")
    s.add_argument("--kit", type=Path, required=True)
    s.add_argument("--dest", type=Path, required=True)
    s.add_argument("--stage", type=int, required=True)
    s = sub.add_parser("results", help="merge measure.py's section into benches/RESULTS.md")
    s.add_argument("section", type=Path)
    s.add_argument("--into", type=Path, default=Path(__file__).resolve().parents[1] / "RESULTS.md")
    args = p.parse_args(argv)
    try:
        if args.cmd == "strip-fatbin":
            r = strip_fatbin(args.src, args.dst, args.keep_arch)
            print(f"{args.dst}: zeroed {r['zeroed_bytes'] / 1e6:.1f} MB of other architectures' code than "
                  f"sm_{args.keep_arch} ({r['entries']} entries in {r['containers']} containers; "
                  f"{r['containers_without_code']} containers have no sm_{args.keep_arch} code and stay as they were)")
        elif args.cmd == "pack":
            plan = pack(args.out, args.budget, args.stage1, args.stage2, not args.no_compress)
            for c in range(1, plan["calls"] + 1):
                size = sum(p["size"] for a in plan["artifacts"] for p in a["parts"] if p["call"] == c)
                print(f"{args.out}/call{c}: {size / 2**20:.1f} MiB")
        elif args.cmd == "unpack":
            for path in unpack(args.kit, args.dest, args.stage):
                print(f"  {path}")
        elif args.cmd == "results":
            merge_results(args.section, args.into)
            print(f"wrote the GPU section of {args.into}")
    except (KitError, OSError, lzma.LZMAError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
