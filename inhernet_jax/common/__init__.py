"""What every part of the package shares and nothing else: path rules (`rules`: regex
rules as data, first full match wins) and small helpers (`utils`: atomic writes, JSON
conversion, tree-path names).

May import: nothing of `inhernet_jax` (the ground floor).
"""
