"""A disk-backed document KV cache for corpora larger than RAM (SmolLM2: 23 KB of bf16 KV per
token, so a million-token corpus is 23 GB).

The whole pool is prefilled once, in the seeded permutation order that every query's corpus is
drawn from, into one file per layer (``[k|v, kv_head, token, d_head]``).  A query's corpus at
size N is then a prefix of that order plus its gold documents, so the engine streams each
layer's prefix once for all streams.  The files are memory-mapped copy-on-write and never
written through the map: the kernels read the page cache in place, with no copy per read.  Those
pages belong to the page cache, which the OS evicts under memory pressure (a corpus larger than
RAM runs at the disk's speed); they are counted in the process's resident set while mapped.

The folder is content-addressed (model fingerprint, layout, every document's tokens and code,
storage order, dtype), built in a ``.partial`` folder that a restarted build resumes batch by
batch, and renamed into place only when complete.  Opening it checks every file's size and
CRC-32 against the manifest: a truncated or corrupt cache is reported, deleted and rebuilt,
never used.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kernels.corpus_attention import update_shared
from lens.data.layout import PoolLayout, document_start, pool_order
from lens.errors import LensError
from lens.log import log
from lens.models.decoder import Decoder
from lens.paths import cache_dir, exclusive_lock
from lens.runtime.kv.source import KVSource
from lens.runtime.prefill import pool_batches, prefill_batch, run_instruction
from lens.runtime.records import DocumentKV
from lens.runtime.stream import QueryStream

FORMAT = 1
_NUMPY = {torch.bfloat16: np.int16, torch.float16: np.int16, torch.float32: np.float32}


def _crc32_file(path: Path, bar: tqdm | None = None, block: int = 64 << 20) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
            if bar is not None:
                bar.update(len(chunk))
    return crc


class DiskKV(KVSource):
    def __init__(
        self, model: Decoder, pool: PoolLayout, seed: int = 0, folder: str | Path | None = None,
        batch_tokens: int = 8192, chunk_tokens: int = 65536, progress: bool = True, wait: bool = False,
        kv_dtype: torch.dtype | None = None,
    ):
        """``wait``: when another process is building this cache, wait for it and open its result
        (sweep workers sharing a KV folder) instead of refusing.  ``kv_dtype``: the stored KV's
        dtype (default the model's; bf16 under an fp32 model halves the cache on disk)."""
        self.dtype = kv_dtype or model.dtype
        if pool.config.positions == "sequential":
            raise LensError(
                "the disk KV cache needs position-independent documents: under `sequential` positions a "
                "document's KV depends on its place in each corpus; use positions shared or restart"
            )
        if self.dtype not in _NUMPY:
            raise LensError(f"disk KV cache: dtype {self.dtype} not supported (use bfloat16 or float32)")
        self.model, self.pool, self.seed = model, pool, seed
        self.batch_tokens, self.chunk_tokens, self.progress = batch_tokens, chunk_tokens, progress
        cfg = model.cfg
        self.n_layers, self.n_kv, self.d_head = cfg.n_layers, cfg.n_kv_heads, cfg.d_head
        self.order = pool_order(len(pool.doc_token_ids), seed)
        self.rank = torch.empty(len(self.order), dtype=torch.long)
        self.rank[torch.tensor(self.order)] = torch.arange(len(self.order))
        lengths = np.array([len(pool.doc_token_ids[d]) for d in self.order], dtype=np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.n_tokens = int(self.doc_offsets[-1])
        self.token_doc = torch.from_numpy(np.repeat(np.arange(len(self.order)), lengths))  # storage doc of each token
        self.key = self._content_key()
        base = Path(folder).expanduser() if folder is not None else cache_dir() / "kv"
        self.root = base / self.key
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        if not self._open():
            with exclusive_lock(base / f".{self.key}.lock", f"the KV cache {self.root}", wait=wait):
                if not self._open():  # another process may have finished it while we waited to look
                    try:
                        self._build()  # checksums are computed from the files as written: no second pass here
                    except OSError as err:
                        raise LensError(f"{self.root}: writing the KV cache failed ({err.strerror}); free disk "
                                        "space or set LENS_CACHE to a writable disk; a rerun resumes the build") from None
                    if not self._open(verify=False):
                        raise LensError(f"{self.root}: the KV cache just built cannot be opened; is the disk full?")

    # -------------------------------------------------------------------------- identity
    def _content_key(self) -> str:
        h = hashlib.sha256()
        h.update(f"lens-kv{FORMAT}|{self.model.fingerprint}|{self.pool.config.document_fingerprint()}|{self.dtype}|".encode())
        if self.batch_tokens != 8192:  # the batches shape the KV's last bits; the default is left out of
            h.update(f"batch{self.batch_tokens}|".encode())  # the key so caches built before stay valid
        h.update(np.asarray(self.pool.instruction_ids, dtype=np.int64).tobytes())
        for d in self.order:
            h.update(f"|{self.pool.codes[d]}|".encode())
            h.update(np.asarray(self.pool.doc_token_ids[d], dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def _layer_path(self, root: Path, layer: int) -> Path:
        return root / f"layer_{layer:03d}.bin"

    def _layer_bytes(self) -> int:
        return 2 * self.n_kv * self.n_tokens * self.d_head * self.itemsize

    # -------------------------------------------------------------------------- open / verify
    def _open(self, verify: bool = True) -> bool:
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            return False
        problem = self._verify(manifest_path) if verify else None
        if problem:
            log.warning(f"KV cache {self.root} is unusable ({problem}); deleting and rebuilding it")
            shutil.rmtree(self.root, ignore_errors=True)
            return False
        tensors = load_file(self.root / "instruction.safetensors")
        self.instruction = DocumentKV(tensors["keys"], tensors["values"])
        self._layers = [self._map(self._layer_path(self.root, l)) for l in range(self.n_layers)]
        return True

    def _map(self, path: Path) -> torch.Tensor:
        """A layer file as a tensor [k|v, kv_head, token, d] over a copy-on-write map of it (the
        tensor holds the map; the file is never written through it)."""
        shape = (2, self.n_kv, self.n_tokens, self.d_head)
        if self._layer_bytes() == 0:
            return torch.empty(shape, dtype=self.dtype)
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(mapped, dtype=self.dtype).view(shape)

    def _verify(self, manifest_path: Path) -> str | None:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "manifest is not valid JSON"
        if not isinstance(manifest, dict) or not isinstance(manifest.get("crc32"), dict):
            return "manifest has the wrong shape"
        if manifest.get("format") != FORMAT or manifest.get("key") != self.key:
            return "manifest does not match this model, layout and corpus"
        files = [self._layer_path(self.root, l) for l in range(self.n_layers)] + [self.root / "instruction.safetensors"]
        for f in files:
            if not f.is_file():
                return f"{f.name} missing"
        for f in files[:-1]:
            if f.stat().st_size != self._layer_bytes():
                return f"{f.name} has {f.stat().st_size} bytes, expected {self._layer_bytes()} (truncated?)"
        total = sum(f.stat().st_size for f in files)
        with tqdm(total=total, desc="verify KV cache", unit="B", unit_scale=True, disable=not self.progress, leave=False) as bar:
            for f in files:
                if _crc32_file(f, bar) != manifest["crc32"].get(f.name):
                    return f"{f.name} fails its checksum (corrupt)"
        return None

    # -------------------------------------------------------------------------- build
    @torch.no_grad()
    def _build(self) -> None:
        partial = self.root.with_name(self.root.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        progress_path = partial / "progress.json"
        committed = self._committed_batches(progress_path)
        free = shutil.disk_usage(partial).free
        need = self._layer_bytes() * self.n_layers
        if not committed and free < need:
            raise LensError(f"{partial}: the KV cache needs {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free; "
                            "set LENS_CACHE to a bigger disk")
        instruction = run_instruction(self.model, self.pool.instruction_ids)
        save_file({"keys": instruction.keys.to(self.dtype).contiguous(), "values": instruction.values.to(self.dtype).contiguous()},
                  partial / "instruction.safetensors")
        fds = []
        for layer in range(self.n_layers):
            path = self._layer_path(partial, layer)
            fd = os.open(path, os.O_RDWR | os.O_CREAT)
            if os.fstat(fd).st_size != self._layer_bytes():
                os.ftruncate(fd, self._layer_bytes())
            fds.append(fd)
        committed = self._verified_prefix(fds, committed)
        done = committed[-1]["docs_done"] if committed else 0
        n_inst = len(self.pool.instruction_ids)
        docs = [self.pool.doc_token_ids[d] for d in self.order]
        # the fixed batches the memory cache prefills too (so both hold the same bits), in storage
        # positions; a batch that a resumed build finds half done is prefilled whole again
        batches = [[int(self.rank[d]) for d in b] for b in pool_batches(self.pool, self.seed, self.batch_tokens)]
        batches = [b for b in batches if b[-1] >= done]
        desc = f"prefill {len(docs)} documents to disk" + (f" (resuming at {done})" if done else "")
        initial = int(self.doc_offsets[batches[0][0] if batches else done])
        with tqdm(total=self.n_tokens, initial=initial, desc=desc, unit="tok", unit_scale=True,
                  disable=not self.progress) as bar:
            for batch in batches:
                starts = [document_start(self.pool.config, n_inst, 0) for _ in batch]
                keys, values = prefill_batch(self.model, instruction, [docs[i] for i in batch], starts,
                                             self.model.tokenizer.pad_token_id or 0)
                lengths = [len(docs[i]) for i in batch]
                first = int(self.doc_offsets[batch[0]])
                for layer in range(self.n_layers):
                    for which, tensor in enumerate((keys, values)):
                        valid = torch.cat([tensor[row, layer, :n] for row, n in enumerate(lengths)])  # [tok, kv, d]
                        self._write(fds[layer], which, first, valid.transpose(0, 1).to(self.dtype).contiguous())
                done = batch[-1] + 1
                for fd in fds:  # the data is on disk before the progress file says so
                    os.fsync(fd)
                n_tok = int(sum(lengths))
                committed.append(dict(docs_done=done, first_token=first, tokens=n_tok,
                                      crc32=self._range_crc(fds, first, n_tok)))
                tmp = progress_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"format": FORMAT, "key": self.key, "docs_done": done, "batches": committed}))
                os.replace(tmp, progress_path)
                bar.update(sum(lengths))
        for fd in fds:
            os.fsync(fd)
            os.close(fd)
        files = [self._layer_path(partial, l) for l in range(self.n_layers)] + [partial / "instruction.safetensors"]
        with tqdm(total=sum(f.stat().st_size for f in files), desc="checksum KV cache", unit="B", unit_scale=True,
                  disable=not self.progress, leave=False) as bar:
            crc = {f.name: _crc32_file(f, bar) for f in files}
        progress_path.unlink()
        (partial / "manifest.json").write_text(json.dumps({
            "format": FORMAT, "key": self.key, "model": self.model.name, "dtype": str(self.dtype),
            "n_docs": len(self.order), "n_tokens": self.n_tokens, "layers": self.n_layers, "crc32": crc,
        }, indent=1))
        if self.root.exists():
            shutil.rmtree(self.root)
        os.replace(partial, self.root)

    def _committed_batches(self, progress_path: Path) -> list[dict]:
        """The batches a killed build committed, as its progress file lists them; an unreadable or
        foreign progress file means starting over (said on stderr), never trusting it."""
        if not progress_path.is_file():
            return []
        try:
            progress = json.loads(progress_path.read_text())
            batches = progress["batches"] if progress.get("key") == self.key and progress.get("format") == FORMAT else None
            if batches is None or not all({"docs_done", "first_token", "tokens", "crc32"} <= set(b) for b in batches):
                raise ValueError("not this cache's progress")
            return list(batches)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            log.warning(f"{progress_path} is unreadable or from another build; rebuilding the KV cache from the start")
            return []

    def _verified_prefix(self, fds: list[int], committed: list[dict]) -> list[dict]:
        """The committed batches whose bytes still match their checksums, up to the first that does
        not (bytes torn by a kill are prefilled again)."""
        for i, batch in enumerate(committed):
            if self._range_crc(fds, batch["first_token"], batch["tokens"]) != batch["crc32"]:
                log.warning(f"KV cache batch {i} (documents before {batch['docs_done']}) fails its checksum; "
                            "prefilling from there again")
                return committed[:i]
        return committed

    def _range_crc(self, fds: list[int], first_token: int, n_tokens: int) -> int:
        """crc32 of storage tokens [first, first + n) in every layer, key and value, KV head."""
        crc = 0
        size = n_tokens * self.d_head * self.itemsize
        for fd in fds:
            for which in range(2):
                for head in range(self.n_kv):
                    offset = ((which * self.n_kv + head) * self.n_tokens + first_token) * self.d_head * self.itemsize
                    crc = zlib.crc32(os.pread(fd, size, offset), crc)
        return crc

    def _write(self, fd: int, which: int, first_token: int, tensor: torch.Tensor) -> None:
        """tensor [kv_head, tokens, d] -> its place in a layer file."""
        data = tensor.view(torch.int16).numpy() if self.itemsize == 2 else tensor.numpy()
        for head in range(self.n_kv):
            offset = ((which * self.n_kv + head) * self.n_tokens + first_token) * self.d_head * self.itemsize
            os.pwrite(fd, data[head].tobytes(), offset)

    def _read(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage tokens [start, stop) of a layer: keys, values [kv_head, stop - start, d], views
        of the mapped file (each head's rows contiguous)."""
        t = self._layers[layer]
        return t[0, :, start:stop], t[1, :, start:stop]

    # -------------------------------------------------------------------------- the engine's side
    def prefill(self, corpus: list[int]) -> None:
        """Everything is on disk already."""

    def _plan(self, stream: QueryStream) -> tuple[int, list[int], torch.Tensor]:
        """(prefix tokens, storage indices of documents past the prefix, storage doc -> corpus position)."""
        lookup = torch.full((len(self.order),), -1, dtype=torch.long)
        storage = self.rank[torch.tensor(stream.corpus)]
        lookup[storage] = torch.arange(len(stream.corpus))
        ranks = sorted(storage.tolist())
        prefix = 0
        while prefix < len(ranks) and ranks[prefix] == prefix:
            prefix += 1
        return int(self.doc_offsets[prefix]), ranks[prefix:], lookup

    def feed(self, layer: int, streams: list[QueryStream]) -> None:
        for s in streams:
            if s.source_plan is None:
                s.source_plan = self._plan(s)
        plans = [s.source_plan for s in streams]
        inst_k, inst_v = self.instruction.keys[layer], self.instruction.values[layer]
        inst_doc = torch.full((inst_k.shape[1],), -1, dtype=torch.long)
        # the instruction: attended by every stream (routed or not), one kernel call for all
        update_shared([s.attention for s in streams], inst_k, inst_v, [inst_doc] * len(streams))

        def update(s, keys, values, key_doc):
            self.update(s, layer, keys, values, key_doc)

        longest = max(p[0] for p in plans)
        for start in range(0, longest, self.chunk_tokens):  # the shared prefix: read once for all streams
            stop = min(start + self.chunk_tokens, longest)
            keys, values = self._read(layer, start, stop)
            docs = self.token_doc[start:stop]
            whole = []  # streams that attend the whole chunk share one kernel call
            for s, (prefix, _, lookup) in zip(streams, plans):
                if prefix >= stop and not s.attends_routed(layer):
                    whole.append((s, lookup))
                elif prefix > start:
                    end = min(stop, prefix) - start
                    update(s, keys[:, :end], values[:, :end], lookup[docs[:end]])
            if whole:
                update_shared([s.attention for s, _ in whole], keys, values, [lookup[docs] for _, lookup in whole])
        # documents past the prefix (the queries' gold documents): each read once, and one kernel
        # call for every stream that holds it and attends it whole
        holders: dict[int, list[int]] = {}
        for i, (_, extra, _) in enumerate(plans):
            for r in extra:
                holders.setdefault(r, []).append(i)
        for r in sorted(holders):
            a, b = int(self.doc_offsets[r]), int(self.doc_offsets[r + 1])
            keys, values = self._read(layer, a, b)
            docs = self.token_doc[a:b]
            whole = [i for i in holders[r] if not streams[i].attends_routed(layer)]
            for i in holders[r]:
                if i not in whole:
                    update(streams[i], keys, values, plans[i][2][docs])
            if len(whole) == 1:
                update(streams[whole[0]], keys, values, plans[whole[0]][2][docs])
            elif whole:
                update_shared([streams[i].attention for i in whole], keys, values, [plans[i][2][docs] for i in whole])

    def close(self) -> None:
        """Drops this cache's maps (each is unmapped once no tensor read from it is left)."""
        self._layers = []
