"""The attention math: score functions (interventions), block-sparse prefill, corpus attention."""
