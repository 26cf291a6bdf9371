"""Commands beside training: evaluate, predict, doctor, and the benchmarks against the lesson."""
