"""File integrity: GGUF and safetensors headers parsed defensively, SHA-256 manifests.

Nothing here trusts a length or an offset it reads: each one is checked against the bytes that remain, so a
truncated or corrupted file gives one readable message instead of a crash, a hang or a read past the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces

# Arrays the doctor reads (token strings for marker checks, token types); all others are skipped.
DOCTOR_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


@dataclass
class GGUFArray:
    """A metadata array that was skipped, not read."""

    element_type: int
    count: int


@dataclass
class GGUFTensor:
    name: str
    dims: list[int]  # GGUF order: fastest-varying first
    type_id: int
    type_name: str
    offset: int  # relative to the data section
    nbytes: int


@dataclass
class GGUFInfo:
    path: Path
    version: int
    file_size: int
    metadata: dict = field(default_factory=dict)
    tensors: list[GGUFTensor] = field(default_factory=list)
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_start: int = 0

    def data_problems(self) -> list[str]:
        return gguf_data_problems(self)


class _Corrupt(Exception):
    pass


class _Reader:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}")

    def scalar(self, fmt: str, n: int, what: str):
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        start, self.pos = self.pos, self.pos + n
        if not keep:
            return None
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at byte {start} is not valid UTF-8") from None


def read_gguf(path: Path, keep_arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Parse a GGUF header (metadata and tensor table) without trusting it.

    Raises ModelFileError when the header itself is unreadable (bad magic, unknown version, a length or
    type that makes no sense, a header running past the end). Problems with where the tensor data lies are
    returned by `GGUFInfo.data_problems()`, since the header is readable then.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from e
    with f:
        head = f.read(24)
        if head[:4] != GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (bad magic bytes {head[:4]!r}, expected b'GGUF')")
        if len(head) < 24:
            raise ModelFileError(f"{path}: GGUF file is truncated ({size} bytes, shorter than its fixed header)")
        version = struct.unpack_from("<I", head, 4)[0]
        if version not in GGUF_VERSIONS:
            raise ModelFileError(f"{path}: unsupported GGUF version {version} (supported: 2, 3); the header may be corrupt")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(path, buf, size, version, keep_arrays)
        except _Corrupt as e:
            truncated = "ends at byte" in str(e)
            kind = "GGUF header is truncated or corrupt" if truncated else "GGUF header is corrupt"
            raise ModelFileError(f"{path}: {kind}: {e}") from None
        finally:
            buf.close()


def _parse(path: Path, buf, size: int, version: int, keep_arrays) -> GGUFInfo:
    r = _Reader(buf, size)
    r.pos = 8
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata key count")
    # Each metadata entry takes at least 13 bytes, each tensor entry at least 28: absurd counts are corruption.
    if n_kv * 13 > size or n_tensors * 28 > size:
        raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than a {size}-byte file can hold")
    info = GGUFInfo(path, version, size)
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}")
        if not key or len(key) > 65535 or not _KEY_RE.match(key):
            raise _Corrupt(f"metadata key #{i} ({key[:40]!r}) is not a valid key name")
        vtype = r.u32(f"value type of '{key}'")
        info.metadata[key] = _value(r, vtype, key, keep=key in keep_arrays)
    alignment = info.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment = {alignment!r} is not a power of two")
    info.alignment = alignment
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for i in range(n_tensors):
        name = r.string(f"name of tensor #{i}")
        if not name or len(name) > 256 or not _KEY_RE.match(name):
            raise _Corrupt(f"tensor #{i} has an invalid name {name[:40]!r}")
        n_dims = r.u32(f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise _Corrupt(f"tensor '{name}' has {n_dims} dimensions (1 to {GGUF_MAX_DIMS} allowed)")
        dims = [r.u64(f"dimensions of tensor '{name}'") for _ in range(n_dims)]
        if any(d == 0 or d > 2**40 for d in dims) or math.prod(dims) > 2**50:
            raise _Corrupt(f"tensor '{name}' has impossible dimensions {dims}")
        type_id = r.u32(f"type of tensor '{name}'")
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor '{name}' has unknown tensor type {type_id}") from None
        if dims[0] % block:
            raise _Corrupt(f"tensor '{name}' ({qtype.name}) has a row of {dims[0]} values, not a multiple of its block size {block}")
        offset = r.u64(f"data offset of tensor '{name}'")
        nbytes = math.prod(dims) // block * type_size
        info.tensors.append(GGUFTensor(name, dims, type_id, qtype.name, offset, nbytes))
    info.data_start = (r.pos + alignment - 1) // alignment * alignment
    return info


def _value(r: _Reader, vtype: int, key: str, keep: bool, depth: int = 0):
    if vtype in _SCALARS:
        fmt, n = _SCALARS[vtype]
        return r.scalar(fmt, n, f"value of '{key}'")
    if vtype == _STRING:
        return r.string(f"value of '{key}'")
    if vtype != _ARRAY or depth > 2:
        raise _Corrupt(f"metadata key '{key}' has unknown value type {vtype}")
    etype = r.u32(f"array type of '{key}'")
    count = r.u64(f"array length of '{key}'")
    if etype in _SCALARS:
        n = _SCALARS[etype][1] * count
        r.need(n, f"array '{key}' of {count} values")
        out = np.frombuffer(r.buf, dtype=_NUMPY[etype], count=count, offset=r.pos).copy() if keep else GGUFArray(etype, count)
        r.pos += n
        return out
    if etype == _STRING:
        if count * 8 > r.size - r.pos:
            raise _Corrupt(f"array '{key}' claims {count} strings, more than the file can hold")
        return _string_array(r, key, count) if keep else _skip_string_array(r, key, count)
    if etype == _ARRAY:
        if count * 12 > r.size - r.pos:
            raise _Corrupt(f"array '{key}' claims {count} arrays, more than the file can hold")
        items = [_value(r, _ARRAY, key, keep, depth + 1) for _ in range(count)]
        return items if keep else GGUFArray(etype, count)
    raise _Corrupt(f"array '{key}' has unknown element type {etype}")


_U64 = struct.Struct("<Q").unpack_from


def _skip_string_array(r: _Reader, key: str, count: int) -> GGUFArray:
    """Skip `count` length-prefixed strings (the 262k-token vocabulary) in a tight loop."""
    buf, pos, size = r.buf, r.pos, r.size
    for j in range(count):
        if pos + 8 > size:
            break
        pos += 8 + _U64(buf, pos)[0]
        if pos > size:
            break
    else:
        r.pos = pos
        return GGUFArray(_STRING, count)
    raise _Corrupt(f"string #{j} of '{key}' runs past the end of the file (at byte {min(pos, size)}, "
                   f"the file ends at byte {size})")


def _string_array(r: _Reader, key: str, count: int) -> list[str]:
    start = r.pos
    _skip_string_array(r, key, count)  # validates every length before anything is decoded
    buf, pos, out = r.buf, start, []
    for _ in range(count):
        n = _U64(buf, pos)[0]
        out.append(buf[pos + 8: pos + 8 + n].decode("utf-8", errors="replace"))
        pos += 8 + n
    return out


def gguf_data_problems(info: GGUFInfo) -> list[str]:
    """Tensor data that lies outside the file, overlaps, is misaligned or is named twice."""
    path, problems = info.path, []
    names = [t.name for t in info.tensors]
    dupes = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if dupes:
        problems.append(f"{path}: GGUF tensor table is corrupt: tensor '{dupes[0]}' is listed twice")
    misaligned = [t for t in info.tensors if t.offset % info.alignment]
    if misaligned:
        t = misaligned[0]
        problems.append(f"{path}: GGUF tensor table is corrupt: tensor '{t.name}' starts at offset {t.offset}, "
                        f"not a multiple of the alignment {info.alignment}")
    if info.data_start > info.file_size and info.tensors:
        problems.append(f"{path}: GGUF file is truncated: it ends at byte {info.file_size}, inside the header")
        return problems
    outside = [t for t in info.tensors if info.data_start + t.offset + t.nbytes > info.file_size]
    if outside:
        need = max(info.data_start + t.offset + t.nbytes for t in outside)
        # A cut download ends inside some tensor's data; offsets that all point far past the end look like a
        # corrupt tensor table instead.
        cut = any(info.data_start + t.offset < info.file_size for t in outside)
        what = "GGUF file is truncated" if cut else "GGUF file is truncated or its tensor table is corrupt"
        problems.append(
            f"{path}: {what}: {len(outside)} of {len(info.tensors)} tensors lie past its end "
            f"(e.g. '{outside[0].name}'); it has {info.file_size} bytes but needs at least {need}"
        )
    ranges = sorted((t.offset, t.offset + t.nbytes, t.name) for t in info.tensors)
    for (s0, e0, n0), (s1, e1, n1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            problems.append(f"{path}: GGUF tensor table is corrupt: tensors '{n0}' and '{n1}' overlap")
            break
    return problems


def check_gguf_structure(path: Path) -> GGUFInfo:
    """The loader's check: the header parses and every tensor's data lies inside the file."""
    info = read_gguf(path)
    problems = info.data_problems()
    if problems:
        raise ModelFileError(summarize(problems))
    return info


def summarize(problems: list[str]) -> str:
    """One line for a list of problems: the first, and how many more there are."""
    if len(problems) == 1:
        return problems[0]
    return f"{problems[0]} (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"


# ---- safetensors ----------------------------------------------------------------------------------------
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    file: Path


def read_safetensors_header(path: Path) -> tuple[dict[str, SafetensorsEntry], list[str]]:
    """Tensors listed in a safetensors file (name -> dtype, shape) and the problems found in its header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return {}, [f"{path}: safetensors file is truncated ({size} bytes, no header)"]
            n = struct.unpack("<Q", head)[0]
            if n > _MAX_HEADER:
                return {}, [f"{path}: safetensors header is corrupt (claims a {n}-byte header)"]
            if 8 + n > size:
                return {}, [f"{path}: safetensors file is truncated (its {n}-byte header runs past the end of the "
                            f"{size}-byte file)"]
            raw = f.read(n)
    except OSError as e:
        return {}, [f"cannot read {path}: {e.strerror}"]
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" \x00"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        return {}, [f"{path}: safetensors header is corrupt ({str(e).splitlines()[0]})"]
    data_size = size - 8 - n
    tensors, problems, ranges = {}, [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(begin, int) and isinstance(end, int)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: safetensors header is corrupt (bad entry for tensor '{name}')")
            continue
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            problems.append(f"{path}: tensor '{name}' has an unknown dtype '{dtype}'")
            continue
        expected = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if not 0 <= begin <= end:
            problems.append(f"{path}: safetensors header is corrupt (tensor '{name}' has offsets {begin}..{end})")
            continue
        if end - begin != expected:
            problems.append(f"{path}: tensor '{name}' {dtype}{list(shape)} needs {expected} bytes but its header "
                            f"gives it {end - begin}: the header is corrupt")
        ranges.append((begin, end, name))
        tensors[name] = SafetensorsEntry(dtype, shape, path)
    ranges.sort()
    outside = [r for r in ranges if r[1] > data_size]
    if outside:
        problems.append(f"{path}: safetensors file is truncated: {len(outside)} of {len(ranges)} tensors lie past "
                        f"its end (e.g. '{outside[0][2]}'); it has {size} bytes but needs {8 + n + max(r[1] for r in outside)}")
    end = 0
    for begin, stop, name in ranges:
        if begin != end:
            kind = f"tensor '{name}' overlaps the one before it" if begin < end else f"{begin - end} bytes before " \
                f"tensor '{name}' belong to no tensor"
            problems.append(f"{path}: safetensors header is corrupt: {kind}")
            break
        end = stop
    if not outside and ranges and ranges[-1][1] != data_size:
        problems.append(f"{path}: safetensors file has {data_size - ranges[-1][1]} bytes after its last tensor "
                        "(a corrupt or incompletely rewritten file)")
    return tensors, problems


def read_safetensors_folder(folder: Path) -> tuple[dict[str, SafetensorsEntry], list[str]]:
    """All tensors of a folder's safetensors files (honouring the shard index) and the problems found."""
    from ..loading import safetensors_files

    problems: list[str] = []
    try:
        files = safetensors_files(folder)
    except ModelFileError as e:
        return {}, [str(e)]
    tensors: dict[str, SafetensorsEntry] = {}
    for file in files:
        found, file_problems = read_safetensors_header(file)
        problems += file_problems
        for name, entry in found.items():
            if name in tensors:
                problems.append(f"{folder}: tensor '{name}' is stored twice ({tensors[name].file.name} and {file.name})")
            tensors[name] = entry
    index = folder / "model.safetensors.index.json"
    if index.exists() and not problems:
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = [n for n, shard in weight_map.items() if n not in tensors or tensors[n].file.name != Path(shard).name]
        if wrong:
            problems.append(f"{index}: the shard index lists {len(wrong)} tensors that are not in the shard it "
                            f"names, e.g. '{wrong[0]}' in {weight_map[wrong[0]]}")
    return tensors, problems


# ---- SHA-256 manifests ------------------------------------------------------------------------------------
_MANIFEST_NAMES = ("SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt", "sha256sum.txt", "checksums.sha256")
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def find_manifest(target: Path) -> dict[str, str]:
    """File name -> expected SHA-256 from a manifest next to the model (a SHA256SUMS file or *.sha256 files).

    For a GGUF file `X.gguf`, `X.gguf.sha256` (or `X.sha256`) holding the digest counts too.
    """
    folder = target if target.is_dir() else target.parent
    expected: dict[str, str] = {}
    manifests = [folder / n for n in _MANIFEST_NAMES if (folder / n).is_file()]
    manifests += sorted(p for p in folder.glob("*.sha256") if p not in manifests)
    for manifest in manifests:
        try:
            lines = manifest.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.strip().split(maxsplit=1)
            if not parts or not _HEX.match(parts[0]):
                continue
            if len(parts) == 2:
                name = Path(parts[1].lstrip("*").strip()).name
            else:  # a bare digest in X.sha256 / X.gguf.sha256 names its file
                stem = manifest.name[: -len(".sha256")]
                name = stem if (folder / stem).exists() else next((p.name for p in folder.glob(stem + ".*")
                                                                  if p.suffix != ".sha256"), stem)
            expected[name] = parts[0].lower()
    return expected


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
