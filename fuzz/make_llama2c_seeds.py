#!/usr/bin/env python3
"""Write the seed corpora for fuzz_checkpoint and fuzz_tokenizer.

fuzz/corpus/checkpoint/ gets tiny llama2.c checkpoints (legacy float32
format: seven int32 header fields, then float32 weights) and
fuzz/corpus/tokenizer/ gets fuzz_tokenizer inputs: an int32 vocab_size, a
uint8 text length, the text, then a llama2.c tokenizer file. Both contain valid
files and invalid ones. The weights are generated deterministically, so the
script needs only the Python standard library. Rerun it after changing the
seeds:
    python3 fuzz/make_llama2c_seeds.py
"""
import math
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
CHECKPOINT_CORPUS = FUZZ / "corpus" / "checkpoint"
TOKENIZER_CORPUS = FUZZ / "corpus" / "tokenizer"

# ---------------------------------------------------------------------------
# Checkpoints.


def checkpoint_floats(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len):
    """Return the float count that follows the header of a valid checkpoint."""
    vocab = abs(vocab_size)
    head_dim = dim // n_heads
    kv_dim = head_dim * n_kv_heads
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden_dim * dim
    count = vocab * dim + n_layers * per_layer + dim + seq_len * head_dim
    if vocab_size < 0:
        count += vocab * dim  # wcls, the separate classifier
    return count


def checkpoint(fields, float_count=None):
    """Return a checkpoint with header `fields` and float i set to sin(i) / 2."""
    if float_count is None:
        float_count = checkpoint_floats(*fields)
    values = [math.sin(i) / 2 for i in range(float_count)]
    return struct.pack("<7i", *fields) + struct.pack("<%df" % float_count, *values)


# Header fields: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.
SHARED = (4, 8, 1, 2, 1, 8, 4)        # 2 query heads share 1 KV head
SEPARATE = (4, 8, 1, 2, 2, -8, 4)     # negative vocab_size: wcls follows
TWO_LAYERS = (8, 4, 2, 2, 2, 6, 2)

CHECKPOINT_SEEDS = {
    "valid_shared.bin": checkpoint(SHARED),
    "valid_separate.bin": checkpoint(SEPARATE),
    "valid_two_layers.bin": checkpoint(TWO_LAYERS),
    "bad_one_byte_short.bin": checkpoint(SHARED)[:-1],
    "bad_one_byte_long.bin": checkpoint(SHARED) + b"\x00",
    "bad_separate_without_wcls.bin": checkpoint(SEPARATE, checkpoint_floats(*SHARED)),
    "bad_short_header.bin": struct.pack("<3i", 4, 8, 1),
    "bad_huge_dim.bin": struct.pack("<7i", 2**30, 8, 1, 2, 1, 8, 4),
    "bad_overflow.bin": struct.pack("<7i", 2**30, 2**30, 2**30, 2, 2, 8, 4),
    "bad_negative_layers.bin": checkpoint((4, 8, -1, 2, 1, 8, 4), 16),
    "bad_kv_heads.bin": checkpoint((8, 8, 1, 4, 3, 8, 4), 16),
    "bad_odd_head_dim.bin": checkpoint((6, 8, 1, 2, 1, 8, 4), 16),
}

# ---------------------------------------------------------------------------
# Tokenizers.


def base_vocabulary():
    """Return the first 259 tokens of a llama2.c tokenizer: <unk>, BOS, EOS, bytes."""
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    pieces += [(b"<0x%02X>" % b, 0.0) for b in range(256)]
    return pieces


def tokenizer_file(max_token_length, vocabulary):
    data = struct.pack("<i", max_token_length)
    for piece, score in vocabulary:
        data += struct.pack("<fi", score, len(piece)) + piece
    return data


def fuzz_input(vocab_size, text, file_bytes):
    """Return a fuzz_tokenizer input: vocab_size, text length, text, file."""
    assert len(text) < 256
    return struct.pack("<iB", vocab_size, len(text)) + text + file_bytes


