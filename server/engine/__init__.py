"""The engine: sequences, sampling, scheduling, the step loop."""
