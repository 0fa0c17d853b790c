"""Safetensors checkpoint directories, read and written one shard at a time.

The layout is Hugging Face's: either one `model.safetensors`, or shards
`model-00001-of-0000N.safetensors` and a `model.safetensors.index.json` whose `weight_map` names
the shard of every tensor. Every foreign format int4kit reads or writes shares this layout, so the
per-format code only maps tensor names and contents.
"""
import json
import math
import os
import re
import uuid
import zlib
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PT_SINGLE_FILE = "pytorch_model.bin"  # older checkpoints, read weights-only (never written)
PT_INDEX_FILE = "pytorch_model.bin.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


CHECKSUM_KEY = "int4kit_crc32"  # shard metadata: JSON {tensor name: CRC-32 of its bytes}
# shard metadata: who wrote the shard, "int4kit" (every tensor has a checksum) or "transformers"
# (save_pretrained: the quantized layers' tensors have one)
WRITER_KEY = "int4kit_writer"


def tensor_crc32(tensor: torch.Tensor) -> int:
    """CRC-32 (zlib) of a tensor's dtype and shape as text (e.g. "torch.float32[96, 64]"),
    then of its bytes in memory, row-major (on x86, the little-endian bytes safetensors stores):
    a header that lies about the dtype or shape of the same bytes fails it too."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    head = zlib.crc32(f"{tensor.dtype}{list(tensor.shape)}".encode())
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()), head)


class CheckpointError(ValueError):
    """A checkpoint file or tensor is not what its format says it must be. The message names the
    file, the tensor and what was expected."""


def parse_size(size: Union[int, str], argument: str = "max_shard_size") -> int:
    """Bytes in `size`: an int, or a string such as "5GB" (10^9) or "500MiB" (2^20), as in
    Hugging Face's max_shard_size."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
        if match is None:
            raise ValueError(f"{argument} must be an int or a size such as '5GB' or '500MiB', "
                             f"got {size!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    else:
        raise TypeError(f"{argument} must be an int or a size string such as '5GB', "
                        f"got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"{argument} must be positive, got {size!r}")
    return value


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise ImportError("int4kit's checkpoints need the safetensors package: "
                          "pip install safetensors") from error
    return safetensors


class _PickledFile:
    """A `pytorch_model.bin` (older checkpoints), read with torch.load(weights_only=True): only
    tensors and plain containers are unpickled, no code from the file runs. The same face as a
    safetensors handle."""

    def __init__(self, path: str):
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # UnpicklingError (a forbidden global), RuntimeError, OSError
            raise CheckpointError(f"{path}: not a readable weights-only PyTorch file "
                                  f"({str(error).splitlines()[0]})") from None
        if not isinstance(self._tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self._tensors.items()):
            raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor")

    def keys(self):
        return list(self._tensors)

    def metadata(self):
        return {}

    def get_tensor(self, key):
        return self._tensors[key].contiguous()

    def get_slice(self, key, dim, start, stop):
        return self._tensors[key].narrow(dim, start, stop - start).contiguous()

    def shape_dtype(self, key):
        t = self._tensors[key]
        return list(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))


_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL",
                       torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16",
                       torch.float32: "F32", torch.int32: "I32", torch.float64: "F64",
                       torch.int64: "I64"}
