"""A while_loop whose trip count is data-dependent, with a static estimate of it that `plan` can read:
the body runs in a named scope `mean_trips=<n>` and plan_flops multiplies the body's FLOPs by n.

(A jaxpr has no trip count for a while_loop, so a FLOP count from it sees the body once.)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

SCOPE = "mean_trips="
_PATTERN = re.compile(re.escape(SCOPE) + r"([0-9.]+)")


def counted_while(lower, upper, body, init, mean_trips: float):
    """`fori_loop(lower, upper, body, init)` as a while_loop whatever its bounds (a static-bound
    fori_loop becomes a scan), its body in the scope that says it runs `mean_trips` times on average."""
    scope = f"{SCOPE}{float(mean_trips):.3f}"   # fixed-point: the pattern reads no exponent

    def step(state):
        index, carry = state
        with jax.named_scope(scope):
            return index + 1, body(index, carry)

    return jax.lax.while_loop(lambda state: state[0] < upper, step,
                              (jnp.asarray(lower, jnp.int32), init))[1]


def mean_trips(body_jaxpr) -> float:
    """The estimate a counted_while put on its body (the innermost scope), 1.0 for another while."""
    jaxpr = getattr(body_jaxpr, "jaxpr", body_jaxpr)
    for eqn in jaxpr.eqns:
        found = _PATTERN.findall(str(eqn.source_info.name_stack))
        if found:
            return float(found[-1])
    return 1.0
