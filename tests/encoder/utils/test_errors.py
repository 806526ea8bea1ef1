"""first_line: what a one-line UserError quotes of a library's error."""

from encoder.utils.errors import first_line


def test_first_line_keeps_the_first_line_only():
    err = OSError("  no such file: x\nTraceback (most recent call last):\n  ...")
    assert first_line(err) == "no such file: x"
    assert first_line(err, with_type=True) == "OSError: no such file: x"


def test_an_empty_message_gives_the_type_name_once():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(EOFError(""), with_type=True) == "EOFError"
    assert first_line(None) == "NoneType"  # tenacity's last attempt may hold no exception
