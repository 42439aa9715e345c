"""The fast paths of codegen.rules.syntax say what its general paths say: words of a line
without quotes, and plain decimal numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from codegen.rules.syntax import Line, strtoui, tokenize, tokenize_quoted

# Blanks, the characters iptables-restore's words are made of, and the odd ones it keeps in them.
unquoted = st.text(alphabet=st.sampled_from(" \t-!/.:,_ab9Z\\\r\v\u00e9"), max_size=40)


@given(text=unquoted, start=st.integers(0, 5))
def test_words_of_a_line_without_quotes_are_the_quoted_tokenizers(text, start):
    line = Line("rules", 1, text)
    assert tokenize(line, start) == tokenize_quoted(line, start)


def test_a_quote_takes_the_general_path():
    text = '-A INPUT -m comment --comment "a b" -j ACCEPT'
    line = Line("rules", 1, text)
    assert [token.text for token in tokenize(line, 0)][5] == "a b"
    assert tokenize(line, 0)[5].column == text.index('"') + 1


def _general(text: str, maximum: int, minimum: int) -> int | None:
    """strtoui with its plain-decimal shortcut out of the way (a leading `+` skips it)."""
    return strtoui(f"+{text}", maximum, minimum) if not text.startswith(("+", "-")) else None


@given(
    text=st.text(alphabet=st.sampled_from("0123456789x+ \u0663"), min_size=1, max_size=8),
    maximum=st.sampled_from([0, 9, 255, 65535, 2**32 - 1]),
    minimum=st.sampled_from([0, 1, 10]),
)
def test_plain_decimals_read_as_the_general_path_reads_them(text, maximum, minimum):
    if text.isascii() and text.isdigit():
        assert strtoui(text, maximum, minimum) == _general(text, maximum, minimum)
    # Others, for example Arabic-Indic digits, are no number to libxtables.
    if not text.isascii():
        assert strtoui(text, maximum, minimum) is None
