"""The attention math: score functions (interventions), block-sparse prefill, corpus attention.

Importing any of it registers the interventions (:mod:`kernels.interventions`)."""

import kernels.interventions  # noqa: F401
