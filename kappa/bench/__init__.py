"""`scripts/bench`: kappa's batch replay against a raw consumer, naive Faust, Quix Streams and
pandas, on one topic in one run, each checked against the pandas oracle.

Every contender runs in its own process, so its peak RSS (from wait4) is its own and no
contender warms a cache for the next one.
"""