_ITEMSIZE = {name: dtype.itemsize for dtype, name in _SAFETENSORS_DTYPES.items()}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
# (index file, single file) of each layout, in the order a folder is looked at
LAYOUTS = ((INDEX_FILE, SINGLE_FILE), (PT_INDEX_FILE, PT_SINGLE_FILE))


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint folder (or one file): safetensors, or for older
    foreign checkpoints `pytorch_model.bin` shards read weights-only (never full pickle).

    Nothing is read until `get`; headers are checked when the reader is made, so a truncated or
    corrupt file fails here, with its name, before any weight is touched."""

    def __init__(self, path: Union[str, os.PathLike]):
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
        self.directory = path if os.path.isdir(path) else os.path.dirname(path)
        self.index_metadata: Dict[str, str] = {}
        weight_map, index_path = None, None
        if os.path.isfile(path):
            files = [os.path.basename(path)]
        elif not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        else:
            files = None
            for index_name, single_name in LAYOUTS:
                if os.path.isfile(os.path.join(path, index_name)):
                    index_path = os.path.join(path, index_name)
                    weight_map = self._read_index(index_path)
                    files = sorted(set(weight_map.values()))
                    break
                if os.path.isfile(os.path.join(path, single_name)):
                    files = [single_name]
                    break
            if files is None:
                raise CheckpointError(f"{path!r} is not a safetensors checkpoint: it has neither "
                                      f"{INDEX_FILE} nor {SINGLE_FILE}")
        self._handles = {}
        self._file_of: Dict[str, str] = {}
        self.checksums: Dict[str, int] = {}  # every shard's recorded CRC-32s, by tensor name
        self.shard_metadata: Dict[str, Dict[str, str]] = {}  # shard file name -> its metadata
        self.shard_checksums: Dict[str, Dict[str, int]] = {}
        self.metadata: Dict[str, str] = {}
        for name in files:
            full = os.path.join(self.directory, name)
            if not os.path.isfile(full):
                raise CheckpointError(f"{full}: shard named in {os.path.basename(index_path)} "
                                      f"is missing")
            handle = self._open(full)
            self._handles[name] = handle
            metadata = dict(handle.metadata() or {})
            self.shard_metadata[name] = dict(metadata)
            self.shard_checksums[name] = self._read_checksums(full, metadata.pop(CHECKSUM_KEY,
                                                                                 None))
            self.checksums.update(self.shard_checksums[name])
            self.metadata.update(metadata)
            for key in handle.keys():
                if key in self._file_of:
                    raise CheckpointError(f"{full}: tensor {key!r} is also in "
                                          f"{self._file_of[key]}")
                self._file_of[key] = name
        for key, shard in (weight_map or {}).items():
            if self._file_of.get(key) != shard:
                raise CheckpointError(f"{index_path}: tensor {key!r} is mapped to {shard} but "
                                      f"that shard does not hold it")

    @staticmethod
    def _read_checksums(full: str, text: Optional[str]) -> Dict[str, int]:
        if text is None:
            return {}
        try:
            checksums = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise CheckpointError(f"{full}: metadata {CHECKSUM_KEY!r} is not JSON "
                                  f"({str(error)[:80]})") from None
        if not isinstance(checksums, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in checksums.items()):
            raise CheckpointError(f"{full}: metadata {CHECKSUM_KEY!r} must map tensor names to "
                                  f"CRC-32 integers")
        return checksums

    def _read_index(self, index_path: str) -> Dict[str, str]:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map' of "
                                  f"tensor name -> shard file name")
        for shard in set(weight_map.values()):
            if os.path.basename(shard) != shard:
                raise CheckpointError(f"{index_path}: shard name {shard!r} is not a file name in "
                                      f"the checkpoint folder")
        self.index_metadata = {k: v for k, v in (index.get("metadata") or {}).items()
                               if isinstance(v, str)}
        return weight_map

    @staticmethod
    def _open(full: str):
        if not full.endswith(".safetensors"):
            return _PickledFile(full)
        try:
            handle = _safetensors().safe_open(full, framework="pt", device="cpu")
            handle.keys(), handle.metadata()
            return _SafetensorsFile(handle, full)
        except Exception as error:  # SafetensorError, OSError: truncated or not safetensors
            raise CheckpointError(f"{full}: not a readable safetensors file ({error})") from None

    def keys(self) -> List[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> str:
        return os.path.join(self.directory, self._file_of[key])

    def files(self) -> List[str]:
        return [os.path.join(self.directory, name) for name in self._handles]

    def keys_by_file(self) -> Dict[str, List[str]]:
        """Shard file name -> its tensor names, shards in order: for converting one at a time."""
        out: Dict[str, List[str]] = {name: [] for name in self._handles}
        for key, name in self._file_of.items():
            out[name].append(key)
        return out

    def get(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise CheckpointError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        try:
            tensor = self._handles[self._file_of[key]].get_tensor(key)
        except Exception as error:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} cannot be read "
                                  f"({error})") from None
        expected = self.checksums.get(key)
        if expected is not None and tensor_crc32(tensor) != expected:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} does not match the "
                                  f"CRC-32 its file recorded when it was written: the file is "
                                  f"corrupt")
        return tensor

    def get_slice(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of dimension `dim` (0 or 1) of a tensor, reading only those
        bytes from a safetensors file. The file's CRC-32 covers the whole tensor, so a slice is
        not checked against it (see `verify`)."""
        shape, _ = self.shape_dtype(key)
        if dim >= len(shape) or not 0 <= start <= stop <= shape[dim]:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} of shape {shape} has no "
                                  f"slice [{start}:{stop}] in dimension {dim}")
        try:
            return self._handles[self._file_of[key]].get_slice(key, dim, start, stop)
        except Exception as error:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} cannot be read "
                                  f"({error})") from None

    def verify(self, key: str, chunk_bytes: int = 64 << 20) -> None:
        """Checks a tensor against its recorded CRC-32 reading it in slices of about chunk_bytes
        (never the whole tensor at once); a tensor without a recorded checksum passes."""
        expected = self.checksums.get(key)
        if expected is None:
            return
        shape, dtype = self.shape_dtype(key)
        if not shape:
            self.get(key)
            return
        crc = zlib.crc32(f"{_TORCH_DTYPES[dtype]}{shape}".encode())
        row_bytes = max(1, math.prod(shape[1:]) * _ITEMSIZE[dtype])
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, shape[0], step):
            rows = self.get_slice(key, 0, start, min(start + step, shape[0]))
            crc = zlib.crc32(memoryview(rows.contiguous().reshape(-1).view(torch.uint8).numpy()),
                             crc)
        if crc != expected:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} does not match the "
                                  f"CRC-32 its file recorded when it was written: the file is "
                                  f"corrupt")

    def shape_dtype(self, key: str) -> Tuple[List[int], str]:
        """Shape and safetensors dtype name (e.g. "U8", "BF16") without reading the data."""
        if key not in self._file_of:
            raise CheckpointError(f"{self.directory}: tensor {key!r} is missing from the checkpoint")
        return self._handles[self._file_of[key]].shape_dtype(key)

    def nbytes(self, key: str) -> int:
        """Bytes of a tensor's data, from its header (an unknown dtype counts 4 per element)."""
        shape, dtype = self.shape_dtype(key)
        return math.prod(shape) * _ITEMSIZE.get(dtype, 4)


