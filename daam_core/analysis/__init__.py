"""The paper's analyses over traces: syntax relations, entanglement, studies of many prompts.

Modules (nothing here is imported by ``import daam_core``):

- :mod:`.syntax`: spaCy parse of a prompt, aligned to its token layout (optional extra ``[syntax]``)
- :mod:`.relations`: head/dependent map overlap (mIoU, mIoD, mIoH) per pair and the paper's table
- :mod:`.entanglement`: cohyponym prompts and overlap, adjective spread, object matching
- :mod:`.shapes_truth`: one shapes-model image scored against the objects it really drew
- :mod:`.study`, :mod:`.report`, :mod:`.cli`: ``daam study`` / ``daam report``
"""
