"""benchmarks.common: the Markdown tables every benchmark prints."""

from benchmarks.common import markdown_table


def test_markdown_table_aligns_the_first_columns_left_and_keeps_short_rows():
  text = markdown_table(["a", "b", "c"], [["x", "1", "2"], ["y", "skipped"]], left=1)
  assert text.splitlines() == ["| a | b | c |", "|---|---:|---:|", "| x | 1 | 2 |",
                               "| y | skipped |"]
  assert markdown_table(["a", "b"], []).splitlines() == ["| a | b |", "|---|---|"]
