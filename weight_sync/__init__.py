"""Kiln weight sync: move trainer weights into inference engines."""
