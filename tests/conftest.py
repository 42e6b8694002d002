"""Settings for the whole suite.

Hypothesis times each example against a deadline (200 ms) and fails a test whose data generation is slow
(``HealthCheck.too_slow``): both measure the machine, not the code, and fail on a busy one (a round trip of
the line grammar took 291 ms beside three other test runs). The properties are checked without them.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("chashd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("chashd")