STORY = [(b" ", -1000.0), (b"O", -5.0), (b"n", -4.0), (b"c", -4.5), (b"e", -3.0), (b"a", -2.0),
         (b"b", -2.5), (b"On", 1.0), (b"ce", 2.0), (b"Once", 3.0), (b" Once", 4.0), (b"aa", 5.0),
         (b"ab", 5.0), (b"ba", 5.0), (b" a", 0.5), (b"\xc3\xa9", -1.0), (b"caf\xc3\xa9", 6.0),
         (b"ca", 1.5), (b"caf", 2.5), (b"\xe2\x82\xac", -1.0)]

# Duplicate pieces (the first wins), an empty piece, scores at the -1e10
# floor, NaN and infinity, lowercase byte pieces and a second "<0x41>".
EDGE = [(b" ", 0.0), (b"a", 1.0), (b"a", 9.0), (b"", 3.0), (b"aa", -1e10), (b" a", float("nan")),
        (b"ab", float("inf")), (b"b", 0.0), (b"<0x41>", 7.0), (b"<0x", 2.0), (b"\x00", 1.0)]


def lowercase_bytes(vocabulary):
    return [(piece.lower() if 3 <= i < 259 else piece, score) for i, (piece, score) in enumerate(vocabulary)]


story_vocabulary = base_vocabulary() + STORY
edge_vocabulary = lowercase_bytes(base_vocabulary()) + EDGE
story = tokenizer_file(8, story_vocabulary)
edge = tokenizer_file(6, edge_vocabulary)
story_size = len(story_vocabulary)
edge_size = len(edge_vocabulary)

no_space = base_vocabulary() + [(b"a", 0.0)]
wrong_byte = base_vocabulary() + [(b" ", 0.0)]
wrong_byte[3 + 0x41] = (b"A", 0.0)
negative_length = tokenizer_file(8, story_vocabulary[:-1]) + struct.pack("<fi", 0.0, -5)
too_long = tokenizer_file(8, story_vocabulary[:-1]) + struct.pack("<fi", 0.0, 9) + b"123456789"
# A length that max_token_length allows but the file cannot hold.
huge_length = tokenizer_file(2**31 - 1, story_vocabulary[:-1]) + struct.pack("<fi", 0.0, 2**31 - 1) + b"x"

TOKENIZER_SEEDS = {
    "valid_story.bin": fuzz_input(story_size, b"Once upon a caf\xc3\xa9 aab ba", story),
    "valid_story_blocks.bin": fuzz_input(story_size, b"Once\n\n \n ab \xe2\x82\xac\r\n\nba", story),
    "valid_edge.bin": fuzz_input(edge_size, b"aaab <0x41>A\x00", edge),
    "valid_invalid_utf8_text.bin": fuzz_input(story_size, b"caf\xe9 \xed\xa0\x80", story),
    "bad_truncated.bin": fuzz_input(story_size, b"a", story[:-1]),
    "bad_extra_bytes.bin": fuzz_input(story_size, b"a", story + b"xyz"),
    "bad_vocab_too_small.bin": fuzz_input(100, b"a", story),
    "bad_vocab_huge.bin": fuzz_input(2**31 - 1, b"a", story[:64]),
    "bad_no_space.bin": fuzz_input(len(no_space), b"a", tokenizer_file(8, no_space)),
    "bad_wrong_byte_piece.bin": fuzz_input(len(wrong_byte), b"a", tokenizer_file(8, wrong_byte)),
    "bad_negative_length.bin": fuzz_input(story_size, b"a", negative_length),
    "bad_length_over_max.bin": fuzz_input(story_size, b"a", too_long),
    "bad_huge_length.bin": fuzz_input(story_size, b"a", huge_length),
    "bad_zero_max_length.bin": fuzz_input(story_size, b"a", struct.pack("<i", 0) + story[4:]),
}


def write_corpus(folder, seeds):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(seeds.items()):
        (folder / name).write_bytes(content)
    print("wrote %d seeds to %s" % (len(seeds), folder))


def main():
    write_corpus(CHECKPOINT_CORPUS, CHECKPOINT_SEEDS)
    write_corpus(TOKENIZER_CORPUS, TOKENIZER_SEEDS)


if __name__ == "__main__":
    main()
