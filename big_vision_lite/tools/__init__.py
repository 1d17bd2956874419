"""Command-line tools that prepare data for big_vision_lite (e.g. seg_targets)."""
