"""Shared pytest setup: a bounded hypothesis profile (no deadlines: kernels may take a while
on 2 shared cores)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dart", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("dart")
