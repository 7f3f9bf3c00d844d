"""State entries kept small in memory. Entries of one kind share most of their text (a workflow entry's field names,
its workflow's type and steps, its commands' shape), so each is kept compressed with zstandard against a dictionary
made of the first entries the store held: a 734-byte workflow entry keeps about 140 bytes, and 200 000 open workflows
fit in well under 150 MB. Until it has seen enough entries to make that dictionary of, an entry is kept as it is.
Only memory holds entries packed: Kafka holds them as JSON, and each process makes its own dictionary. No Kafka."""

import ctypes

import zstandard

SAMPLES = 8          # entries the dictionary is made of
SMALLEST = 200       # bytes: an entry shorter than this is kept as it is (packing it saves little)
FRAME = b"\x28\xb5\x2f\xfd"  # how a zstandard frame begins (an entry kept as it is begins with JSON)


class Packer:
    """Packs and unpacks one store's entries. Not for two threads at once (each zstandard context is one thread's)."""

    def __init__(self):
        self.samples: list[bytes] = []
        self.compressor: zstandard.ZstdCompressor | None = None
        self.decompressor: zstandard.ZstdDecompressor | None = None

    def pack(self, raw: bytes) -> bytes:
        """An entry as memory keeps it: packed once the dictionary is made, else as it is."""
        if len(raw) < SMALLEST:
            return raw
        if self.compressor is None:
            self._learn(raw)
            return raw
        return bytes(memoryview(self.compressor.compress(raw)))  # (a copy the packed size: zstandard's own result
        # keeps the whole buffer it was given, as large as the entry)

    def unpack(self, kept: bytes) -> bytes:
        """An entry as it was stored (JSON)."""
        return self.decompressor.decompress(kept) if kept[:4] == FRAME else kept

    def _learn(self, raw: bytes) -> None:
        """Keep an entry as a sample; with enough of them, make the dictionary (a plain concatenation: zstandard
        finds in it the text entries share)."""
        self.samples.append(raw)
        if len(self.samples) == SAMPLES:
            words = zstandard.ZstdCompressionDict(b"".join(self.samples), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            words.precompute_compress(level=-1)  # (else each entry packed reads the dictionary again)
            self.compressor = zstandard.ZstdCompressor(level=-1, dict_data=words, write_checksum=False,
                                                       write_dict_id=False)
            self.decompressor = zstandard.ZstdDecompressor(dict_data=words)
            self.samples = []


def hand_back_freed() -> None:
    """Give back to the system the memory a read-back used and freed. glibc keeps freed memory that lies between
    memory in use (the records read back lie between the entries kept): 200 000 entries read back leave ~20 MB so,
    which malloc_trim hands back. Elsewhere than glibc, nothing is done."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
