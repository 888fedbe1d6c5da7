"""Installing DAAM's hooks on a clone of a ComfyUI MODEL (the only module that touches ComfyUI's patcher)."""

from __future__ import annotations

from ..daam_core.engine.recorder import RecordFilter
from ..daam_core.engine.refine import RefineRecording
from ..daam_core.hosts.comfy.dit import DiTTraceSession
from ..daam_core.hosts.comfy.maps import new_session
from ..daam_core.hosts.comfy.session import OPTIONS_KEY, WRAPPER_KEY, TraceSession, session_of  # noqa: F401 (importers of 0.2)


def patch_model(model, filter: RecordFilter, refine: RefineRecording | None = None):
    """A clone of ``model`` that records cross-attention (UNets) or joint attention (SD3, Flux) into a new
    :class:`TraceSession`. A model family DAAM cannot trace raises ValueError naming it. ``refine`` (UNets) also
    records the refinements' sums (self-attention through an ``attn1`` patch, per-head sums).

    Returns
    -------
    (ModelPatcher, TraceSession)
    """
    import comfy.patcher_extension as ext

    session = new_session(model, filter, refine)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to["optimized_attention_override"] = session.attention_override(to.get("optimized_attention_override"))
    to[OPTIONS_KEY] = session
    if not isinstance(session, DiTTraceSession):  # UNets mark their cross-attention calls
        m.set_model_attn2_patch(session.attn2_patch)
        if refine is not None and refine.self_attention:
            m.set_model_attn1_patch(session.attn1_patch)
    m.remove_wrappers_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    m.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, session.outer_sample)
    m.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, session.apply_model)
    return m, session

