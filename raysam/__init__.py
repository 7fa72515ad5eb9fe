"""raysam: Segment Anything over large areas of Sentinel-2 imagery, as a Ray batch processor."""

__version__ = "0.1.0"
