"""What the prompt graph says before sampling: nodes after 'DAAM Trace Model' that will undo its hook."""

from __future__ import annotations

# Core nodes that set their own ``optimized_attention_override`` on a MODEL without calling the one already there
# (``ModelPatcher.set_model_optimized_attention``): DAAM's override, installed earlier, is dropped.
REPLACES_ATTENTION = {"ModelAttentionBackend"}


def attention_replacers_after(prompt: dict | None, node_id: str | None) -> list[str]:
    """One warning per node of ``REPLACES_ATTENTION`` that takes its input, directly or further down, from node
    ``node_id`` of an API-format ``prompt``. Empty when either is unknown."""
    if not prompt or node_id is None:
        return []
    reached, frontier = {str(node_id)}, [str(node_id)]
    while frontier:
        source = frontier.pop()
        for nid, node in prompt.items():
            nid = str(nid)
            if nid in reached:
                continue
            links = (v for v in (node.get("inputs") or {}).values() if isinstance(v, list) and len(v) == 2)
            if any(str(link[0]) == source for link in links):
                reached.add(nid)
                frontier.append(nid)
    return [f"node {nid} '{prompt[nid]['class_type']}' comes after DAAM Trace Model and replaces its attention "
            f"hook without calling it, so nothing is recorded through it: put it before DAAM Trace Model"
            for nid in sorted(reached - {str(node_id)}, key=lambda n: (len(n), n))
            if prompt[nid].get("class_type") in REPLACES_ATTENTION]
