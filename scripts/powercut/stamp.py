"""Self-describing 512-byte sectors for the power-cut test.

Every sector a writer puts on a version carries: a magic, the code of the
export it was written to, its own sector number, the id of the write that
put it there, a filler derived from those, and a crc32 of all of that. So
after a crash a sector read back is exactly one of: all zero (never
written), a valid stamp (which write, and whether it sits where that write
put it), or garbage (bad crc or magic).
"""
import struct
import zlib

SECTOR = 512
MAGIC = b"PCUT"
_HEAD = struct.Struct("<4sIQQ")  # magic, export code, sector, write id
_FILL = SECTOR - _HEAD.size - 4
_CRC = struct.Struct("<I")
ZERO = bytes(SECTOR)

# Export codes: which version a stamp was written to.
ORIGIN = 1
WRITABLE = 3  # the snapshot of a snapshot the clients write to


def _filler(wid, sector):
    seed = struct.pack("<QQ", wid ^ 0x9E3779B97F4A7C15, sector * 0xD6E8FEB86659FD93 & (2**64 - 1))
    return (seed * (_FILL // 16 + 1))[:_FILL]


def sector_bytes(export, sector, wid):
    body = _HEAD.pack(MAGIC, export, sector, wid) + _filler(wid, sector)
    return body + _CRC.pack(zlib.crc32(body))


def write_buffer(export, first_sector, nsectors, wid):
    """The payload of one write: nsectors stamps, starting at first_sector."""
    head = _HEAD.pack
    parts = []
    for s in range(first_sector, first_sector + nsectors):
        body = head(MAGIC, export, s, wid) + _filler(wid, s)
        parts.append(body)
        parts.append(_CRC.pack(zlib.crc32(body)))
    return b"".join(parts)


def decode(buf, first_sector=0):
    """Yield (sector, kind, export, stamped_sector, wid) for each sector of
    buf, kind being 'zero', 'stamp' or 'garbage'."""
    mv = memoryview(buf)
    crc32 = zlib.crc32
    for i in range(len(buf) // SECTOR):
        o = i * SECTOR
        s = first_sector + i
        magic, export, ssec, wid = _HEAD.unpack_from(mv, o)
        if magic == MAGIC and crc32(mv[o:o + SECTOR - 4]) == _CRC.unpack_from(mv, o + SECTOR - 4)[0]:
            yield s, "stamp", export, ssec, wid
        elif mv[o:o + SECTOR] == ZERO:
            yield s, "zero", 0, 0, 0
        else:
            yield s, "garbage", 0, 0, 0