class _SafetensorsFile:
    """A safetensors file behind the face CheckpointReader uses. safe_open checks the header when
    the file is opened; the data is then read with pread at the header's offsets, not through
    safe_open's memory map, whose touched pages would stay resident (counted in the process's
    memory) for as long as the file is open: reading a 100 GB checkpoint tensor by tensor would
    look like holding it."""

    def __init__(self, handle, path: str):
        self._handle = handle
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        self._data_start = 8 + length
        self._entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def keys(self):
        return list(self._handle.keys())

    def metadata(self):
        return self._handle.metadata()

    def _read(self, offset: int, nbytes: int) -> bytearray:
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], self._data_start + offset + done)
            if got <= 0:
                raise OSError(f"unexpected end of file reading {nbytes} bytes at {offset}")
            done += got
        return buffer

    def _tensor(self, buffer: bytearray, dtype: torch.dtype, shape) -> torch.Tensor:
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def get_tensor(self, key):
        entry = self._entries[key]
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:  # a dtype int4kit does not map: safetensors reads it
            return self._handle.get_tensor(key)
        begin, end = entry["data_offsets"]
        return self._tensor(self._read(begin, end - begin), dtype, entry["shape"])

    def get_slice(self, key, dim, start, stop):
        entry = self._entries[key]
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            piece = self._handle.get_slice(key)
            return (piece[start:stop] if dim == 0 else piece[:, start:stop]).contiguous()
        shape = list(entry["shape"])
        begin = entry["data_offsets"][0]
        item = dtype.itemsize
        inner = math.prod(shape[dim + 1:]) * item  # bytes of one position of `dim`
        if dim == 0:
            shape[0] = stop - start
            return self._tensor(self._read(begin + start * inner, (stop - start) * inner),
                                dtype, shape)
        row = shape[1] * inner  # dim == 1: one read per row
        pieces = [self._read(begin + r * row + start * inner, (stop - start) * inner)
                  for r in range(shape[0])]
        shape[1] = stop - start
        return self._tensor(bytearray(b"".join(pieces)), dtype, shape)

    def shape_dtype(self, key):
        entry = self._entries[key]
        return list(entry["shape"]), entry["dtype"]


