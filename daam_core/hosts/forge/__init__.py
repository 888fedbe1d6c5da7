"""Stable Diffusion WebUI Forge host: tracing through Forge's UNet patcher (``session``), token layouts from what
Forge encoded (``tokens``), and the extension's logic behind ``scripts/daam_forge.py`` (``extension``)."""
