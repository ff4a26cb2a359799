"""Named host-side spans of the engine's step loop, recorded in a `jax.profiler` trace.

    SCHEDULE  event loop     the scheduler builds the next ScheduledBatch
    INPUTS    compute thread the runner pads the batch into its bucket's host arrays
    DISPATCH  compute thread the jitted forward and sampler are enqueued (inputs copied to the device)
    RESULTS   compute thread waiting for the step's results and copying them to the host
    APPLY     event loop     the scheduler records the results; outputs go to the request streams

tools.profile_step reads them beside XLA's per-op events to say where a step's time goes. Outside a
trace a span costs about a microsecond; JAX is imported only when the first span opens.
"""

from __future__ import annotations

SCHEDULE = "kvloom.schedule"
INPUTS = "kvloom.inputs"
DISPATCH = "kvloom.dispatch"
RESULTS = "kvloom.results"
APPLY = "kvloom.apply"
HOST_SPANS = (SCHEDULE, INPUTS, DISPATCH, RESULTS, APPLY)


def span(name: str):
    """A context manager marking `name` on the calling thread in a running profiler trace."""
    from jax.profiler import TraceAnnotation

    return TraceAnnotation(name)
