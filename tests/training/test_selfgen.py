import random

import numpy as np

from training import selfgen

SRC = '''
def short(x):
    return x


def documented(a, b):
    """Add two numbers and return the sum of them, checking both are numbers first.

    Second paragraph, not used.
    """
    if not isinstance(a, (int, float)):
        raise TypeError(a)
    if not isinstance(b, (int, float)):
        raise TypeError(b)
    return a + b


class C:
    def method(self):
        x = 1
        y = 2
        z = 3
        w = 4
        v = 5
        return x + y + z + w + v
'''


def test_functions_keep_long_definitions_in_file_order_with_their_first_docstring_paragraph():
    fns = selfgen.functions(SRC)
    assert [f.name for f in fns] == ["documented", "method"]
    assert (
        fns[0].head == 'def documented(a, b):\n    """Add two numbers and return the sum of them, '
        "checking both are numbers first.\n\n"
    )
    assert fns[0].doc == "Add two numbers and return the sum of them, checking both are numbers first."
    assert fns[1].head.startswith("def method(self):\n")  # dedented out of the class
    assert fns[1].doc == ""
    assert selfgen.functions("def broken(:\n") == []


def test_chat_requests_need_a_docstring_except_explanations():
    fn = selfgen.functions(SRC)[1]  # no docstring
    kinds = [selfgen.chat_request(fn, random.Random(seed)) for seed in range(40)]
    assert any(k is None for k in kinds)
    assert all(k is None or k.startswith("Explain what this Python function does.") for k in kinds)
    documented = selfgen.functions(SRC)[0]
    texts = {selfgen.chat_request(documented, random.Random(seed)).split()[0] for seed in range(40)}
    assert texts == {"Explain", "Write", "Summarise", "Rewrite"}


def test_batches_sort_by_length_within_blocks_and_drop_long_prompts():
    prompts = [[1] * n for n in (5, 3, 200, 4, 1, 2)]
    assert selfgen.batches(prompts, 2, max_prompt=160) == [[[1], [1] * 2], [[1] * 3, [1] * 4], [[1] * 5]]
    # blocks of 8 batches: a later block is sorted on its own
    many = [[1] * n for n in range(20, 0, -1)]
    first_block = selfgen.batches(many, 1)[:8]
    assert [len(b[0]) for b in first_block] == list(range(13, 21))


def test_pack_separates_sequences_with_one_eos_and_drops_the_tail():
    windows = selfgen.pack([[5, 6, 0], [7, 8], [9]], eos=0, seq_len=3)
    np.testing.assert_array_equal(windows, [[5, 6, 0], [7, 8, 0]])
    assert windows.dtype == np.int64