def check_src_dst(src, dst, src_name: str = "src", dst_name: str = "dst") -> Tuple[str, str]:
    """(src, dst) as strings, for work that reads the folder src while writing dst: src must be a
    folder and dst another one."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src_name} {src!r} is not a checkpoint folder")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"{dst_name} must be another folder than {src_name} (the source is read "
                         f"while the result is written)")
    return src, dst


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None


def _fsync(path: str) -> None:
    """Flushes a file (or a folder's entries) to the disk, so a rename after it never exposes an
    empty or partial file after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, content) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class ShardWriter:
    """Writes tensors to a checkpoint directory in shards of at most max_bytes (a tensor larger
    than that gets a shard of its own), holding at most one shard in memory.

    Shards are written (and flushed to disk) under temporary names while the checkpoint is made;
    a save that fails then (`abort`, or an exception in a `with` block) removes them and leaves
    the folder's previous checkpoint as it was. `finish` commits: it removes the old index, gives
    the shards their final names and writes the new index last (a single file is one rename).
    A crash in the middle of those renames leaves no checkpoint that loads, never a mix of old
    and new tensors. Files of an earlier save that the new one does not overwrite (stale shards,
    an index or single file of the other kind) are removed at the end."""

    def __init__(self, directory: str, max_bytes: int, metadata: Optional[Dict[str, str]] = None):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", WRITER_KEY: "int4kit", **(metadata or {})}
        self._tag = uuid.uuid4().hex[:8]
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: List[Tuple[str, List[str]]] = []  # (temporary file, its keys)
        self.total_bytes = 0
        self._keys = set()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abort()
        return False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise ValueError(f"tensor {key!r} was already written to this checkpoint")
        self._keys.add(key)
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[key] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def add_all(self, tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        for key, tensor in tensors:
            self.add(key, tensor)

    def flush(self) -> None:
        """Writes what was added so far as a shard now: a boundary the caller chooses (one block
        of a model at a time keeps memory at one block)."""
        self._flush()

    def state(self) -> dict:
        """What `resume` needs to go on with this checkpoint in another process (JSON-ready):
        the temporary shards written so far and their tensor names. Call after `flush`."""
        if self._pending:
            raise RuntimeError("ShardWriter.state() with tensors not yet written: flush first")
        return {"tag": self._tag, "total_bytes": self.total_bytes,
                "written": [[os.path.basename(tmp), keys] for tmp, keys in self._written]}

    @classmethod
    def resume(cls, directory: str, max_bytes: int, state: dict,
               metadata: Optional[Dict[str, str]] = None) -> "ShardWriter":
        """A writer that goes on from `state` (an earlier writer's, whose process stopped):
        its temporary shards must still be there, readable."""
        writer = cls(directory, max_bytes, metadata)
        writer._tag, writer.total_bytes = state["tag"], state["total_bytes"]
        for name, keys in state["written"]:
            tmp = os.path.join(directory, name)
            handle = CheckpointReader._open(tmp) if os.path.isfile(tmp) else None
            if handle is None or set(handle.keys()) != set(keys):
                raise CheckpointError(f"{tmp}: a temporary shard of the interrupted run is "
                                      f"missing or does not hold what it should")
            writer._written.append((tmp, list(keys)))
            writer._keys.update(keys)
        return writer

    def _flush(self) -> None:
        if not self._pending:
            return
        st = _safetensors()
        tmp = os.path.join(self.directory, f".tmp-{self._tag}-{len(self._written):05d}.safetensors")
        self._written.append((tmp, list(self._pending)))
        checksums = {key: tensor_crc32(t) for key, t in self._pending.items()}
        st.torch.save_file(self._pending, tmp,
                           metadata={**self.metadata, CHECKSUM_KEY: json.dumps(checksums)})
        _fsync(tmp)
        self._pending, self._pending_bytes = {}, 0

    def abort(self) -> None:
        self._pending = {}
        for tmp, _ in self._written:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._written = []

    def finish(self, metadata: Optional[Dict[str, str]] = None) -> List[str]:
        """Commits the checkpoint; returns the file names written (shards, then the index).
        `metadata` known only at the end (e.g. a config built while converting) goes into the
        last shard and the index."""
        self.metadata.update(metadata or {})
        try:
            self._flush()
            if not self._written:  # a model without tensors still gets a (empty) checkpoint
                self._pending = {}
                st = _safetensors()
                tmp = os.path.join(self.directory, f".tmp-{self._tag}-00000.safetensors")
                st.torch.save_file({}, tmp, metadata=self.metadata)
                self._written.append((tmp, []))
        except BaseException:
            self.abort()
            raise
        index_path = os.path.join(self.directory, INDEX_FILE)
        single_path = os.path.join(self.directory, SINGLE_FILE)
        stale = [name for name in os.listdir(self.directory) if _SHARD_NAME.match(name)]
        if len(self._written) == 1:
            if os.path.exists(index_path):
                os.remove(index_path)  # else the loader would follow the old index
            os.replace(self._written[0][0], single_path)
            names = [SINGLE_FILE]
        else:
            if os.path.exists(index_path):
                os.remove(index_path)  # shards are about to change under it
            count = len(self._written)
            names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
            weight_map = {}
            for (tmp, keys), name in zip(self._written, names):
                os.replace(tmp, os.path.join(self.directory, name))
                weight_map.update({key: name for key in keys})
            write_json_atomic(index_path, {"metadata": {"total_size": self.total_bytes,
                                                        **self.metadata},
                                           "weight_map": weight_map})
            if os.path.exists(single_path):
                os.remove(single_path)
            names.append(INDEX_FILE)
        for name in stale:
            if name not in names:
                os.remove(os.path.join(self.directory, name))
        _fsync(self.directory)
        self._written = []
        return names
