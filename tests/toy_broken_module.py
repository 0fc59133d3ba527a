"""A module that fails while importing (for `torch:` spec errors)."""

raise RuntimeError("this module cannot be imported")
