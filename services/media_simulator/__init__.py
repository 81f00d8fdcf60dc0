"""The media-platform simulator daemon: stands in for the media servers (MPP) that place outbound calls."""
