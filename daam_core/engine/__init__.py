"""The DAAM engine: torch, numpy and OpenCV only; no host, no model library."""
