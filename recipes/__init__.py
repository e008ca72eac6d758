"""The recipes, shipped in the wheel as ``minift.recipes`` so that the ``minift`` command finds them."""
