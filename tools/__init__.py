"""The command-line tools, shipped in the wheel as ``minift.tools`` so that the ``minift`` command finds them."""
