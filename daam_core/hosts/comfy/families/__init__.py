"""The joint-attention model families DAAM traces on ComfyUI.

A family is one module here that subclasses :class:`~.base.JointFamily` (which host network classes it covers, how
to read the model's numbers, where the text and the generated image sit on a call's sequence, how its layers are
named, which encoders make its conditioning) and calls :func:`~.base.register`; then it is imported below.
Nothing else changes for a new family: the session, the record filter checks, the layouts and the refusal
message all read the registry.
"""

# registered in this order: the order of the supported list
from . import sd3, flux, chroma, wan, qwen_image, lumina, ltxv, hunyuan, flux2, hidream  # noqa: F401
from .base import FAMILIES, DiTSpec, JointFamily, dit_spec, family_name, register, supported

__all__ = ["FAMILIES", "DiTSpec", "JointFamily", "dit_spec", "family_name", "register", "supported"]
