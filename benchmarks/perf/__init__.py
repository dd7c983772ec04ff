"""Layer 7, perf: measuring tools (profile, GPU check, timings, throughput); nothing in the
engine imports them."""
