#!/usr/bin/env python3
"""Write the seed corpus for fuzz_npy into fuzz/corpus/npy/.

The seeds are small valid and invalid .npy files. They are built with struct
rather than NumPy, so the script runs without NumPy. The headers follow the
layout of numpy/lib/format.py without the growth-axis spaces of newer NumPy
releases, so the reader also sees the older layout. Rerun it after changing
the seeds:
    python3 fuzz/make_npy_seeds.py
"""
import pathlib
import struct

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus" / "npy"
MAGIC = b"\x93NUMPY"


def npy(dict_text, data, major=1, align=64):
    """Return a .npy file whose data starts at a multiple of align bytes."""
    preamble_size = 10 if major == 1 else 12
    header = dict_text.encode("ascii")
    padding = -(preamble_size + len(header) + 1) % align
    header += b" " * padding + b"\n"
    length = struct.pack("<H" if major == 1 else "<I", len(header))
    return MAGIC + bytes([major, 0]) + length + header + data


def header(descr, shape, fortran_order="False"):
    return "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran_order, shape)


def floats(*values):
    return struct.pack("<%df" % len(values), *values)


def int64s(*values):
    return struct.pack("<%dq" % len(values), *values)


SEEDS = {
    # Valid files.
    "valid_f4_2x3.npy": npy(header("<f4", "(2, 3)"), floats(0, 1, 2, 3, 4, 5)),
    "valid_f4_scalar.npy": npy(header("<f4", "()"), floats(1.5)),
    "valid_f4_empty.npy": npy(header("<f4", "(0, 4)"), b""),
    "valid_f4_rank4.npy": npy(header("<f4", "(1, 2, 1, 2)"), floats(1, -1, 0.5, float("nan"))),
    "valid_i8_3.npy": npy(header("<i8", "(3,)"), int64s(-1, 0, 2**62)),
    "valid_v2.npy": npy(header("<f4", "(2,)"), floats(1, 2), major=2),
    "valid_v3_reordered.npy": npy("{\"shape\": (2L,), \"descr\": \"<f4\", \"fortran_order\": False}",
                                  floats(1, 2), major=3),
    "valid_align16.npy": npy(header("<f4", "(1,)"), floats(7), align=16),
    # Invalid files.
    "bad_dtype_f8.npy": npy(header("<f8", "(2,)"), struct.pack("<2d", 1, 2)),
    "bad_big_endian.npy": npy(header(">f4", "(2,)"), struct.pack(">2f", 1, 2)),
    "bad_fortran.npy": npy(header("<f4", "(2, 2)", "True"), floats(1, 2, 3, 4)),
    "bad_magic.npy": b"\x93NUMPZ\x01\x00" + npy(header("<f4", "(1,)"), floats(1))[8:],
    "bad_version.npy": MAGIC + b"\x04\x00" + npy(header("<f4", "(1,)"), floats(1))[8:],
    "bad_header_length.npy": MAGIC + b"\x01\x00" + struct.pack("<H", 4000) + b"{'descr': '<f4'",
    "bad_negative_dim.npy": npy(header("<f4", "(-1, 2)"), floats(1, 2)),
    "bad_huge_dims.npy": npy(header("<f4", "(4294967296, 4294967296, 0)"), b""),
    "bad_not_tuple.npy": npy(header("<f4", "(2)"), floats(1, 2)),
    "bad_truncated.npy": npy(header("<f4", "(4,)"), floats(1, 2, 3)),
    "bad_trailing.npy": npy(header("<f4", "(1,)"), floats(1, 2)),
}


def main():
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(SEEDS.items()):
        (CORPUS / name).write_bytes(content)
    print("wrote %d seeds to %s" % (len(SEEDS), CORPUS))


if __name__ == "__main__":
    main()
