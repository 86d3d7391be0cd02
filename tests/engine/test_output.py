import pytest

from engine.output import TextStream

# Byte pieces per token id; "中" is e4 b8 ad, split over ids 4 and 5.
PIECES = {
    0: b"Hello",
    1: b" wor",
    2: b"ld",
    3: b"!",
    4: b"\xe4\xb8",
    5: b"\xad",
    6: b"ST",
    7: b"OP",
    8: b" S",
    9: b"x",
    10: b"TOP",
    11: b"\xe6\x96\x87",  # "文", whole
}


class FakeTokenizer:
    """Byte-level decode: an incomplete UTF-8 tail decodes to U+FFFD, like HF tokenizers."""

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens
        return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def decode(ids):
    return FakeTokenizer().decode(ids, skip_special_tokens=True)


def run(ids, stops=()):
    """Feeds ids one at a time like the engine; returns (deltas, matched stop)."""
    ts = TextStream(FakeTokenizer(), stops)
    deltas, matched = [], None
    for n in range(1, len(ids) + 1):
        matched = ts.update(ids[:n])
        if matched is not None:
            break
        deltas.append(ts.delta(final=False))
    deltas.append(ts.delta(final=True))
    return deltas, matched


def test_fake_tokenizer_splits_a_character():
    assert decode([4]) == "\ufffd"
    assert decode([9, 4]) == "x\ufffd"
    assert decode([9, 4, 5]) == "x中"


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [0, 4, 5, 1, 2], [4, 5, 4, 5, 11, 3], [0, 6, 7, 8, 10]])
@pytest.mark.parametrize("stops", [(), ("zzz",), ("never-matches",)])
def test_deltas_concatenate_to_the_full_text(ids, stops):
    deltas, matched = run(ids, stops)
    assert matched is None
    assert "".join(deltas) == decode(ids)
    assert "\ufffd" not in "".join(deltas)


def test_without_stops_text_streams_immediately():
    ts = TextStream(FakeTokenizer(), ())
    assert ts.update([0]) is None
    assert ts.delta(False) == "Hello"
    ts.update([0, 1])
    assert ts.delta(False) == " wor"
    assert ts.delta(False) == ""  # nothing new
    ts.update([0, 1, 2])
    assert ts.delta(False) == "ld"
    assert ts.delta(True) == ""


def test_incomplete_character_is_held_back():
    ts = TextStream(FakeTokenizer(), ())
    ts.update([0, 4])
    assert ts.delta(False) == "Hello"  # the U+FFFD tail is not sent
    ts.update([0, 4, 5])
    assert ts.delta(False) == "中"
    assert ts.text == "Hello中"


def test_incomplete_character_is_flushed_on_final():
    ts = TextStream(FakeTokenizer(), ())
    ts.update([9, 4])
    assert ts.delta(False) == "x"
    assert ts.delta(True) == "\ufffd"


def test_stop_string_across_a_token_boundary():
    deltas, matched = run([0, 6, 7, 3], stops=("STOP",))
    assert matched == "STOP"
    assert "".join(deltas) == "Hello"


def test_stop_string_truncates_the_text_and_later_text_is_dropped():
    ts = TextStream(FakeTokenizer(), ("STOP",))
    assert ts.update([0, 8]) is None
    assert ts.update([0, 8, 10]) == "STOP"  # "Hello STOP"
    assert ts.text == "Hello "
    assert ts.delta(True) == "Hello "


def test_stop_string_inside_one_token():
    ts = TextStream(FakeTokenizer(), ("wor",))
    ts.update([0])
    assert ts.update([0, 1]) == "wor"
    assert ts.text == "Hello "


def test_earliest_stop_wins():
    ts = TextStream(FakeTokenizer(), ("ld!", "wor"))
    assert ts.update([0, 1, 2, 3]) == "wor"
    assert ts.text == "Hello "


def test_possible_stop_prefix_is_held_back_until_resolved():
    ts = TextStream(FakeTokenizer(), ("STOP",))
    ts.update([0])
    sent = ts.delta(False)
    ts.update([0, 6])  # "HelloST": "ST" could start "STOP"
    sent += ts.delta(False)
    assert "S" not in sent
    assert "HelloST".startswith(sent)
    ts.update([0, 6, 9])  # "HelloSTx": not a stop after all
    sent += ts.delta(False)
    ts.update([0, 6, 9, 1])  # "HelloSTx wor"
    sent += ts.delta(False)
    assert sent.startswith("HelloSTx")  # released once it can no longer be a stop
    sent += ts.delta(True)
    assert sent == "HelloSTx wor"


def test_held_back_prefix_that_becomes_the_stop_is_never_sent():
    ts = TextStream(FakeTokenizer(), ("STOP",))
    sent = ""
    for ids in ([0], [0, 8], [0, 8, 6]):  # "Hello", "Hello S", "Hello SST"
        assert ts.update(ids) is None
        sent += ts.delta(False)
    assert "S" not in sent
    assert ts.update([0, 8, 6, 7]) == "STOP"  # "Hello SSTOP"
    sent += ts.delta(True)
    assert sent == "Hello S"


def test_final_flushes_held_text():
    ts = TextStream(FakeTokenizer(), ("a long stop string",))
    ts.update([0, 1])
    assert ts.delta(False) == ""  # all of "Hello wor" may still start the stop
    assert ts.delta(True) == "Hello wor"
    assert ts.delta(True) == ""


@pytest.mark.parametrize("stop", ["中", "x中"])
def test_stop_string_completed_by_a_multi_byte_character(stop):
    deltas, matched = run([9, 4, 5, 1], stops=(stop,))
    assert matched == stop
    assert "中" not in "".join(deltas)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_incremental_decoding_of_a_real_tokenizer_equals_decoding_everything(smollm2_tokenizer, chunk):
    """SmolLM2's byte-level BPE: spaces merged into tokens, characters split over several tokens,
    special tokens skipped; tokens arrive `chunk` at a time as speculation emits them."""
    tok = smollm2_tokenizer
    text = "Hello wörld, 中文 and 🙂🙂 in a row.\n  Indented\ttabs; naïve café. " * 3
    ids = tok(text).input_ids + [tok.eos_token_id] + tok(" tail 日本").input_ids
    ts = TextStream(tok, ())
    deltas = []
    for n in range(chunk, len(ids) + chunk, chunk):
        ts.update(ids[:n])
        deltas.append(ts.delta(final=False))
    deltas.append(ts.delta(final=True))
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert ts.read == len(ids)  # every token decoded once in a short window, none left pending
